"""Hostile and careless input, second round: training runs (issue 20).

Processes are real: a run is interrupted with SIGKILL, a second `vit-keras
train` meets a running one, a file-size limit is put on a running process.
"""

import json
import pathlib
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import PIL.Image
import pytest

from vit_keras import cli, data, training

TINY = ["--model", "vit_tiny16", "--image-size", "32", "--batch-size", "32"]
STEPS_PER_EPOCH = data.load("digits").num_train // 32


def _cmd(out, *extra):
    return [sys.executable, "-m", "vit_keras.cli", "train", *TINY, "--out", str(out), *extra]


def _state(out):
    try:
        return json.loads((pathlib.Path(out) / "backup" / "state.json").read_text())
    except (OSError, ValueError):
        return None


def _wait_for_backup(proc, out, timeout=240):
    deadline = time.time() + timeout
    while _state(out) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert _state(out) is not None, f"no backup appeared (rc {proc.poll()})"
    return _state(out)


def _one_line_error(stderr):
    """The `vit-keras: error:` line, after checking that nothing like a traceback came with it."""
    assert "Traceback" not in stderr and "h5py" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("vit-keras: error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run killed with SIGKILL after its first backup; while it ran, a second run tried its folder."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    proc = subprocess.Popen(_cmd(out, "--epochs", "3", "--backup-every", "3"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_for_backup(proc, out)
        proc.send_signal(signal.SIGSTOP)  # frozen mid-run, holding the folder's lock
        second = subprocess.run(_cmd(out, "--epochs", "3", "--backup-every", "3"), capture_output=True,
                                text=True, timeout=300)
        alive = proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    return out, second, alive, proc.pid


def test_a_second_run_on_a_busy_folder_gets_one_line(interrupted):
    out, second, alive, pid = interrupted
    assert alive, "the first run ended before the second tried"
    assert second.returncode == 2
    line = _one_line_error(second.stderr)
    assert f"the output folder {out} is in use by another vit-keras process (pid {pid})" in line
    assert "BlockingIOError" not in second.stderr


@pytest.fixture
def backup_copy(interrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(interrupted[0], out)
    return out


def digit_folder(root, names, per_class=6):
    """Digits as PNG files in class folders named `names` (one per digit 0..9)."""
    images, labels = data.pixels(data.load("digits").train, 32, 400)
    for digit, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i, image in enumerate(np.asarray(images)[np.asarray(labels) == digit][:per_class]):
            PIL.Image.fromarray(np.asarray(image, "uint8")).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("change, named", [
    (["--batch-size", "64"], "batch_size 64 (backup: 32)"),
    (["--epochs", "1"], "epochs 1 (backup: 3)"),
    (["--optimizer", "adamw"], 'optimizer "adamw" (backup: "sgd")'),
    (["--lr", "0.01"], "learning_rate 0.01 (backup: 0.03)"),
])
def test_resume_under_other_settings_is_refused_naming_them(backup_copy, capsys, change, named):
    before = _state(backup_copy)
    args = TINY + ["--epochs", "3", "--backup-every", "3"]
    for i in range(0, len(change), 2):  # the changed flag replaces the run's own
        if change[i] in args:
            args[args.index(change[i]) + 1] = change[i + 1]
        else:
            args += change[i:i + 2]
    code = cli.main(["train", *args, "--out", str(backup_copy)])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert f"holds a backup at step {before['step']} of a run with other settings" in err
    assert named in err and "--overwrite" in err
    assert _state(backup_copy) == before  # the backup is untouched


def test_resume_on_another_dataset_with_the_same_class_count_is_refused(backup_copy, tmp_path, capsys):
    folder = digit_folder(tmp_path / "digits_png", [str(i) for i in range(10)])
    code = cli.main(["train", *TINY, "--epochs", "3", "--backup-every", "3", "--out", str(backup_copy),
                     "--dataset", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and re.search(r'dataset ".*digits_png" \(backup: "digits"\)', err), err[-2000:]
    assert "train_images" in err


def test_overwrite_starts_over_when_the_settings_differ(backup_copy, caplog):
    with caplog.at_level("WARNING", logger="vit_keras"):
        result = training.train(model="vit_tiny16", image_size=32, batch_size=64, epochs=1, out=str(backup_copy),
                                overwrite=True, verbose=0)
    assert "Starting over" in caplog.text and "batch_size" in caplog.text
    assert result.metrics["resumed_from_step"] == 0 and result.metrics["steps"] == 1365 // 64


def test_resume_with_the_same_settings_still_resumes(backup_copy, caplog):
    step = _state(backup_copy)["step"]
    with caplog.at_level("WARNING", logger="vit_keras"):
        result = training.train(model="vit_tiny16", image_size=32, batch_size=32, epochs=3, backup_every=3,
                                out=str(backup_copy), verbose=0)
    assert f"Resuming {backup_copy} at step {step}" in caplog.text
    assert result.metrics["resumed_from_step"] == step and result.metrics["steps"] == 3 * STEPS_PER_EPOCH


@pytest.mark.parametrize("limit", ["below the estimate", "above the estimate, below the file"])
def test_a_file_size_limit_mid_run_is_one_line_and_keeps_the_last_backup(tmp_path, limit):
    """`ulimit -f` reached while training (as a full disk): exit 2, one line, the last good backup kept.

    The limit is put on the running process after its first backup; the next backup cannot be written.
    """
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(out, "--epochs", "3", "--backup-every", "3"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = _wait_for_backup(proc, out)
        size = (out / "backup" / first["weights"]).stat().st_size
        cap = 100_000 if limit == "below the estimate" else size - 1024
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (cap, cap))
        stderr = proc.communicate(timeout=300)[1]
    finally:
        proc.kill()
    assert proc.returncode == 2, (proc.returncode, stderr[-3000:])  # not a crash (it was SIGSEGV, rc 139)
    line = _one_line_error(stderr)
    assert "cannot write" in line and "The last backup" in line, line
    kept = _state(out)
    assert kept is not None and kept["step"] >= first["step"]
    model = keras.saving.load_model(out / "backup" / kept["weights"])  # the kept backup is whole
    assert int(model.optimizer.iterations.numpy()) == kept["step"]
    assert not [p for p in (out / "backup").iterdir() if p.name.startswith(".tmp")]


@pytest.fixture(scope="module")
def finished_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    training.train(model="vit_tiny16", image_size=32, batch_size=32, epochs=1, out=str(out), verbose=0)
    return out / "model.keras"


def test_fine_tuning_a_keras_file_on_other_class_names_takes_the_new_names(finished_model, tmp_path, caplog):
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    folder = digit_folder(tmp_path / "words", names)
    out = tmp_path / "tuned"
    with caplog.at_level("WARNING", logger="vit_keras"):
        result = training.train(model=str(finished_model), dataset=str(folder), batch_size=8, epochs=1,
                                out=str(out), verbose=0)
    assert "was trained on other classes (0, 1, 2, 3, ... (10 in all))" in caplog.text
    saved = keras.saving.load_model(out / "model.keras")
    assert saved.get_layer("head").class_names == sorted(names)  # folders are classes in sorted order
    assert result.metrics["class_names"] == sorted(names)


@pytest.mark.parametrize("flag, value", [("--weights", "imagenet21k"), ("--dropout", "0.2")])
def test_keras_model_with_weights_or_dropout_is_refused_before_work(finished_model, tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    code = cli.main(["train", "--model", str(finished_model), flag, value, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"{flag} cannot apply to {finished_model}" in err, err[-2000:]
    assert not out.exists()


@pytest.mark.parametrize("out", ["/proc/vit_keras_run", "FILE/run"])
def test_unwritable_out_is_one_line(tmp_path, capsys, out):
    if out.startswith("FILE"):
        (tmp_path / "FILE").write_text("a file")
        out = str(tmp_path / out)
    code = cli.main(["train", *TINY, "--epochs", "1", "--out", out])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert re.search(r"vit-keras: error: cannot create the output folder .*(Not a directory|No such file)", err), err


@pytest.mark.parametrize("flag, value, message", [
    ("--weight-decay", "-1", "weight_decay must be a finite number >= 0, got -1.0"),
    ("--clipnorm", "0", "clipnorm must be a finite number > 0, got 0.0"),
    ("--clipnorm", "nan", "clipnorm must be a finite number > 0, got nan"),
    ("--label-smoothing", "1", "label_smoothing must be in [0, 1), got 1.0"),
    ("--dropout", "1.5", "dropout must be in [0, 1), got 1.5"),
    ("--seed", "-1", "seed must be an integer in [0, 2**32), got -1"),
])
def test_numeric_flags_are_checked_against_their_meaning(tmp_path, capsys, flag, value, message):
    out = tmp_path / "run"
    code = cli.main(["train", "--dataset", str(tmp_path / "missing"), "--out", str(out), flag, value])
    err = capsys.readouterr().err
    assert code == 2 and f"vit-keras: error: {message}" in err, err[-2000:]
    assert not out.exists()


def test_an_image_size_that_cannot_fit_is_one_line(tmp_path, capsys):
    code = cli.main(["train", *TINY[:2], "--image-size", "160000", "--epochs", "1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert re.search(r"image_size 160000x160000 gives 100,000,001 tokens: .* GiB .* Use a smaller image_size",
                     err), err


def test_sigterm_kills_nothing_but_the_run(tmp_path):
    """SIGTERM mid-run: the process ends (exit 143), the backup it had stays, no temporaries are left."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(out, "--epochs", "3", "--backup-every", "3"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_backup(proc, out)
        proc.send_signal(signal.SIGTERM)
        stderr = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    kept = _state(out)
    assert keras.saving.load_model(out / "backup" / kept["weights"]).optimizer.iterations.numpy() == kept["step"]
    leftovers = [p.name for p in out.rglob("*") if p.name.startswith(".tmp")]
    assert not leftovers, leftovers


def test_config_fields_are_checked():
    from vit_keras import ViTConfig, build_model, create

    with pytest.raises(ValueError, match="num_layers must be a positive integer, got 0"):
        ViTConfig("x", "x", 16, 0, 64, 4, 128)
    with pytest.raises(ValueError, match="num_heads must be a positive integer, got 0"):
        ViTConfig("x", "x", 16, 2, 64, 0, 128)
    with pytest.raises(ValueError, match="hidden_size 64 is not divisible by num_heads 3"):
        ViTConfig("x", "x", 16, 2, 64, 3, 128)
    with pytest.raises(ValueError, match=r"dropout must be a rate in \[0, 1\), got 1.0"):
        create("vit_tiny16", classes=2, image_size=32, dropout=1.0)
    with pytest.raises(ValueError, match="resnet_layers must be a tuple of positive unit counts"):
        build_model(32, 1, 1, 64, 4, 128, classes=2, resnet_layers=(1, 0))
    with pytest.raises(ValueError, match="classes must be a positive integer"):
        build_model(32, 16, 1, 64, 4, 128, classes=0)
    with pytest.raises(ValueError, match="image_size must be a positive integer or a"):
        build_model(32.5, 16, 1, 64, 4, 128, classes=2)
