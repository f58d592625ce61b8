"""`load_weights` in its steps (plan, adapt, report, apply), the head policy as preset data, build vs load."""

import inspect
import logging

import numpy as np
import pytest
import scipy.ndimage

import vit_keras
from conftest import assert_close
from vit_keras import checkpoint, presets, sources
from vit_keras.checkpoint import POSEMB_KEY, LoadPolicy, read_npz


def _weights(model):
    return [np.array(w) for w in model.get_weights()]


def test_load_weights_gives_the_upstream_logits(tiny_r50):
    model = vit_keras.build_model(**tiny_r50.config())
    assert vit_keras.load_weights(model, str(tiny_r50.params)) is model
    assert_close(model(tiny_r50.images), tiny_r50.expected["logits"], 2e-5, "load_weights(path)")


def test_plan_pairs_every_key_with_a_variable(tiny_vit):
    """The fixture file (written by the upstream code) and the model: every key and every variable, once."""
    model = vit_keras.build_model(**tiny_vit.config())
    params = checkpoint.read(str(tiny_vit.params))
    plan = checkpoint.plan(model, params)
    assert set(plan.load) == set(params) and len(plan.load) == len(model.weights)
    assert not (plan.fresh or plan.dropped or plan.missing or plan.unused)
    assert {id(v) for v, _ in plan.load.values()} == {id(w) for w in model.weights}
    assert plan.load["cls"][0] is model.get_layer("embeddings").cls


def test_report_lists_every_missing_unused_and_misshaped_key_in_one_error(tiny_vit):
    model = vit_keras.build_model(**tiny_vit.config())
    params = checkpoint.read(str(tiny_vit.params))
    gone = ["Transformer/encoder_norm/scale", "Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"]
    for key in gone:
        del params[key]
    extra = {"Transformer/encoderblock_7/LayerNorm_0/scale": np.ones(64, "float32"), "decoder/kernel": np.ones((2, 2))}
    params.update(extra)
    params["embedding/bias"] = np.zeros(65, "float32")
    plan = checkpoint.adapt(checkpoint.plan(model, params), model)
    assert set(plan.missing) == set(gone) and set(plan.unused) == set(extra)
    before = _weights(model)
    with pytest.raises(ValueError) as err:
        checkpoint.report(plan, model.name, "bad.npz")
    text = str(err.value)
    assert text.startswith("Checkpoint bad.npz does not fit model 'vit':")
    assert "missing (2)" in text and "unused (2)" in text and "wrong shape (1)" in text
    for key in [*gone, *extra, "embedding/bias: checkpoint (65,), model (64,)"]:
        assert key in text, key
    # load_weights stops at the report: nothing assigned.
    with pytest.raises(ValueError, match=r"missing \(2\)[\s\S]*unused \(2\)[\s\S]*wrong shape \(1\)"):
        vit_keras.load_weights(model, checkpoint.Checkpoint("bad.npz", params))
    for old, new in zip(before, _weights(model)):
        np.testing.assert_array_equal(old, new)


@pytest.mark.parametrize("image_size, grid", [((48, 80), (3, 5)), ((16, 64), (1, 4))])
def test_adapt_resizes_the_position_grid_as_scipy_zoom(tiny_vit, image_size, grid):
    """vit_jax's load_pretrained zooms the grid with scipy.ndimage.zoom(order=1); the class row is kept."""
    model = vit_keras.build_model(**tiny_vit.config(image_size=image_size))
    params = checkpoint.read(str(tiny_vit.params))
    posemb = params[POSEMB_KEY]  # (1, 1 + 2*2, 64)
    zoomed = scipy.ndimage.zoom(posemb[0, 1:].reshape(2, 2, -1), (grid[0] / 2, grid[1] / 2, 1), order=1)
    plan = checkpoint.adapt(checkpoint.plan(model, params), model)
    value = plan.load[POSEMB_KEY][1]
    assert_close(value[:, :1], posemb[:, :1], 0, "class row")
    assert_close(value[0, 1:], zoomed.reshape(grid[0] * grid[1], -1), 1e-6, "grid")
    assert plan.notes == (("resize_grid", POSEMB_KEY, (1, 5, 64), (1, 1 + grid[0] * grid[1], 64)),)


def test_adapt_takes_a_non_square_checkpoint_grid_without_class_token(tiny_vit_gap):
    """The gap fixture's 2x3 grid (no class row), said by checkpoint_grid, into a 4x4 model."""
    model = vit_keras.build_model(**tiny_vit_gap.config(image_size=64))
    params = checkpoint.read(str(tiny_vit_gap.params))
    posemb = params[POSEMB_KEY]
    assert posemb.shape == (1, 6, 64)
    zoomed = scipy.ndimage.zoom(posemb[0].reshape(2, 3, -1), (4 / 2, 4 / 3, 1), order=1)
    plan = checkpoint.adapt(checkpoint.plan(model, params), model, LoadPolicy(checkpoint_grid=(2, 3)))
    assert_close(plan.load[POSEMB_KEY][1][0], zoomed.reshape(16, -1), 1e-6, "grid")
    with pytest.raises(ValueError, match="not a square grid"):  # 6 tokens, no grid given
        checkpoint.adapt(checkpoint.plan(model, params), model)


def test_adapt_sums_the_first_kernel_for_a_grey_model(tiny_vit):
    model = vit_keras.build_model(**tiny_vit.config(), input_channels=1)
    params = checkpoint.read(str(tiny_vit.params))
    plan = checkpoint.adapt(checkpoint.plan(model, params), model)
    kernel = params["embedding/kernel"]
    np.testing.assert_allclose(plan.load["embedding/kernel"][1], kernel[:, :, 0:1] + kernel[:, :, 1:2]
                               + kernel[:, :, 2:3], rtol=1e-6)
    vit_keras.load_npz(model, str(tiny_vit.params))  # load_npz goes through the same steps
    grey = np.asarray(tiny_vit.images).mean(-1, keepdims=True)
    rgb = vit_keras.build_model(**tiny_vit.config(), weights=str(tiny_vit.params))
    assert_close(model(grey), rgb(np.repeat(grey, 3, -1)), 2e-5, "grey = its RGB copy")


@pytest.fixture
def with_pre_logits(tiny_vit):
    """tiny_vit's checkpoint with a 32-wide pre_logits layer and a 10-class head on it."""
    params = read_npz(tiny_vit.params)
    rng = np.random.default_rng(0)
    params.update({"pre_logits/kernel": rng.normal(size=(64, 32)).astype("float32") / 8,
                   "pre_logits/bias": rng.normal(size=(32,)).astype("float32"),
                   "head/kernel": rng.normal(size=(32, 10)).astype("float32")})
    return params


def test_policy_top_decides_classes_and_pre_logits(with_pre_logits):
    params = with_pre_logits
    policy = LoadPolicy()
    assert policy.top(params, None) == dict(classes=10, representation_size=32)  # the head and its layer
    assert policy.top(params, 3) == dict(classes=3, representation_size=None)  # new head: drop-head variant
    assert policy.top(params, 10, include_top=False) == dict(classes=10, representation_size=None)
    assert LoadPolicy(keep_pre_logits=True).top(params, 3) == dict(classes=3, representation_size=32)
    assert LoadPolicy(pretrained_top=False).top(params, 10)["representation_size"] is None
    untied = LoadPolicy(head=presets.HeadPolicy(tied=()))
    assert untied.top(params, 3) == dict(classes=3, representation_size=32)
    with pytest.raises(ValueError, match="x.npz has no head: classes=None"):
        policy.top({k: v for k, v in params.items() if not k.startswith("head/")}, None, source="x.npz")


def test_plan_reinitialises_a_new_head_and_drops_what_is_tied_to_it(tiny_vit, with_pre_logits):
    model = vit_keras.build_model(**tiny_vit.config(classes=3))
    plan = checkpoint.plan(model, with_pre_logits)
    assert set(plan.fresh) == {"head/kernel", "head/bias"} and set(plan.dropped) == {"pre_logits/kernel",
                                                                                   "pre_logits/bias"}
    assert plan.fresh["head/kernel"][2] == "checkpoint has (32, 10)"
    assert not (plan.missing or plan.unused)
    # Untied by the preset's data, the same layer is the model's to have: unused here, one error.
    untied = checkpoint.plan(model, with_pre_logits, LoadPolicy(head=presets.HeadPolicy(tied=())))
    assert set(untied.unused) == {"pre_logits/kernel", "pre_logits/bias"} and not untied.dropped
    body = checkpoint.plan(vit_keras.build_model(**tiny_vit.config(include_top=False)), with_pre_logits)
    assert set(body.dropped) == {"head/kernel", "head/bias", "pre_logits/kernel", "pre_logits/bias"}


@pytest.mark.parametrize("tied", [("pre_logits",), ()])
def test_create_reads_the_head_policy_from_the_preset(tiny_vit, with_pre_logits, tmp_path, monkeypatch, caplog, tied):
    """A published name brings its preset's HeadPolicy: tied drops pre_logits with a new head, untied keeps it."""
    path = tmp_path / "rep.npz"
    np.savez(path, **with_pre_logits)
    config = vit_keras.ViTConfig("tiny_policy", "tiny", 16, 2, 64, 4, 128)
    preset = presets.Preset("tiny_policy", presets.I21K, str(path), 32, classes=10,
                            head=presets.HeadPolicy(tied=tied))
    monkeypatch.setattr(presets, "PRESETS", [*presets.PRESETS, preset])
    with caplog.at_level(logging.INFO, logger="vit_keras"):
        model = vit_keras.create(config, weights=presets.I21K, classes=3)
    names = [layer.name for layer in model.layers]
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 3)
    assert not np.any(model.get_layer("head").kernel.numpy())
    if tied:
        assert "pre_logits" not in names and "Dropped the checkpoint's pre_logits layer" in caplog.text
    else:
        np.testing.assert_array_equal(model.get_layer("pre_logits").kernel.numpy(),
                                      with_pre_logits["pre_logits/kernel"])


def test_create_reads_the_checkpoint_once_and_build_model_builds(tiny_vit, monkeypatch):
    reads = []
    real = checkpoint.read_npz
    monkeypatch.setattr(checkpoint, "read_npz", lambda path: reads.append(path) or real(path))
    config = vit_keras.ViTConfig("tiny", "tiny", 16, 2, 64, 4, 128)
    model = vit_keras.create(config, weights=str(tiny_vit.params), classes=10, image_size=32)
    assert reads == [str(tiny_vit.params)]
    assert_close(model(tiny_vit.images), tiny_vit.expected["logits"], 2e-5, "create")
    reads.clear()
    vit_keras.build_model(**tiny_vit.config())  # architecture only: nothing read
    assert reads == []
    read_once = sources.load(str(tiny_vit.params)).checkpoint
    vit_keras.build_model(**tiny_vit.config(), weights=read_once)  # a Checkpoint read before is not read again
    assert reads == [str(tiny_vit.params)]


def test_one_dropout_default():
    """build_model's defaults are ViTConfig's (0.0, as every vit_jax config that does not say 0.1)."""
    defaults = inspect.signature(vit_keras.build_model).parameters
    for field in ("dropout", "attention_dropout", "classifier", "posemb", "resnet_width_factor"):
        assert defaults[field].default == getattr(presets.ViTConfig, field), field
    model = vit_keras.build_model(32, 16, 1, 32, 2, 64, classes=2)
    assert model.get_layer("Transformer").dropout == model.get_layer("embeddings").dropout == 0.0
    # The builders keep their models' own rates (test_published builds them): R50+ViT-B/16's is 0.1.
    assert vit_keras.get_config("vit_r50_b16").dropout == 0.1


@pytest.mark.parametrize("kwargs, message", [
    (dict(pretrained_top="yes"), "pretrained_top must be True or False"),
    (dict(keep_pre_logits=1), "keep_pre_logits must be True, False or None"),
    (dict(checkpoint_grid=(0, 3)), "checkpoint_grid must be"),
    (dict(checkpoint_grid=(2, 3, 4)), "checkpoint_grid must be"),
    (dict(head="pre_logits"), "head must be a presets.HeadPolicy"),
])
def test_bad_policy_is_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoadPolicy(**kwargs)


def test_load_weights_refuses_a_bad_policy_and_a_foreign_model(tiny_vit):
    import keras

    model = vit_keras.build_model(**tiny_vit.config())
    with pytest.raises(ValueError, match="policy must be a vit_keras.LoadPolicy"):
        vit_keras.load_weights(model, str(tiny_vit.params), {"pretrained_top": False})
    inputs = keras.Input((4,))
    with pytest.raises(ValueError, match="not a model of this package"):
        vit_keras.load_weights(keras.Model(inputs, keras.layers.Dense(2)(inputs)), str(tiny_vit.params))
