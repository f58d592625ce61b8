"""The ONNX export, checked with ONNX Runtime against Keras on the Flax reference fixtures."""

import json
import os
import shutil
import sys

import numpy as np
import pytest

pytest.importorskip("tf2onnx")
pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from vit_keras import model as vit_model  # noqa: E402
from vit_keras.predict import probabilities  # noqa: E402
from vit_keras.serving import onnx as vit_onnx  # noqa: E402
from vit_keras.serving import prepare as vit_prepare  # noqa: E402
from vit_keras.files import MANIFEST  # noqa: E402


def pixels(model, batch, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (batch,) + tuple(model.input_shape[1:])).astype("float32")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def keras_probabilities(model, images):
    return np.asarray(probabilities(model, images))


@pytest.fixture(scope="module")
def vit(tiny_vit):
    return tiny_vit.model()


@pytest.fixture(scope="module")
def r50(tiny_r50):
    return tiny_r50.model()


@pytest.fixture(scope="module")
def vit_export(vit, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "vit"
    return vit_onnx.export_onnx(vit, str(out), class_names=[f"class {i}" for i in range(10)])


@pytest.fixture(scope="module")
def r50_export(r50, tmp_path_factory):
    """The hybrid, exported through `fold_weight_standardization` (the call is recorded)."""
    folded = []

    def fold(model):
        folded.append(model)
        return vit_model.fold_weight_standardization(model)

    out = tmp_path_factory.mktemp("onnx") / "r50"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vit_prepare, "fold_weight_standardization", fold)
        path = vit_onnx.export_onnx(r50, str(out))
    assert folded == [r50]  # float32 already: the model itself, then folded
    return path


def test_file_format(vit, vit_export):
    folder = os.path.dirname(vit_export)
    assert vit_export.endswith(os.path.join("vit", "model.onnx"))
    assert sorted(os.listdir(folder)) == ["class_names.json", "model.onnx", MANIFEST]
    assert read_json(os.path.join(folder, MANIFEST))["files"] == ["class_names.json", "model.onnx"]
    assert read_json(os.path.join(folder, "class_names.json"))[3] == "class 3"

    proto = onnx.load(vit_export)
    onnx.checker.check_model(proto)
    opsets = {o.domain: o.version for o in proto.opset_import}
    assert opsets[""] == vit_onnx.DEFAULT_OPSET >= 17

    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == "images" and out.name == "probabilities"
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert in_dims == ["N", 32, 32, 3] and out_dims == ["N", 10]

    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["class_names"])[9] == "class 9"
    assert "pixels 0..255" in proto.doc_string


@pytest.mark.parametrize("name", ["vit", "r50"])
def test_onnx_runtime_matches_keras(name, request):
    model = request.getfixturevalue(name)
    session = vit_onnx.onnx_session(request.getfixturevalue(f"{name}_export"))
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert session.get_inputs()[0].shape[0] == "N"
    assert [o.name for o in session.get_outputs()] == ["probabilities"]
    for batch in (1, 3):
        images = pixels(model, batch, seed=batch)
        expected = keras_probabilities(model, images)  # the original model: the hybrid unfolded
        assert expected.max() - expected.min() > 0.1  # the fixtures' heads give distinct classes
        got = session.run(None, {"images": images})[0]
        assert got.shape == expected.shape == (batch, 10)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_onnx_predict_batches(vit, vit_export):
    images = pixels(vit, 5, seed=7)
    session = vit_onnx.onnx_session(os.path.dirname(vit_export), threads=1)  # the folder works too
    whole = vit_onnx.onnx_predict(session, images, batch_size=None)
    np.testing.assert_allclose(vit_onnx.onnx_predict(vit_export, images, batch_size=2), whole, atol=1e-6)
    np.testing.assert_allclose(whole, keras_probabilities(vit, images), atol=1e-5, rtol=0)
    uint8 = vit_onnx.onnx_predict(session, images.round().astype("uint8"))  # cast to float32
    np.testing.assert_allclose(uint8, keras_probabilities(vit, images.round()), atol=1e-5, rtol=0)
    assert vit_onnx.onnx_predict(session, images[:0]).shape == (0, 10)


def test_overwrite_only_when_asked(vit, vit_export, tmp_path):
    folder = os.path.dirname(vit_export)
    before = os.path.getmtime(vit_export)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        vit_onnx.export_onnx(vit, folder)
    assert os.path.getmtime(vit_export) == before

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by vit-keras export"):
        vit_onnx.export_onnx(vit, str(mine), overwrite=True)
    assert os.listdir(mine) == ["notes.txt"]

    again = tmp_path / "again"
    shutil.copytree(folder, again)
    path = vit_onnx.export_onnx(vit, str(again), overwrite=True)  # an earlier export: replaced
    assert sorted(os.listdir(again)) == ["class_names.json", "model.onnx", MANIFEST]
    assert read_json(again / "class_names.json")[0] == "0"  # the new export's names
    np.testing.assert_allclose(vit_onnx.onnx_predict(path, pixels(vit, 2)), keras_probabilities(vit, pixels(vit, 2)),
                               atol=1e-5, rtol=0)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary folders left


def test_external_data_and_opset_18(vit, tmp_path, monkeypatch):
    """Weights over the protobuf limit go to model.onnx.data (forced here); the folder moves as a whole."""
    monkeypatch.setattr(vit_onnx, "EXTERNAL_DATA_BYTES", 0)
    opset = min(18, vit_onnx.max_opset())
    vit_onnx.export_onnx(vit, str(tmp_path / "big"), opset=opset)
    assert sorted(os.listdir(tmp_path / "big")) == ["class_names.json", "model.onnx", "model.onnx.data", MANIFEST]
    assert "model.onnx.data" in read_json(tmp_path / "big" / MANIFEST)["files"]
    assert os.path.getsize(tmp_path / "big" / "model.onnx") < os.path.getsize(tmp_path / "big" / "model.onnx.data")
    shutil.move(tmp_path / "big", tmp_path / "moved")
    proto = onnx.load(str(tmp_path / "moved" / "model.onnx"), load_external_data=False)
    assert {o.domain: o.version for o in proto.opset_import}[""] == opset
    images = pixels(vit, 3)
    np.testing.assert_allclose(vit_onnx.onnx_predict(tmp_path / "moved", images), keras_probabilities(vit, images),
                               atol=1e-5, rtol=0)
    assert not hasattr(np, "product")  # the NumPy 2 shim for tf2onnx is gone again


def test_mixed_precision_model_exports_in_float32(tiny_vit, tmp_path):
    import keras

    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = tiny_vit.model()
    finally:
        keras.config.set_dtype_policy("float32")
    assert "bfloat16" in json.dumps(mixed.get_config())
    path = vit_onnx.export_onnx(mixed, str(tmp_path / "mixed"))
    proto = onnx.load(path)
    assert {i.data_type for i in proto.graph.initializer} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64,
                                                             onnx.TensorProto.INT32}
    images = pixels(mixed, 2)
    expected = keras_probabilities(vit_model.float32_copy(mixed), images)
    np.testing.assert_allclose(vit_onnx.onnx_predict(path, images), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("opset", [16, 99, "17", True])
def test_bad_opset_is_refused_before_writing(vit, tmp_path, opset):
    with pytest.raises(ValueError, match="opset"):
        vit_onnx.export_onnx(vit, str(tmp_path / "x"), opset=opset)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("missing", ["tf2onnx", "onnx"])
def test_missing_converter_names_the_extra(vit, tmp_path, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # `import` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'vit_keras\[onnx\]'") as error:
        vit_onnx.export_onnx(vit, str(tmp_path / "x"))
    assert missing in str(error.value)
    assert os.listdir(tmp_path) == []


def test_missing_runtime_names_the_extra(vit_export, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"onnxruntime.*pip install 'vit_keras\[onnx\]'"):
        vit_onnx.onnx_predict(vit_export, np.zeros((1, 32, 32, 3), "float32"))


def test_export_command_writes_onnx(vit, tmp_path, capsys):
    """`vit-keras export --format onnx`: the folder, the printed path, and Keras's probabilities."""
    from vit_keras import cli

    vit.save(tmp_path / "m.keras")
    out = tmp_path / "onnx"
    code = cli.main(["export", "--model", str(tmp_path / "m.keras"), "--format", "onnx", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert f"ONNX -> {out / vit_onnx.ONNX_FILE}" in printed.out
    x = pixels(vit, 2, seed=5)
    np.testing.assert_allclose(vit_onnx.onnx_predict(str(out / vit_onnx.ONNX_FILE), x),
                               keras_probabilities(vit, x), atol=1e-5)
    assert cli.main(["export", "--model", str(tmp_path / "m.keras"), "--format", "onnx", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
