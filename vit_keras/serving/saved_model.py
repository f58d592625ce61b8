"""The SavedModel for TF Serving: `serving_default` (encoded images), `predict_images` (pixels), `attention`."""

import json
import os

import tensorflow as tf

from vit_keras import console
from vit_keras.files import atomic_dir, check_name_and_version, check_target
from vit_keras.model import attention_model
from vit_keras.precision import EXPORT_PRECISIONS, check_dtype
from vit_keras.predict import label_names, probabilities
from vit_keras.preprocessing import preprocess_inputs
from vit_keras.serving.archive import save_endpoints
from vit_keras.serving.prepare import prepare_export_model
from vit_keras.serving.images import MAX_PIXELS, checked_pixels, decode_images
from vit_keras.serving.warmup import write_warmup


def export_saved_model(model, out_dir, name=None, version=1, top_k=5, class_names=None,
                       max_pixels=MAX_PIXELS, overwrite=False, keep=(), precision="float32"):
    """Writes a SavedModel in TF Serving's layout, `out_dir/<name>/<version>/`.

    Signatures (tensor names are stable and documented in export/README.md):
    - `serving_default`: `image_bytes` (string [N], encoded JPEG/PNG/BMP/GIF of
      any size) -> `probabilities` [N, C], `classes` [N, k] (int32 indices),
      `labels` [N, k] (string), `scores` [N, k].
    - `predict_images`: `images` (float32 [N, H, W, 3], pixels 0..255) -> the same.
    - `attention`: `images` -> `attention` [N, layers, heads, T, T] and
      `rollout` [N, grid_h, grid_w] (attention rollout of the class token).

    Every signature checks its input inside the graph first (rank and shape,
    finite pixels, the pixel limit of encoded images) and answers a bad request
    with INVALID_ARGUMENT. `overwrite` replaces only an earlier export (see
    `files.atomic_dir`), never a folder holding a path in `keep`.

    `precision="bfloat16"` serves the model's `inference_copy`: weights stored
    in bfloat16, matmuls and convolutions in bfloat16 (fast where the CPU has
    AVX512_BF16 or AMX), with the same signatures: the same inputs, float32
    outputs. Default "float32".

    Returns:
        The path of the version folder.
    """
    from vit_keras import visualize

    check_dtype(precision, EXPORT_PRECISIONS, "precision")
    name = name or model.name
    check_name_and_version(name, version)
    final = os.path.join(out_dir, name, str(version))
    check_target(final, overwrite, keep)  # before the slow part
    model = prepare_export_model(model, precision)
    names = label_names(model, class_names)
    k = min(top_k, len(names))
    height, width = model.input_shape[1:3]
    grid = visualize.grid_shape(model)
    attn = attention_model(model)
    labels_table = tf.constant(names)

    # One function for both classifying signatures: the SavedModel holds the model's graph once for them
    # (one traced copy less: ~55 MB less in a process that loads R50+ViT-B/16).
    @tf.function(input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32)])
    def outputs(pixels):
        probs = probabilities(model, pixels)
        scores, classes = tf.math.top_k(probs, k=k)
        return {"probabilities": probs, "classes": classes, "labels": tf.gather(labels_table, classes),
                "scores": scores}

    # The specs leave the rank open: with [None, H, W, 3] a graph optimiser may take the
    # rank as known and fold parts of the in-graph checks away (TF Serving does not check
    # fed shapes against the signature). The checks state the expected shape.
    @tf.function(input_signature=[tf.TensorSpec(None, tf.string, name="image_bytes")])
    def serve_bytes(image_bytes):
        return outputs(decode_images(image_bytes, (height, width), max_pixels))

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="images")])
    def predict_images(images):
        return outputs(checked_pixels(images, (height, width)))

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="images")])
    def attention(images):
        images = checked_pixels(images, (height, width))
        _, weights = attn(preprocess_inputs(images), training=False)
        stacked = tf.stack([tf.cast(w, tf.float32) for w in weights], axis=1)
        return {"attention": stacked, "rollout": visualize.rollout_grid(weights, grid)}

    endpoints = {"serving_default": serve_bytes, "predict_images": predict_images, "attention": attention}
    # Phases: tracing the signatures and writing (one step: `save_endpoints` traces inside the save), the warm-up
    # request.
    with console.Progress("SavedModel", 2, "phase") as bar, console.native_output("writing the SavedModel"):
        with atomic_dir(final, overwrite, keep) as tmp:
            bar.update(0, note="tracing the signatures and writing")
            save_endpoints(tmp, endpoints, [model, attn])
            extra = os.path.join(tmp, "assets.extra")
            os.makedirs(extra, exist_ok=True)
            with open(os.path.join(extra, "class_names.json"), "w") as f:
                json.dump(names, f)
            bar.update(1, note="warm-up request")
            write_warmup(extra, name, (height, width))
        bar.update(2, note="written")
    return final
