"""Training throughput (images/s) of R50+ViT-B/16 and ViT-B/16 at 224, per precision and XLA setting.

    python benchmarks/train_throughput.py [--batch-size 64] [--steps 10]

Prints a table with model FLOPs utilisation (MFU = 3 x forward FLOPs x images/s / peak)
against the device's peak: the measured matmul rate of the precision on this device
(so on a GPU, bf16 is measured against the bf16 matmul rate).
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import GFLOPS_224, machine, matmul_gflops, table


def measure(name, precision, jit, batch, steps, size):
    import keras
    import tensorflow as tf

    import vit_keras
    from vit_keras import training

    keras.config.set_dtype_policy(precision)
    try:
        model = vit_keras.BUILDERS[name](image_size=size, classes=1000, pretrained=False)
    finally:
        keras.config.set_dtype_policy("float32")
    model.compile(optimizer=training.make_optimizer("sgd", 0.01, 1000, 10),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True), jit_compile=jit)
    x = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype("float32")
    y = np.eye(1000, dtype="float32")[np.arange(batch) % 1000]
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()
    model.fit(ds, steps_per_epoch=2, epochs=1, verbose=0)  # compile + warm up
    start = time.perf_counter()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
    return batch * steps / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=["vit_r50_b16", "vit_b16"])
    p.add_argument("--precisions", nargs="+", default=["float32", "mixed_bfloat16"])
    p.add_argument("--jit", nargs="+", default=["off", "on"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--image-size", type=int, default=224)
    args = p.parse_args()

    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        tf.config.experimental.enable_tensor_float_32_execution(False)
    peaks = {"float32": matmul_gflops(dtype="float32")}
    if any("bfloat16" in x for x in args.precisions):
        peaks["mixed_bfloat16"] = matmul_gflops(dtype="bfloat16")
    if any("float16" == x.split("_")[-1] for x in args.precisions):
        peaks["mixed_float16"] = matmul_gflops(dtype="float16")
    scale = (args.image_size / 224) ** 2
    rows = []
    for name in args.models:
        for precision in args.precisions:
            for jit in args.jit:
                ips = measure(name, precision, jit == "on", args.batch_size, args.steps, args.image_size)
                tflops = 3 * GFLOPS_224[name] * scale * ips / 1e3
                rows.append({"model": name, "precision": precision, "xla": jit, "batch": args.batch_size,
                             "images/s": f"{ips:.1f}", "TFLOP/s": f"{tflops:.2f}",
                             "MFU": f"{tflops * 1e3 / peaks[precision]:.0%}"})
                print(rows[-1], flush=True)
    print(f"\nTraining throughput at {args.image_size}x{args.image_size} on {machine()}; peak = measured "
          + ", ".join(f"{k} matmul {v / 1e3:.2f} TFLOP/s" for k, v in peaks.items()) + "\n")
    print(table(rows, ["model", "precision", "xla", "batch", "images/s", "TFLOP/s", "MFU"]))


if __name__ == "__main__":
    main()
