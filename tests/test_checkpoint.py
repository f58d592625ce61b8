"""Checkpoint loading: name map, quirks, strict key accounting, errors, downloads."""

import functools
import http.server
import logging
import threading

import numpy as np
import pytest

import vit_keras
from conftest import assert_close
from vit_keras.checkpoint import read_npz


def write_npz(path, params):
    np.savez(path, **params)
    return str(path)


def test_group_norm_as_vectors(tiny_r50, tmp_path):
    """GroupNorm scale/bias stored as (C,) load as well as the published (1,1,1,C)."""
    params = read_npz(tiny_r50.params)
    squeezed = {k: (v.reshape(-1) if "/gn" in k or k.startswith("gn_") else v) for k, v in params.items()}
    assert any(v.ndim == 1 and "gn" in k for k, v in squeezed.items())
    model = vit_keras.build_model(weights=write_npz(tmp_path / "p.npz", squeezed), **tiny_r50.config())
    assert_close(model(tiny_r50.images), tiny_r50.expected["logits"], 2e-5)


def test_pre_logits_checkpoint_adds_tanh_layer(tiny_vit, tmp_path):
    params = read_npz(tiny_vit.params)
    rng = np.random.default_rng(0)
    k = rng.normal(size=(64, 32)).astype("float32") / 8
    b = rng.normal(size=(32,)).astype("float32")
    hk = rng.normal(size=(32, 10)).astype("float32")
    params.update({"pre_logits/kernel": k, "pre_logits/bias": b, "head/kernel": hk})
    model = vit_keras.build_model(weights=write_npz(tmp_path / "p.npz", params), **tiny_vit.config())
    assert model.get_layer("pre_logits").activation.__name__ == "tanh"
    expected = np.tanh(tiny_vit.expected["pre_logits"] @ k + b) @ hk + params["head/bias"]
    assert_close(model(tiny_vit.images), expected, 2e-5)
    # Without a top, the representation layer is not part of the model.
    body = vit_keras.build_model(
        weights=str(tmp_path / "p.npz"), **tiny_vit.config(include_top=False)
    )
    assert "pre_logits" not in [layer.name for layer in body.layers]


def test_new_class_count_reinitialises_head(tiny_vit, caplog):
    with caplog.at_level(logging.WARNING, logger="vit_keras"):
        model = tiny_vit.model(classes=3)
    assert "head/kernel" in caplog.text and "Re-initialised" in caplog.text
    head = model.get_layer("head")
    assert not np.any(head.kernel.numpy()) and not np.any(head.bias.numpy())
    # The body is loaded: the class token equals the reference representation.
    body = model.get_layer("class_token").output
    import keras

    feats = keras.Model(model.inputs[0], body)(tiny_vit.images)
    ref = tiny_vit.expected["pre_logits"]
    assert_close(feats, ref, 1e-4 * np.abs(ref).max())


def test_pretrained_top_false_keeps_fresh_head(tiny_vit):
    model = vit_keras.build_model(
        weights=str(tiny_vit.params), pretrained_top=False, **tiny_vit.config()
    )
    assert not np.any(model.get_layer("head").kernel.numpy())


def test_missing_unused_and_misshaped_keys_listed_together(tiny_vit, tmp_path):
    params = read_npz(tiny_vit.params)
    del params["Transformer/encoder_norm/scale"]
    params["Transformer/encoderblock_9/LayerNorm_0/scale"] = np.ones(64, "float32")
    params["embedding/bias"] = np.zeros(65, "float32")
    path = write_npz(tmp_path / "bad.npz", params)
    model = vit_keras.build_model(**tiny_vit.config())
    before = model.get_layer("embeddings").cls.numpy().copy()
    with pytest.raises(ValueError) as err:
        vit_keras.load_npz(model, path)
    text = str(err.value)
    assert "missing (1)" in text and "Transformer/encoder_norm/scale" in text
    assert "unused (1)" in text and "encoderblock_9/LayerNorm_0/scale" in text
    assert "wrong shape (1)" in text and "embedding/bias: checkpoint (65,), model (64,)" in text
    # Nothing was assigned.
    np.testing.assert_array_equal(model.get_layer("embeddings").cls.numpy(), before)


def test_checkpoint_of_another_model_is_refused(tiny_vit, tiny_r50):
    model = vit_keras.build_model(**tiny_vit.config())
    with pytest.raises(ValueError, match=r"unused \(\d+\):[\s\S]*block1/unit1/conv1/kernel"):
        vit_keras.load_npz(model, str(tiny_r50.params))


def test_not_an_npz(tmp_path, tiny_vit):
    model = vit_keras.build_model(**tiny_vit.config())
    text = tmp_path / "weights.npz"
    text.write_text("this is not a checkpoint")
    with pytest.raises(ValueError, match="is not an .npz checkpoint"):
        vit_keras.load_npz(model, str(text))
    array = tmp_path / "array.npy"
    np.save(array, np.zeros(3))
    with pytest.raises(ValueError, match="single array"):
        vit_keras.load_npz(model, str(array))


def test_unknown_weights_name():
    with pytest.raises(ValueError, match="Unknown weights 'imagenet-22k'.*imagenet21k"):
        vit_keras.vit_b16(weights="imagenet-22k")
    with pytest.raises(ValueError, match="No published 'imagenet21k' checkpoint for"):
        from vit_keras import checkpoint, presets

        presets.PRESETS.append(presets.Preset("x", "other", "http://127.0.0.1:9/x.npz", 224))
        try:
            checkpoint.resolve("imagenet21k", model="x")
        finally:
            presets.PRESETS.pop()


def test_every_preset_has_a_config_and_url():
    from vit_keras import presets

    for preset in presets.PRESETS:
        assert preset.model in presets.CONFIGS and preset.weights in presets.WEIGHT_NAMES
        assert preset.url.startswith("https://storage.googleapis.com/vit_models/")
        assert preset.url.endswith(".npz") and preset.license == "Apache-2.0"
    # The recommended AugReg files ("How to train your ViT") for every model the issue names.
    for name in ("vit_ti16", "vit_s16", "vit_s32", "vit_b16", "vit_b32", "vit_l16", "vit_r_ti16",
                 "vit_r26_s32", "vit_r50_l32"):
        pretrained = presets.find_preset(name, "augreg_in21k")
        assert pretrained.classes == 21843 and pretrained.resolution == 224
        assert "-i21k-300ep-" in pretrained.url and "--imagenet2012" not in pretrained.url
        finetuned = presets.find_preset(name, "augreg_in21k_ft_in1k", 384)
        assert finetuned.url.startswith(pretrained.url[:-4] + "--imagenet2012-steps_20k-lr_")
        assert finetuned.url.endswith("-res_384.npz") and finetuned.resolution == 384
    # A name published at two resolutions gives the file of the requested one.
    assert presets.find_preset("vit_b16", "augreg_in21k_ft_in1k", 224).url.endswith("res_224.npz")
    assert presets.find_preset("vit_b16", "augreg_in21k_ft_in1k", (224, 224)).resolution == 224
    assert presets.find_preset("vit_b16", "augreg_in21k_ft_in1k").resolution == 384
    # The 2020 names keep working, ViT-H/14 included (pre-trained only).
    assert presets.find_preset("vit_h14", "imagenet21k").url.endswith("imagenet21k/ViT-H_14.npz")
    assert presets.find_preset("vit_r50_b16", "imagenet21k+imagenet2012").url.endswith(
        "imagenet21k+imagenet2012/R50+ViT-B_16.npz")
    assert presets.find_preset("vit_ti16", "imagenet21k").url == presets.find_preset("vit_ti16", "augreg_in21k").url
    assert set(vit_keras.BUILDERS) == set(presets.CONFIGS)


@pytest.fixture
def http_server(tmp_path):
    """Serves the fixture folder over HTTP on 127.0.0.1."""
    from conftest import FIXTURES

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(FIXTURES))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_from_url(http_server, tiny_r50):
    import os

    url = f"{http_server}/tiny_r50/params.npz"
    model = vit_keras.build_model(weights=url, **tiny_r50.config())
    assert_close(model(tiny_r50.images), tiny_r50.expected["logits"], 2e-5)
    from vit_keras import download

    cached = download.cache_path(url)
    assert cached.startswith(os.path.join(os.environ["KERAS_HOME"], "vit_keras"))
    assert os.path.getsize(cached) == tiny_r50.params.stat().st_size
    # load_npz takes URLs too.
    vit_keras.load_npz(model, url)


def test_download_checksum_is_verified(http_server, tiny_vit, tmp_path):
    from vit_keras import checkpoint, download, presets

    url = f"{http_server}/tiny_vit/params.npz"
    good = presets.Preset("tiny", "imagenet21k", url, 32, sha256=tiny_vit.meta["files"]["params.npz"]["sha256"])
    bad = presets.Preset("tiny", "imagenet21k+imagenet2012", url.replace("params", "inputs"), 32, sha256="0" * 64)
    presets.PRESETS.extend([good, bad])
    try:
        assert checkpoint.resolve("imagenet21k", model="tiny").endswith("params.npz")
        with pytest.raises(download.DownloadError, match="(?i)corrupt: .*sha256"):
            checkpoint.resolve("imagenet21k+imagenet2012", model="tiny")
    finally:
        del presets.PRESETS[-2:]
