"""Inference images/s and peak memory: vit_keras (float32, XLA on/off, TFLite) against timm and vit-keras.

    python benchmarks/inference.py [--batches 1 8] [--models vit_r50_b16 vit_b16]

Each configuration runs in its own fresh process, one after the other, so the
peak resident memory is its own. timm runs when `torch` and `timm` are installed
(`pip install -e '.[bench]'`). The older `vit-keras` package is not measured: it
has the same import name (`vit_keras`), so it cannot be installed beside this one.
"""

import argparse
import json
import os
import resource
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import GFLOPS_224, machine, matmul_gflops, table, timed  # noqa: E402

TIMM = {"vit_r50_b16": "vit_base_r50_s16_224", "vit_b16": "vit_base_patch16_224"}


def run_one(engine, name, batch, size):
    import numpy as np

    x = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype("float32")
    if engine.startswith("vit_keras"):
        import tensorflow as tf

        import vit_keras

        model = vit_keras.BUILDERS[name](image_size=size, classes=1000, pretrained=False)
        if engine == "vit_keras-tflite":
            from vit_keras import export

            from ai_edge_litert.interpreter import Interpreter

            interpreter = Interpreter(model_content=export.convert_tflite(model, "float32"),
                                      num_threads=os.cpu_count())
            interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], x.shape)
            interpreter.allocate_tensors()
            index = interpreter.get_input_details()[0]["index"]
            pixels = (x + 1) * 127.5

            def fn():
                interpreter.set_tensor(index, pixels)
                interpreter.invoke()
        else:
            call = tf.function(lambda v: model(v, training=False), jit_compile=engine == "vit_keras-xla")
            fn = lambda: call(x).numpy()  # noqa: E731
    elif engine == "timm":
        import timm
        import torch

        torch.set_num_threads(os.cpu_count())
        model = timm.create_model(TIMM[name], pretrained=False).eval()
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

        def fn():
            with torch.inference_mode():
                model(xt)
    else:
        raise ValueError(f"unknown engine {engine}")
    seconds = timed(fn, warmup=2, repeats=5, min_seconds=2.0)
    return {"images/s": batch / seconds, "peak MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=["vit_r50_b16", "vit_b16"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--engines", nargs="+",
                   default=["vit_keras", "vit_keras-xla", "vit_keras-tflite", "timm"])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        engine, name, batch = args.child
        print(json.dumps(run_one(engine, name, int(batch), args.image_size)))
        return
    ceiling = matmul_gflops()
    rows = []
    for name in args.models:
        flops = GFLOPS_224[name] * (args.image_size / 224) ** 2
        for batch in args.batches:
            for engine in args.engines:
                done = subprocess.run([sys.executable, __file__, "--image-size", str(args.image_size),
                                       "--child", engine, name, str(batch)], capture_output=True, text=True)
                row = {"model": name, "batch": batch, "engine": engine}
                if done.returncode:
                    row["images/s"] = "n/a: " + done.stderr.strip().splitlines()[-1][:60]
                else:
                    r = json.loads(done.stdout.strip().splitlines()[-1])
                    row.update({"images/s": f"{r['images/s']:.2f}", "peak MB": f"{r['peak MB']:.0f}",
                                "of ceiling": f"{r['images/s'] * flops / ceiling:.0%}"})
                rows.append(row)
                print(row, flush=True)
    print(f"\nInference at {args.image_size}x{args.image_size} on {machine()}; float32 matmul ceiling "
          f"{ceiling:.0f} GFLOP/s; forward GFLOPs/image: "
          + ", ".join(f"{k} {v}" for k, v in GFLOPS_224.items() if k in args.models) + "\n")
    print(table(rows, ["model", "batch", "engine", "images/s", "peak MB", "of ceiling"]))


if __name__ == "__main__":
    main()
