"""TFLite latency (batch 1, 2 threads) and file size of each variant against Keras.

    python benchmarks/export_latency.py [--models vit_r50_b16 vit_b16] [--image-size 224]

Full-size models with random weights (speed and size do not depend on the values);
int8 is calibrated on a few random images, which is enough for timing.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, table, timed  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=["vit_r50_b16", "vit_b16"])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--variants", nargs="+", default=None)
    p.add_argument("--calibration", type=int, default=4)
    args = p.parse_args()

    import tensorflow as tf

    import vit_keras
    from vit_keras import export

    tf.config.threading.set_intra_op_parallelism_threads(2)
    rows = []
    rng = np.random.default_rng(0)
    s = args.image_size
    x = rng.uniform(0, 255, (1, s, s, 3)).astype("float32")
    for name in args.models:
        model = vit_keras.BUILDERS[name](image_size=s, classes=1000, pretrained=False)
        head = model.get_layer("head")  # zero-initialised: give it weights so outputs differ
        head.kernel.assign(rng.normal(0, 0.05, head.kernel.shape).astype("float32"))
        keras_fn = tf.function(lambda v: model(v, training=False))
        keras_s = timed(lambda: keras_fn(x / 127.5 - 1).numpy())
        reference = np.asarray(export.probabilities(model, x))
        rows.append({"model": name, "variant": "keras (float32)", "latency ms": f"{keras_s * 1e3:.1f}",
                     "size MB": f"{sum(w.size for w in model.get_weights()) * 4 / 2**20:.1f}",
                     "convert s": "", "max |p - keras|": ""})
        calibration = rng.uniform(0, 255, (args.calibration, s, s, 3)).astype("float32")
        for variant in args.variants or export.TFLITE_VARIANTS:
            start = time.perf_counter()
            blob = export.convert_tflite(model, variant, calibration)
            convert_s = time.perf_counter() - start
            with tempfile.NamedTemporaryFile(suffix=".tflite", delete=False) as f:
                f.write(blob)
            from ai_edge_litert.interpreter import Interpreter

            interpreter = Interpreter(model_path=f.name, num_threads=2)
            interpreter.allocate_tensors()
            inp = interpreter.get_input_details()[0]
            feed = x.astype(inp["dtype"])

            def run():
                interpreter.set_tensor(inp["index"], feed)
                interpreter.invoke()

            latency = timed(run, warmup=1, repeats=5)
            probs = export.tflite_predict(f.name, feed)
            os.remove(f.name)
            rows.append({"model": name, "variant": variant, "latency ms": f"{latency * 1e3:.1f}",
                         "size MB": f"{len(blob) / 2**20:.1f}", "convert s": f"{convert_s:.0f}",
                         "max |p - keras|": f"{np.abs(probs - reference).max():.1e}"})
            print(rows[-1], flush=True)
    print(f"\nTFLite vs Keras, batch 1, 2 threads, {s}x{s}, on {machine()}\n")
    print(table(rows, ["model", "variant", "latency ms", "size MB", "convert s", "max |p - keras|"]))


if __name__ == "__main__":
    main()
