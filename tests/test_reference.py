"""The model reproduces Google's original Flax outputs (tests/fixtures/vit_jax)."""

import numpy as np
import pytest
import scipy.ndimage

import vit_keras
from conftest import Case, assert_close
from vit_keras.checkpoint import POSEMB_KEY, read_npz


def intermediates(model, images):
    """Runs the model's layers one by one and records what the fixtures record."""
    emb = model.get_layer("embeddings")
    enc = model.get_layer("Transformer")
    out = {}
    x = images
    if emb.resnet_layers is not None:
        resnet = emb.resnet
        out["resnet/conv_root"] = resnet.conv_root(images)
        out["resnet/gn_root"] = resnet.gn_root(out["resnet/conv_root"])
        x = resnet.root(images)
        for stage in resnet.stages:
            for unit in stage.units:
                x = unit(x)
                out[f"resnet/{stage.name}/{unit.name}"] = out[f"resnet/{stage.name}"] = x
    out["embedding_out"] = emb.embedding(x)
    tokens = emb(images)
    out["encoder_input"] = tokens
    for i, block in enumerate(enc.blocks):
        tokens, out[f"attn_{i}"] = block(tokens)
        out[f"block_{i}_out"] = tokens
    out["encoder_out"] = enc.encoder_norm(tokens)
    cls = emb.class_token
    out["pre_logits"] = out["encoder_out"][:, 0] if cls else np.mean(out["encoder_out"], axis=1)
    return {k: np.asarray(v) for k, v in out.items()}


def test_logits_and_attention(case):
    model = case.model()
    logits, weights = vit_keras.attention_model(model)(case.images)
    assert_close(logits, case.expected["logits"], 2e-5, "logits")
    assert len(weights) == case.config()["num_layers"]
    for i, w in enumerate(weights):
        assert_close(w, case.expected[f"attn_{i}"], 1e-5, f"attn_{i}")


def test_every_intermediate(case):
    model = case.model()
    got = intermediates(model, case.images)
    wanted = [k for k in case.expected if k != "logits"]
    assert set(wanted) <= set(got), set(wanted) - set(got)
    for key in wanted:
        ref = case.expected[key]
        assert_close(got[key], ref, 1e-4 * np.abs(ref).max(), key)


def test_resize_matches_original_file():
    """The loader's own resize equals the checkpoint that the original code resized."""
    case = Case("tiny_r50_posemb")
    model = case.model()
    emb = model.get_layer("embeddings")
    ref = np.load(case.dir / "posemb_resized.npy")
    assert_close(emb.pos_embedding.numpy(), ref, 1e-6, "pos_embedding")
    assert_close(read_npz(case.dir / "params_resized.npz")[POSEMB_KEY], ref, 0, "params_resized")


def test_non_square_resize_matches_scipy(tiny_r50):
    """A 64x96 model gets a 4x6 grid, resized as scipy.ndimage.zoom(order=1) does."""
    model = tiny_r50.model(image_size=(64, 96))
    posemb = read_npz(tiny_r50.params)[POSEMB_KEY]
    grid = posemb[0, 1:].reshape(4, 4, -1)
    zoomed = scipy.ndimage.zoom(grid, (4 / 4, 6 / 4, 1), order=1).reshape(1, 24, -1)
    expected = np.concatenate([posemb[:, :1], zoomed], axis=1)
    assert_close(model.get_layer("embeddings").pos_embedding.numpy(), expected, 1e-6)
    images = np.random.default_rng(0).uniform(-1, 1, (1, 64, 96, 3)).astype("float32")
    logits, weights = vit_keras.attention_model(model)(images)
    assert logits.shape == (1, 10) and weights[0].shape == (1, 4, 25, 25)


def test_include_top_false_outputs_class_token(case):
    model = case.model(include_top=False)
    assert model.output_shape == (None, case.config()["hidden_size"])
    ref = case.expected["pre_logits"]
    assert_close(model(case.images), ref, 1e-4 * np.abs(ref).max(), "pre_logits")


@pytest.mark.parametrize(
    "builder, expected",
    [(vit_keras.vit_b16, 86_567_656), (vit_keras.vit_r50_b16, 98_659_112)],
)
def test_full_size_parameter_counts(builder, expected):
    assert builder(image_size=224, classes=1000, pretrained=False).count_params() == expected


def test_folded_weight_standardization(tiny_r50):
    """The inference copy with kernels standardised once reproduces the original's outputs."""
    model = tiny_r50.model()
    folded = vit_keras.fold_weight_standardization(model)
    assert folded is not model
    assert_close(folded(tiny_r50.images), tiny_r50.expected["logits"], 2e-5, "logits")
    got = intermediates(folded, tiny_r50.images)
    for key in [k for k in tiny_r50.expected if k.startswith("resnet/")]:
        ref = tiny_r50.expected[key]
        assert_close(got[key], ref, 1e-4 * np.abs(ref).max(), key)
    # Each stored kernel is now standardised: zero mean, unit std per output channel.
    conv = folded.get_layer("embeddings").resnet.units[0].conv2
    kernel = np.asarray(conv.kernel).reshape(-1, conv.filters)
    np.testing.assert_allclose(kernel.mean(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(kernel.std(axis=0), 1, atol=1e-3)
    # The original keeps its raw kernels.
    raw = np.asarray(model.get_layer("embeddings").resnet.units[0].conv2.kernel)
    assert not np.allclose(raw, kernel.reshape(raw.shape))


def test_nothing_to_fold_without_resnet(tiny_vit):
    model = tiny_vit.model()
    assert vit_keras.fold_weight_standardization(model) is model
