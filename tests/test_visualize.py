"""Attention rollout and heat maps: against NumPy, on the hybrid, and on the trained digits model."""

import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

import vit_keras
from conftest import assert_close
from vit_keras import data, visualize


def numpy_rollout(weights, head_fusion="mean", discard_ratio=0.0):
    """Abnar & Zuidema's rollout, written out in NumPy."""
    result = None
    for w in weights:
        a = {"mean": np.mean, "max": np.max, "min": np.min}[head_fusion](np.asarray(w, np.float64), axis=1)
        t = a.shape[-1]
        k = int(t * discard_ratio)
        if k:
            kth_largest = -np.sort(-a, axis=-1)[..., t - k - 1 : t - k]  # keep the t-k largest
            a = np.where(a >= kth_largest, a, 0.0)
        a = a + np.eye(t)
        a = a / a.sum(-1, keepdims=True)
        result = a if result is None else a @ result
    return result


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_r50"])
@pytest.mark.parametrize("fusion, discard", [("mean", 0.0), ("max", 0.0), ("min", 0.0), ("mean", 0.5)])
def test_rollout_matches_numpy_on_fixture_attention(name, fusion, discard):
    from conftest import Case

    case = Case(name)
    weights = [case.expected[f"attn_{i}"] for i in range(2)]
    assert_close(visualize.rollout(weights, fusion, discard), numpy_rollout(weights, fusion, discard), 1e-5)


def test_heatmap_grid_is_row_major_not_transposed():
    """A class token attending only to patch (row 0, col 2) of a 2x3 grid lights the top-right."""
    t = 1 + 6
    w = np.zeros((1, 1, t, t), "float32")
    w[0, 0, :, 0] = 0.1
    w[0, 0, 0, 0], w[0, 0, 0, 1 + 2] = 0.1, 0.9  # token 1 + row * 3 + col
    for i in range(1, t):
        w[0, 0, i, i] = 0.9
    grid = np.asarray(visualize.rollout_grid([w], (2, 3)))[0]
    assert grid.shape == (2, 3) and np.unravel_index(grid.argmax(), grid.shape) == (0, 2)


def test_heatmap_for_hybrid_non_square_and_new_head(tiny_r50):
    model = tiny_r50.model(image_size=(64, 96), classes=3)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 64, 96, 3)).astype("float32")
    heat = visualize.attention_heatmap(model, images, head_fusion="max", discard_ratio=0.2)
    assert heat.shape == (2, 64, 96) and heat.min() >= 0 and 0.5 < heat.max() <= 1.0
    assert visualize.grid_shape(model) == (4, 6)


def test_attention_map_compat(tiny_vit):
    model = tiny_vit.model()
    image = np.random.default_rng(0).integers(0, 256, (50, 40, 3)).astype("uint8")
    out = visualize.attention_map(model, image)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.all(out <= image)


def test_digits_heat_is_on_the_strokes(demo_run):
    """On the trained demo model the class token looks at the ink more than at the background."""
    _, result = demo_run
    images, _ = data.pixels(data.load("digits").test, 64)
    heat = visualize.attention_heatmap(result.model, vit_keras.preprocess_inputs(images.astype("float32")))
    ink = images[..., 0] > 64
    fg = heat[ink].mean()
    bg = heat[~ink].mean()
    assert fg > 1.2 * bg, (fg, bg)


def test_attention_command_writes_pngs(demo_run, tmp_path):
    out, _ = demo_run
    images, _ = data.pixels(data.load("digits").test, 64, 2)
    files = []
    for i, image in enumerate(images):
        files.append(str(tmp_path / f"d{i}.png"))
        PIL.Image.fromarray(image).save(files[-1])
    done = subprocess.run([sys.executable, "-m", "vit_keras.cli", "attention", *files,
                           "--model", str(out / "model.keras"), "--out", str(tmp_path / "maps")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for f in files:
        png = tmp_path / "maps" / (os.path.basename(f)[:-4] + "_attention.png")
        assert PIL.Image.open(png).size[0] > 300
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    done = subprocess.run([sys.executable, "-m", "vit_keras.cli", "attention", str(bad),
                           "--model", str(out / "model.keras"), "--out", str(tmp_path / "maps")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "undecodable image" in done.stderr


# ----------------------------------------------------------------------------- careless input


@pytest.fixture(scope="module")
def tiny_keras(tmp_path_factory):
    """A tiny ViT saved as `.keras`, and a PNG it can read."""
    folder = tmp_path_factory.mktemp("tiny_attention")
    model = vit_keras.build_model(32, 16, num_layers=1, hidden_size=32, num_heads=2, mlp_dim=64, classes=3)
    model.save(folder / "model.keras")
    image = folder / "x.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 36, 3)).astype("uint8")).save(image)
    return folder / "model.keras", image


def attention(capsys, *args):
    from vit_keras import cli

    code = cli.main(["attention", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *words):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vit-keras: error: "), err
    for word in words:
        assert word in lines[0], (word, err)


def test_attention_command_errors_are_one_line(tiny_keras, tmp_path, capsys):
    """Issue 11: a missing file, a folder, a bad --out or a URL gave a TensorFlow traceback."""
    model, image = tiny_keras
    out = tmp_path / "maps"
    missing = tmp_path / "missing.png"
    code, _, err = attention(capsys, missing, "--model", model, "--out", out)
    assert_one_line_error(code, err, str(missing), "cannot read the image")
    code, _, err = attention(capsys, tmp_path, "--model", model, "--out", out)
    assert_one_line_error(code, err, str(tmp_path), "is a folder")
    url = "http://unreachable.invalid/cat.png"
    code, _, err = attention(capsys, url, "--model", model, "--out", out)
    assert_one_line_error(code, err, url, "cannot read the image")
    code, _, err = attention(capsys, image, "--model", tmp_path / "nope.keras", "--out", out)
    assert_one_line_error(code, err, str(tmp_path / "nope.keras"), "cannot load the model")
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    code, _, err = attention(capsys, image, "--model", model, "--out", a_file)
    assert_one_line_error(code, err, str(a_file), "is a file")
    assert a_file.read_text() == "mine"
    # A folder that cannot be written: read-only for a normal user; root writes anywhere, so it
    # gets a folder the kernel refuses.
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    target = read_only if os.geteuid() != 0 else "/proc/vit-keras-attention"
    code, _, err = attention(capsys, image, "--model", model, "--out", target)
    assert_one_line_error(code, err, str(target))


def test_attention_inputs_with_the_same_name_get_their_own_png(tiny_keras, tmp_path, capsys):
    """Issue 11: a/x.png and b/x.png both wrote x_attention.png, the second over the first."""
    model, image = tiny_keras
    for folder, seed in (("a", 1), ("b", 2)):
        (tmp_path / folder).mkdir()
        pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3)).astype("uint8")
        PIL.Image.fromarray(pixels).save(tmp_path / folder / "x.png")
    out = tmp_path / "maps"
    code, stdout, err = attention(capsys, tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", "--model", model,
                                  "--out", out)
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["x_2_attention.png", "x_attention.png"]
    assert (out / "x_attention.png").read_bytes() != (out / "x_2_attention.png").read_bytes()
    lines = stdout.strip().splitlines()
    assert lines[0].endswith(f"-> {out / 'x_attention.png'}")
    assert f"-> {out / 'x_2_attention.png'}" in lines[1] and "same file name" in lines[1]


def test_read_image_refuses_before_decoding(tmp_path):
    """Images over the pixel limit are refused from their header; bytes that are no image name the file."""
    big = tmp_path / "big.png"
    PIL.Image.new("L", (4100, 4100)).save(big)  # 16.8 M pixels, a few KB compressed
    with pytest.raises(ValueError, match=r"big.png: image exceeds the limit of 16777216 pixels \(4100x4100\)"):
        visualize.read_image(big)
    small = tmp_path / "small.png"
    PIL.Image.new("RGB", (20, 10), (1, 2, 3)).save(small)
    assert visualize.read_image(small).shape == (10, 20, 3)
    with pytest.raises(ValueError, match="exceeds the limit of 100 pixels"):
        visualize.read_image(small, max_pixels=100)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png: undecodable image"):
        visualize.read_image(text)
