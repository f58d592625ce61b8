"""Reads the class token out of the encoded sequence."""

import keras


@keras.saving.register_keras_serializable(package="vit_keras")
class ExtractToken(keras.layers.Layer):
    """Returns token 0 (the class token): `[batch, tokens, D]` -> `[batch, D]`.

    Args:
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Example:
    >>> tuple(ExtractToken()(keras.ops.ones((2, 5, 32))).shape)
    (2, 32)
    """

    def call(self, inputs):
        return inputs[:, 0]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])
