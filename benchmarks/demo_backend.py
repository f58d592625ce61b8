"""The README's demo training (`vit-keras demo`'s recipe) on the Keras backend of this process.

    KERAS_BACKEND=jax python benchmarks/demo_backend.py [--epochs 60] [--out runs/demo_jax]

Trains the small hybrid on the built-in digits exactly as `vit_keras.training.DEMO`
says (60 epochs, batch 32, 64x64, SGD + warm-up + cosine) with
`vit_keras.training.train`, and prints the backend, the test top-1 accuracy and
the wall time. On JAX and PyTorch the input is the TensorFlow-free
`ImagePipeline`; the export and attention steps of `vit-keras demo` are not run.
"""

import argparse
import dataclasses
import json
import os
import platform
import tempfile


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: the demo's")
    parser.add_argument("--out", default=None, help="default: a temporary folder")
    args = parser.parse_args()
    import keras

    from vit_keras import training

    config = dataclasses.replace(training.DEMO, verbose=2, overwrite=True,
                                 epochs=args.epochs or training.DEMO.epochs)
    out = args.out or tempfile.mkdtemp(prefix="demo_backend_")
    metrics = training.train(config, out=out).metrics
    result = {
        "backend": keras.backend.backend(),
        "test_top1": round(metrics["test_top1"], 4),
        "epochs": metrics["epochs"],
        "steps": metrics["steps"],
        "wall_seconds": metrics["wall_seconds"],
        "devices": keras.distribution.list_devices(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
