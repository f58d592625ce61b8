"""One pre-norm transformer encoder block."""

import keras

from vit_keras.layers.attention import Attention, tokens_and_weights_spec
from vit_keras.layers.mlp import Mlp

LN_EPSILON = 1e-6


def layer_norm(name, epsilon=LN_EPSILON, dtype=None):
    """LayerNorm with the original's epsilon (Keras defaults to 1e-3); its statistics are float32 under any policy."""
    return keras.layers.LayerNormalization(epsilon=epsilon, name=name, dtype=dtype)


@keras.saving.register_keras_serializable(package="vit_keras")
class Block(keras.layers.Layer):
    """`x + Attention(LayerNorm(x))`, then `x + Mlp(LayerNorm(x))`.

    Sublayers carry the original checkpoint's names: `LayerNorm_0`,
    `MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`.

    Args:
        num_heads: int. Attention heads.
        mlp_dim: int. Width of the MLP's hidden layer.
        dropout: float. Dropout after attention and in the MLP. Defaults to 0.
        attention_dropout: float. Dropout on attention weights. Defaults to 0.
        layer_norm_epsilon: float. LayerNorm epsilon (1e-6 in Google's and timm's
            checkpoints, 1e-12 in Hugging Face's). Defaults to 1e-6.
        gelu_approximate: bool. The MLP's GELU in tanh form (Google's); False
            is the exact erf form (timm's, Hugging Face's). Defaults to True.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: tensor `[batch, tokens, D]`.
        training: bool or None. Dropout on. Defaults to None.
        return_weights: bool. Also return the attention weights; False runs
            the fused attention (see `Attention`). Defaults to True.
        class_token_only: bool. Compute the output for token 0 alone: its
            query attends to every token, and the MLP runs on it only
            (`[batch, 1, D]` out, weights `[batch, heads, 1, tokens]`). What a
            `"token"` classifier's last block needs; the same numbers for that
            token. Defaults to False.

    Returns:
        `(tokens [batch, tokens, D], weights [batch, heads, tokens, tokens])`,
        or `tokens` with `return_weights=False`.

    Example:
    >>> block = Block(num_heads=4, mlp_dim=64)
    >>> x, w = block(keras.ops.ones((2, 5, 32)))
    >>> tuple(x.shape), tuple(w.shape)
    ((2, 5, 32), (2, 4, 5, 5))
    """

    def __init__(self, num_heads, mlp_dim, dropout=0.0, attention_dropout=0.0, layer_norm_epsilon=LN_EPSILON,
                 gelu_approximate=True, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.layer_norm_epsilon = layer_norm_epsilon
        self.gelu_approximate = gelu_approximate

    def build(self, input_shape):
        self.norm_0 = layer_norm("LayerNorm_0", self.layer_norm_epsilon, self.dtype_policy)
        self.norm_0.build(input_shape)
        self.attention = Attention(
            self.num_heads, self.attention_dropout, name="MultiHeadDotProductAttention_1", dtype=self.dtype_policy
        )
        self.attention.build(input_shape)
        self.dropout_layer = keras.layers.Dropout(self.dropout, name="dropout", dtype=self.dtype_policy)
        self.norm_2 = layer_norm("LayerNorm_2", self.layer_norm_epsilon, self.dtype_policy)
        self.norm_2.build(input_shape)
        self.mlp = Mlp(self.mlp_dim, self.dropout, self.gelu_approximate, name="MlpBlock_3", dtype=self.dtype_policy)
        self.mlp.build(input_shape)
        self.built = True

    def call(self, inputs, training=None, return_weights=True, class_token_only=False):
        normed = self.norm_0(inputs)
        if class_token_only:  # keys and values from every token, the query from the class token alone
            inputs = inputs[:, :1]
            y = self.attention(normed[:, :1], context=normed, training=training, return_weights=return_weights)
        else:
            y = self.attention(normed, training=training, return_weights=return_weights)
        if return_weights:
            y, weights = y
        x = inputs + self.dropout_layer(y, training=training)
        x = x + self.mlp(self.norm_2(x), training=training)
        return (x, weights) if return_weights else x

    def compute_output_shape(self, input_shape):
        b, t, _ = input_shape
        return input_shape, (b, self.num_heads, t, t)

    def compute_output_spec(self, inputs, training=None, return_weights=True, class_token_only=False):
        if not class_token_only:
            return tokens_and_weights_spec(inputs, self.compute_dtype, self.num_heads, return_weights)
        b, t, d = inputs.shape
        output = keras.KerasTensor((b, 1, d), dtype=self.compute_dtype)
        return (output, keras.KerasTensor((b, self.num_heads, 1, t), dtype="float32")) if return_weights else output

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "mlp_dim": self.mlp_dim,
                "dropout": self.dropout,
                "attention_dropout": self.attention_dropout,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "gelu_approximate": self.gelu_approximate,
            }
        )
        return config
