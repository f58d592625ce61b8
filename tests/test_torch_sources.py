"""timm state_dicts and Hugging Face transformers folders load to those libraries' own outputs.

The fixtures (tests/fixtures/timm, tests/fixtures/transformers) were written by timm and transformers
themselves (generate.py beside them); those libraries are not installed here (see the fixture READMEs).
"""

import json
import pathlib
import shutil
import struct

import keras
import numpy as np
import pytest

import vit_keras
from conftest import assert_close
from vit_keras import cli, evaluate, sources, training

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TIMM = FIXTURES / "timm"
HF = FIXTURES / "transformers" / "hf_vit"
VIT = vit_keras.ViTConfig("timm_tiny", "timm tiny ViT", 8, 2, 64, 4, 128)
HYBRID = vit_keras.ViTConfig("timm_tiny_hybrid", "timm tiny R+ViT", 1, 2, 64, 4, 128, resnet_layers=(1, 1),
                             resnet_width_factor=0.5)
TIMM_CASES = {"timm_vit": VIT, "timm_r50_hybrid": HYBRID}


def io(folder):
    images = np.load(folder / "inputs.npz")["images"]
    with np.load(folder / "expected.npz") as e:
        return images, {k: e[k] for k in e.files}


@pytest.fixture(scope="module", params=list(TIMM_CASES))
def timm_case(request):
    folder = TIMM / request.param
    model = vit_keras.create(TIMM_CASES[request.param], weights=str(folder / "model.safetensors"), classes=10,
                             image_size=(32, 48))
    return request.param, folder, model


def check_outputs(model, folder, logits_atol=1e-4):
    images, e = io(folder)
    logits, weights = vit_keras.attention_model(model)(images)
    assert_close(logits, e["logits"], logits_atol, "logits")
    assert_close(model(images), e["logits"], logits_atol, "logits (fused attention)")
    for i, w in enumerate(weights):
        assert_close(w, e[f"attn_{i}"], 1e-5, f"attn_{i}")


def test_timm_logits_features_attention(timm_case):
    name, folder, model = timm_case
    check_outputs(model, folder)
    images, e = io(folder)
    assert model.get_layer("Transformer").gelu_approximate is False
    features = vit_keras.create(TIMM_CASES[name], weights=str(folder / "model.safetensors"), include_top=False,
                                image_size=(32, 48))
    assert_close(features(images), e["features"], 1e-4, "features")


def test_timm_numerics_are_needed():
    """The exact GELU is what timm's logits need (tanh moves them by 3.5e-4 here)."""
    folder = TIMM / "timm_r50_hybrid"
    images, e = io(folder)
    args = dict(HYBRID.build_args(), image_size=(32, 48), classes=10, weights=str(folder / "model.safetensors"))
    model = vit_keras.build_model(**{**args, **sources.TIMM_NUMERICS})
    assert_close(model(images), e["logits"], 1e-4, "build_model with timm's numerics")
    model = vit_keras.build_model(**{**args, **sources.TIMM_NUMERICS, "gelu_approximate": True})
    assert float(np.abs(np.asarray(model(images)) - e["logits"]).max()) > 1e-4
    # build_model with weights= and no numerics given takes the file's.
    model = vit_keras.build_model(**{k: v for k, v in args.items() if k not in sources.TIMM_NUMERICS})
    assert model.get_layer("Transformer").gelu_approximate is False
    assert_close(model(images), e["logits"], 1e-4, "build_model, numerics from the file")


def test_ws_epsilon_on_the_std_is_timms_under_the_root():
    """timm standardises with (w - mean) / sqrt(var + 1e-8); eps 1e-8 on the std is the same in float32."""
    from vit_keras.layers.std_conv import standardize_kernel

    w = np.random.default_rng(0).normal(size=(3, 3, 16, 8)) * 0.05
    mean = w.mean(axis=(0, 1, 2), keepdims=True)
    timm_form = (w - mean) / np.sqrt(w.var(axis=(0, 1, 2), keepdims=True) + 1e-8)
    ours = np.asarray(standardize_kernel(w.astype("float32"), 1e-8))
    assert_close(ours, timm_form, 1e-5, "ws eps 1e-8")
    google = np.asarray(standardize_kernel(w.astype("float32"), 1e-5))
    assert np.abs(google - timm_form).max() > 1e-4  # 1e-5 on a std of 0.05 is 2e-4 relative


def test_numerics_survive_keras_file(timm_case, tmp_path):
    name, folder, model = timm_case
    path = tmp_path / "m.keras"
    model.save(path)
    again = keras.saving.load_model(path)
    images, e = io(folder)
    assert_close(again(images), e["logits"], 1e-4, "reloaded")
    if name == "timm_r50_hybrid":
        resnet = again.get_layer("embeddings").resnet
        assert (resnet.ws_epsilon, resnet.gn_epsilon) == (1e-8, 1e-5)
        folded = vit_keras.fold_weight_standardization(again)
        assert_close(folded(images), e["logits"], 1e-4, "folded")


def test_hf_folder_names_its_architecture():
    model = vit_keras.create(str(HF / "model"))
    assert model.input_shape == (None, 32, 48, 3)
    assert model.get_layer("head").class_names[:3] == ["zero", "one", "two"]
    encoder = model.get_layer("Transformer")
    assert (encoder.layer_norm_epsilon, encoder.gelu_approximate) == (1e-12, False)
    check_outputs(model, HF)
    # The file itself with its config.json beside it, and a builder given the folder as weights.
    check_outputs(vit_keras.create(str(HF / "model" / "model.safetensors")), HF)
    # transformers 5's in-memory names (vit.layers.N.attention.q_proj, mlp.fc1): save_file(model.state_dict()).
    check_outputs(vit_keras.create(str(HF / "model" / "state_dict.safetensors")), HF)
    config = vit_keras.ViTConfig("hf", "hf", 8, 2, 64, 4, 128)
    check_outputs(vit_keras.create(config, weights=str(HF / "model"), classes=10, image_size=(32, 48)), HF)
    images, e = io(HF)
    features = vit_keras.create(str(HF / "model"), include_top=False)
    assert_close(features(images), e["features"], 1e-4, "features")


def test_hf_vit_model_without_classifier():
    """`ViTModel` saves its names without "vit."; its pooler (Dense + tanh) is the published files' pre_logits."""
    folder = FIXTURES / "transformers" / "hf_vit_base"
    images = np.load(folder / "inputs.npz")["images"]
    e = np.load(folder / "expected.npz")
    features = vit_keras.create(str(folder / "model"), include_top=False)
    assert_close(features(images), e["class_token"], 1e-4, "last_hidden_state[:, 0]")
    pooled = vit_keras.create(str(folder / "model"), include_top=False, keep_pre_logits=True)
    assert_close(pooled(images), e["pooler_output"], 1e-4, "pooler_output")
    with pytest.raises(ValueError, match="has no head"):
        vit_keras.create(str(folder / "model"))


@pytest.mark.slow  # an export, a full-size model or an evaluation run: left to `make test`
def test_evaluate_and_train_take_timm_and_hf(tmp_path, capsys):
    """The paths of `vit-keras evaluate` / `train --weights`; and one CLI evaluate of the HF folder."""
    images, e = io(HF)
    assert_close(evaluate.load_model(str(HF / "model"))(images), e["logits"], 1e-4, "evaluate.load_model")
    model = training._model_from(str(HF / "model"), 10, None, None, None, 0.0)
    assert_close(model(images), e["logits"], 1e-4, "train --model folder")
    folder = TIMM / "timm_vit"
    timages, te = io(folder)
    model = training._model_from(VIT, 10, None, (32, 48), str(folder / "model.safetensors"), 0.0)
    assert_close(model(timages), te["logits"], 1e-4, "train --weights model.safetensors")
    # Its head names the classes "zero".."nine" (config.json's id2label), digits "0".."9": scored by position.
    assert cli.main(["evaluate", "--model", str(HF / "model"), "--dataset", "digits", "--batch-size", "120",
                     "--label-map", "position"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["count"] == 360 and result["image_size"] in ([32, 48], "32x48", (32, 48))


def test_torch_files_refused_where_they_do_not_fit(tmp_path):
    state = sources.read_safetensors(TIMM / "timm_vit" / "model.safetensors")
    # A key no rule knows (timm's fc_norm of avg-pooled models) is listed, nothing loads.
    path = tmp_path / "fc_norm.safetensors"
    write_safetensors(path, {**state, "fc_norm.weight": np.ones(64, "float32")})
    with pytest.raises(ValueError, match=r"(?s)unused \(1\).*fc_norm\.weight"):
        vit_keras.create(VIT, weights=str(path), classes=10, image_size=(32, 48))
    # A missing block.
    path = tmp_path / "missing.safetensors"
    write_safetensors(path, {k: v for k, v in state.items() if not k.startswith("blocks.1.mlp.fc2")})
    with pytest.raises(ValueError, match=r"(?s)missing \(2\).*encoderblock_1/MlpBlock_3/Dense_1/bias"):
        vit_keras.create(VIT, weights=str(path), classes=10, image_size=(32, 48))
    # A timm file does not record its heads: it needs an architecture name.
    with pytest.raises(ValueError, match="does not record the number of heads"):
        vit_keras.create(str(TIMM / "timm_vit" / "model.safetensors"))
    # The wrong architecture: shapes listed.
    with pytest.raises(ValueError, match="wrong shape"):
        vit_keras.create(vit_keras.ViTConfig("x", "x", 8, 2, 64, 4, 256), weights=str(TIMM / "timm_vit" /
                         "model.safetensors"), classes=10, image_size=(32, 48))
    # Hugging Face folders: another model type, a pickle only, no config beside a HF file.
    folder = tmp_path / "deit"
    shutil.copytree(HF / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "deit"}))
    with pytest.raises(ValueError, match="model_type 'deit' is not a transformers ViT"):
        vit_keras.create(str(folder))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin is a pickle"):
        vit_keras.create(str(folder))
    alone = tmp_path / "alone" / "model.safetensors"
    alone.parent.mkdir()
    shutil.copy(HF / "model" / "model.safetensors", alone)
    with pytest.raises(ValueError, match="needs its config.json beside it"):
        vit_keras.create(str(alone))
    with pytest.raises(ValueError, match="neither a transformers folder"):
        sources.load(str(tmp_path / "alone"))


def write_safetensors(path, arrays, dtype="F32", header=None, tail=b""):
    """The safetensors format written here by hand (the reader's independent counterpart)."""
    entries, data, offset = {}, b"", 0
    for name, value in arrays.items():
        raw = np.ascontiguousarray(value, "<f4").tobytes()
        entries[name] = {"dtype": dtype, "shape": list(value.shape), "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    text = json.dumps(header if header is not None else entries).encode()
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data + tail)


def test_safetensors_reader_equals_the_format(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.normal(size=(2, 3)).astype("float32"), "b": rng.normal(size=(4,)).astype("float32")}
    path = tmp_path / "ok.safetensors"
    write_safetensors(path, arrays)
    got = sources.read_safetensors(path)
    assert set(got) == {"a", "b"} and all(np.array_equal(got[k], arrays[k]) for k in arrays)
    # bfloat16: the top half of each float32.
    bits = (arrays["a"].view("<u4") >> 16).astype("<u2")
    text = json.dumps({"a": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}}).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + bits.tobytes())
    np.testing.assert_array_equal(sources.read_safetensors(path)["a"], (bits.astype("<u4") << 16).view("<f4"))


@pytest.mark.parametrize("kind, match", [
    ("short", "is 4 bytes long"),
    ("huge_header", "its header claims"),
    ("not_json", "header is not JSON"),
    ("not_object", "not a JSON object"),
    ("int_dtype", "dtype I64"),
    ("size_mismatch", "declares shape"),
    ("past_end", "declares shape"),
    ("overlap", "overlap"),
    ("bad_entry", "malformed header entry"),
])
def test_hostile_safetensors(tmp_path, kind, match):
    path = tmp_path / f"{kind}.safetensors"
    a = np.zeros((2, 2), "float32")
    entry = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    if kind == "short":
        path.write_bytes(b"\x01\x02\x03\x04")
    elif kind == "huge_header":
        path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    elif kind == "not_json":
        path.write_bytes(struct.pack("<Q", 3) + b"{x}")
    elif kind == "not_object":
        path.write_bytes(struct.pack("<Q", 2) + b"[]")
    elif kind == "int_dtype":
        write_safetensors(path, {"a": a}, header={"a": {**entry, "dtype": "I64", "shape": [2, 1]}})
    elif kind == "size_mismatch":
        write_safetensors(path, {"a": a}, header={"a": {**entry, "shape": [1000, 1000]}})
    elif kind == "past_end":
        write_safetensors(path, {"a": a}, header={"a": {**entry, "shape": [4, 4], "data_offsets": [0, 64]}})
    elif kind == "overlap":
        write_safetensors(path, {"a": a}, header={"a": entry, "b": {**entry, "shape": [2], "data_offsets": [8, 16]}})
    elif kind == "bad_entry":
        write_safetensors(path, {"a": a}, header={"a": {**entry, "shape": "2x2"}})
    with pytest.raises(ValueError, match=match):
        sources.read_safetensors(path)
    if kind != "short":  # the same error through the public entry point
        with pytest.raises(ValueError, match=match):
            vit_keras.create(VIT, weights=str(path), classes=10, image_size=(32, 48))


@pytest.mark.slow  # an export, a full-size model or an evaluation run: left to `make test`
def test_tflite_keeps_timm_numerics():
    """The float32 TFLite file of the timm hybrid gives timm's probabilities (serving takes 0..255 pixels)."""
    from vit_keras.serving import tflite

    folder = TIMM / "timm_r50_hybrid"
    images, e = io(folder)
    model = vit_keras.create(HYBRID, weights=str(folder / "model.safetensors"), classes=10, image_size=(32, 48))
    blob = tflite.convert_tflite(model, "float32", attention=False)
    probs = tflite.tflite_predict(blob, (images + 1) * 127.5)
    z = e["logits"] - e["logits"].max(-1, keepdims=True)
    assert_close(probs, np.exp(z) / np.exp(z).sum(-1, keepdims=True), 1e-5, "TFLite probabilities")


@pytest.mark.slow  # an export, a full-size model or an evaluation run: left to `make test`
def test_full_size_timm_r50_hybrid_keys_fit_vit_r50_b16():
    """Every key of timm's vit_base_r50_s16_384 state_dict (names and shapes written by timm) fits vit_r50_b16."""
    from vit_keras import checkpoint

    shapes = json.loads((TIMM / "full_size_keys.json").read_text())["vit_base_r50_s16_384"]
    state = {k: np.full(s, 0.5, "float32") for k, s in shapes.items()}
    params = sources.translate(state, "timm")
    model = vit_keras.create("vit_r50_b16", classes=1000, image_size=384, pretrained=False)
    checkpoint.assign(model, params)  # raises, listing them, on any missing, unused or mis-shaped key
    assert len(state) == 308
    last_unit = model.get_layer("embeddings").resnet.stages[2].units[8]  # block3/unit9
    last_block = model.get_layer("Transformer").blocks[11]
    for variable in (last_unit.conv3.kernel, last_unit.gn3.scale, last_block.attention.query.kernel):
        assert np.all(np.asarray(variable) == 0.5), variable.path
