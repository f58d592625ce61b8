"""What `vit-keras train` writes opens everywhere: plain `keras.models.load_model` after `import vit_keras`.

Each backend gets a fresh process (tests/trained_files_run.py) that has imported
nothing but `vit_keras`: the files load with their optimizer, give the logits
of the trained weights, train on with `fit` and save again.
"""

import json
import os
import pathlib
import subprocess
import sys
import numpy as np
import pytest

from vit_keras import training

SCRIPT = pathlib.Path(__file__).parent / "trained_files_run.py"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-epoch run of `train`, with the logits and momentum slots of its trained model."""
    root = tmp_path_factory.mktemp("trained")
    out = root / "run"
    result = training.train(model="vit_tiny16", dataset="digits", image_size=32, batch_size=32, epochs=1,
                            out=str(out), verbose=0)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (8, 32, 32, 3)).astype("float32")
    labels = np.eye(10, dtype="float32")[rng.integers(0, 10, 8)]
    expected = {"images": images, "labels": labels}
    for name in ("model", "best", "last"):
        expected[f"{name}_logits"] = np.asarray(result.model(images, training=False))
        for v in result.model.optimizer.variables:
            if "momentum" in v.path:
                expected[f"{name}|{v.path}"] = np.asarray(v)
    np.savez(root / "expected.npz", **expected)
    return out, root / "expected.npz", result.metrics["steps"]


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_train_files_load_fit_and_save_in_a_fresh_process(trained, backend, tmp_path):
    run, expected, steps = trained
    env = dict(os.environ, KERAS_BACKEND=backend)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(run), str(expected), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("model", "best", "last"):
        row = report[name]
        assert row["optimizer"] == "vit_keras.optimizers.SGD", row
        assert row["iterations"] == steps, row  # one epoch: all three files are of the last step
        assert row["logits_error"] < 1e-5 and row["momentum_error"] < 1e-6 and row["momentum_slots"] > 0, row
        assert row["iterations_after_fit"] == steps + 2 and np.isfinite(row["fit_loss"]), row
        assert row["weights_moved"], row
        assert row["resaved_error"] < 1e-6 and row["resaved_iterations"] == steps + 2, row
    if backend != "tensorflow":
        assert report["tensorflow_modules"] == []
