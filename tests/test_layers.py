"""Each layer: config round trip, declared output shapes, and its maths against NumPy."""

import keras
import numpy as np
import pytest

from conftest import assert_close
from vit_keras import layers
from vit_keras.layers.std_conv import standardize_kernel

LAYERS = [
    (layers.StdConv2D(8, 3, strides=2, padding="same", use_bias=False), (2, 9, 9, 4)),
    (layers.ResNetUnit(filters=32, strides=2), (2, 8, 8, 64)),
    (layers.ResNetUnit(filters=32), (2, 8, 8, 128)),
    (layers.ResNet(block_units=(1, 2), width_factor=0.5), (2, 32, 48, 3)),
    (layers.Embeddings(hidden_size=16, patch_size=8, dropout=0.1), (2, 16, 24, 3)),
    (layers.Embeddings(hidden_size=16, patch_size=1, resnet_layers=(1, 1), resnet_width_factor=0.5), (2, 32, 32, 3)),
    (layers.Attention(num_heads=2, dropout=0.1), (2, 5, 16)),
    (layers.Mlp(mlp_dim=32, dropout=0.1), (2, 5, 16)),
    (layers.Block(num_heads=2, mlp_dim=32, dropout=0.1), (2, 5, 16)),
    (layers.Encoder(num_layers=2, num_heads=2, mlp_dim=32), (2, 5, 16)),
    (layers.ExtractToken(), (2, 5, 16)),
    (layers.GroupNorm(groups=4), (2, 6, 5, 16)),
    (layers.ClassifierHead(3, class_names=["a", "b", "c"]), (2, 16)),
]


def flat_shapes(spec):
    """Flattens a (nested) output-shape spec into a list of shape tuples."""
    if all(isinstance(d, (int, type(None))) for d in spec):
        return [tuple(spec)]
    return [shape for item in spec for shape in flat_shapes(item)]


@pytest.mark.parametrize("layer, input_shape", LAYERS, ids=lambda v: type(v).__name__)
def test_config_round_trip_and_shapes(layer, input_shape):
    x = np.random.default_rng(0).normal(size=input_shape).astype("float32")
    out = keras.tree.flatten(layer(x))
    assert [tuple(t.shape) for t in out] == flat_shapes(layer.compute_output_shape(input_shape))
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    clone(x)
    clone.set_weights(layer.get_weights())
    for a, b in zip(keras.tree.flatten(clone(x)), out):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # Registered: the serialised form names this package, and it deserialises.
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == f"vit_keras>{type(layer).__name__}"
    assert type(keras.saving.deserialize_keras_object(serialized)) is type(layer)


def test_weight_standardisation_matches_numpy():
    w = np.random.default_rng(1).normal(2.0, 3.0, size=(3, 3, 4, 5)).astype("float32")
    mean = w.mean(axis=(0, 1, 2))
    std = w.std(axis=(0, 1, 2))  # population std, epsilon outside the root
    assert_close(standardize_kernel(w), (w - mean) / (std + 1e-5), 1e-5)


def test_attention_matches_numpy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 5, 8)).astype("float32")
    attn = layers.Attention(num_heads=2)
    out, weights = attn(x)
    p = {n: getattr(attn, n) for n in ("query", "key", "value", "out")}
    q, k, v = (np.einsum("btd,dhk->bthk", x, p[n].kernel.numpy()) + p[n].bias.numpy()
               for n in ("query", "key", "value"))
    logits = np.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(4)
    ref_w = np.exp(logits - logits.max(-1, keepdims=True))
    ref_w /= ref_w.sum(-1, keepdims=True)
    ref = np.einsum("bhqt,bthk->bqhk", ref_w, v)
    ref = np.einsum("bqhk,hkd->bqd", ref, p["out"].kernel.numpy()) + p["out"].bias.numpy()
    assert_close(weights, ref_w, 1e-6)
    assert_close(out, ref, 1e-5)
    assert attn.query.kernel.shape == (8, 2, 4) and attn.out.kernel.shape == (2, 4, 8)


def test_mlp_uses_tanh_gelu():
    x = np.random.default_rng(3).normal(size=(1, 3, 4)).astype("float32")
    mlp = layers.Mlp(mlp_dim=6)
    mlp(x)
    h = x @ mlp.dense_0.kernel.numpy() + mlp.dense_0.bias.numpy()
    gelu = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
    assert_close(mlp(x), gelu @ mlp.dense_1.kernel.numpy() + mlp.dense_1.bias.numpy(), 1e-5)


def test_indivisible_image_size_is_refused():
    import vit_keras

    with pytest.raises(ValueError, match="Image size 230x224 is not divisible by the model's stride 16"):
        vit_keras.vit_b16(image_size=(230, 224), pretrained=False)
    with pytest.raises(ValueError, match="stride 16.*ResNet"):
        vit_keras.vit_r50_b16(image_size=200, pretrained=False)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        layers.Attention(num_heads=3)(np.zeros((1, 2, 8), "float32"))


def test_group_norm_matches_numpy_and_keras():
    rng = np.random.default_rng(4)
    x = rng.normal(3.0, 2.0, size=(2, 5, 7, 64)).astype("float32")
    gn = layers.GroupNorm(groups=32)
    gn.build(x.shape)
    gn.scale.assign(rng.normal(1, 0.2, 64).astype("float32"))
    gn.bias.assign(rng.normal(0, 0.2, 64).astype("float32"))
    g = x.reshape(2, 5, 7, 32, 2)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    ref = ((g - mean) / np.sqrt(var + 1e-6)).reshape(x.shape) * gn.scale.numpy() + gn.bias.numpy()
    assert_close(gn(x), ref, 1e-5)
    keras_gn = keras.layers.GroupNormalization(groups=32, epsilon=1e-6)
    keras_gn.build(x.shape)
    keras_gn.set_weights(gn.get_weights())
    assert_close(gn(x), keras_gn(x), 1e-5)


def test_group_norm_is_stable_far_from_zero():
    """Channel means near 1000, unequal within a group, tiny spread: the variance is taken
    around the group mean (two passes), so nothing cancels, against float64 NumPy."""
    rng = np.random.default_rng(5)
    offsets = rng.normal(0, 50, size=(1, 1, 1, 16)) + 1000
    x = (rng.normal(0, 0.01, size=(3, 9, 9, 16)) + offsets).astype("float32")
    gn = layers.GroupNorm(groups=4)
    gn.build(x.shape)
    g = x.astype("float64").reshape(3, 9, 9, 4, 4)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    ref = ((g - mean) / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + 1e-6)).reshape(x.shape)
    assert_close(gn(x), ref, 1e-4)
