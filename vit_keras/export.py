"""Exports for serving: a SavedModel for TF Serving and TFLite files for phones.

Both take pixels or encoded images and do the preprocessing inside, so a
client sends what it has (JPEG bytes, camera pixels) and gets probabilities.
"""

import contextlib
import json
import logging
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from vit_keras.model import (
    attention_model,
    class_names as model_class_names,
    copy_model,
    fold_weight_standardization,
)
from vit_keras.vit import preprocess_inputs

logger = logging.getLogger("vit_keras")

# Images with more pixels than this are refused before they are decoded.
MAX_PIXELS = 4096 * 4096
TFLITE_VARIANTS = ("float32", "float16", "dynamic_int8", "int8")


# ----------------------------------------------------------------------------- helpers


def float32_copy(model):
    """A float32 copy of a model trained in mixed precision (TFLite cannot convert bf16)."""
    if all(layer.dtype_policy.name == "float32" for layer in model._flatten_layers()):
        return model

    def as_float32(config):
        if config.get("class_name") == "DTypePolicy":
            return {**config, "config": {**config["config"], "name": "float32"}}
        return config

    return copy_model(model, as_float32, [np.asarray(w, "float32") for w in model.get_weights()])


def label_names(model, class_names=None):
    """The class names to serve: given ones, those in the model's head, or "0".."C-1"."""
    names = class_names or model_class_names(model)
    classes = model.output_shape[-1]
    return list(names) if names else [str(i) for i in range(classes)]


def probabilities(model, pixels):
    """Pixels 0..255 -> class probabilities (softmax of logits; as-is for softmax/sigmoid heads)."""
    return as_probabilities(model, model(preprocess_inputs(pixels), training=False))


def as_probabilities(model, outputs):
    """The model's outputs -> probabilities, by the head's activation."""
    try:
        activation = model.get_layer("head").activation.__name__
    except ValueError:
        activation = "linear"
    if activation in ("softmax", "sigmoid"):
        return tf.cast(outputs, tf.float32)
    return tf.nn.softmax(tf.cast(outputs, tf.float32), axis=-1)


def _image_size_from_header(data):
    """(height, width) read from a JPEG/PNG/GIF/BMP header, without decoding; (-1, -1) if unknown."""

    def uint(lo, n, little):
        raw = tf.io.decode_raw(tf.strings.substr(data, lo, n), tf.uint8)
        raw = tf.cast(raw, tf.int64)
        order = tf.range(n, dtype=tf.int64) if little else tf.range(n - 1, -1, -1, dtype=tf.int64)
        return tf.reduce_sum(raw * tf.bitwise.left_shift(tf.constant(1, tf.int64), 8 * order))

    magic = tf.strings.substr(data, 0, 4)
    long_enough = tf.strings.length(data) >= 26
    is_png = tf.logical_and(tf.equal(magic, b"\x89PNG"), long_enough)
    is_gif = tf.logical_and(tf.strings.regex_full_match(magic, "GIF8"), long_enough)
    is_bmp = tf.logical_and(tf.equal(tf.strings.substr(data, 0, 2), b"BM"), long_enough)

    def bmp_height():
        # BMP heights are signed 32-bit (negative: stored top-down); the magnitude counts.
        h = uint(22, 4, True)
        return tf.where(h >= 2**31, 2**32 - h, h)

    def jpeg():
        shape = tf.image.extract_jpeg_shape(data)
        return tf.cast(shape[0], tf.int64), tf.cast(shape[1], tf.int64)

    def other():
        unknown = (tf.constant(-1, tf.int64), tf.constant(-1, tf.int64))
        return tf.case(
            [
                (is_png, lambda: (uint(20, 4, False), uint(16, 4, False))),
                (is_gif, lambda: (uint(8, 2, True), uint(6, 2, True))),
                (is_bmp, lambda: (bmp_height(), uint(18, 4, True))),
            ],
            default=lambda: unknown,
        )

    return tf.cond(tf.io.is_jpeg(data), jpeg, other)


def decode_images(image_bytes, image_size, max_pixels=MAX_PIXELS):
    """A batch of encoded images -> float32 pixels [N, H, W, 3] in 0..255, resized.

    Raises InvalidArgumentError for bytes that are not a JPEG, PNG, GIF or BMP
    image and for images over `max_pixels`, before decoding them.
    """
    height, width = image_size

    def one(data):
        h, w = _image_size_from_header(data)
        tf.debugging.assert_greater_equal(
            h, tf.constant(0, tf.int64),
            message="image_bytes: undecodable image (not a JPEG, PNG, GIF or BMP file)",
        )
        tf.debugging.assert_less_equal(
            h * w, tf.constant(max_pixels, tf.int64),
            message=f"image_bytes: image exceeds the limit of {max_pixels} pixels",
        )
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        image = tf.image.resize(image, (height, width), antialias=True)
        return tf.clip_by_value(image, 0.0, 255.0)

    return tf.map_fn(one, image_bytes, fn_output_signature=tf.TensorSpec((height, width, 3), tf.float32))


@contextlib.contextmanager
def _atomic_dir(final, overwrite):
    """Yields a temporary folder beside `final` that replaces it only if the block succeeds."""
    if os.path.exists(final) and not overwrite:
        raise FileExistsError(f"{final} exists; pass overwrite=True (--overwrite) to replace it.")
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final + ".old" if os.path.exists(final) else None
    if old:
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- SavedModel


def export_saved_model(model, out_dir, name=None, version=1, top_k=5, class_names=None,
                       max_pixels=MAX_PIXELS, overwrite=False):
    """Writes a SavedModel in TF Serving's layout, `out_dir/<name>/<version>/`.

    Signatures (tensor names are stable and documented in export/README.md):
    - `serving_default`: `image_bytes` (string [N], encoded JPEG/PNG/BMP/GIF of
      any size) -> `probabilities` [N, C], `classes` [N, k] (int32 indices),
      `labels` [N, k] (string), `scores` [N, k].
    - `predict_images`: `images` (float32 [N, H, W, 3], pixels 0..255) -> the same.
    - `attention`: `images` -> `attention` [N, layers, heads, T, T] and
      `rollout` [N, grid_h, grid_w] (attention rollout of the class token).

    Returns:
        The path of the version folder.
    """
    from vit_keras import visualize

    model = fold_weight_standardization(float32_copy(model))
    name = name or model.name
    final = os.path.join(out_dir, name, str(version))
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

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(image_bytes):
        return outputs(decode_images(image_bytes, (height, width), max_pixels))

    @tf.function(input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32, name="images")])
    def predict_images(images):
        return outputs(images)

    @tf.function(input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32, name="images")])
    def attention(images):
        _, weights = attn(preprocess_inputs(images), training=False)
        stacked = tf.stack([tf.cast(w, tf.float32) for w in weights], axis=1)
        return {"attention": stacked, "rollout": visualize.rollout_grid(weights, grid)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.track(attn)
    archive.add_endpoint("serving_default", serve_bytes)
    archive.add_endpoint("predict_images", predict_images)
    archive.add_endpoint("attention", attention)
    with _atomic_dir(final, overwrite) as tmp:
        archive.write_out(tmp, verbose=False)
        extra = os.path.join(tmp, "assets.extra")
        os.makedirs(extra, exist_ok=True)
        with open(os.path.join(extra, "class_names.json"), "w") as f:
            json.dump(names, f)
        _write_warmup(extra, name, (height, width))
    return final


def _varint(n):
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _message_field(number, payload):
    """One length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def warmup_request(model_name, image_bytes, signature="serving_default"):
    """A serialized `tensorflow.serving.PredictionLog` holding one PredictRequest.

    tensorflow-serving-api would pull a second, full TensorFlow, so the few
    wrapper messages are written by hand from their field numbers:
    PredictionLog.predict_log = 6, PredictLog.request = 1, PredictRequest
    {model_spec = 1, inputs = 2 (map<string, TensorProto>)}, ModelSpec {name = 1,
    signature_name = 3}; the TensorProto itself comes from TensorFlow.
    """
    tensor = tf.make_tensor_proto(list(image_bytes), dtype=tf.string).SerializeToString()
    spec = _message_field(1, model_name.encode()) + _message_field(3, signature.encode())
    inputs = _message_field(1, b"image_bytes") + _message_field(2, tensor)
    request = _message_field(1, spec) + _message_field(2, inputs)
    return _message_field(6, _message_field(1, request))


def _write_warmup(directory, model_name, image_size):
    # A mid-grey PNG of the model's size: it exercises decoding, resizing and the model.
    png = tf.io.encode_png(tf.fill((*image_size, 3), tf.constant(128, tf.uint8))).numpy()
    path = os.path.join(directory, "tf_serving_warmup_requests")
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(warmup_request(model_name, [png]))
    return path


# ----------------------------------------------------------------------------- TFLite


def _tflite_fn(model, dtype):
    height, width = model.input_shape[1:3]

    @tf.function(input_signature=[tf.TensorSpec([None, height, width, 3], dtype, name="images")])
    def predict(images):
        return {"probabilities": probabilities(model, tf.cast(images, tf.float32))}

    return predict


def convert_tflite(model, variant="float32", representative_images=None):
    """Converts to TFLite with built-in ops only; returns the flatbuffer bytes.

    Input `images` [N, H, W, 3] pixels 0..255 (float32; uint8 for `int8`),
    output `probabilities` [N, C]. `int8` (full-integer) needs
    `representative_images` (uint8 or float pixels) for calibration.
    """
    if variant not in TFLITE_VARIANTS:
        raise ValueError(f"Unknown TFLite variant {variant!r}; use one of {TFLITE_VARIANTS}.")
    model = float32_copy(model)
    fn = _tflite_fn(model, tf.float32).get_concrete_function()
    # Without a trackable object the converter freezes the variables into constants. With
    # one (or through a SavedModel) TF 2.21 keeps Keras 3 variables as READ_VARIABLE ops
    # that the interpreter cannot initialise. absl warns that this path is deprecated.
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn])
    return _configure(converter, variant, representative_images).convert()


def _configure(converter, variant, representative_images):
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if variant == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "dynamic_int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif variant == "int8":
        if representative_images is None:
            raise ValueError("The int8 variant needs representative_images for calibration.")
        sample = np.asarray(representative_images, "float32")

        def representative():
            for image in sample:
                yield [image[None]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
    return converter


def tflite_predict(path_or_bytes, images, num_threads=2):
    """Runs a TFLite file with the LiteRT interpreter on a batch of pixels."""
    from ai_edge_litert.interpreter import Interpreter

    if isinstance(path_or_bytes, (bytes, bytearray)):
        interpreter = Interpreter(model_content=bytes(path_or_bytes), num_threads=num_threads)
    else:
        interpreter = Interpreter(model_path=str(path_or_bytes), num_threads=num_threads)
    inp = interpreter.get_input_details()[0]
    images = np.asarray(images)
    interpreter.resize_tensor_input(inp["index"], images.shape)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    interpreter.set_tensor(inp["index"], images.astype(inp["dtype"]))
    interpreter.invoke()
    out = interpreter.get_output_details()[0]
    result = interpreter.get_tensor(out["index"])
    if out["dtype"] != np.float32:
        scale, zero = out["quantization"]
        result = (result.astype("float32") - zero) * scale
    return result


def export_tflite(model, out_dir, variants=TFLITE_VARIANTS, representative_images=None,
                  class_names=None, overwrite=False):
    """Writes `<variant>.tflite` files and `class_names.json` into `out_dir`, atomically."""
    names = label_names(model, class_names)
    written = {}
    with _atomic_dir(out_dir, overwrite) as tmp:
        for variant in variants:
            path = os.path.join(tmp, f"{variant}.tflite")
            with open(path, "wb") as f:
                f.write(convert_tflite(model, variant, representative_images))
            written[variant] = os.path.join(out_dir, f"{variant}.tflite")
        with open(os.path.join(tmp, "class_names.json"), "w") as f:
            json.dump(names, f)
    return written


def parity_table(model, tflite_files, images, labels=None):
    """Compares each TFLite file with Keras on `images` (uint8 pixels); returns rows of dicts."""
    images = np.asarray(images)
    reference = np.asarray(probabilities(float32_copy(model), tf.constant(images, tf.float32)))
    rows = []
    for variant, path in tflite_files.items():
        probs = tflite_predict(path, images.astype("uint8") if variant == "int8" else images.astype("float32"))
        rows.append({
            "variant": variant,
            "max_abs_diff": float(np.abs(probs - reference).max()),
            "top1_agreement": float(np.mean(probs.argmax(-1) == reference.argmax(-1))),
            "size_mb": os.path.getsize(path) / 2**20,
        })
    return rows


def format_parity(rows):
    lines = [f"{'variant':<14}{'max |p - keras|':>16}{'top-1 agree':>13}{'size MB':>10}"]
    for r in rows:
        lines.append(f"{r['variant']:<14}{r['max_abs_diff']:>16.2e}{r['top1_agreement']:>13.2%}{r['size_mb']:>10.2f}")
    return "\n".join(lines)
