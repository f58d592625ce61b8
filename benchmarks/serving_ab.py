"""The serving paths of one model side by side in ONE process, call after call (before/after on a busy machine).

    python benchmarks/serving_ab.py [--model vit_r50_b16] [--batch 1] [--calls 15]

float32 as built (the old float32 path), `inference_copy(model, "float32")`, the model built under
`mixed_bfloat16` (the old bfloat16 path) and `inference_copy(model, "bfloat16")`, each under
`tf.function`, two warm-up calls each, then `--calls` rounds in which every path runs once; images/s
from the median call. Load from other processes falls on all paths alike, which fresh-process runs
(`inference.py`) cannot give on a shared machine. No timm here: torch and TensorFlow in one process crash.
"""

import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import cpu_info, load_average, matmul_gflops, model_parser, table


def main():
    p = model_parser(__doc__, batch=1)
    p.add_argument("--calls", type=int, default=15)
    args = p.parse_args()
    import tensorflow as tf

    import vit_keras

    build = vit_keras.BUILDERS[args.model]
    x = np.random.default_rng(0).uniform(-1, 1, (args.batch, 224, 224, 3)).astype("float32")
    f32 = build(image_size=224, classes=1000, pretrained=False)
    models = {"float32 as built": f32,
              "inference_copy float32": vit_keras.inference_copy(f32, "float32"),
              "mixed_bfloat16 policy": build(image_size=224, classes=1000, pretrained=False, dtype="mixed_bfloat16"),
              "inference_copy bfloat16": vit_keras.inference_copy(f32, "bfloat16")}
    fns = {k: tf.function(lambda v, m=m: m(v, training=False)) for k, m in models.items()}
    for fn in fns.values():
        fn(x).numpy()
        fn(x).numpy()
    loads, times = [load_average()], {k: [] for k in fns}
    for _ in range(args.calls):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn(x).numpy()
            times[k].append(time.perf_counter() - start)
        loads.append(load_average())
    rows = [{"model": args.model, "batch": args.batch, "path": k,
             "images/s": f"{args.batch / statistics.median(v):.2f}"} for k, v in times.items()]
    loads = [v for v in loads if v is not None]
    print(f"\nCPU: {cpu_info()}; TensorFlow matmul GFLOP/s float32 {matmul_gflops():.0f}, bfloat16 "
          f"{matmul_gflops(dtype='bfloat16'):.0f}; load average {min(loads):.1f}-{max(loads):.1f}; "
          f"median of {args.calls} alternating calls\n")
    print(table(rows, ["model", "batch", "path", "images/s"]))


if __name__ == "__main__":
    main()
