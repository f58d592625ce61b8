"""Builders, defaults and heads as the original: param counts, dropout, init, pre_logits, classifiers."""

import logging

import keras
import numpy as np
import pytest

import vit_keras
from conftest import Case, assert_close
from vit_keras.checkpoint import read_npz

# vit_jax/models_test.py MODEL_SIZES: the original's parameter counts at 224 with 1000 classes.
ORIGINAL_SIZES = {
    "vit_ti16": 5_717_416, "vit_s16": 22_050_664, "vit_s32": 22_878_952, "vit_b8": 86_576_872,
    "vit_b16": 86_567_656, "vit_b32": 88_224_232, "vit_l16": 304_326_632, "vit_l32": 306_535_400,
    "vit_h14": 632_045_800, "vit_r_ti16": 6_337_704, "vit_r26_s32": 36_431_912,
    "vit_r26_b32": 101_383_976, "vit_r50_b16": 98_659_112, "vit_r50_l32": 328_994_856,
}
# ... and its gap-norep configs.
ORIGINAL_GAP_SIZES = {"vit_s16": 22_049_896, "vit_b16": 86_566_120, "vit_s32": 22_878_184, "vit_b32": 88_222_696}
# vit_jax/configs/models.py transformer.dropout_rate.
ORIGINAL_DROPOUT = {
    "vit_ti16": 0.0, "vit_s16": 0.0, "vit_s32": 0.0, "vit_b8": 0.0, "vit_b16": 0.0, "vit_b32": 0.0,
    "vit_l16": 0.1, "vit_l32": 0.0, "vit_h14": 0.1, "vit_r_ti16": 0.0, "vit_r26_s32": 0.0,
    "vit_r26_b32": 0.0, "vit_r50_b16": 0.1, "vit_r50_l32": 0.1,
}


@pytest.mark.parametrize("name", list(ORIGINAL_SIZES))
def test_parameter_count_equals_the_original(name):
    model = vit_keras.BUILDERS[name](image_size=224, classes=1000, pretrained=False)
    assert model.count_params() == ORIGINAL_SIZES[name]
    if name in ORIGINAL_GAP_SIZES:
        gap = vit_keras.BUILDERS[name](image_size=224, classes=1000, pretrained=False, classifier="gap")
        assert gap.count_params() == ORIGINAL_GAP_SIZES[name]
    keras.backend.clear_session()


def test_dropout_per_model_and_overridable():
    for name, rate in ORIGINAL_DROPOUT.items():
        assert vit_keras.presets.CONFIGS[name].dropout == rate, name
    for name in ("vit_ti16", "vit_r_ti16", "vit_r50_b16"):  # the builders take it from the table
        rate = ORIGINAL_DROPOUT[name]
        model = vit_keras.BUILDERS[name](image_size=64, classes=2, pretrained=False)
        assert model.get_layer("embeddings").dropout == rate, name
        encoder = model.get_layer("Transformer")
        assert (encoder.dropout, encoder.attention_dropout) == (rate, 0.0), name
    model = vit_keras.vit_r50_b16(image_size=64, classes=2, pretrained=False, dropout=0.0, attention_dropout=0.2)
    encoder = model.get_layer("Transformer")
    assert (encoder.dropout, encoder.attention_dropout) == (0.0, 0.2)
    assert encoder.blocks[0].attention.dropout == 0.2


def test_initialisation_as_the_original():
    model = vit_keras.build_model(64, 1, 1, 64, 4, 128, classes=3, resnet_layers=(1, 1),
                                  resnet_width_factor=0.5, representation_size=512)
    for unit in model.get_layer("embeddings").resnet.units:
        assert not np.any(unit.gn3.scale.numpy()), "the last GroupNorm of each unit starts at zero"
        assert np.all(unit.gn1.scale.numpy() == 1)
    # lecun_normal: std sqrt(1 / fan_in) = 1/8 (glorot_uniform would give sqrt(2 / 576) = 0.059).
    kernel = model.get_layer("pre_logits").kernel.numpy()
    assert abs(kernel.std() - 1 / 8) < 0.01 and not np.any(model.get_layer("pre_logits").bias.numpy())
    assert not np.any(model.get_layer("head").kernel.numpy())


@pytest.fixture
def with_pre_logits(tiny_vit, tmp_path):
    """tiny_vit's checkpoint with a 32-wide pre_logits layer and a head on it."""
    params = read_npz(tiny_vit.params)
    rng = np.random.default_rng(0)
    params.update({"pre_logits/kernel": rng.normal(size=(64, 32)).astype("float32") / 8,
                   "pre_logits/bias": rng.normal(size=(32,)).astype("float32"),
                   "head/kernel": rng.normal(size=(32, 10)).astype("float32")})
    path = tmp_path / "rep.npz"
    np.savez(path, **params)
    return str(path), params


def test_new_head_drops_pre_logits_as_the_original(tiny_vit, with_pre_logits, caplog):
    path, params = with_pre_logits
    with caplog.at_level(logging.INFO, logger="vit_keras"):
        model = vit_keras.build_model(weights=path, **tiny_vit.config(classes=3))
    assert "pre_logits" not in [layer.name for layer in model.layers]
    assert "Dropped the checkpoint's pre_logits layer" in caplog.text
    assert model.get_layer("head").kernel.shape == (64, 3)
    # Asked to keep it: the representation layer is loaded and the new head sits on it.
    model = vit_keras.build_model(weights=path, keep_pre_logits=True, **tiny_vit.config(classes=3))
    np.testing.assert_array_equal(model.get_layer("pre_logits").kernel.numpy(), params["pre_logits/kernel"])
    assert model.get_layer("head").kernel.shape == (32, 3)


def test_features_through_kept_pre_logits(tiny_vit, with_pre_logits):
    path, params = with_pre_logits
    expected = np.tanh(tiny_vit.expected["pre_logits"] @ params["pre_logits/kernel"] + params["pre_logits/bias"])
    body = vit_keras.build_model(weights=path, keep_pre_logits=True, **tiny_vit.config(include_top=False))
    assert_close(body(tiny_vit.images), expected, 1e-5)
    body = vit_keras.build_model(weights=path, **tiny_vit.config(include_top=False))
    assert_close(body(tiny_vit.images), tiny_vit.expected["pre_logits"], 1e-4)


def test_loaded_head_without_its_pre_logits_is_refused(tiny_vit, tmp_path):
    """As ViT-B/16's ImageNet-21k file: pre_logits as wide as the tokens, so the head's shape fits both ways."""
    params = read_npz(tiny_vit.params)
    params.update({"pre_logits/kernel": np.eye(64, dtype="float32"), "pre_logits/bias": np.zeros(64, "float32")})
    np.savez(tmp_path / "rep.npz", **params)
    with pytest.raises(ValueError, match="trained on its pre_logits layer"):
        vit_keras.build_model(weights=str(tmp_path / "rep.npz"), keep_pre_logits=False, **tiny_vit.config())


@pytest.mark.parametrize("case_name, classifier", [("tiny_vit_gap", "unpooled"), ("tiny_vit", "token_unpooled")])
def test_unpooled_classifiers_apply_the_head_to_every_token(case_name, classifier):
    case = Case(case_name)
    params = read_npz(case.params)
    model = case.model(classifier=classifier)
    expected = case.expected["encoder_out"] @ params["head/kernel"] + params["head/bias"]
    assert model.output_shape == (None, expected.shape[1], 10)
    assert_close(model(case.images), expected, 1e-4)
    features = case.model(classifier=classifier, include_top=False)
    ref = case.expected["encoder_out"]
    assert_close(features(case.images), ref, 1e-4 * np.abs(ref).max())


def test_gap_has_no_class_token_and_reloads(tiny_vit_gap, tmp_path):
    model = tiny_vit_gap.model()
    embeddings = model.get_layer("embeddings")
    assert not embeddings.class_token and not hasattr(embeddings, "cls")
    assert embeddings.pos_embedding.shape == (1, 6, 64)
    model.save(tmp_path / "gap.keras")
    again = keras.saving.load_model(tmp_path / "gap.keras")
    assert_close(again(tiny_vit_gap.images), tiny_vit_gap.expected["logits"], 2e-5)


def test_root_only_stem_has_stride_4(tiny_rti):
    model = tiny_rti.model()
    resnet = model.get_layer("embeddings").resnet
    assert resnet.stride == 4 and resnet.compute_output_shape((1, 32, 32, 3)) == (1, 8, 8, 64)
    assert model.get_layer("embeddings").stride == 8
    # R+ViT-Ti/16 (patch 8 on the root's map) has stride 32: 7x7 tokens at 224.
    full = vit_keras.vit_r_ti16(image_size=224, classes=10, pretrained=False)
    assert full.get_layer("embeddings").pos_embedding.shape == (1, 50, 192)


def test_unknown_classifier():
    with pytest.raises(ValueError, match="Unknown classifier 'mean'"):
        vit_keras.build_model(32, 16, 1, 64, 4, 128, classes=2, classifier="mean")


def test_readme_table_lists_every_builder_and_weights():
    """The README's model table is this table of presets and the original's parameter counts."""
    import pathlib

    from vit_keras import presets

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    for name, config in presets.CONFIGS.items():
        names = []
        for weights in presets.WEIGHT_NAMES:
            found = [p for p in presets.PRESETS if p.model == name and p.weights == weights]
            if found:
                names.append(f"`{weights}`: {', '.join(str(p.resolution) for p in found)}; {found[0].classes}")
        licences = sorted({p.license for p in presets.PRESETS if p.model == name}) or ["—"]
        row = (f"| `{name}` | {config.title} | {ORIGINAL_SIZES[name]:,} | {config.dropout} | "
               f"{'<br>'.join(names) or 'none published'} | {', '.join(licences)} |")
        assert row in readme, row


def test_every_preset_takes_the_preprocessing_the_exports_apply():
    """Exports and training pipelines bake `preprocess_inputs`' defaults: a preset with other statistics
    would be served wrongly, so it must not appear without its own preprocessing path."""
    from vit_keras import preprocessing, presets

    for preset in presets.PRESETS:
        assert (preset.mean, preset.std) == (preprocessing.MEAN, preprocessing.STD), preset
    x = np.array([[0.0, 51.0, 255.0]] * 3).T  # [3 pixels, 3 channels]
    other = preprocessing.preprocess_inputs(x, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    np.testing.assert_allclose(other, (x / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225], rtol=1e-6)


def test_attention_map_of_a_model_without_class_token(tiny_vit_gap):
    """gap pools every token: the map is the rollout averaged over all rows (numpy here)."""
    from vit_keras import visualize

    model = tiny_vit_gap.model()
    weights = [tiny_vit_gap.expected[f"attn_{i}"].astype("float64") for i in range(2)]
    result = None
    for w in weights:
        a = w.mean(axis=1) + np.eye(6)
        a = a / a.sum(-1, keepdims=True)
        result = a if result is None else a @ result
    expected = result.mean(axis=1).reshape(-1, 2, 3)
    expected = expected / expected.max(axis=(1, 2), keepdims=True)
    assert_close(visualize.rollout_grid(weights, (2, 3)), expected, 1e-6)
    heat = visualize.attention_heatmap(model, tiny_vit_gap.images)
    assert heat.shape == (2, 32, 48) and heat.max() == pytest.approx(1.0, abs=1e-3)
