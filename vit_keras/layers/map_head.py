"""Multi-head attention pooling (big_vision's `MAPHead`, the image towers of SigLIP)."""

import keras
from keras import ops

from vit_keras.layers.attention import Attention
from vit_keras.layers.block import LN_EPSILON, layer_norm
from vit_keras.layers.mlp import Mlp


@keras.saving.register_keras_serializable(package="vit_keras")
class MAPHead(keras.layers.Layer):
    """Pools `[batch, tokens, D]` to `[batch, D]` with a learned probe that attends to the tokens.

    As big_vision's `MAPHead`: `a = Attention(query=probe, keys=values=tokens)`
    (no LayerNorm before it, no residual around it), then
    `y = a + Mlp(LayerNorm(a))`, and the output is `y[:, 0]`. Sublayers carry
    the checkpoint's names: `probe` `(1, 1, D)`,
    `MultiHeadDotProductAttention_0`, `LayerNorm_0`, `MlpBlock_0`.

    Args:
        num_heads: int. Attention heads.
        mlp_dim: int. Width of the MLP's hidden layer.
        layer_norm_epsilon: float. LayerNorm epsilon. Defaults to 1e-6.
        gelu_approximate: bool. The MLP's GELU in tanh form. Defaults to True.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: tensor `[batch, tokens, D]`.
        return_weights: bool. Also return the probe's attention
            `[batch, heads, 1, tokens]` (float32). Defaults to False.

    Example:
    >>> head = MAPHead(num_heads=4, mlp_dim=64)
    >>> y, w = head(keras.ops.ones((2, 5, 32)), return_weights=True)
    >>> tuple(y.shape), tuple(w.shape)
    ((2, 32), (2, 4, 1, 5))
    """

    def __init__(self, num_heads, mlp_dim, layer_norm_epsilon=LN_EPSILON, gelu_approximate=True, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layer_norm_epsilon = layer_norm_epsilon
        self.gelu_approximate = gelu_approximate

    def build(self, input_shape):
        width = input_shape[-1]
        self.probe = self.add_weight(shape=(1, 1, width), initializer="glorot_uniform", name="probe")
        probe_shape = (input_shape[0], 1, width)
        self.attention = Attention(self.num_heads, name="MultiHeadDotProductAttention_0", dtype=self.dtype_policy)
        self.attention.build(probe_shape)
        self.norm = layer_norm("LayerNorm_0", self.layer_norm_epsilon, self.dtype_policy)
        self.norm.build(probe_shape)
        self.mlp = Mlp(self.mlp_dim, gelu_approximate=self.gelu_approximate, name="MlpBlock_0",
                       dtype=self.dtype_policy)
        self.mlp.build(probe_shape)
        self.built = True

    def call(self, inputs, return_weights=False):
        probe = ops.zeros_like(inputs[:, :1]) + ops.cast(self.probe, inputs.dtype)  # one per image
        a, weights = self.attention(probe, return_weights=True, context=inputs)
        y = a + self.mlp(self.norm(a))
        return (y[:, 0], weights) if return_weights else y[:, 0]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def compute_output_spec(self, inputs, return_weights=False):
        b, t, d = inputs.shape
        out = keras.KerasTensor((b, d), dtype=self.compute_dtype)
        return (out, keras.KerasTensor((b, self.num_heads, 1, t), dtype="float32")) if return_weights else out

    def get_config(self):
        config = super().get_config()
        config.update({"num_heads": self.num_heads, "mlp_dim": self.mlp_dim,
                       "layer_norm_epsilon": self.layer_norm_epsilon, "gelu_approximate": self.gelu_approximate})
        return config
