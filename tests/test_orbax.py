"""Orbax checkpoint folders (tests/fixtures/orbax, written by Orbax's own savers) load to the upstream outputs.

The outputs are those of the vit_jax and big_vision fixtures whose params the folders hold. Reading needs the
`orbax` extra (orbax-checkpoint, tensorstore); without it the error names the extra.
"""

import pathlib
import sys

import numpy as np
import pytest

import vit_keras
from conftest import Case, assert_close

ORBAX = pathlib.Path(__file__).parent / "fixtures" / "orbax"
BIG_VISION = pathlib.Path(__file__).parent / "fixtures" / "big_vision" / "bv_sincos_map"


def test_missing_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "orbax", None)  # as if not installed: `import orbax...` raises ImportError
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    with pytest.raises(ValueError, match=r"is an Orbax checkpoint folder.*pip install 'vit_keras\[orbax\]'"):
        vit_keras.create(str(ORBAX / "bv_standard"), image_size=(32, 48))


def test_workdir_and_other_folders_refused(tmp_path):
    with pytest.raises(ValueError, match=r"holds checkpoints \['checkpoint_2'\]: pass one of them"):
        vit_keras.create(str(ORBAX / "vit_jax_train"))
    with pytest.raises(ValueError, match="neither a transformers folder"):
        vit_keras.create(str(tmp_path))


def test_orbax_folders_load():
    pytest.importorskip("orbax.checkpoint", reason="the orbax extra (orbax-checkpoint==0.12.8, tensorstore==0.1.86) "
                        "is not installed")
    case = Case("tiny_vit")  # vit_jax's train.py state (params, opt_state, step) of the tiny_vit params
    model = vit_keras.create(str(ORBAX / "vit_jax_train" / "checkpoint_2"), image_size=32)
    logits, weights = vit_keras.attention_model(model)(case.images)
    assert_close(logits, case.expected["logits"], 2e-5, "vit_jax train state")
    assert_close(weights[1], case.expected["attn_1"], 1e-5, "attention")
    images = np.load(BIG_VISION / "inputs.npz")["images"]
    expected = np.load(BIG_VISION / "expected.npz")["logits"]
    config = vit_keras.ViTConfig("bv", "bv", 8, 2, 64, 4, 128)
    model = vit_keras.create(config, weights=str(ORBAX / "bv_standard"), classes=10, image_size=(32, 48))
    assert model.get_layer("embeddings").posemb == "sincos2d"
    assert_close(model(images), expected, 2e-5, "StandardCheckpointer state of big_vision params")


def test_big_vision_tensorstore_folder():
    """big_vision's checkpoint.bv-<step>/ (zarr arrays named params~..., opt~..., chrono~...): params only."""
    pytest.importorskip("tensorstore", reason="the orbax extra (tensorstore==0.1.86) is not installed")
    images = np.load(BIG_VISION / "inputs.npz")["images"]
    expected = np.load(BIG_VISION / "expected.npz")["logits"]
    folder = ORBAX / "big_vision_ts" / "checkpoint.bv-000000002"
    model = vit_keras.create(str(folder), image_size=(32, 48))
    assert model.get_layer("embeddings").posemb == "sincos2d"
    assert_close(model(images), expected, 2e-5, "big_vision tensorstore checkpoint")
    # big_vision's own way to name the latest step: the prefix, with checkpoint.bv-LAST beside it.
    model = vit_keras.create(str(ORBAX / "big_vision_ts" / "checkpoint.bv"), image_size=(32, 48))
    assert_close(model(images), expected, 2e-5, "checkpoint.bv-LAST")


def test_big_vision_tensorstore_without_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorstore", None)
    with pytest.raises(ValueError, match=r"big_vision tensorstore checkpoint.*pip install 'vit_keras\[orbax\]'"):
        vit_keras.create(str(ORBAX / "big_vision_ts" / "checkpoint.bv-000000002"), image_size=(32, 48))


def test_big_vision_tensorstore_refuses_integers_in_params(tmp_path):
    pytest.importorskip("tensorstore", reason="the orbax extra (tensorstore==0.1.86) is not installed")
    import json
    import shutil

    folder = tmp_path / "checkpoint.bv-000000002"
    shutil.copytree(ORBAX / "big_vision_ts" / "checkpoint.bv-000000002", folder)
    leaf = folder / "params~Transformer~step"  # a zarr v2 array written by hand: .zarray and one raw chunk
    leaf.mkdir()
    (leaf / ".zarray").write_text(json.dumps({"chunks": [1], "compressor": None, "dtype": "<i8", "fill_value": 0,
                                              "filters": None, "order": "C", "shape": [1], "zarr_format": 2}))
    (leaf / "0").write_bytes(np.array([3], "<i8").tobytes())
    with pytest.raises(ValueError, match="params/Transformer/step has dtype int64"):
        vit_keras.create(str(folder), image_size=(32, 48))


def test_orbax_integers_in_params_refused():
    pytest.importorskip("orbax.checkpoint", reason="the orbax extra (orbax-checkpoint==0.12.8, tensorstore==0.1.86) "
                        "is not installed")
    with pytest.raises(ValueError, match="params/Transformer/step hold int32 values"):
        vit_keras.create(str(ORBAX / "int_in_params"), image_size=32)
