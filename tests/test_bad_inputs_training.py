"""Hostile and careless input to training: a clear error, and nothing on disk lost."""

import io
import json
import os
import re
import shutil
import stat
import zipfile

import h5py
import keras
import numpy as np
import PIL.Image
import pytest

from vit_keras import cli, data, training

TINY = dict(model="vit_tiny16", image_size=32, batch_size=32, verbose=0)
TINY_ARGS = ["--model", "vit_tiny16", "--image-size", "32", "--batch-size", "32", "--epochs", "1"]
RUN_FILES = ("model.keras", "metrics.json", "best.keras", "last.keras", "best.json", "log.csv")


def snapshot(folder):
    """Bytes and modification time of each file directly in `folder`."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()}


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A completed 1-epoch run, trained under umask 022."""
    out = tmp_path_factory.mktemp("finished") / "run"
    previous = os.umask(0o022)
    try:
        training.train(dataset="digits", out=str(out), epochs=1, **TINY)
    finally:
        os.umask(previous)
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def test_atomic_files_follow_the_umask(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    previous = os.umask(0o022)
    try:
        for umask in (0o022, 0o027):
            os.umask(umask)
            target = tmp_path / oct(umask)
            target.mkdir()
            training.atomic_save(model, str(target / "m.keras"))
            training.atomic_write_json({"a": 1}, str(target / "m.json"))
            expected = 0o666 & ~umask
            assert mode(target / "m.keras") == expected and mode(target / "m.json") == expected
            assert sorted(os.listdir(target)) == ["m.json", "m.keras"]  # no temporary file left
    finally:
        os.umask(previous)
    assert json.loads((tmp_path / oct(0o022) / "m.json").read_text()) == {"a": 1}


def test_training_writes_files_readable_by_others(finished_run):
    """A teammate or a TF Serving process running as another user can read the run (umask 022)."""
    for name in RUN_FILES:
        assert mode(finished_run / name) == 0o644, name


@pytest.mark.parametrize("name, value, message", [
    ("epochs", 0, "epochs must be a positive integer, got 0"),
    ("epochs", -1, "epochs must be a positive integer, got -1"),
    ("batch_size", 0, "batch_size must be a positive integer, got 0"),
    ("batch_size", -4, "batch_size must be a positive integer, got -4"),
    ("image_size", 0, "image_size must be a positive integer or a (height, width) pair"),
    ("image_size", (32, 0), "image_size must be a positive integer or a (height, width) pair"),
    ("grad_accum", 0, "grad_accum must be a positive integer, got 0"),
    ("backup_every", 0, "backup_every must be a positive integer"),
    ("warmup_steps", -1, "warmup_steps must be a non-negative integer"),
    ("learning_rate", float("nan"), "learning_rate must be a finite number >= 0"),
    ("crop_area", (0.0, 1.0), "crop_area must be a (min, max) share"),
])
def test_library_refuses_bad_numbers_before_touching_disk(tmp_path, name, value, message):
    # The dataset does not exist either: the numbers are checked first.
    out = tmp_path / "run"
    kwargs = dict(TINY, dataset=str(tmp_path / "missing"), out=str(out), epochs=1)
    kwargs[name] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        training.train(**kwargs)
    assert not out.exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--epochs", "0", "epochs must be a positive integer, got 0."),
    ("--batch-size", "0", "batch_size must be a positive integer, got 0."),
    ("--batch-size", "-4", "batch_size must be a positive integer, got -4."),
    ("--image-size", "0", "image_size must be a positive integer or a (height, width) pair of them, got 0."),
    ("--image-size", "32x0", "image_size must be a positive integer or a (height, width) pair of them, got (32, 0)."),
    ("--grad-accum", "0", "grad_accum must be a positive integer, got 0."),
    ("--backup-every", "0", "backup_every must be a positive integer, got 0."),
    ("--warmup-steps", "-1", "warmup_steps must be a non-negative integer, got -1."),
    ("--crop-area", "0.5,0", "crop_area must be a (min, max) share of the image area"),
])
def test_cli_refuses_bad_numbers(tmp_path, capsys, flag, value, message):
    """The check of `TrainConfig`'s field, after parsing: the message `train()` gives (tests/test_train_config.py)."""
    out = tmp_path / "run"
    argv = ["train", "--dataset", str(tmp_path / "missing"), "--out", str(out), flag, value]
    assert cli.main(argv) == 2
    assert f"vit-keras: error: {message}" in capsys.readouterr().err
    assert not out.exists()


def test_cli_refuses_text_that_is_no_number(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--dataset", str(tmp_path / "missing"), "--out", str(out), "--crop-area", "0.5"])
    assert exit_info.value.code == 2
    assert "argument --crop-area: must be MIN,MAX shares of the image area" in capsys.readouterr().err
    assert not out.exists()


def test_epochs_zero_on_a_finished_run_changes_nothing(run_copy, capsys):
    before = snapshot(run_copy)
    assert cli.main(["train", *TINY_ARGS[:-2], "--epochs", "0", "--out", str(run_copy)]) == 2
    assert "vit-keras: error: epochs must be a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="epochs must be a positive integer, got 0"):
        training.train(dataset="digits", out=str(run_copy), epochs=0, **TINY)
    assert snapshot(run_copy) == before


def test_finished_run_needs_overwrite(run_copy, capsys):
    before = snapshot(run_copy)
    with pytest.raises(FileExistsError, match=r"holds a finished run \(model.keras, metrics.json\).*--overwrite"):
        training.train(dataset="digits", out=str(run_copy), epochs=1, **TINY)
    assert cli.main(["train", *TINY_ARGS, "--out", str(run_copy)]) == 2
    err = capsys.readouterr().err
    assert "vit-keras: error:" in err and "holds a finished run" in err and "--overwrite" in err
    assert snapshot(run_copy) == before
    # With overwrite it trains again from scratch, and its files replace the old ones.
    result = training.train(dataset="digits", out=str(run_copy), epochs=1, overwrite=True,
                            **dict(TINY, learning_rate=0.1))
    after = snapshot(run_copy)
    assert result.metrics["resumed_from_step"] == 0
    assert result.metrics["steps"] == data.load("digits").num_train // 32
    assert json.loads(after["metrics.json"][0]) == result.metrics
    for name in ("model.keras", "best.keras", "last.keras"):  # best.keras too: a new run's record
        assert after[name][0] != before[name][0], name
    assert not (run_copy / "backup").exists()


def test_diverging_cli_run_exits_2_and_keeps_the_finished_model(run_copy, capsys):
    before = snapshot(run_copy)
    code = cli.main(["train", *TINY_ARGS, "--lr", "1e30", "--overwrite", "--out", str(run_copy)])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert re.search(r"vit-keras: error: Training diverged at step \d+: the loss is (nan|inf)", err), err[-2000:]
    assert "without writing model.keras" in err and "no backup had been made yet" in err
    assert snapshot(run_copy) == before  # the finished run's model, metrics and records
    assert not (run_copy / "backup").exists()


def test_diverging_run_keeps_the_last_good_backup(tmp_path, caplog):
    out = tmp_path / "run"
    # The warm-up's first step has learning rate 0; then 1e30 blows the weights up.
    kwargs = dict(TINY, dataset="digits", out=str(out), epochs=1, learning_rate=1e30,
                  warmup_steps=1, backup_every=1)
    with pytest.raises(training.TrainingDiverged, match="Training diverged at step") as error:
        training.train(**kwargs)
    failed = int(re.search(r"at step (\d+)", str(error.value)).group(1))
    kept = int(re.search(r"last backup \(step (\d+)\)", str(error.value)).group(1))
    backup = out / "backup"
    state = json.loads((backup / "state.json").read_text())
    assert state["step"] == kept < failed
    with zipfile.ZipFile(backup / state["weights"]) as archive, archive.open("model.weights.h5") as h5:
        f = h5py.File(h5, "r")
        arrays = []
        f.visititems(lambda name, obj: arrays.append(obj[()]) if isinstance(obj, h5py.Dataset) else None)
    floats = [a for a in arrays if np.issubdtype(np.asarray(a).dtype, np.floating)]
    assert floats and all(np.isfinite(a).all() for a in floats)
    for name in ("model.keras", "metrics.json", "last.keras", "best.keras"):
        assert not (out / name).exists(), name
    saved = snapshot(backup)
    # Started again, it resumes from that backup, diverges again, and leaves the backup as it was.
    with caplog.at_level("WARNING", logger="vit_keras"):
        with pytest.raises(training.TrainingDiverged):
            training.train(**kwargs)
    assert f"Resuming {out} at step {kept}" in caplog.text
    assert snapshot(backup) == saved
    assert not (out / "model.keras").exists()


def image_bytes(fmt, seed):
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 24, 3)).astype("uint8")
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def make_classes(root, classes, n=4):
    root.mkdir(parents=True)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"{i}.png").write_bytes(image_bytes("PNG", 10 * c + i))
    return root


def test_folder_with_undecodable_files_is_refused_naming_each(tmp_path):
    folder = make_classes(tmp_path / "images", ["cat", "dog"])
    (folder / "cat" / "empty.png").write_bytes(b"")
    (folder / "dog" / "notes.jpg").write_text("not an image")
    (folder / "dog" / "cut.png").write_bytes(image_bytes("PNG", 99)[:300])
    with pytest.raises(ValueError) as error:
        data.load(str(folder))
    message = str(error.value)
    assert "3 of 11 files cannot be decoded" in message
    assert re.search(r"cat/empty\.png: Input is empty", message), message
    assert re.search(r"dog/notes\.jpg: Unknown image file format", message), message
    assert re.search(r"dog/cut\.png: Invalid PNG data", message), message
    assert "0.png" not in message  # the good files are not named


def test_cli_train_on_a_corrupt_folder_fails_before_writing(tmp_path, capsys):
    folder = make_classes(tmp_path / "images", ["cat", "dog"])
    (folder / "dog" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "run"
    code = cli.main(["train", *TINY_ARGS[:-4], "--batch-size", "2", "--epochs", "1",
                     "--dataset", str(folder), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert re.search(r"vit-keras: error: Image folder .*dog/empty\.jpg: Input is empty", err), err[-2000:]
    assert not out.exists()


def test_folder_needs_two_classes_with_images(tmp_path, caplog):
    one = make_classes(tmp_path / "one", ["cat"])
    (one / "dog").mkdir()  # an empty class
    (one / ".ipynb_checkpoints").mkdir()  # hidden: no class, whatever it holds
    (one / ".ipynb_checkpoints" / "0.png").write_bytes(image_bytes("PNG", 5))
    with pytest.raises(ValueError, match=r"has 1 class sub-folder\(s\) with images \(cat; empty: dog\); "
                                         r"training needs at least two classes"):
        data.load(str(one))
    with pytest.raises(ValueError, match=r"has 0 class sub-folder\(s\) with images \(none\)"):
        data.load(str(make_classes(tmp_path / "none", [])))
    # Two classes with images and an empty one: it trains, with a warning that names the empty one.
    three = make_classes(tmp_path / "three", ["cat", "dog"])
    (three / "eel").mkdir()
    with caplog.at_level("WARNING", logger="vit_keras"):
        splits = data.load(str(three))
    assert splits.class_names == ["cat", "dog", "eel"] and "eel hold no images" in caplog.text


def test_folder_too_small_for_three_splits(tmp_path):
    """5 images: 80/10/10 leaves the test split empty, which used to fail only after training."""
    make_classes(tmp_path / "tiny", ["a", "b"], n=2)
    (tmp_path / "tiny" / "a" / "extra.png").write_bytes(image_bytes("PNG", 99))
    with pytest.raises(ValueError, match=r"has 5 images: too few for train, validation and test splits"):
        data.image_folder(str(tmp_path / "tiny"))
