"""TFLite files for phones (built-in ops only, with SignatureDefs) and their parity table against Keras.

Every file has the signature `serving_default`: `images` [N, H, W, 3], pixels 0..255
(float32; uint8 in `int8`) -> `probabilities` [N, C]. The files with float
activations (`float32`, `float16`, `dynamic_int8`) also have `attention`:
`images` -> `rollout` [N, grid_h, grid_w] (the attention rollout of
`vit_keras.visualize.rollout_grid`, max 1). The batch is dynamic: a signature
runner resizes the input to whatever it is given.

The route is Keras's own LiteRT exporter's (`model.export(format="litert")`:
`keras.export.ExportArchive` -> SavedModel -> `TFLiteConverter.from_saved_model`),
with two endpoints instead of one, built-in ops only, and the int8 recipe below; the SavedModel is
written by `serving.archive.save_endpoints` (each weight and each traced graph once, where `ExportArchive` wrote
both twice: the converter's peak memory for R50+ViT-B/16 in float32 4.25 -> 3.67 GB).
"""

import contextlib
import ctypes
import gc
import json
import os
import shutil
import tempfile
import warnings

import numpy as np
import tensorflow as tf

from vit_keras import console, files
from vit_keras.files import atomic_dir, check_target
from vit_keras.model import attention_model
from vit_keras.predict import (
    BATCH_SIZE,
    batched_probabilities,
    label_names,
    probabilities,
)
from vit_keras.preprocessing import preprocess_inputs
from vit_keras.serving import TFLITE_VARIANTS  # kept where the CLI reads it without TensorFlow
from vit_keras.serving.archive import save_endpoints
from vit_keras.serving.prepare import prepare_export_model

# The variants whose file also has the `attention` signature (float activations).
ATTENTION_VARIANTS = ("float32", "float16", "dynamic_int8")
SERVING_KEY = "serving_default"
TEMP_PREFIX = "vit_keras_tflite_"  # + pid: the SavedModel each conversion starts from, in the temp folder
ATTENTION_KEY = "attention"
# The op types that the `int8` file runs in int8 (weights and activations, calibrated ranges):
# the convolutions and dense layers, nearly all of the FLOPs. Every other op runs in float32
# between a DEQUANTIZE and a QUANTIZE. In int8, BATCH_MATMUL, SOFTMAX, SQUARED_DIFFERENCE,
# RSQRT and GELU run LiteRT's own single-threaded kernels (XNNPACK has none), 1.4-30x slower
# than float at the models' shapes; the norms' statistics lose their small variances (a
# LayerNorm variance quantised to 0 gave rsqrt = inf); and the multiply-adds and reshapes
# between them, kept int8, would each cost a QUANTIZE/DEQUANTIZE of a whole feature map.
# Op profile: benchmarks/RESULTS.md. `None` quantises every op (the strict full-integer
# file, for integer-only accelerators; several times slower on CPU).
INT8_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def _release_memory():
    """Collects garbage and hands freed heap pages back to the OS (glibc keeps them otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _endpoints(model, attention):
    """The signatures' functions by key, and the models they use (to track)."""
    from vit_keras import visualize

    height, width = model.input_shape[1:3]
    spec = tf.TensorSpec([None, height, width, 3], tf.float32, name="images")

    @tf.function(input_signature=[spec])
    def serving_default(images):
        return {"probabilities": probabilities(model, images)}

    endpoints, tracked = {SERVING_KEY: serving_default}, [model]
    if attention:
        attn = attention_model(model)
        grid = visualize.grid_shape(model)

        @tf.function(input_signature=[spec])
        def rollout(images):
            _, weights = attn(preprocess_inputs(images), training=False)
            return {"rollout": visualize.rollout_grid(weights, grid)}

        endpoints[ATTENTION_KEY] = rollout
        tracked.append(attn)
    return endpoints, tracked


@contextlib.contextmanager
def _saved_model(model, attention):
    """A temporary SavedModel of the endpoints (what Keras's LiteRT exporter converts from)."""
    files.sweep(tempfile.gettempdir(), TEMP_PREFIX)  # left by conversions that were killed
    directory = tempfile.mkdtemp(prefix=files.temp_prefix(TEMP_PREFIX))
    try:
        endpoints, tracked = _endpoints(model, attention)
        save_endpoints(directory, endpoints, tracked)
        keys = list(endpoints)
        del endpoints, tracked
        _release_memory()
        yield directory, keys
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _calibration(representative_images):
    def representative():  # one image at a time: no float32 copy of the whole set
        total = len(representative_images) if hasattr(representative_images, "__len__") else 0
        with console.Progress("TFLite int8 calibration", total, "image") as bar:
            for i, image in enumerate(representative_images):
                image = np.array(image, "float32")
                if i == 0:  # one pixel 0 and one 255: the uint8 input takes pixels as they are (scale 1)
                    image[0, 0], image[0, -1] = 0.0, 255.0
                yield SERVING_KEY, {"images": image[None]}
                bar.update(i + 1)

    return representative


def _configure(converter, variant, representative_images):
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if variant == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "dynamic_int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif variant == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = _calibration(representative_images)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter


def _op_types(blob):
    """The names of the op types a flatbuffer uses (read in place, no copy of the weights)."""
    from tensorflow.lite.python import schema_py_generated as schema_fb
    from tensorflow.lite.python import schema_util

    model = schema_fb.Model.GetRootAsModel(blob, 0)
    names = {code: name for name, code in vars(schema_fb.BuiltinOperator).items() if not name.startswith("_")}
    return sorted({names.get(schema_util.get_builtin_code_from_operator_code(model.OperatorCodes(i)), "CUSTOM")
                   for i in range(model.OperatorCodesLength())})


def _quantize_int8(converter, int8_ops):
    """Calibrates, then quantises the op types in `int8_ops` (None: all) and keeps the others float32.

    This is what `tf.lite.experimental.QuantizationDebugger(...).get_nondebug_quantized_model()`
    does with `QuantizationDebugOptions(denylisted_ops=...)`, without the debugger's
    extra instrumented model; input uint8, output float32 as the converter writes them.
    """
    from tensorflow.lite.python import convert

    converter._experimental_calibrate_only = True  # the debugger's switch
    with warnings.catch_warnings():  # the calibrator runs TF's own (deprecated) tf.lite.Interpreter
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
        calibrated = converter.convert()
    _release_memory()
    float_ops = [] if int8_ops is None else [op for op in _op_types(calibrated) if op not in int8_ops]
    return convert.mlir_quantize(calibrated, disable_per_channel=False, input_data_type=tf.uint8,
                                 output_data_type=tf.float32, denylisted_ops=float_ops)


def _name_signatures(blob):
    """`serving_default` becomes subgraph 0 (what `Interpreter.invoke()` and `run()` without a
    signature execute) and every signature tensor is named as its signature entry
    (`images`, `probabilities`, `rollout`) instead of `serving_default_images:0`/`Identity`."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(blob)
    if any(b.offset for b in model.buffers) or not model.signatureDefs:  # > 2 GB layout: leave it
        return blob
    serving = [s.subgraphIndex for s in model.signatureDefs if s.signatureKey.decode() == SERVING_KEY]
    # Operators that name subgraphs (WHILE, IF, CALL_ONCE, ...) would need renumbering too: none here.
    names_subgraphs = any(
        opts is not None and any("ubgraph" in field for field in vars(opts))
        for g in model.subgraphs for op in g.operators for opts in (op.builtinOptions, op.builtinOptions2))
    if serving and serving[0] != 0 and not names_subgraphs:
        order = [serving[0]] + [i for i in range(len(model.subgraphs)) if i != serving[0]]
        new_index = {old: new for new, old in enumerate(order)}
        model.subgraphs = [model.subgraphs[i] for i in order]
        for s in model.signatureDefs:
            s.subgraphIndex = new_index[s.subgraphIndex]
        model.signatureDefs.sort(key=lambda s: s.subgraphIndex)
    for s in model.signatureDefs:
        graph = model.subgraphs[s.subgraphIndex]
        for entry in list(s.inputs) + list(s.outputs):
            graph.tensors[entry.tensorIndex].name = entry.name
    return flatbuffer_utils.convert_object_to_bytearray(model)


def convert_tflite(model, variant="float32", representative_images=None, attention=None,
                   int8_ops=INT8_OPS):
    """Converts to TFLite with built-in ops only; returns the flatbuffer bytes.

    Signatures: `serving_default` (`images` [N, H, W, 3] pixels 0..255, float32; uint8
    for `int8` -> `probabilities` [N, C]) and, with `attention` (default: the variants
    in `ATTENTION_VARIANTS`), `attention` (`images` -> `rollout` [N, grid_h, grid_w]).
    `int8` (uint8 input, float32 output) needs `representative_images` for
    calibration: uint8 or float pixels (an array, or any iterable of images), fed
    one image at a time as float32; the op types in `int8_ops` are quantised and the
    others stay float32 (None: every op int8, the strict full-integer file, several
    times slower on CPU).
    The model is converted as `prepare_export_model` gives it. The SavedModel
    and the converter are released before this returns.
    """
    if variant not in TFLITE_VARIANTS:
        raise ValueError(f"Unknown TFLite variant {variant!r}; use one of {TFLITE_VARIANTS}.")
    if variant == "int8" and representative_images is None:
        raise ValueError("The int8 variant needs representative_images for calibration.")
    attention = variant in ATTENTION_VARIANTS if attention is None else attention
    if attention and variant == "int8":
        raise ValueError("The int8 file has no attention signature (its calibration covers serving_default).")
    return _convert(prepare_export_model(model), variant, representative_images, attention, int8_ops)


def _convert(model, variant, representative_images, attention, int8_ops):
    """`convert_tflite` of a model that `prepare_export_model` gave, its arguments checked."""
    # The converter's MLIR passes and TensorFlow's SavedModel reader write to the C++ stderr.
    with console.native_output(f"converting to TFLite ({variant})"), \
            _saved_model(model, attention) as (directory, keys):
        converter = _configure(tf.lite.TFLiteConverter.from_saved_model(directory, signature_keys=keys),
                               variant, representative_images)
        try:
            if variant == "int8":
                blob = _quantize_int8(converter, int8_ops)
            else:
                blob = converter.convert()
        finally:
            del converter
            _release_memory()
    blob = _name_signatures(blob)
    _release_memory()
    if variant == "int8":
        _check_pixel_input(blob)
    return blob


def _serving_runner(interpreter):
    """The `serving_default` signature runner, or None for a file without signatures."""
    if SERVING_KEY in interpreter.get_signature_list():
        return interpreter.get_signature_runner(SERVING_KEY)
    return None


def _check_pixel_input(blob):
    # Apps feed the uint8 input camera pixels as they are: its quantisation must be the identity.
    details = _serving_runner(tflite_interpreter(blob)).get_input_details()["images"]
    scale, zero = details["quantization"]
    if details["dtype"] != np.uint8 or abs(scale - 1.0) > 1e-6 or zero != 0:
        raise ValueError(f"int8 conversion gave input {details['dtype'].__name__} with scale {scale}, zero "
                         f"point {zero}; pixels 0..255 need scale 1, zero point 0.")


def tflite_interpreter(path_or_bytes, num_threads=2):
    """A LiteRT interpreter of a `.tflite` file (path) or flatbuffer (bytes)."""
    from ai_edge_litert.interpreter import Interpreter

    if isinstance(path_or_bytes, (bytes, bytearray)):
        return Interpreter(model_content=bytes(path_or_bytes), num_threads=num_threads)
    return Interpreter(model_path=str(path_or_bytes), num_threads=num_threads)


def _dequantized(result, details):
    if details["dtype"] != np.float32:
        scale, zero = details["quantization"]
        result = (result.astype("float32") - zero) * scale
    return np.array(result, "float32")


def tflite_predict(model, images, num_threads=2, batch_size=BATCH_SIZE, progress=None):
    """Runs a TFLite model on pixels `[N, H, W, 3]`, `batch_size` images at a time -> `[N, C]`.

    `model` is a path, flatbuffer bytes, or an interpreter (from `tflite_interpreter`)
    to reuse across calls. Runs the `serving_default` signature (a file without
    signatures, from an earlier version, through its first input and output). The
    input is never larger than `batch_size` images (None: all at once), so memory
    does not grow with N; each batch is cast to the input's dtype (uint8 for `int8`).
    `progress(n)`, if given, is called with the number of images of each batch done.
    """
    interpreter = model if hasattr(model, "invoke") else tflite_interpreter(model, num_threads)
    images = np.asarray(images)
    batch_size = batch_size or max(len(images), 1)
    runner = _serving_runner(interpreter)
    if runner is not None:
        inp = runner.get_input_details()["images"]
        out = runner.get_output_details()["probabilities"]
    else:
        inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    results = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].astype(inp["dtype"])
        if runner is not None:
            result = runner(images=batch)["probabilities"]
        else:
            if tuple(inp["shape"]) != batch.shape:
                interpreter.resize_tensor_input(inp["index"], batch.shape)
                interpreter.allocate_tensors()
                inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
            interpreter.set_tensor(inp["index"], batch)
            interpreter.invoke()
            result = interpreter.get_tensor(out["index"])
        results.append(_dequantized(result, out))
        if progress is not None:
            progress(len(batch))
    if not results:
        return np.zeros((0, out["shape_signature"][-1]), "float32")
    return np.concatenate(results)


def tflite_rollout(model, images, num_threads=2):
    """The `attention` signature of a TFLite file on pixels `[N, H, W, 3]` -> rollout `[N, grid_h, grid_w]`."""
    interpreter = model if hasattr(model, "invoke") else tflite_interpreter(model, num_threads)
    if ATTENTION_KEY not in interpreter.get_signature_list():
        raise ValueError("This TFLite file has no attention signature (only float32, float16 and "
                         "dynamic_int8 files written by this version have one).")
    runner = interpreter.get_signature_runner(ATTENTION_KEY)
    dtype = runner.get_input_details()["images"]["dtype"]
    return np.array(runner(images=np.asarray(images).astype(dtype))["rollout"], "float32")


def export_tflite(model, out_dir, variants=TFLITE_VARIANTS, representative_images=None,
                  class_names=None, overwrite=False, keep=(), int8_ops=INT8_OPS):
    """Writes `<variant>.tflite` files and `class_names.json` into `out_dir`, atomically.

    One variant is converted at a time, and each is written and released before
    the next (signatures and `int8_ops`: see `convert_tflite`). `overwrite`
    replaces only an earlier export (see `files.atomic_dir`), never a folder holding
    a path in `keep`.
    """
    for variant in variants:
        if variant not in TFLITE_VARIANTS:
            raise ValueError(f"Unknown TFLite variant {variant!r}; use one of {TFLITE_VARIANTS}.")
    if "int8" in variants and representative_images is None:
        raise ValueError("The int8 variant needs representative_images for calibration.")
    check_target(out_dir, overwrite, keep)  # before the slow part
    names = label_names(model, class_names)
    model = prepare_export_model(model)  # once for all variants
    written = {}
    with atomic_dir(out_dir, overwrite, keep) as tmp, \
            console.Progress("TFLite conversion", len(variants), "variant") as bar:
        for done, variant in enumerate(variants):
            bar.update(done, note=f"at {variant}")
            path = os.path.join(tmp, f"{variant}.tflite")
            blob = _convert(model, variant, representative_images, variant in ATTENTION_VARIANTS, int8_ops)
            with open(path, "wb") as f:
                f.write(blob)
            del blob
            _release_memory()
            written[variant] = os.path.join(out_dir, f"{variant}.tflite")
        bar.update(len(variants), note="written")
        with open(os.path.join(tmp, "class_names.json"), "w") as f:
            json.dump(names, f)
    return written


def parity_table(model, tflite_files, images, labels=None, batch_size=BATCH_SIZE):
    """Compares each TFLite file with Keras on `images` (uint8 pixels); returns rows of dicts.

    Keras and every interpreter see `batch_size` images at a time (one
    interpreter per file, reused across batches), so memory does not grow with
    the number of images. Keras runs the model as the files were converted
    from (`prepare_export_model`; no copy of a model prepared already).
    """
    images = np.asarray(images)
    engines = 1 + len(tflite_files)
    with console.Progress("TFLite parity against Keras", engines * len(images), "image") as bar:
        bar.update(0, note="at keras")
        copy, parts = prepare_export_model(model), []
        for start in range(0, len(images), batch_size or max(len(images), 1)):
            parts.append(batched_probabilities(copy, images[start:start + (batch_size or len(images))], batch_size))
            bar.add(len(parts[-1]))
        reference = np.concatenate(parts) if parts else np.zeros((0, model.output_shape[-1]), "float32")
        del copy, parts
        _release_memory()
        probabilities_of = {}
        with console.native_output("running TFLite files"):  # "INFO: Created TensorFlow Lite XNNPACK delegate"
            for variant, path in tflite_files.items():
                bar.update(bar.current, note=f"at {variant}")
                interpreter = tflite_interpreter(path)
                probabilities_of[variant] = tflite_predict(interpreter, images, batch_size=batch_size,
                                                           progress=bar.add)
                del interpreter
                _release_memory()
    rows = []
    for variant, path in tflite_files.items():
        probs = probabilities_of.pop(variant)
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
