"""The transformer block's feed-forward part."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="vit_keras")
class Mlp(keras.layers.Layer):
    """`Dense_0` -> GELU (tanh form; erf with `gelu_approximate=False`) -> Dropout -> `Dense_1` -> Dropout.

    The Dense layers run on the tokens flattened to `[batch * tokens, D]`: a
    plain 2-D matmul, which TensorFlow's oneDNN graph rewrite fuses with the
    bias add and the GELU into one op (a 3-D input goes through `tensordot`,
    whose reshape sits between them); `benchmarks/RESULTS.md` has the
    before and after.

    Args:
        mlp_dim: int. Width of the hidden layer.
        dropout: float. Dropout after each Dense. Defaults to 0.
        gelu_approximate: bool. The tanh form of GELU (Google's); False is the
            exact erf form (timm's and Hugging Face's). Defaults to True.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Example:
    >>> mlp = Mlp(mlp_dim=64)
    >>> tuple(mlp(keras.ops.ones((2, 5, 32))).shape)
    (2, 5, 32)
    """

    def __init__(self, mlp_dim, dropout=0.0, gelu_approximate=True, **kwargs):
        super().__init__(**kwargs)
        self.mlp_dim = mlp_dim
        self.dropout = dropout
        self.gelu_approximate = gelu_approximate

    def build(self, input_shape):
        init = dict(
            kernel_initializer="glorot_uniform",
            bias_initializer=keras.initializers.RandomNormal(stddev=1e-6),
            dtype=self.dtype_policy,
        )
        self.dense_0 = keras.layers.Dense(self.mlp_dim, name="Dense_0", **init)
        self.dense_0.build(input_shape)
        self.dense_1 = keras.layers.Dense(input_shape[-1], name="Dense_1", **init)
        self.dense_1.build(tuple(input_shape[:-1]) + (self.mlp_dim,))
        self.dropout_layer = keras.layers.Dropout(self.dropout, name="dropout", dtype=self.dtype_policy)
        self.built = True

    def call(self, inputs, training=None):
        x = ops.reshape(inputs, (-1, inputs.shape[-1]))
        x = keras.activations.gelu(self.dense_0(x), approximate=self.gelu_approximate)
        x = self.dropout_layer(x, training=training)
        x = self.dropout_layer(self.dense_1(x), training=training)
        return ops.reshape(x, ops.shape(inputs))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"mlp_dim": self.mlp_dim, "dropout": self.dropout, "gelu_approximate": self.gelu_approximate})
        return config
