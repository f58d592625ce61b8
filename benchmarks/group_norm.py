"""GroupNorm: Keras's GroupNormalization (before) against vit_keras.layers.GroupNorm (after).

    python benchmarks/group_norm.py [--batch 8]

The shapes are the GroupNorm inputs of R50+ViT-B/16 at 224 (root, and the gn1/gn2/gn3 of each stage);
"per pass" weights each shape by how often it occurs in one forward pass.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, table, timed

# (H, W, C, occurrences in one R50 (3,4,9) forward pass at 224)
SHAPES = [
    (112, 112, 64, 1),                                      # gn_root
    (56, 56, 64, 2 * 3), (56, 56, 256, 3 + 1),              # stage 1: gn1, gn2 | gn3, gn_proj
    (56, 56, 128, 1), (28, 28, 128, 2 * 4 - 1), (28, 28, 512, 4 + 1),   # stage 2
    (28, 28, 256, 1), (14, 14, 256, 2 * 9 - 1), (14, 14, 1024, 9 + 1),  # stage 3
]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()

    import keras
    import tensorflow as tf

    from vit_keras.layers import GroupNorm

    rows, total = [], {"keras": 0.0, "vit_keras": 0.0}
    for h, w, c, count in SHAPES:
        x = tf.constant(np.random.default_rng(0).normal(1, 2, (args.batch, h, w, c)).astype("float32"))
        layers = {"keras": keras.layers.GroupNormalization(32, epsilon=1e-6), "vit_keras": GroupNorm(32, 1e-6)}
        times = {}
        for name, layer in layers.items():
            fn = tf.function(lambda v, layer=layer: layer(v))
            times[name] = timed(lambda: fn(x).numpy(), warmup=2, repeats=10)
            total[name] += count * times[name]
        rows.append({"shape": f"{args.batch}x{h}x{w}x{c}", "per pass": count,
                     "keras ms": f"{times['keras'] * 1e3:.2f}", "vit_keras ms": f"{times['vit_keras'] * 1e3:.2f}",
                     "speed-up": f"{times['keras'] / times['vit_keras']:.2f}x"})
    rows.append({"shape": "one R50 forward pass", "per pass": "",
                 "keras ms": f"{total['keras'] * 1e3:.1f}", "vit_keras ms": f"{total['vit_keras'] * 1e3:.1f}",
                 "speed-up": f"{total['keras'] / total['vit_keras']:.2f}x"})
    print(f"GroupNorm(32) forward, batch {args.batch}, no XLA, on {machine()}\n")
    print(table(rows, ["shape", "per pass", "keras ms", "vit_keras ms", "speed-up"]))


if __name__ == "__main__":
    main()
