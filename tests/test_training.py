"""Training with model.fit: data sources, recipe, precision, fine-tuning, resume."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import vit_keras
from vit_keras import data, training
from vit_keras.checkpoint import POSEMB_KEY, read_npz, resize_posemb

TINY = dict(model="vit_tiny16", image_size=32, batch_size=32, verbose=0)


def test_digits_run_writes_everything(tmp_path):
    result = training.train(dataset="digits", out=str(tmp_path), epochs=1, **TINY)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == result.metrics
    for key in ("test_top1", "test_top5", "epochs", "steps", "wall_seconds"):
        assert key in metrics
    assert metrics["steps"] == data.load("digits").num_train // 32 and metrics["epochs"] == 1
    assert 0.0 <= metrics["test_top1"] <= metrics["test_top5"] <= 1.0
    for name in ("model.keras", "last.keras", "best.keras", "log.csv"):
        assert (tmp_path / name).exists(), name
    assert any((tmp_path / "logs").rglob("*tfevents*"))
    assert not (tmp_path / "backup").exists()
    reloaded = keras.saving.load_model(tmp_path / "model.keras")
    assert vit_keras.model.class_names(reloaded) == [str(i) for i in range(10)]


def test_tfds_pipeline_with_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=64):
        result = training.train(
            dataset="cifar10", data_dir=str(tmp_path / "tfds"), out=str(tmp_path / "run"),
            epochs=1, randaugment=True, mixup=True, cutmix=True, label_smoothing=0.1, **TINY,
        )
    assert len(result.metrics["class_names"]) == 10  # from the dataset's info
    assert result.metrics["steps"] == 64 // 32  # mock_data yields num_examples whatever the split slice
    assert result.model.output_shape == (None, 10)


def make_folder(root, n=12, size=40):
    """Two classes that a model can tell apart: horizontal and vertical stripes."""
    import PIL.Image

    rng = np.random.default_rng(0)
    for label, axis in (("horizontal", 0), ("vertical", 1)):
        (root / label).mkdir(parents=True)
        for i in range(n):
            stripes = (np.arange(size) // 4 % 2 * 200 + rng.integers(0, 40)).astype("uint8")
            img = np.repeat(np.expand_dims(stripes, 1 - axis), size, axis=1 - axis)
            ext = ("png", "jpg", "bmp")[i % 3]
            PIL.Image.fromarray(np.stack([img] * 3, -1)).save(root / label / f"{i}.{ext}")
    return root


def test_image_folder_pipeline(tmp_path):
    folder = make_folder(tmp_path / "images")
    splits = data.load(str(folder))
    assert splits.class_names == ["horizontal", "vertical"] and splits.num_train == 19
    ds = data.make_pipeline(splits.train, (32, 48), 2, batch_size=4, training=True)
    images, labels = next(iter(ds))
    assert images.shape == (4, 32, 48, 3) and labels.shape == (4, 2)
    assert float(np.min(images)) >= -1.0 and float(np.max(images)) <= 1.0


def test_unknown_and_unprepared_datasets_fail_fast(tmp_path):
    start = time.time()
    with pytest.raises(ValueError, match="Unknown dataset 'no_such_dataset'"):
        data.load("no_such_dataset")
    with pytest.raises(ValueError, match="no such folder"):
        data.load("./missing/folder")
    with pytest.raises(ValueError, match="not prepared"):
        data.load("mnist", data_dir=str(tmp_path))
    assert time.time() - start < 30


def test_fine_tune_from_checkpoint_new_classes_and_resolution(tmp_path, tiny_r50, caplog):
    """The fixture hybrid (10 classes, 64x64) fine-tuned on 2 classes at 32x48."""
    folder = make_folder(tmp_path / "images")
    config = tiny_r50.config()
    for key in ("classes", "image_size"):
        config.pop(key)
    with caplog.at_level("WARNING", logger="vit_keras"):
        result = training.train(
            model=config, dataset=str(folder), weights=str(tiny_r50.params), image_size=(32, 48),
            out=str(tmp_path / "run"), epochs=1, batch_size=4, learning_rate=0.0, verbose=0,
        )
    model = result.model
    assert model.output_shape == (None, 2) and "Re-initialised head/kernel" in caplog.text
    # With a zero learning rate the body is exactly the checkpoint's (position
    # embedding resized to the 2x3 grid).
    params = read_npz(tiny_r50.params)
    emb = model.get_layer("embeddings")
    np.testing.assert_array_equal(emb.resnet.conv_root.kernel.numpy(), params["conv_root/kernel"])
    np.testing.assert_allclose(emb.pos_embedding.numpy(), resize_posemb(params[POSEMB_KEY], (2, 3)), atol=1e-6)


def test_xla_training(tmp_path):
    result = training.train(dataset="digits", out=str(tmp_path), epochs=1, jit_compile=True, **TINY)
    assert result.model.jit_compile is True
    assert result.metrics["test_top1"] > 0.2  # one epoch of a 2-layer ViT already beats chance (0.1)


def test_mixed_bfloat16_keeps_float32_where_needed(tmp_path):
    result = training.train(dataset="digits", out=str(tmp_path), epochs=1, precision="mixed_bfloat16", **TINY)
    model = result.model
    assert model.get_layer("Transformer").compute_dtype == "bfloat16"
    assert model.get_layer("head").compute_dtype == "float32"
    x = np.zeros((1, 32, 32, 3), "float32")
    logits, weights = vit_keras.attention_model(model)(x)
    assert logits.dtype == "float32" and weights[0].dtype == "float32"
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored


def _state(out):
    path = pathlib.Path(out) / "backup" / "state.json"
    try:
        return json.loads(path.read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def test_sigkill_mid_epoch_then_resume(tmp_path):
    out = tmp_path / "run"
    per_epoch = data.load("digits").num_train // 32
    total = 2 * per_epoch
    every = 5 if per_epoch % 5 else 7  # backups never fall on an epoch boundary before the end
    cmd = [sys.executable, "-m", "vit_keras.cli", "train", "--model", "vit_hybrid_tiny",
           "--dataset", "digits", "--image-size", "64", "--epochs", "2", "--batch-size", "32",
           "--backup-every", str(every), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while _state(out) < 2 * every and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _state(out)
    assert 2 * every <= killed_at < total and killed_at % per_epoch, f"backup at step {killed_at} is not mid-run"
    assert not (out / "metrics.json").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Resuming {out} at step {killed_at} of {total}" in done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == total and metrics["resumed_from_step"] == killed_at
    model = keras.saving.load_model(out / "model.keras")
    # The optimizer state came back too: its step counter saw every step once.
    assert int(model.optimizer.iterations.numpy()) == total


def test_unknown_model_and_precision(tmp_path):
    with pytest.raises(ValueError, match="Unknown model 'vit_x'"):
        training.train(model="vit_x", out=str(tmp_path), epochs=1)
    with pytest.raises(ValueError, match="Unknown precision"):
        training.train(precision="fp8", out=str(tmp_path))


def test_continue_from_keras_file(tmp_path):
    first = training.train(dataset="digits", out=str(tmp_path / "a"), epochs=1, **TINY)
    path = str(tmp_path / "a" / "model.keras")
    kwargs = {k: v for k, v in TINY.items() if k != "model"}
    # With a learning rate of 0 the run must end where the file started: its weights, its accuracy.
    again = training.train(model=path, dataset="digits", out=str(tmp_path / "b"), epochs=1,
                           learning_rate=0.0, **kwargs)
    assert again.metrics["steps"] == first.metrics["steps"]
    for before, after in zip(first.model.weights, again.model.weights):
        np.testing.assert_array_equal(np.asarray(before), np.asarray(after), err_msg=before.path)
    assert again.metrics["test_top1"] == first.metrics["test_top1"] > 0.3  # a new head would be at chance
    moved = training.train(model=path, dataset="digits", out=str(tmp_path / "m"), epochs=1, **kwargs)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(first.model.weights, moved.model.weights))
    folder = make_folder(tmp_path / "images")
    with pytest.raises(ValueError, match="has 10 outputs but the dataset has 2 classes"):
        training.train(model=path, dataset=str(folder), out=str(tmp_path / "c"), epochs=1,
                       **dict(kwargs, batch_size=4))
