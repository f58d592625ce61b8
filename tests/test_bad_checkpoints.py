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
        "try:\n"
        "    checkpoint.read(sys.argv[1]); error = None\n"
        "except ValueError as e:\n"
        "    error = str(e)\n"
        "print(json.dumps({'error': error, 'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "declares shape (400000000,) (1,600,000,000 bytes)" in result["error"]
    assert result["rss_mb"] < 1200, result  # the 1.6 GB were never allocated


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
