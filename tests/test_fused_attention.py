"""The models run their attention fused (`keras.ops.dot_product_attention`); `attention_model` keeps the weights.

The fused path is checked against the Flax fixtures wherever a model's own
outputs are (tests/test_reference.py, tests/test_backends.py); here it is held
against the explicit path in bfloat16, and models saved before it existed
(whose encoder returns the weights in the graph) still load and work.
"""

import copy

import keras
import numpy as np

import vit_keras
from conftest import Case, assert_close
from vit_keras.layers import Attention


def test_attention_layer_fused_equals_explicit():
    attn = Attention(num_heads=4)
    x = keras.random.normal((2, 7, 32), seed=0)
    out, weights = attn(x)
    fused = attn(x, return_weights=False)
    assert weights.shape == (2, 4, 7, 7)
    assert_close(fused, out, 1e-5, "fused vs explicit")


def test_attention_dropout_in_training_is_applied_without_weights():
    """Fused attention has no dropout: a training call with attention dropout takes the explicit path."""
    attn = Attention(num_heads=4, dropout=0.5)
    x = keras.random.normal((2, 7, 32), seed=0)
    inference = keras.ops.convert_to_numpy(attn(x, return_weights=False))
    trained = keras.ops.convert_to_numpy(attn(x, training=True, return_weights=False))
    assert_close(inference, keras.ops.convert_to_numpy(attn(x)[0]), 1e-5, "inference")
    assert np.abs(trained - inference).max() > 1e-3  # dropped weights change the output


def test_fused_and_weights_paths_agree_in_bfloat16():
    case = Case("tiny_r50")
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = case.model()
    finally:
        keras.config.set_dtype_policy("float32")
    fused = model.predict(case.images, verbose=0)
    logits, weights = vit_keras.attention_model(model).predict(case.images, verbose=0)
    scale = np.abs(case.expected["logits"]).max()
    assert fused.dtype == logits.dtype == np.float32 and weights[0].dtype == np.float32
    assert_close(fused, logits, 2e-2 * scale, "fused vs weights path, bf16")
    # The whole hybrid in bf16 (the ResNet most) is some 6 % off the float32 original.
    assert_close(fused, case.expected["logits"], 1e-1 * scale, "fused bf16 vs Flax float32")
    assert_close(weights[1], case.expected["attn_1"], 5e-2, "attention weights bf16 vs Flax float32")


def old_format(model):
    """`model` as saved before the fused attention: its encoder's node returns the weights."""
    config = copy.deepcopy(model.get_config())
    for layer in config["layers"]:
        if layer["class_name"] == "Encoder":
            for node in layer["inbound_nodes"]:
                assert node["kwargs"].pop("return_weights") is False
    old = model.__class__.from_config(config)
    old.set_weights(model.get_weights())
    return old


def test_models_saved_before_fused_attention_still_load(tmp_path):
    case = Case("tiny_vit_gap")
    old = old_format(case.model())
    assert isinstance(old.get_layer("Transformer").output, (list, tuple))  # weights in the graph
    path = tmp_path / "old.keras"
    old.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    assert_close(reloaded.predict(case.images, verbose=0), case.expected["logits"], 2e-5, "logits")
    logits, weights = vit_keras.attention_model(reloaded)(case.images)
    assert_close(logits, case.expected["logits"], 2e-5, "attention_model logits")
    for i, w in enumerate(weights):
        assert_close(w, case.expected[f"attn_{i}"], 1e-5, f"attn_{i}")


def test_new_models_record_the_fused_call(tmp_path):
    """A new model's graph asks its encoder for no weights, and keeps asking after a reload."""
    model = Case("tiny_vit").model()
    assert not isinstance(model.get_layer("Transformer").output, (list, tuple))
    path = tmp_path / "new.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert not isinstance(reloaded.get_layer("Transformer").output, (list, tuple))
    _, weights = vit_keras.attention_model(reloaded)(Case("tiny_vit").images)
    assert len(weights) == 2
