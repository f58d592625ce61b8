"""What a user watches (issue 26): our own lines only, progress with counts; the image-folder check at scale."""

import io
import os
import pty
import re
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest

from vit_keras import console, data, image_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What TensorFlow, absl, MLIR, the TFLite converter and LiteRT print on their own.
INTERNAL = re.compile(r"^[IWEF]\d{4} |absl|INFO:tensorflow|WARNING:tensorflow|reader\.cc|loader\.cc|oneDNN|"
                      r"cpu_feature_guard|mlir|MLIR|fully_quantize|XNNPACK|tf_tfl_flatbuffer|flatbuffer_export|"
                      r"Assets written", re.M)
TINY_TRAIN = ["--model", "vit_tiny16", "--image-size", "32", "--batch-size", "16", "--epochs", "1"]


def command_env(**extra):
    """The environment of a user who set no TensorFlow variable (`.ci/run` and conftest set one)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", console.MODE_VARIABLE,
                                                            console.PROGRESS_VARIABLE, "GLOG_minloglevel")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def vit_keras_command(*args):
    return [sys.executable, "-m", "vit_keras.cli", *args]


def plain(text):
    """Terminal output without its colours (ANSI escapes)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def run_in_terminal(argv, env, timeout=300):
    """Runs `argv` with stdout and stderr on a pseudo-terminal; returns (exit code, everything it wrote)."""
    master, slave = pty.openpty()
    process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    try:
        code = process.wait(timeout=max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return code, plain(b"".join(chunks).decode("utf-8", "replace"))


def run_to_file(argv, env, path, timeout=300):
    with open(path, "wb") as log:
        code = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=timeout)
    return code, path.read_text()


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """100 digits as PNG files in ten class folders."""
    root = tmp_path_factory.mktemp("digits_folder") / "digits"
    split = data.digits(tf_data=False).train
    for label in range(10):
        (root / str(label)).mkdir(parents=True)
        for i, row in enumerate(np.flatnonzero(split.labels == label)[:10]):
            PIL.Image.fromarray(split.images[row]).save(root / str(label) / f"{i}.png")
    return root


def assert_no_internal_lines(text):
    found = INTERNAL.findall(text)
    assert not found, f"internal log lines: {found}\n{text[-3000:]}"


@pytest.mark.slow  # trains, exports, starts processes (`make check` leaves it out)
def test_train_and_export_in_a_terminal(digit_folder, tmp_path):
    """On a terminal: no TensorFlow/absl/MLIR lines, bars with counts redrawn in place."""
    env = command_env(KERAS_HOME=str(tmp_path / "keras"))  # a cache of its own: the folder is checked
    code, out = run_in_terminal(vit_keras_command("train", *TINY_TRAIN, "--dataset", str(digit_folder),
                                                  "--out", str(tmp_path / "run")), env)
    assert code == 0, out[-3000:]
    assert_no_internal_lines(out)
    assert re.search(r"\rChecking images in .*digits: 100/100 ━+ \d+s \d+[mu]?s/file", out), out[-3000:]
    assert re.search(r"\r5/5 ━+ \d+s \d+[mu]?s/step", out), out[-3000:]  # Keras's epoch bar, redrawn
    assert "test top-1" in out
    code, out = run_in_terminal(vit_keras_command("export", "--model", str(tmp_path / "run" / "model.keras"),
                                                  "--format", "tflite", "--variants", "int8",
                                                  "--out", str(tmp_path / "lite")), env)
    assert code == 0, out[-3000:]
    assert_no_internal_lines(out)
    assert re.search(r"\rTFLite int8 calibration: 80/80 ━+ \d+s \d+[mu]?s/image", out), out[-3000:]
    assert re.search(r"\rTFLite conversion \(written\): 1/1 ━+ \d+s \d+[mu]?s/variant", out), out[-3000:]
    assert re.search(r"\rTFLite parity against Keras \(at int8\): 20/20 ━+ \d+s \d+[mu]?s/image", out), out[-3000:]
    assert re.search(r"int8 +[0-9.e+-]+ +[0-9.]+%", out), out[-3000:]  # the parity table
    assert sorted(os.listdir(tmp_path / "lite")) == ["class_names.json", "int8.tflite", "vit_keras_export.json"]


@pytest.mark.slow  # trains, exports, starts processes (`make check` leaves it out)
def test_train_and_export_to_a_log_file(digit_folder, tmp_path):
    """Output to a file: our lines only, a few per phase, no redraws."""
    env = command_env(KERAS_HOME=str(tmp_path / "keras"))  # a cache of its own: the folder is checked
    code, log = run_to_file(vit_keras_command("train", *TINY_TRAIN, "--dataset", str(digit_folder),
                                              "--out", str(tmp_path / "run")), env, tmp_path / "train.log")
    assert code == 0, log[-3000:]
    assert_no_internal_lines(log)
    assert "\r" not in log and "\b" not in log
    lines = log.splitlines()
    assert len(lines) <= 6, log
    assert any(re.match(r"Checking images in .*digits: 100/100 files in \d+ s", line) for line in lines), log
    assert any(line.startswith("5/5 - ") for line in lines), log  # Keras: one line per epoch
    code, log = run_to_file(vit_keras_command("export", "--model", str(tmp_path / "run" / "model.keras"),
                                              "--format", "tflite", "--variants", "int8",
                                              "--out", str(tmp_path / "lite")), env, tmp_path / "export.log")
    assert code == 0, log[-3000:]
    assert_no_internal_lines(log)
    assert "\r" not in log and "\b" not in log
    lines = log.splitlines()
    assert len(lines) <= 12, log
    for pattern in (r"TFLite int8 calibration: 80/80 images in \d+ s", r"TFLite conversion: 1/1 variant in \d+ s",
                    r"TFLite parity against Keras: 20/20 images in \d+ s", r"TFLite parity against Keras on 10 "):
        assert any(re.match(pattern, line) for line in lines), (pattern, log)


@pytest.mark.slow  # trains, exports, starts processes (`make check` leaves it out)
def test_verbose_and_a_user_set_level_show_tensorflow_lines(tmp_path):
    """--verbose, or TF_CPP_MIN_LOG_LEVEL set by the user, leave TensorFlow's own lines (default: tests above)."""
    argv = ["export", "--model", str(tmp_path / "missing.keras"), "--format", "saved_model", "--out", str(tmp_path)]
    for args, env in ((["--verbose", *argv], command_env()), (argv, command_env(TF_CPP_MIN_LOG_LEVEL="0"))):
        shown = subprocess.run(vit_keras_command(*args), env=env, capture_output=True, text=True)
        assert shown.returncode == 2
        assert re.search(r"^[IW]\d{4} |absl", shown.stderr, re.M), shown.stderr[-2000:]
        assert shown.stderr.strip().splitlines()[-1].startswith("vit-keras: error: ")


# ----------------------------------------------------------------------------- console pieces


def test_progress_in_a_log_prints_a_few_lines(capsys):
    with console.Progress("Counting", 1000, "file", log_every=0) as bar:
        for i in range(1000):
            bar.update(i + 1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4, lines  # at 25 %, 50 %, 75 % and the end
    assert re.match(r"Counting: 250/1,000 files, \d+ s, .* about \d+ s left", lines[0]), lines
    assert re.match(r"Counting: 1,000/1,000 files in \d+ s", lines[-1]), lines


def test_progress_quarters_are_time_limited(capsys):
    with console.Progress("Slow", 8, "image", log_every=3600) as bar:
        for i in range(8):
            bar.update(i + 1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Slow: 8/8 images in "), lines


def test_captured_native_output(capfd, monkeypatch):
    """While quiet, what C++ writes to fd 2 is kept: errors become one line of ours, all of it on failure."""
    monkeypatch.setitem(console._state, "quiet", True)
    with console.native_output("testing"):
        os.write(2, b"I0000 00:00:1796411686.104322    4559 reader.cc:83] Reading SavedModel from: /tmp/x\n"
                    b"E0000 00:00:1796411686.1 4559 foo.cc:12] Something broke\nfully_quantize: 0\n")
        console.say("our own line")
    err = capfd.readouterr().err
    assert err.splitlines() == ["our own line",
                                "vit-keras: TensorFlow reported an error while testing: Something broke"]
    with pytest.raises(RuntimeError):
        with console.native_output("converting"):
            os.write(2, b"loc(fused): error: failed to legalize\n")
            raise RuntimeError("conversion failed")
    err = capfd.readouterr().err
    assert "what TensorFlow wrote while converting" in err and "failed to legalize" in err


def test_invoked_as_command():
    assert console.invoked_as_command(["/venv/bin/vit-keras", "train"], [])
    assert console.invoked_as_command(["-m", "train"], ["python", "-m", "vit_keras.cli", "train"])
    assert not console.invoked_as_command(["pytest"], ["python", "-m", "pytest"])
    assert console.command_words(["--verbose", "export", "--model", "m"]) == (True, "export")
    assert console.command_words(["train", "--verbose"]) == (False, "train")


# ----------------------------------------------------------------------------- the image-folder check


def png(seed, size=24):
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3)).astype("uint8")
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_folder(root, classes=("cat", "dog"), n=4):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"{i}.png").write_bytes(png(10 * c + i))
    return root


@pytest.mark.parametrize("decoder", image_check.DECODERS)
def test_rerun_checks_only_new_and_changed_files(tmp_path, decoder):
    folder = make_folder(tmp_path / "images")
    listing = image_check.list_folder(folder)
    assert image_check.unchecked(folder, listing.files, decoder) == listing.files
    assert image_check.check_files(folder, listing.files, decoder) == []
    assert os.path.exists(image_check.manifest_path(folder, decoder))
    assert image_check.unchecked(folder, listing.files, decoder) == []  # nothing to decode on a rerun
    # One file replaced (new size), one added: only those two are decoded again.
    (folder / "cat" / "1.png").write_bytes(png(99, size=30))
    (folder / "dog" / "new.png").write_bytes(png(98))
    files = image_check.list_folder(folder).files
    assert image_check.unchecked(folder, files, decoder) == [str(folder / "cat" / "1.png"),
                                                              str(folder / "dog" / "new.png")]
    assert image_check.check_files(folder, files, decoder) == []
    assert image_check.unchecked(folder, files, decoder) == []
    # Corrupted after its check: cut short (size changes), or overwritten in place with as many bytes.
    cut, flipped = folder / "cat" / "2.png", folder / "dog" / "3.png"
    cut.write_bytes(cut.read_bytes()[:200])
    stat = flipped.stat()
    flipped.write_bytes(b"\0" * stat.st_size)
    os.utime(flipped, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    bad = image_check.check_files(folder, files, decoder)
    assert [path for path, _ in bad] == [str(cut), str(flipped)], bad
    assert image_check.unchecked(folder, files, decoder) == [str(cut), str(flipped)]  # bad files: again next time


def test_image_folder_rerun_says_what_it_skips(tmp_path, caplog):
    folder = make_folder(tmp_path / "images")
    data.image_folder(str(folder), tf_data=False)
    with caplog.at_level("INFO", logger="vit_keras"):
        data.image_folder(str(folder), tf_data=False)
    assert "8 of 8 files unchanged since they were checked; checking 0" in caplog.text


# ----------------------------------------------------------------------------- issue 20, item 11


@pytest.mark.parametrize("tf_data", [False, True])
def test_hidden_folders_inside_class_folders_are_not_training_data(tmp_path, caplog, tf_data):
    folder = make_folder(tmp_path / "images")
    (folder / "cat" / ".ipynb_checkpoints").mkdir()
    (folder / "cat" / ".ipynb_checkpoints" / "0-checkpoint.png").write_bytes(png(50))
    (folder / "dog" / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS metadata, not an image
    with caplog.at_level("WARNING", logger="vit_keras"):
        splits = data.image_folder(str(folder), tf_data=tf_data)
    total = splits.num_train + sum(len(list(split)) if tf_data else len(split)
                                   for split in (splits.validation, splits.test))
    assert total == 8
    if not tf_data:
        used = [*splits.train.images, *splits.validation.images, *splits.test.images]
        assert not any("checkpoint" in f or "._" in f for f in used), used
    assert "2 hidden (dot-named) file(s) or folder(s) in class folders are not used" in caplog.text
    assert "cat/.ipynb_checkpoints" in caplog.text


@pytest.mark.parametrize("tf_data", [False, True])
def test_webp_images_are_used_and_other_files_named(tmp_path, caplog, tf_data):
    folder = make_folder(tmp_path / "images", n=3)
    for name in ("cat", "dog"):
        buffer = io.BytesIO()
        PIL.Image.fromarray(np.full((20, 20, 3), 200 if name == "cat" else 30, "uint8")).save(buffer, "WEBP")
        (folder / name / "photo.webp").write_bytes(buffer.getvalue())
    (folder / "dog" / "scan.tiff").write_bytes(b"II*\0")
    with caplog.at_level("WARNING", logger="vit_keras"):
        splits = data.image_folder(str(folder), tf_data=tf_data)
    images, _ = data.pixels(splits.train, 8)
    total = splits.num_train + sum(len(list(split)) if tf_data else len(split)
                                   for split in (splits.validation, splits.test))
    assert total == 8 and images.shape[1:] == (8, 8, 3)
    assert "1 file(s) not ending in" in caplog.text and "dog/scan.tiff" in caplog.text
    # A webp file that does not decode is refused by name, as any other.
    (folder / "cat" / "broken.webp").write_bytes(b"RIFF\0\0\0\0WEBPVP8 ")
    with pytest.raises(ValueError, match=r"cat/broken\.webp"):
        data.image_folder(str(folder), tf_data=tf_data)


@pytest.mark.parametrize("tf_data", [False, True])
def test_file_names_that_are_not_utf8(tmp_path, tf_data):
    folder = make_folder(tmp_path / "images")
    raw = os.fsencode(folder)
    with open(raw + b"/cat/caf\xe9.png", "wb") as f:
        f.write(png(77))
    splits = data.image_folder(str(folder), tf_data=tf_data)
    images, _ = data.pixels(splits.train, 8)
    total = splits.num_train + sum(len(list(split)) if tf_data else len(split)
                                   for split in (splits.validation, splits.test))
    assert total == 9 and len(images) == splits.num_train
    with open(raw + b"/dog/bad\xff.png", "wb") as f:
        f.write(b"not an image")
    with pytest.raises(ValueError) as error:
        data.image_folder(str(folder), tf_data=tf_data)
    assert "dog/bad\\xff.png: " in str(error.value) and "1 of 10 files cannot be decoded" in str(error.value)
    os.mkdir(raw + b"/\xe9l\xe8ves")
    with open(raw + b"/\xe9l\xe8ves/0.png", "wb") as f:
        f.write(png(78))
    with pytest.raises(ValueError, match=r"class folder name\(s\) \\xe9l\\xe8ves are not UTF-8"):
        data.image_folder(str(folder), tf_data=tf_data)
