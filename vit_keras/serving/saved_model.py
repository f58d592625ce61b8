"""The SavedModel for TF Serving: `serving_default` (encoded images), `predict_images` (pixels), `attention`."""

import json
import os

import keras
import tensorflow as tf

from vit_keras import console
from vit_keras.model import attention_model, float32_copy, fold_weight_standardization
from vit_keras.precision import EXPORT_PRECISIONS, check_dtype, inference_copy
from vit_keras.predict import label_names, probabilities
from vit_keras.preprocessing import preprocess_inputs
from vit_keras.serving.folders import _atomic_dir, _check_name_and_version, _check_target
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
    `_atomic_dir`), never a folder holding a path in `keep`.

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
    _check_name_and_version(name, version)
    final = os.path.join(out_dir, name, str(version))
    _check_target(final, overwrite, keep)  # before the slow part
    if precision == "bfloat16":
        model = inference_copy(model, "bfloat16")
    else:
        model = fold_weight_standardization(float32_copy(model))
    names = label_names(model, class_names)
    k = min(top_k, len(names))
    height, width = model.input_shape[1:3]
    grid = visualize.grid_shape(model)
    attn = attention_model(model)
    labels_table = tf.constant(names)

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
    # Phases: one per signature traced, writing the SavedModel, the warm-up request.
    with console.Progress("SavedModel", len(endpoints) + 2, "phase") as bar, \
            console.native_output("writing the SavedModel"):
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.track(attn)
        for done, (key, fn) in enumerate(endpoints.items()):
            bar.update(done, note=f"tracing {key}")
            archive.add_endpoint(key, fn)
        with _atomic_dir(final, overwrite, keep) as tmp:
            bar.update(len(endpoints), note="writing")
            archive.write_out(tmp, verbose=False)
            extra = os.path.join(tmp, "assets.extra")
            os.makedirs(extra, exist_ok=True)
            with open(os.path.join(extra, "class_names.json"), "w") as f:
                json.dump(names, f)
            bar.update(len(endpoints) + 1, note="warm-up request")
            write_warmup(extra, name, (height, width))
        bar.update(len(endpoints) + 2, note="written")
    return final
