"""Multi-head self-attention that returns its attention weights, or runs fused without them."""

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="vit_keras")
class Attention(keras.layers.Layer):
    """Multi-head dot-product self-attention returning `(output, weights)`, or `output` alone.

    Sublayers `query`, `key`, `value` (kernels `[D, heads, head_dim]`, biases
    `[heads, head_dim]`) and `out` (kernel `[heads, head_dim, D]`) have the
    original checkpoint's layouts. q is scaled by `1/sqrt(head_dim)`; the
    softmax runs in float32 whatever the compute dtype.

    Called with `return_weights=False` it returns the output alone, computed
    by `keras.ops.dot_product_attention`: the backend's fused kernel (flash
    attention or cuDNN's on a GPU where the shapes and dtype allow), which
    never materialises the `[tokens, tokens]` weights. Attention dropout needs
    the weights, so a training call with `dropout > 0` takes the explicit
    path either way.

    Args:
        num_heads: int. Number of attention heads; must divide the width.
        dropout: float. Dropout on the attention weights. Defaults to 0.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: tensor `[batch, tokens, D]`.
        training: bool or None. Dropout on. Defaults to None.
        return_weights: bool. Also return the weights. Defaults to True.
        context: tensor `[batch, keys, D]` or None. Keys and values come from
            it instead of `inputs` (cross-attention, as the MAP head's probe).
            Defaults to None.

    Returns:
        `(output [batch, tokens, D], weights [batch, heads, tokens, tokens])`
        (weights in float32), or `output` with `return_weights=False`.

    Example:
    >>> attn = Attention(num_heads=4)
    >>> out, weights = attn(keras.ops.ones((2, 5, 32)))
    >>> tuple(out.shape), tuple(weights.shape)
    ((2, 5, 32), (2, 4, 5, 5))
    >>> tuple(attn(keras.ops.ones((2, 5, 32)), return_weights=False).shape)
    (2, 5, 32)
    """

    def __init__(self, num_heads, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.dropout = dropout

    def build(self, input_shape):
        hidden = input_shape[-1]
        if hidden % self.num_heads:
            raise ValueError(
                f"Width {hidden} is not divisible by num_heads={self.num_heads}."
            )
        self.head_dim = hidden // self.num_heads
        for name in ("query", "key", "value"):
            layer = keras.layers.EinsumDense(
                "btd,dhk->bthk",
                output_shape=(None, self.num_heads, self.head_dim),
                bias_axes="hk",
                kernel_initializer="glorot_uniform",
                name=name,
                dtype=self.dtype_policy,
            )
            layer.build(input_shape)
            setattr(self, name, layer)
        self.out = keras.layers.EinsumDense(
            "bthk,hkd->btd",
            output_shape=(None, hidden),
            bias_axes="d",
            kernel_initializer="glorot_uniform",
            name="out",
            dtype=self.dtype_policy,
        )
        self.out.build((input_shape[0], input_shape[1], self.num_heads, self.head_dim))
        self.dropout_layer = keras.layers.Dropout(self.dropout, name="dropout", dtype=self.dtype_policy)
        self.built = True

    def call(self, inputs, training=None, return_weights=True, context=None):
        context = inputs if context is None else context
        q = project(self.query, inputs, 1) * ops.cast(1.0 / math.sqrt(self.head_dim), inputs.dtype)
        k = project(self.key, context, 1)
        v = project(self.value, context, 1)
        if not return_weights and not (training and self.dropout > 0):
            return project(self.out, ops.dot_product_attention(q, k, v, scale=1.0), 2)
        logits = ops.einsum("bqhk,bthk->bhqt", q, k)
        weights = ops.softmax(ops.cast(logits, "float32"), axis=-1)
        probs = self.dropout_layer(ops.cast(weights, v.dtype), training=training)
        x = project(self.out, ops.einsum("bhqt,bthk->bqhk", probs, v), 2)
        return (x, weights) if return_weights else x

    def compute_output_shape(self, input_shape):
        b, t, _ = input_shape
        return input_shape, (b, self.num_heads, t, t)

    def compute_output_spec(self, inputs, training=None, return_weights=True, context=None):
        spec = tokens_and_weights_spec(inputs, self.compute_dtype, self.num_heads, return_weights)
        if not return_weights or context is None:
            return spec
        b, t, _ = inputs.shape
        return spec[0], keras.KerasTensor((b, self.num_heads, t, context.shape[1]), dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update({"num_heads": self.num_heads, "dropout": self.dropout})
        return config


def project(layer, x, in_dims):
    """`layer(x)` for an `EinsumDense` contracting the last `in_dims` axes of `x`, as one 2-D matmul plus bias.

    The same numbers as the layer's einsum (its `kernel`, LoRA included), but
    TensorFlow runs the einsum as a batched matmul, which on CPU was ~8 %
    slower in bfloat16 (as fast in float32) than this plain matmul of the
    flattened tokens (`benchmarks/RESULTS.md`). A quantized layer runs as it is.
    """
    if layer.quantization_mode is not None:
        return layer(x)
    kernel = layer.kernel
    n_in = math.prod(kernel.shape[:in_dims])
    y = ops.matmul(ops.reshape(x, (-1, n_in)), ops.reshape(kernel, (n_in, -1)))
    if layer.bias is not None:
        y = y + ops.reshape(layer.bias, (-1,))
    return ops.reshape(y, tuple(ops.shape(x)[:-in_dims]) + tuple(kernel.shape[in_dims:]))


def tokens_and_weights_spec(inputs, dtype, num_heads, return_weights):
    """Symbolic outputs of a layer that returns tokens like `inputs` and, if asked, float32 weights."""
    output = keras.KerasTensor(inputs.shape, dtype=dtype)
    if not return_weights:
        return output
    b, t, _ = inputs.shape
    return output, keras.KerasTensor((b, num_heads, t, t), dtype="float32")
