"""Serving: files that servers and phones run, with the preprocessing inside.

- `images`: decoding encoded images in the graph, with header limits.
- `saved_model`: the SavedModel for TF Serving (`export_saved_model`).
- `warmup`: TF Serving's warm-up request file.
- `tflite`: TFLite files for phones (`export_tflite`) and their parity table.
- `onnx`: an ONNX file for ONNX Runtime (`export_onnx`).
- `folders`: atomic export folders and what `overwrite` may replace.

These modules need TensorFlow (the exports are TensorFlow graphs).
"""

import json
import os

# What `export` (and `vit-keras export --format`) writes.
FORMATS = ("saved_model", "tflite", "onnx")
TFLITE_VARIANTS = ("float32", "float16", "dynamic_int8", "int8")


def recorded_dataset(model_path):
    """The dataset named in `metrics.json` beside a `.keras` file of a training run, or None."""
    if not isinstance(model_path, (str, os.PathLike)):
        return None
    metrics = os.path.join(os.path.dirname(os.path.abspath(model_path)), "metrics.json")
    if not os.path.exists(metrics):
        return None
    try:
        with open(metrics) as f:
            return json.load(f).get("dataset")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{metrics}: unreadable ({str(e).splitlines()[0] if str(e) else e}); "
                         "pass the dataset") from None


def export(model, format, out, *, dataset=None, name=None, version=1, variants=None, overwrite=False,
           calibration=200, parity=400, batch_size=None, strict_int8=False, precision="float32"):
    """Exports a model or `.keras` file as `format`; the one function behind `vit-keras export`.

    - "saved_model": TF Serving's layout `out/<name>/<version>/`
      (`saved_model.export_saved_model`).
    - "tflite": `out/<variant>.tflite` (`tflite.export_tflite`), int8
      calibrated on `calibration` training images of `dataset`, then the parity
      table against Keras on `parity` held-out images, `batch_size` at a time.
      `int8` runs its convolutions and dense layers in int8 and the rest in
      float32 (faster than `dynamic_int8` on CPU); `strict_int8` quantises
      every op (for integer-only accelerators; several times slower on CPU).
    - "onnx": `out/model.onnx` (`onnx.export_onnx`).

    `precision="bfloat16"` (SavedModel and ONNX): the SavedModel serves the
    model's bfloat16 `inference_copy`; the ONNX file stores its weights in
    bfloat16 and computes in float32 (ONNX Runtime's CPU provider has no
    bfloat16 kernels). Same inputs, float32 outputs. TFLite refuses it: its
    smaller variants are float16, dynamic_int8 and int8.

    `dataset` defaults to the one in `metrics.json` beside a `.keras` file.
    `overwrite` replaces only an earlier export, never the folder that holds
    the model. Errors a user can fix are ValueError or FileExistsError naming
    the path.

    Returns:
        dict with `path` (what was written) and, for TFLite, `rows` (the
        parity table, see `tflite.format_parity`) and `dataset`.
    """
    from vit_keras import files
    from vit_keras.serving import folders

    if format not in FORMATS:
        raise ValueError(f"Unknown export format {format!r}; use one of {FORMATS}.")
    _check_precision(format, precision)
    if format == "saved_model":  # before the model is loaded
        folders._check_name_and_version(name or "model", version)
    keep = [os.fspath(model)] if isinstance(model, (str, os.PathLike)) else []
    if format == "tflite":
        dataset = dataset or recorded_dataset(model)
    if format == "tflite" and dataset is None:
        raise ValueError("TFLite export needs a dataset (--dataset) for calibration and the parity check.")
    with files.lock_beside(out, f"the export folder {out}"):  # one export at a time into `out`
        return _export(model, format, out, dataset, name, version, variants, overwrite, calibration, parity,
                       batch_size, strict_int8, keep, precision)


def _check_precision(format, precision):
    """ValueError for a precision the format cannot take (TFLite has no bfloat16 kernels)."""
    from vit_keras.precision import EXPORT_PRECISIONS, check_dtype

    check_dtype(precision, EXPORT_PRECISIONS, "precision")
    if format == "tflite" and precision != "float32":
        raise ValueError(f"TFLite has no {precision} kernels: --precision {precision} is for saved_model and onnx; "
                         "TFLite's smaller variants are --variants float16 dynamic_int8 int8.")


def _export(model, format, out, dataset, name, version, variants, overwrite, calibration, parity, batch_size,
            strict_int8, keep, precision="float32"):
    from vit_keras import data, files, finetune
    from vit_keras.serving import tflite

    net = finetune.merge_lora(files.load_keras(model))  # exports hold LoRA adapters folded into the kernels
    if len(net.outputs) != 1:
        raise ValueError(f"{model if keep else net.name} has {len(net.outputs)} outputs; export takes a "
                         "classifier with one (its logits), such as the files `vit-keras train` writes.")
    try:
        if format == "saved_model":
            from vit_keras.serving.saved_model import export_saved_model

            return {"path": export_saved_model(net, out, name=name or net.name, version=version,
                                               overwrite=overwrite, keep=keep, precision=precision)}
        if format == "onnx":
            from vit_keras.serving.onnx import export_onnx

            return {"path": export_onnx(net, out, overwrite=overwrite, keep=keep, precision=precision)}
        splits = data.load(dataset)
        size = net.input_shape[1:3]
        calib, _ = data.pixels(splits.train, size, calibration)
        held_out, _ = data.pixels(splits.test, size, parity)
        written = tflite.export_tflite(net, out, variants=variants or TFLITE_VARIANTS,
                                       representative_images=calib, overwrite=overwrite, keep=keep,
                                       int8_ops=None if strict_int8 else tflite.INT8_OPS)
        del calib
        rows = tflite.parity_table(net, written, held_out, batch_size=batch_size or tflite.BATCH_SIZE)
        return {"path": out, "files": written, "rows": rows, "dataset": dataset, "count": len(held_out)}
    except FileExistsError:
        raise
    except OSError as e:
        raise ValueError(f"{e.filename or out}: {e.strerror or e}") from None
