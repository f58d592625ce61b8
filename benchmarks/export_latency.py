"""Latency of every export against Keras: TFLite variants (the int8 recipe before and after), ONNX Runtime.

    python benchmarks/export_latency.py [--models vit_r50_b16 vit_b16] [--image-size 224] [--rounds 5]

Full-size models with random weights (a random head, so the probabilities differ between
classes); speed and size do not depend on the values. int8 is calibrated on a few random
images, which is enough for timing. Every engine gets 2 threads. All engines of one model
are timed interleaved, round after round (batch 1: `--calls` calls per round; batch 8: one),
so that load from other processes falls on all of them alike; the table gives the median.

- keras: the model under `tf.function` in TensorFlow (oneDNN), preprocessing and softmax inside.
- tflite: the `serving_default` signature of each file, through its signature runner (the
  batch of 8 resizes the input), default XNNPACK delegate of ai_edge_litert's Interpreter.
  "int8 (before)" is the strict full-integer recipe (`int8_ops=None`: every op int8),
  "int8" the shipped one (`INT8_OPS`: convolutions and dense layers int8, the rest float).
- onnxruntime: `vit_keras.serving.onnx.export_onnx`'s file on the CPU provider (skipped with
  a note when onnxruntime or tf2onnx is not installed).

Memory: a TFLite conversion of R50+ViT-B/16 peaks below 5 GB, but its ONNX export (tf2onnx)
peaks near 10 GB, and the whole run peaked at 16.9 GB RSS (2-core CPU, 11 minutes).
"""

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, matmul_gflops, table

THREADS = 2
COLUMNS = ["model", "engine", "variant", "batch 1 ms", "batch 8 images/s", "size MB", "convert s",
           "max |p - keras|"]


def interleaved(engines, rounds, calls):
    """Median seconds per call of each engine (name -> fn), timed round-robin after one warm-up call each."""
    for fn in engines.values():
        fn()
    times = {name: [] for name in engines}
    for _ in range(rounds):
        for name, fn in engines.items():
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def tflite_engine(interpreter):
    """Pixels -> probabilities through the file's `serving_default` signature (resized to each batch)."""
    runner = interpreter.get_signature_runner("serving_default")
    dtype = runner.get_input_details()["images"]["dtype"]
    return lambda x: runner(images=x.astype(dtype))["probabilities"]


def onnx_engine(session):
    name = session.get_inputs()[0].name
    return lambda x: session.run(["probabilities"], {name: x})[0]


def onnx_missing():
    missing = [m for m in ("onnxruntime", "tf2onnx", "onnx") if importlib.util.find_spec(m) is None]
    if not missing and importlib.util.find_spec("vit_keras.serving.onnx") is None:
        missing = ["vit_keras.serving.onnx"]
    return missing


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit_r50_b16", "vit_b16"])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--calibration", type=int, default=4, help="random images to calibrate int8 on")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=3, help="batch-1 calls per engine and round")
    p.add_argument("--no-onnx", action="store_true")
    args = p.parse_args()

    import keras
    import tensorflow as tf

    import vit_keras
    from vit_keras.predict import probabilities
    from vit_keras.serving import tflite

    tf.config.threading.set_intra_op_parallelism_threads(THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    missing = [] if args.no_onnx else onnx_missing()
    use_onnx = not args.no_onnx and not missing
    if missing:
        print(f"ONNX Runtime rows skipped: {', '.join(missing)} not importable "
              f"(pip install 'vit_keras[onnx]').", flush=True)
    rng = np.random.default_rng(0)
    s = args.image_size
    x1 = rng.uniform(0, 255, (1, s, s, 3)).astype("float32")
    x8 = rng.uniform(0, 255, (8, s, s, 3)).astype("float32")
    calibration = rng.integers(0, 256, (args.calibration, s, s, 3)).astype("uint8")
    # (label, variant, convert_tflite keyword arguments)
    variants = [("float32", "float32", {}), ("float16", "float16", {}), ("dynamic_int8", "dynamic_int8", {}),
                ("int8 (before)", "int8", {"int8_ops": None}), ("int8", "int8", {})]
    rows = []
    work = tempfile.mkdtemp(prefix="export_latency_")
    try:
        for name in args.models:
            model = vit_keras.BUILDERS[name](image_size=s, classes=1000, pretrained=False)
            head = model.get_layer("head")  # zero-initialised: give it weights so outputs differ
            head.kernel.assign(rng.normal(0, 0.05, head.kernel.shape).astype("float32"))
            reference = np.asarray(probabilities(model, x8))
            info = {("keras", "float32"): {"size MB": f"{sum(w.size for w in model.get_weights()) * 4 / 2**20:.1f}"}}
            # Every file is written first, one conversion at a time; the engines are loaded afterwards,
            # so that no conversion runs beside them (peak memory).
            paths = {}
            for label, variant, kwargs in variants:
                start = time.perf_counter()
                blob = tflite.convert_tflite(model, variant, calibration, **kwargs)
                convert_s = time.perf_counter() - start
                paths[label] = os.path.join(work, f"{name}_{label.replace(' ', '_')}.tflite")
                with open(paths[label], "wb") as f:
                    f.write(blob)
                info[("tflite", label)] = {"size MB": f"{len(blob) / 2**20:.1f}", "convert s": f"{convert_s:.0f}"}
                del blob
                tflite._release_memory()
                print(f"{name} tflite {label}: converted in {convert_s:.0f} s", flush=True)
            onnx_folder = os.path.join(work, f"{name}_onnx")
            if use_onnx:
                from vit_keras.serving import onnx as onnx_export

                start = time.perf_counter()
                onnx_export.export_onnx(model, onnx_folder)
                convert_s = time.perf_counter() - start
                size = sum(os.path.getsize(os.path.join(onnx_folder, f)) for f in os.listdir(onnx_folder)
                           if f.startswith("model.onnx"))
                info[("onnxruntime", "float32")] = {"size MB": f"{size / 2**20:.1f}", "convert s": f"{convert_s:.0f}"}
                tflite._release_memory()
                print(f"{name} onnx: converted in {convert_s:.0f} s", flush=True)

            keras_fn = tf.function(lambda v, m=model: probabilities(m, v), reduce_retracing=True)
            engines = {("keras", "float32"): (lambda x, f=keras_fn: np.asarray(f(tf.constant(x))))}
            if use_onnx:
                session = onnx_export.onnx_session(onnx_folder, threads=THREADS)
                engines[("onnxruntime", "float32")] = onnx_engine(session)
            for label, path in paths.items():
                engines[("tflite", label)] = tflite_engine(tflite.tflite_interpreter(path, num_threads=THREADS))
            one = interleaved({k: (lambda fn=fn: fn(x1)) for k, fn in engines.items()}, args.rounds, args.calls)
            eight = interleaved({k: (lambda fn=fn: fn(x8)) for k, fn in engines.items()}, args.rounds, 1)
            for key, fn in engines.items():
                diff = np.abs(np.asarray(fn(x8), "float32") - reference).max()
                rows.append({"model": name, "engine": key[0], "variant": key[1],
                             "batch 1 ms": f"{one[key] * 1e3:.1f}", "batch 8 images/s": f"{8 / eight[key]:.1f}",
                             "max |p - keras|": "" if key[0] == "keras" else f"{diff:.1e}", **info[key]})
                print(rows[-1], flush=True)
            del engines, fn, model, keras_fn
            keras.backend.clear_session()
            tflite._release_memory()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nLatency at {s}x{s}, {THREADS} threads per engine, median of {args.rounds} interleaved rounds, on "
          f"{machine()}; float32 matmul rate (TensorFlow, 2048x2048, all cores): {matmul_gflops():.0f} GFLOP/s\n")
    print(table(rows, COLUMNS))


if __name__ == "__main__":
    main()
