"""Exports for serving: a SavedModel for TF Serving and TFLite files for phones.

Both take pixels or encoded images and do the preprocessing inside, so a
client sends what it has (JPEG bytes, camera pixels) and gets probabilities.
"""

import contextlib
import ctypes
import gc
import json
import logging
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from vit_keras import files
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
# A GIF's blocks are walked (to count every frame) in at most this many steps; runs of
# equal-sized data sub-blocks take one step, so ordinary GIFs need a few steps per frame.
MAX_GIF_STEPS = 4096
TFLITE_VARIANTS = ("float32", "float16", "dynamic_int8", "int8")
# Images per Keras call / interpreter invocation in the parity table: bounds its memory.
BATCH_SIZE = 16
# Written into every export folder; `overwrite` replaces only folders that hold it.
MANIFEST = "vit_keras_export.json"


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
    if names and len(names) != classes:
        raise ValueError(f"{len(names)} class names given for a model with {classes} outputs.")
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


@tf.function(input_signature=[tf.TensorSpec([], tf.string)])  # a graph loop, also when called eagerly
def _gif_frames(data, max_steps=MAX_GIF_STEPS):
    """Walks a GIF's blocks: (pixels of all frames, the file cut after its first frame, walked).

    Every image descriptor counts (a 64x64 screen may hold a 10000x10000 frame, and
    the decoder reads every frame before it returns the first). `walked` is False if
    the walk needed more than `max_steps` steps. The cut file (first frame, then the
    trailer) is what gets decoded.
    """
    raw = tf.cast(tf.io.decode_raw(data, tf.uint8), tf.int64)
    n = tf.size(raw, out_type=tf.int64)
    padded = tf.concat([raw, tf.zeros([16], tf.int64)], 0)  # reads past the end give 0
    one, two, zero = (tf.constant(v, tf.int64) for v in (1, 2, 0))
    window = tf.range(256, dtype=tf.int64)

    def get(i):
        return tf.gather(padded, tf.minimum(tf.cast(i, tf.int64), n + 15))

    def color_table(packed):  # size of the colour table that follows, from a packed-fields byte
        return tf.where(packed >= 128, 3 * tf.bitwise.left_shift(one, (packed & 7) + 1), zero)

    def step(pos, mode, frames, pixels, first_end, done):
        # mode 0: at a block introducer; 1: in data sub-blocks; 2: in the sub-blocks of an image.
        c = get(pos)
        at_block = tf.equal(mode, 0)
        is_ext = at_block & tf.equal(c, 0x21)
        is_image = at_block & tf.equal(c, 0x2C)
        area = (get(pos + 5) + 256 * get(pos + 6)) * (get(pos + 7) + 256 * get(pos + 8))
        image_end = pos + 11 + color_table(get(pos + 9))  # descriptor, local table, LZW code size
        ends = ~at_block & tf.equal(c, 0)
        # A run of sub-blocks of c bytes each is skipped in one step.
        same = tf.equal(get(pos + (c + 1) * window), c)
        run = tf.reduce_min(tf.where(same, tf.constant(256, tf.int64), window))
        new_pos = tf.where(is_ext, pos + 2, tf.where(is_image, image_end,
                                                     tf.where(ends, pos + 1, pos + (c + 1) * run)))
        new_mode = tf.where(is_ext, one, tf.where(is_image, two, tf.where(ends, zero, mode)))
        first_end = tf.where(ends & tf.equal(mode, 2) & tf.equal(frames, 1), new_pos, first_end)
        done = (at_block & ~is_ext & ~is_image) | (new_pos > n)  # trailer, junk or end of data
        return (new_pos, new_mode, frames + tf.cast(is_image, tf.int64),
                pixels + tf.where(is_image, area, zero), first_end, done)

    start = 13 + color_table(get(10))
    _, _, frames, pixels, first_end, done = tf.while_loop(
        lambda *state: ~state[-1], step, (start, zero, zero, zero, zero, tf.constant(False)),
        maximum_iterations=max_steps,
    )
    first = tf.strings.join([tf.strings.substr(data, tf.constant(0, tf.int64), first_end), ";"])
    cut = tf.where((frames >= 1) & (first_end > 0), first, data)
    return pixels, cut, done


def decode_images(image_bytes, image_size, max_pixels=MAX_PIXELS):
    """A batch of encoded images -> float32 pixels [N, H, W, 3] in 0..255, resized.

    Raises InvalidArgumentError for bytes that are not a JPEG, PNG, GIF or BMP
    image and for images over `max_pixels`, before decoding them. A GIF counts
    every frame toward the limit, and only its first frame is decoded.
    """
    height, width = image_size
    image_bytes = _checked_bytes(image_bytes)

    def one(data):
        # Each check runs before what follows it (explicit control dependencies: inside
        # map_fn's loop nothing else orders them before the decoder).
        h, w = _image_size_from_header(data)
        known = tf.debugging.assert_greater_equal(
            h, tf.constant(0, tf.int64),
            message="image_bytes: undecodable image (not a JPEG, PNG, GIF or BMP file)",
        )
        with tf.control_dependencies([known] if known is not None else []):
            is_gif = tf.strings.regex_full_match(tf.strings.substr(data, 0, 4), "GIF8")
            frame_pixels, data, walked = tf.cond(
                is_gif, lambda: _gif_frames(data),
                lambda: (tf.constant(0, tf.int64), tf.identity(data), tf.constant(True)),
            )
        checks = [
            tf.debugging.assert_equal(
                walked, True,
                message=f"image_bytes: GIF has too many blocks (more than {MAX_GIF_STEPS} steps) "
                        "to check against the pixel limit",
            ),
            tf.debugging.assert_less_equal(
                tf.maximum(h * w, frame_pixels), tf.constant(max_pixels, tf.int64),
                message=f"image_bytes: image exceeds the limit of {max_pixels} pixels"
                        " (a GIF counts the pixels of all its frames)",
            ),
        ]
        with tf.control_dependencies([c for c in checks + [known] if c is not None]):
            image = tf.io.decode_image(data, channels=3, expand_animations=False)
        image = tf.image.resize(image, (height, width), antialias=True)
        return tf.clip_by_value(image, 0.0, 255.0)

    return tf.map_fn(one, image_bytes, fn_output_signature=tf.TensorSpec((height, width, 3), tf.float32))


def _checked_bytes(image_bytes):
    """`image_bytes` after an in-graph check that it is a vector [N] of strings."""
    shape = tf.shape(image_bytes)
    check = tf.debugging.Assert(
        tf.equal(tf.size(shape), 1),
        ["image_bytes: expected a string vector [N] of encoded images, got shape", shape],
        summarize=8,
    )
    with tf.control_dependencies([check]):
        image_bytes = tf.identity(image_bytes)
    return tf.ensure_shape(image_bytes, [None])


def checked_pixels(images, image_size):
    """`images` after in-graph checks: shape [N, H, W, 3] at `image_size`, every pixel finite.

    A served graph must not reach an op with a tensor it cannot take: a rank-3
    tensor there is a CHECK failure that aborts the whole server. Fails with
    InvalidArgumentError naming the expected and the given shape, or the NaN/Inf.
    """
    height, width = image_size
    shape = tf.shape(images)
    dims = tf.concat([shape, tf.zeros([4], tf.int32)], 0)[1:4]  # padded: any rank slices
    shape_ok = tf.logical_and(tf.equal(tf.size(shape), 4),
                              tf.reduce_all(tf.equal(dims, [height, width, 3])))
    check_shape = tf.debugging.Assert(
        shape_ok,
        [f"images: expected float32 pixels of shape [N, {height}, {width}, 3], got shape", shape],
        summarize=8,
    )
    with tf.control_dependencies([check_shape]):
        check_finite = tf.debugging.Assert(
            tf.reduce_all(tf.math.is_finite(images)),
            ["images: pixels must be finite numbers in 0..255 (found NaN or Inf)"],
        )
    with tf.control_dependencies([check_shape, check_finite]):
        images = tf.identity(images)
    return tf.ensure_shape(images, [None, height, width, 3])


def _listing(root):
    """Relative paths of the files (and links) under `root`."""
    found = []
    for folder, dirs, names in os.walk(root):
        links = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        found += [os.path.relpath(os.path.join(folder, f), root) for f in names + links]
    return sorted(found)


def _check_replaceable(final, keep=()):
    """Raises FileExistsError unless `final` is an export folder holding only what the export wrote."""
    real = os.path.realpath(final)
    for path in keep:
        kept = os.path.realpath(path)
        if kept == real or kept.startswith(real + os.sep):
            raise FileExistsError(f"{final} contains the input model {path}; refusing to replace it "
                                  "(choose another output folder).")
    if os.path.islink(final) or not os.path.isdir(final):
        raise FileExistsError(f"{final} exists and is not an export folder; refusing to replace it.")
    try:
        with open(os.path.join(final, MANIFEST)) as f:
            listed = set(json.load(f)["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise FileExistsError(
            f"{final} was not written by vit-keras export (it has no {MANIFEST}); overwrite only "
            "replaces an earlier export, so choose another output folder or remove it yourself."
        ) from None
    extra = [p for p in _listing(final) if p not in listed and p != MANIFEST]
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise FileExistsError(f"{final} holds files the export did not write ({', '.join(extra[:3])}{more}); "
                              "refusing to replace it.")


def _check_target(final, overwrite, keep=()):
    """FileExistsError if `final` exists and may not be replaced (see `_atomic_dir`)."""
    if os.path.lexists(final):
        if not overwrite:
            raise FileExistsError(f"{final} exists; pass overwrite=True (--overwrite) to replace it.")
        _check_replaceable(final, keep)


@contextlib.contextmanager
def _atomic_dir(final, overwrite, keep=()):
    """Yields a temporary folder beside `final` that replaces it only if the block succeeds.

    The folder gets a manifest of its files (`MANIFEST`) and the modes of the
    user's umask. An existing `final` is replaced only with `overwrite`, and only
    if it is an earlier export holding nothing but what that export wrote, and
    none of the paths in `keep` (the input model); otherwise FileExistsError.
    """
    _check_target(final, overwrite, keep)
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        yield tmp
        written = _listing(tmp)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"written_by": "vit-keras export", "files": written}, f, indent=1)
        files.follow_umask(tmp)
        if not os.path.lexists(final):
            os.rename(tmp, final)
            return
        _check_replaceable(final, keep)  # again: it may have changed while the export ran
        trash = tempfile.mkdtemp(prefix=".old-", dir=parent)
        os.rename(final, os.path.join(trash, "old"))
        try:
            os.rename(tmp, final)
        except BaseException:
            os.rename(os.path.join(trash, "old"), final)
            raise
        shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_name_and_version(name, version):
    if (not isinstance(name, str) or not name.strip() or ".." in name or "\0" in name
            or any(sep and sep in name for sep in ("/", "\\", os.sep, os.altsep))):
        raise ValueError(f"Model name {name!r} must be a plain folder name "
                         "(no path separators or '..').")
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise ValueError(f"version must be a positive integer (TF Serving's version folder), got {version!r}.")


# ----------------------------------------------------------------------------- SavedModel


def export_saved_model(model, out_dir, name=None, version=1, top_k=5, class_names=None,
                       max_pixels=MAX_PIXELS, overwrite=False, keep=()):
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

    Returns:
        The path of the version folder.
    """
    from vit_keras import visualize

    name = name or model.name
    _check_name_and_version(name, version)
    final = os.path.join(out_dir, name, str(version))
    _check_target(final, overwrite, keep)  # before the slow part
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

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.track(attn)
    archive.add_endpoint("serving_default", serve_bytes)
    archive.add_endpoint("predict_images", predict_images)
    archive.add_endpoint("attention", attention)
    with _atomic_dir(final, overwrite, keep) as tmp:
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


def _release_memory():
    """Collects garbage and hands freed heap pages back to the OS (glibc keeps them otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def convert_tflite(model, variant="float32", representative_images=None):
    """Converts to TFLite with built-in ops only; returns the flatbuffer bytes.

    Input `images` [N, H, W, 3] pixels 0..255 (float32; uint8 for `int8`),
    output `probabilities` [N, C]. `int8` (full-integer) needs
    `representative_images` for calibration: uint8 or float pixels (an array,
    or any iterable of images), fed one image at a time as float32.
    The frozen graph and the converter are released before this returns.
    """
    if variant not in TFLITE_VARIANTS:
        raise ValueError(f"Unknown TFLite variant {variant!r}; use one of {TFLITE_VARIANTS}.")
    fn = _tflite_fn(float32_copy(model), tf.float32).get_concrete_function()
    # Without a trackable object the converter freezes the variables into constants. With
    # one (or through a SavedModel) TF 2.21 keeps Keras 3 variables as READ_VARIABLE ops
    # that the interpreter cannot initialise. absl warns that this path is deprecated.
    converter = _configure(tf.lite.TFLiteConverter.from_concrete_functions([fn]), variant,
                           representative_images)
    try:
        blob = _convert_frozen(converter, fn)
    finally:
        del converter, fn
        _release_memory()
    if variant == "int8":
        _check_pixel_input(blob)
    return blob


def _check_pixel_input(blob):
    # Apps feed the uint8 input camera pixels as they are: its quantisation must be the identity.
    details = tflite_interpreter(blob).get_input_details()[0]
    scale, zero = details["quantization"]
    if details["dtype"] != np.uint8 or abs(scale - 1.0) > 1e-6 or zero != 0:
        raise ValueError(f"int8 conversion gave input {details['dtype'].__name__} with scale {scale}, zero "
                         f"point {zero}; pixels 0..255 need scale 1, zero point 0.")


def _convert_frozen(converter, fn):
    """`converter.convert()` without the frozen ConcreteFunction it builds and keeps alive.

    `TFLiteFrozenGraphConverterV2.convert` freezes `fn` into a GraphDef *and* imports
    that into a new function (the graph and the function library each hold another
    copy of every weight) and keeps both until the conversion ends: for R50+ViT-B/16
    that took RSS from 1.1 to 3.8 GB before the converter proper started (peak
    6.1 GB). Here only the frozen GraphDef is made and handed to the same
    conversion; falls back to `convert()` if TensorFlow's internals differ.
    """
    from tensorflow.lite.python import lite
    from tensorflow.python.framework import convert_to_constants

    try:
        data = convert_to_constants._FunctionConverterDataInEager(
            func=fn, lower_control_flow=False, aggressive_inlining=False)
        graph_def, _ = convert_to_constants._replace_variables_by_constants(converter_data=data)
        base_convert = lite.TFLiteConverterBaseV2.convert
    except (AttributeError, TypeError):
        return converter.convert()
    del data
    _release_memory()
    inputs = [t for t in fn.inputs if t.dtype != tf.resource]
    return base_convert(converter, graph_def, inputs, fn.outputs)


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

        def representative():  # one image at a time: no float32 copy of the whole set
            for i, image in enumerate(representative_images):
                image = np.array(image, "float32")
                if i == 0:  # one pixel 0 and one 255: the uint8 input takes pixels as they are (scale 1)
                    image[0, 0], image[0, -1] = 0.0, 255.0
                yield [image[None]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
    return converter


def tflite_interpreter(path_or_bytes, num_threads=2):
    """A LiteRT interpreter of a `.tflite` file (path) or flatbuffer (bytes)."""
    from ai_edge_litert.interpreter import Interpreter

    if isinstance(path_or_bytes, (bytes, bytearray)):
        return Interpreter(model_content=bytes(path_or_bytes), num_threads=num_threads)
    return Interpreter(model_path=str(path_or_bytes), num_threads=num_threads)


def tflite_predict(model, images, num_threads=2, batch_size=BATCH_SIZE):
    """Runs a TFLite model on pixels `[N, H, W, 3]`, `batch_size` images at a time -> `[N, C]`.

    `model` is a path, flatbuffer bytes, or an interpreter (from `tflite_interpreter`)
    to reuse across calls. The interpreter's input is never larger than
    `batch_size` images (None: all at once), so memory does not grow with N;
    each batch is cast to the input's dtype (uint8 for `int8`) on its own.
    """
    interpreter = model if hasattr(model, "invoke") else tflite_interpreter(model, num_threads)
    images = np.asarray(images)
    batch_size = batch_size or max(len(images), 1)
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    results = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        if tuple(inp["shape"]) != batch.shape:
            interpreter.resize_tensor_input(inp["index"], batch.shape)
            interpreter.allocate_tensors()
            inp = interpreter.get_input_details()[0]
            out = interpreter.get_output_details()[0]
        interpreter.set_tensor(inp["index"], batch.astype(inp["dtype"]))
        interpreter.invoke()
        result = interpreter.get_tensor(out["index"])
        if out["dtype"] != np.float32:
            scale, zero = out["quantization"]
            result = (result.astype("float32") - zero) * scale
        results.append(np.array(result, "float32"))
    if not results:
        return np.zeros((0, out["shape"][-1]), "float32")
    return np.concatenate(results)


def export_tflite(model, out_dir, variants=TFLITE_VARIANTS, representative_images=None,
                  class_names=None, overwrite=False, keep=()):
    """Writes `<variant>.tflite` files and `class_names.json` into `out_dir`, atomically.

    One variant is converted at a time, and each is written and released before
    the next. `overwrite` replaces only an earlier export (see `_atomic_dir`),
    never a folder holding a path in `keep`.
    """
    for variant in variants:
        if variant not in TFLITE_VARIANTS:
            raise ValueError(f"Unknown TFLite variant {variant!r}; use one of {TFLITE_VARIANTS}.")
    if "int8" in variants and representative_images is None:
        raise ValueError("The int8 variant needs representative_images for calibration.")
    _check_target(out_dir, overwrite, keep)  # before the slow part
    names = label_names(model, class_names)
    model = float32_copy(model)  # once for all variants
    written = {}
    with _atomic_dir(out_dir, overwrite, keep) as tmp:
        for variant in variants:
            path = os.path.join(tmp, f"{variant}.tflite")
            blob = convert_tflite(model, variant, representative_images)
            with open(path, "wb") as f:
                f.write(blob)
            del blob
            _release_memory()
            written[variant] = os.path.join(out_dir, f"{variant}.tflite")
        with open(os.path.join(tmp, "class_names.json"), "w") as f:
            json.dump(names, f)
    return written


def batched_probabilities(model, images, batch_size=BATCH_SIZE):
    """Keras's probabilities for pixels `[N, H, W, 3]`, `batch_size` images at a time -> `[N, C]`."""
    height, width = model.input_shape[1:3]
    fn = tf.function(lambda x: probabilities(model, x),
                     input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32)])
    images = np.asarray(images)
    parts = [np.asarray(fn(tf.constant(images[i:i + batch_size], tf.float32)))
             for i in range(0, len(images), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, model.output_shape[-1]), "float32")


def parity_table(model, tflite_files, images, labels=None, batch_size=BATCH_SIZE):
    """Compares each TFLite file with Keras on `images` (uint8 pixels); returns rows of dicts.

    Keras and every interpreter see `batch_size` images at a time (one
    interpreter per file, reused across batches), so memory does not grow with
    the number of images.
    """
    images = np.asarray(images)
    reference = batched_probabilities(float32_copy(model), images, batch_size)
    _release_memory()
    rows = []
    for variant, path in tflite_files.items():
        interpreter = tflite_interpreter(path)
        probs = tflite_predict(interpreter, images, batch_size=batch_size)
        del interpreter
        _release_memory()
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
