"""Opens what `vit-keras train` wrote, in a fresh process on one backend; run by tests/test_trained_files.py.

    KERAS_BACKEND=jax python tests/trained_files_run.py RUN_DIR EXPECTED.npz OUT_DIR

As a user would: `import vit_keras`, then plain `keras.models.load_model` of
`model.keras`, `best.keras` and `last.keras`; each must come back with its
optimizer (step count and slots as saved), give the expected logits, train on
with `fit` from that optimizer and save again. Off TensorFlow, TensorFlow is
hidden (tests/no_tensorflow.py). Prints one JSON line.
"""

import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import no_tensorflow

if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
    no_tensorflow.install()

import numpy as np

import keras

import vit_keras  # noqa: F401 - registers the package's layers and optimizers

run, expected_path, out = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
expected = np.load(expected_path)
images = expected["images"]
report = {}
for name in ("model", "best", "last"):
    model = keras.models.load_model(run / f"{name}.keras")  # plain Keras, nothing of ours by hand
    optimizer = model.optimizer
    logits = keras.ops.convert_to_numpy(model(images, training=False))
    slots = {v.path: keras.ops.convert_to_numpy(v) for v in optimizer.variables}
    momentum = [k for k in slots if "momentum" in k]
    row = {
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        "iterations": int(keras.ops.convert_to_numpy(optimizer.iterations)),
        "logits_error": float(np.abs(logits - expected[f"{name}_logits"]).max()),
        "momentum_error": max(float(np.abs(slots[k] - expected[f"{name}|{k}"]).max()) for k in momentum),
        "momentum_slots": len(momentum),
    }
    before = [keras.ops.convert_to_numpy(w).copy() for w in model.trainable_weights]
    history = model.fit(images, expected["labels"], batch_size=len(images) // 2, epochs=1, verbose=0)
    after = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    row["iterations_after_fit"] = int(keras.ops.convert_to_numpy(optimizer.iterations))
    row["fit_loss"] = float(history.history["loss"][-1])
    row["weights_moved"] = bool(any(np.abs(a - b).max() > 0 for a, b in zip(after, before)))
    path = out / f"{name}.keras"
    model.save(path)
    again = keras.models.load_model(path)
    row["resaved_error"] = float(np.abs(keras.ops.convert_to_numpy(again(images, training=False))
                                        - keras.ops.convert_to_numpy(model(images, training=False))).max())
    row["resaved_iterations"] = int(keras.ops.convert_to_numpy(again.optimizer.iterations))
    report[name] = row
report["tensorflow_modules"] = sorted(m for m in sys.modules if m == "tensorflow")
print(json.dumps(report))
