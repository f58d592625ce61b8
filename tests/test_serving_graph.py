"""The work the models' own graph skips or reshapes for speed, held against the full computation.

- Attention's projections run as 2-D matmuls (`layers.attention.project`):
  the same numbers as the `EinsumDense` sublayers' own call, LoRA included.
- A `"token"` classifier's last block computes the class token alone
  (`class_token_only`): the same token as the full encoder's token 0.
- GroupNorm under bfloat16 stays float32 inside: its output is the float32
  layer's, rounded.
"""

import keras
import numpy as np
import pytest

import vit_keras
from conftest import assert_close
from vit_keras.layers import Attention, Block, Encoder, GroupNorm
from vit_keras.layers.attention import project
from vit_keras.model import attention_model


def _randomise(layer_or_model, scale=0.2):
    for i, w in enumerate(layer_or_model.weights):
        w.assign(np.random.default_rng(i).normal(0, scale, w.shape).astype("float32"))


@pytest.mark.parametrize("lora", [False, True])
def test_project_equals_the_einsum_layer(lora):
    attn = Attention(num_heads=4)
    attn.build((2, 7, 32))
    _randomise(attn)
    if lora:
        attn.out.enable_lora(2)
        attn.out.lora_kernel_b.assign(np.full(attn.out.lora_kernel_b.shape, 0.3, "float32"))
    x = keras.random.normal((2, 7, 32), seed=1)
    heads = keras.random.normal((2, 7, 4, 8), seed=2)
    for layer, inputs, dims in [(attn.query, x, 1), (attn.key, x, 1), (attn.out, heads, 2)]:
        assert_close(project(layer, inputs, dims), layer(inputs), 1e-5, f"{layer.name} (lora={lora})")


def test_project_of_a_quantized_layer_runs_the_layer():
    attn = Attention(num_heads=4)
    attn.build((2, 7, 32))
    _randomise(attn)
    attn.query.quantize("int8")
    x = keras.random.normal((2, 7, 32), seed=1)
    assert_close(project(attn.query, x, 1), attn.query(x), 1e-6, "int8 query")


@pytest.mark.parametrize("return_weights", [False, True])
@pytest.mark.parametrize("remat", [False, True])
def test_class_token_only_equals_the_full_encoders_token_0(return_weights, remat):
    encoder = Encoder(num_layers=2, num_heads=4, mlp_dim=64, remat=remat)
    x = keras.random.normal((3, 6, 32), seed=0)
    encoder.build(x.shape)
    _randomise(encoder)
    full = encoder(x, return_weights=return_weights)
    short = encoder(x, return_weights=return_weights, class_token_only=True)
    if return_weights:
        (full, full_w), (short, short_w) = full, short
        assert short_w[-1].shape == (3, 4, 1, 6)
        assert_close(short_w[-1], full_w[-1][:, :, :1], 1e-5, "last block's class-token attention")
        assert_close(short_w[0], full_w[0], 1e-6, "first block's attention")
    assert short.shape == (3, 1, 32)
    assert float(keras.ops.max(keras.ops.abs(full[:, 1:] - full[:, :1]))) > 1e-2  # the other tokens differ
    assert_close(short, full[:, :1], 1e-5, "class token")


def test_block_class_token_only_output_spec():
    block = Block(num_heads=4, mlp_dim=64)
    spec = block.compute_output_spec(keras.KerasTensor((None, 6, 32)), class_token_only=True)
    assert tuple(spec[0].shape) == (None, 1, 32) and tuple(spec[1].shape) == (None, 4, 1, 6)


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_token_models_skip_the_last_blocks_other_tokens(classifier):
    model = vit_keras.build_model(32, 16, 2, 64, 4, 128, classes=10, classifier=classifier)
    _randomise(model)
    node = model.get_layer("Transformer")._inbound_nodes[0]
    assert node.arguments.kwargs.get("class_token_only") == (classifier == "token")
    x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    logits, _ = attention_model(model)(x)  # runs every token through every block
    assert float(np.abs(np.asarray(logits)).max()) > 1e-2
    assert_close(model(x), logits, 1e-5, f"{classifier} logits")


@pytest.mark.parametrize("mean", [0.0, 10.0])
def test_group_norm_in_bfloat16_is_the_float32_result_rounded(mean):
    """Statistics and the multiply-add stay float32 under bfloat16: only the output is rounded.

    (A multiply-add in bfloat16 was ~2 % faster on ResNet maps and 16x less
    accurate where a group's mean is 10 standard deviations: not taken.)
    """
    x = np.random.default_rng(0).normal(mean, 1.0, (2, 8, 8, 64)).astype("float32")
    full, half = GroupNorm(groups=8), GroupNorm(groups=8, dtype="bfloat16")
    full.build(x.shape)
    half.build(x.shape)
    scale = np.random.default_rng(1).uniform(0.5, 2, 64).astype("float32")
    bias = np.random.default_rng(2).normal(0, 1, 64).astype("float32")
    for layer in (full, half):
        layer.scale.assign(scale)
        layer.bias.assign(bias)
    rounded = keras.ops.cast(x, "bfloat16")
    out = half(rounded)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    reference = np.asarray(full(keras.ops.cast(rounded, "float32")))
    error = np.abs(np.asarray(keras.ops.cast(out, "float32")) - reference)
    assert error.max() <= 2.0**-8 * np.abs(reference).max(), error.max()  # half an ulp of the largest output
    assert error.mean() <= 2.0**-8 * np.abs(reference).mean(), error.mean()
