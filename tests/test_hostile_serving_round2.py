"""Hostile and careless input, second round: evaluate, export, loading (issue 20)."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import PIL.Image
import pytest

import vit_keras
from vit_keras import cli, data, files, serving

DIGITS = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """A small ViT with a random head and the digits' class names, as a `.keras` file."""
    model = vit_keras.create("vit_tiny16", classes=10, image_size=32, class_names=DIGITS)
    head = model.get_layer("head")
    head.kernel.assign(np.random.default_rng(0).normal(0, 0.5, head.kernel.shape).astype("float32"))
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    model.save(path)
    return path


def _error(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    return err


def test_evaluate_json_into_a_new_folder_prints_and_writes(tiny_file, tmp_path, capsys):
    target = tmp_path / "nodir" / "deeper" / "x.json"
    code = cli.main(["evaluate", "--model", str(tiny_file), "--dataset", "digits", "--json", str(target)])
    out = capsys.readouterr().out
    assert code == 0
    printed = json.loads(out.strip().splitlines()[-1])
    assert json.loads(target.read_text()) == printed and printed["count"] == 360


def test_evaluate_json_that_is_a_folder_is_refused_before_evaluating(tiny_file, tmp_path, capsys):
    code = cli.main(["evaluate", "--model", str(tiny_file), "--dataset", "digits", "--json", str(tmp_path)])
    err = _error(capsys)
    assert code == 2 and f"--json {tmp_path} is a folder" in err


def test_evaluate_refuses_other_class_names_unless_mapped_by_position(tiny_file, tmp_path, capsys):
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    images, labels = data.pixels(data.load("digits").test, 32, 100)
    for digit, word in enumerate(words):
        (tmp_path / "words" / word).mkdir(parents=True)
        for i, image in enumerate(np.asarray(images)[np.asarray(labels) == digit][:5]):
            PIL.Image.fromarray(np.asarray(image, "uint8")).save(tmp_path / "words" / word / f"{i}.png")
    argv = ["evaluate", "--model", str(tiny_file), "--dataset", str(tmp_path / "words"), "--split", "train"]
    assert cli.main(argv) == 2
    err = _error(capsys)
    assert "other class names ('0' vs 'eight', '1' vs 'five', '2' vs 'four', ...)" in err
    assert "--label-map position" in err
    assert cli.main([*argv, "--label-map", "position"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["count"] > 0


def test_evaluate_of_a_file_with_an_unknown_layer_is_one_line(tmp_path, capsys):
    """A `.keras` file of another program, whose custom layer this process does not know."""
    script = (
        "import keras, sys\n"
        "@keras.saving.register_keras_serializable(package='theirs')\n"
        "class Twice(keras.layers.Layer):\n"
        "    def call(self, x): return 2 * x\n"
        "i = keras.Input((32, 32, 3)); y = keras.layers.Dense(10)(keras.layers.Flatten()(Twice()(i)))\n"
        "keras.Model(i, y).save(sys.argv[1])\n"
    )
    path = tmp_path / "theirs.keras"
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, capture_output=True, timeout=300)
    assert cli.main(["evaluate", "--model", str(path), "--dataset", "digits"]) == 2
    err = _error(capsys)
    assert f"cannot load the model {path}: Could not locate class 'Twice'" in err


def test_keras_home_that_is_a_file_is_one_line(tmp_path):
    home = tmp_path / "home"
    home.write_text("not a folder")
    env = dict(os.environ, KERAS_HOME=str(home))
    proc = subprocess.run([sys.executable, "-m", "vit_keras.cli", "evaluate", "--model", "vit_ti16", "--weights",
                           "http://127.0.0.1:9/ViT-Ti_16.npz", "--dataset", "digits"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"Cannot create the download cache {home}" in proc.stderr and "KERAS_HOME" in proc.stderr


@pytest.mark.parametrize("fmt", ["saved_model", "onnx"])
def test_export_of_a_model_with_attention_outputs_is_one_line(tiny_file, tmp_path, capsys, fmt):
    two = vit_keras.attention_model(keras.saving.load_model(tiny_file))
    path = tmp_path / "two.keras"
    two.save(path)
    assert cli.main(["export", "--model", str(path), "--format", fmt, "--out", str(tmp_path / "out")]) == 2
    err = _error(capsys)
    assert f"{path} has 3 outputs; export takes a classifier with one" in err  # logits + 2 blocks
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", [".", ".."])
def test_export_name_dot_is_refused(tiny_file, tmp_path, capsys, name):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--model", str(tiny_file), "--format", "saved_model", "--out", str(tmp_path / "o"),
                  "--name", name])
    assert exit_info.value.code == 2 and "must be a plain folder name" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _export_cmd(model, out, fmt="saved_model", *extra):
    return [sys.executable, "-m", "vit_keras.cli", "export", "--model", str(model), "--format", fmt,
            "--out", str(out), *extra]


def _held(lock_path):
    """Whether another process holds the flock on `lock_path`."""
    if not os.path.exists(lock_path):
        return False
    fd = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases ours, if we got it
    return False


def test_two_exports_into_one_folder_at_once(tiny_file, tmp_path):
    out = tmp_path / "serving"
    lock = tmp_path / ".serving.lock"
    first = subprocess.Popen(_export_cmd(tiny_file, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.time() + 240
        while not _held(lock) and first.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert first.poll() is None, "the first export ended before the second started"
        with pytest.raises(files.FolderInUse, match=f"the export folder {out} is in use by another vit-keras "
                                                    f"process \\(pid {first.pid}\\)"):
            serving.export(str(tiny_file), "saved_model", str(out))
        stdout, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, stderr[-3000:]
    assert (out / "vit-tiny16" / "1" / "saved_model.pb").exists()


def test_an_export_that_appeared_meanwhile_is_not_replaced(tmp_path):
    """The final rename: a folder another process wrote while this export ran stays, unless overwrite."""
    final = tmp_path / "model" / "1"
    theirs = final / "saved_model.pb"
    theirs.parent.mkdir(parents=True)
    theirs.write_text("theirs")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "saved_model.pb").write_text("mine")
    with pytest.raises(FileExistsError, match="appeared while this export ran"):
        files.publish_folder(str(mine), str(final), overwrite=False, keep=())
    assert theirs.read_text() == "theirs"


def _temporaries(*folders_):
    found = []
    for folder in folders_:
        if folder.exists():
            found += [p for p in folder.iterdir() if p.name.startswith((files.TEMP_PREFIX, "vit_keras_tflite_"))]
    return found


def test_sigterm_during_a_tflite_export_leaves_no_temporaries(tiny_file, tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    out = tmp_path / "tflite"
    env = dict(os.environ, TMPDIR=str(temp))
    proc = subprocess.Popen(_export_cmd(tiny_file, out, "tflite", "--dataset", "digits", "--variants", "float32"),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not _temporaries(temp) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the export ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        stderr = proc.communicate(timeout=300)[1]
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    assert not _temporaries(temp, tmp_path) and not out.exists()


def test_temporaries_of_a_killed_export_are_swept_by_the_next(tiny_file, tmp_path):
    out = tmp_path / "serving"
    parent = out / "vit-tiny16"
    proc = subprocess.Popen(_export_cmd(tiny_file, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not _temporaries(parent) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    left = _temporaries(parent)
    assert left and all(f"-{proc.pid}-" in p.name for p in left)
    other = parent / f"{files.TEMP_PREFIX}{os.getpid()}-alive"  # a live process's: kept
    other.mkdir()
    serving.export(str(tiny_file), "saved_model", str(out))
    assert _temporaries(parent) == [other] and (parent / "1" / "saved_model.pb").exists()


def test_load_npz_refuses_a_folded_copy_and_a_plain_model(tiny_r50):
    model = tiny_r50.model()
    folded = vit_keras.fold_weight_standardization(model)
    with pytest.raises(ValueError, match="its ResNet kernels are folded .* Load into the model first, then fold"):
        vit_keras.load_npz(folded, str(tiny_r50.params))
    plain = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="it is not a model of this package"):
        vit_keras.load_npz(plain, str(tiny_r50.params))


def test_features_model_refuses_non_integer_blocks():
    model = vit_keras.create("vit_tiny16", classes=2, image_size=32)
    with pytest.raises(ValueError, match=r"blocks must be block indices \(integers\), got \[1.7\]"):
        vit_keras.features_model(model, blocks=[1.7])
    with pytest.raises(ValueError, match="blocks must be block indices"):
        vit_keras.features_model(model, blocks="1")
    assert list(vit_keras.features_model(model, blocks=[np.int64(1)]).output) == ["encoderblock_1", "encoder"]
