"""Weight-standardised convolution (Qiao et al., 2019), as in BiT and the hybrid ViT."""

import keras
from keras import ops

# The original adds this to the standard deviation, not under the square root.
WS_EPSILON = 1e-5


def standardize_kernel(kernel, epsilon=WS_EPSILON):
    """Standardises an HWIO kernel per output channel over (kh, kw, c_in): `(w - mean) / (std + epsilon)`."""
    kernel = kernel - ops.mean(kernel, axis=(0, 1, 2), keepdims=True)
    std = ops.sqrt(ops.mean(ops.square(kernel), axis=(0, 1, 2), keepdims=True))
    return kernel / (std + epsilon)


@keras.saving.register_keras_serializable(package="vit_keras")
class StdConv2D(keras.layers.Conv2D):
    """A `Conv2D` whose kernel is weight-standardised before each convolution.

    Takes the arguments of `keras.layers.Conv2D`, and one more. The stored
    kernel is the raw one (as in the original checkpoints); the standardised
    kernel is `(w - mean) / (std + 1e-5)` per output channel, with the
    population std.

    Args:
        prestandardized: bool. The stored kernel is already standardised (in an
            inference copy made by `vit_keras.fold_weight_standardization`),
            so it is used as it is. Defaults to False.
        ws_epsilon: float. Added to the std (1e-5 in Google's checkpoints; timm's
            hybrids use 1e-8 under the square root, the same within float32).
            Defaults to 1e-5.
        *args, **kwargs: the arguments of `keras.layers.Conv2D`.

    Example:
    >>> conv = StdConv2D(8, 3, padding="same", use_bias=False)
    >>> tuple(conv(keras.ops.ones((1, 8, 8, 3))).shape)
    (1, 8, 8, 8)
    """

    def __init__(self, *args, prestandardized=False, ws_epsilon=WS_EPSILON, **kwargs):
        super().__init__(*args, **kwargs)
        self.prestandardized = prestandardized
        self.ws_epsilon = ws_epsilon

    def convolution_op(self, inputs, kernel):
        if not self.prestandardized:
            kernel = standardize_kernel(ops.cast(kernel, "float32"), self.ws_epsilon)
        return super().convolution_op(inputs, ops.cast(kernel, inputs.dtype))

    def get_config(self):
        return {**super().get_config(), "prestandardized": self.prestandardized, "ws_epsilon": self.ws_epsilon}
