"""Hostile checkpoint files: refused with an error naming the problem, before anything is assigned."""

import io
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import vit_keras
from vit_keras.checkpoint import read_npz


def weights_of(model):
    return [w.copy() for w in model.get_weights()]


def assert_unchanged(model, before):
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


@pytest.fixture
def model(tiny_vit):
    return vit_keras.build_model(**tiny_vit.config())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused_and_nothing_assigned(model, tiny_vit, tmp_path, bad):
    params = read_npz(tiny_vit.params)
    params["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"][3, 5] = bad
    np.savez(tmp_path / "nan.npz", **params)
    before = weights_of(model)
    with pytest.raises(ValueError, match=r"NaN or Inf values: Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"):
        vit_keras.load_npz(model, str(tmp_path / "nan.npz"))
    assert_unchanged(model, before)


@pytest.mark.parametrize("value, kind", [(np.ones(64, "complex64"), "complex64"), (np.array(["a"] * 64), "<U1"),
                                         (np.ones(64, "int32"), "int32")])
def test_non_float_arrays_are_refused(model, tiny_vit, tmp_path, value, kind):
    params = read_npz(tiny_vit.params)
    params["Transformer/encoder_norm/bias"] = value
    np.savez(tmp_path / "odd.npz", **params)
    before = weights_of(model)
    with pytest.raises(ValueError, match=f"Transformer/encoder_norm/bias has dtype {kind}"):
        vit_keras.load_npz(model, str(tmp_path / "odd.npz"))
    assert_unchanged(model, before)


def test_huge_declared_array_is_refused_before_reading(tmp_path):
    """A 1 KB file whose npy header declares a 1.6 GB array: refused from the header, in a fresh process."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (400_000_000,)})
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("Transformer/encoder_norm/bias.npy", header.getvalue() + b"\0" * 64)
    assert path.stat().st_size < 2048
    script = (
        "import json, resource, sys\n"
        "from vit_keras import checkpoint\n"
        "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "before = peak()\n"
        "try:\n"
        "    checkpoint.read(sys.argv[1]); error = None\n"
        "except ValueError as e:\n"
        "    error = str(e)\n"
        "print(json.dumps({'error': error, 'rss_growth_mb': peak() - before}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "declares shape (400000000,) (1,600,000,000 bytes) but the archive holds at most 64" in result["error"]
    assert result["rss_growth_mb"] < 400, result  # the 1.6 GB were never allocated


def test_bit_flipped_zip_gives_our_error(model, tiny_vit, tmp_path):
    data = bytearray(tiny_vit.params.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside some array's bytes: the CRC no longer matches
    path = tmp_path / "flipped.npz"
    path.write_bytes(bytes(data))
    before = weights_of(model)
    with pytest.raises(ValueError, match=rf"{path} is not a readable \.npz checkpoint \(.*CRC"):
        vit_keras.load_npz(model, str(path))
    assert_unchanged(model, before)


def test_text_file_renamed_npz_does_not_suggest_pickles(model, tmp_path):
    path = tmp_path / "weights.npz"
    path.write_text("<html>Not Found</html>")
    with pytest.raises(ValueError) as err:
        vit_keras.load_npz(model, str(path))
    text = str(err.value)
    assert "not a zip archive" in text and "pickle" not in text and str(path) in text


def test_missing_file_is_named(model, tmp_path):
    with pytest.raises(ValueError, match="Unknown weights .*nothing-here.npz"):
        vit_keras.load_npz(model, str(tmp_path / "nothing-here.npz"))


def test_deflated_member_cannot_claim_more_than_deflate_gives(tmp_path):
    """A deflated member whose zip directory claims 1.6 GB from a few hundred bytes is refused from the headers."""
    from vit_keras import checkpoint

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (400_000_000,)})
    path = tmp_path / "deflated.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("cls.npy", header.getvalue() + b"\0" * 4096)
    with pytest.raises(ValueError, match=r"declares shape \(400000000,\) .* at most"):
        checkpoint.read(str(path))


def test_checkpoint_without_head_loads_into_a_new_head(tiny_vit, tmp_path):
    params = {k: v for k, v in read_npz(tiny_vit.params).items() if not k.startswith("head/")}
    np.savez(tmp_path / "body.npz", **params)
    model = vit_keras.build_model(weights=str(tmp_path / "body.npz"), **tiny_vit.config(classes=3))
    assert not np.any(model.get_layer("head").kernel.numpy())
    body = vit_keras.build_model(weights=str(tmp_path / "body.npz"), **tiny_vit.config(include_top=False))
    np.testing.assert_allclose(body(tiny_vit.images), tiny_vit.expected["pre_logits"], atol=1e-4)
    with pytest.raises(ValueError, match="has no head: classes=None"):
        vit_keras.build_model(weights=str(tmp_path / "body.npz"), **tiny_vit.config(classes=None))


def test_weights_of_a_model_without_published_ones_are_used(tmp_path):
    """vit_r26_b32 has no preset; weights= must still be loaded, not silently ignored."""
    with pytest.raises(ValueError, match="Unknown weights .*mine.npz"):
        vit_keras.vit_r26_b32(image_size=64, classes=2, weights=str(tmp_path / "mine.npz"))
    model = vit_keras.vit_r26_b32(image_size=64, classes=2)  # nothing to load by default
    assert model.count_params() > 0


def test_cli_download_failure_is_one_line(tmp_path, capsys):
    import socket

    from vit_keras import cli

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/R50+ViT-B_16.npz"
    sock.close()
    assert cli.main(["evaluate", "--model", "vit_r_ti16", "--weights", url, "--dataset", "digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vit-keras: error: Could not download " + url) and "\n" not in err
