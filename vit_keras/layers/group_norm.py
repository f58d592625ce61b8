"""Group normalisation for NHWC feature maps, computed with spatial reductions only."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="vit_keras")
class GroupNorm(keras.layers.Layer):
    """GroupNorm over the last axis of `[batch, H, W, C]`, as Flax's `nn.GroupNorm`.

    Same result as `keras.layers.GroupNormalization(groups, epsilon=...)`, but
    the statistics are taken per channel over (H, W) first and then averaged
    within each group, with the mean subtracted before the variance (two
    passes); normalisation, scale and shift fold into one multiply-add over
    the map. Reducing over the non-adjacent axes of a `[B, H, W, G, C/G]` view
    is slow on ResNet-sized maps (`benchmarks/group_norm.py`). Statistics are computed in float32 under mixed precision.

    Args:
        groups: int. Number of groups; must divide the channels. Defaults to 32.
        epsilon: float. Added to the variance. Defaults to 1e-6 (the original's).
        scale_initializer: str or initializer. Initial scale. Defaults to "ones".
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Example:
    >>> gn = GroupNorm(groups=2)
    >>> tuple(gn(keras.ops.ones((1, 4, 4, 8))).shape)
    (1, 4, 4, 8)
    """

    def __init__(self, groups=32, epsilon=1e-6, scale_initializer="ones", **kwargs):
        super().__init__(**kwargs)
        self.groups = groups
        self.epsilon = epsilon
        self.scale_initializer = keras.initializers.get(scale_initializer)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels % self.groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible by {self.groups} groups.")
        self.scale = self.add_weight(shape=(channels,), initializer=self.scale_initializer, name="scale")
        self.bias = self.add_weight(shape=(channels,), initializer="zeros", name="bias")
        self.built = True

    def _per_group(self, stat, channels):
        """[B, C] per-channel statistic -> its group average broadcast to [B, 1, 1, C]."""
        g = ops.reshape(stat, (-1, self.groups, channels // self.groups))
        g = ops.mean(g, axis=-1, keepdims=True)
        g = ops.broadcast_to(g, (ops.shape(stat)[0], self.groups, channels // self.groups))
        return ops.reshape(g, (-1, 1, 1, channels))

    def call(self, inputs):
        channels = inputs.shape[-1]
        x = ops.cast(inputs, "float32")
        mean = self._per_group(ops.mean(x, axis=(1, 2)), channels)
        variance = self._per_group(ops.mean(ops.square(x - mean), axis=(1, 2)), channels)
        # One multiply-add over the map, x * gain + (bias - mean * gain): the centred
        # map is not kept for the output.
        gain = ops.rsqrt(variance + self.epsilon) * ops.cast(self.scale, "float32")
        shift = ops.cast(self.bias, "float32") - mean * gain
        return ops.cast(x * gain + shift, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({
            "groups": self.groups,
            "epsilon": self.epsilon,
            "scale_initializer": keras.initializers.serialize(self.scale_initializer),
        })
        return config
