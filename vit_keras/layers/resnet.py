"""The ResNet (v1.5, GroupNorm, weight-standardised) stem of the hybrid ViT."""

import keras
from keras import ops

from vit_keras.layers.encoder import remat_call
from vit_keras.layers.group_norm import GroupNorm
from vit_keras.layers.std_conv import WS_EPSILON, StdConv2D

GN_GROUPS = 32
GN_EPSILON = 1e-6


def _group_norm(name, scale_initializer="ones", epsilon=GN_EPSILON, dtype=None):
    return GroupNorm(groups=GN_GROUPS, epsilon=epsilon, scale_initializer=scale_initializer, name=name, dtype=dtype)


def resnet_stride(block_units):
    """Total stride of the stem: 4 for the root (conv and pool), x2 per stage after the first."""
    return 4 * 2 ** max(len(block_units) - 1, 0)


def resnet_channels(block_units, width_factor):
    """Output channels: the root's width, or 4x the last stage's bottleneck width."""
    width = int(64 * width_factor)
    return width if not block_units else 4 * stage_width(len(block_units), width)


def _std_conv(filters, kernel_size, strides, name, prestandardized, ws_epsilon=WS_EPSILON, dtype=None):
    return StdConv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="lecun_normal",
        prestandardized=prestandardized,
        ws_epsilon=ws_epsilon,
        name=name,
        dtype=dtype,
    )


@keras.saving.register_keras_serializable(package="vit_keras")
class ResNetUnit(keras.layers.Layer):
    """Post-activation bottleneck unit with GroupNorm and standardised convs.

    `relu(shortcut + gn3(conv3(relu(gn2(conv2(relu(gn1(conv1(x)))))))))`, where
    `conv2` (3x3) carries the stride and the shortcut is `gn_proj(conv_proj(x))`
    when the stride or the channel count changes. Output channels: `4 * filters`.

    Args:
        filters: int. Width of the bottleneck (conv1 and conv2); GroupNorm(32)
            needs a multiple of 32.
        strides: int. Stride of conv2 and of the projection. Defaults to 1.
        prestandardized: bool. The convs' stored kernels are already
            standardised (see `StdConv2D`). Defaults to False.
        ws_epsilon: float. Weight-standardisation epsilon (see `StdConv2D`).
            Defaults to 1e-5.
        gn_epsilon: float. GroupNorm epsilon (1e-6 in Google's checkpoints,
            1e-5 in timm's). Defaults to 1e-6.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Example:
    >>> unit = ResNetUnit(filters=32, strides=2)
    >>> tuple(unit(keras.ops.ones((1, 16, 16, 64))).shape)
    (1, 8, 8, 128)
    """

    def __init__(self, filters, strides=1, prestandardized=False, ws_epsilon=WS_EPSILON, gn_epsilon=GN_EPSILON,
                 **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.strides = strides
        self.prestandardized = prestandardized
        self.ws_epsilon = ws_epsilon
        self.gn_epsilon = gn_epsilon

    def _conv(self, filters, kernel_size, strides, name):
        return _std_conv(filters, kernel_size, strides, name, self.prestandardized, self.ws_epsilon, self.dtype_policy)

    def _norm(self, name, scale_initializer="ones"):
        return _group_norm(name, scale_initializer, self.gn_epsilon, self.dtype_policy)

    def build(self, input_shape):
        out = 4 * self.filters
        self.needs_projection = input_shape[-1] != out or self.strides != 1
        f, s = self.filters, self.strides
        if self.needs_projection:
            self.conv_proj = self._conv(out, 1, s, "conv_proj")
            self.conv_proj.build(input_shape)
            self.gn_proj = self._norm("gn_proj")
            self.gn_proj.build(self.conv_proj.compute_output_shape(input_shape))
        self.conv1 = self._conv(f, 1, 1, "conv1")
        self.conv1.build(input_shape)
        shape = self.conv1.compute_output_shape(input_shape)
        self.gn1 = self._norm("gn1")
        self.gn1.build(shape)
        self.conv2 = self._conv(f, 3, s, "conv2")
        self.conv2.build(shape)
        shape = self.conv2.compute_output_shape(shape)
        self.gn2 = self._norm("gn2")
        self.gn2.build(shape)
        self.conv3 = self._conv(out, 1, 1, "conv3")
        self.conv3.build(shape)
        # As the original, the last norm of the branch starts at zero: each unit starts as its shortcut.
        self.gn3 = self._norm("gn3", scale_initializer="zeros")
        self.gn3.build(self.conv3.compute_output_shape(shape))
        self.built = True

    def convs(self):
        """The unit's `StdConv2D`s (the projection's last, when there is one)."""
        return [self.conv1, self.conv2, self.conv3] + ([self.conv_proj] if self.needs_projection else [])

    def call(self, inputs):
        shortcut = inputs
        if self.needs_projection:
            shortcut = self.gn_proj(self.conv_proj(inputs))
        y = ops.relu(self.gn1(self.conv1(inputs)))
        y = ops.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return ops.relu(shortcut + y)

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        return (b, _halved(h, self.strides), _halved(w, self.strides), 4 * self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            {"filters": self.filters, "strides": self.strides, "prestandardized": self.prestandardized,
             "ws_epsilon": self.ws_epsilon, "gn_epsilon": self.gn_epsilon}
        )
        return config


def _halved(size, stride):
    """A spatial size after SAME padding with `stride` (None stays None)."""
    return None if size is None else -(-size // stride)


def stage_width(stage, width):
    """Bottleneck width of stage `stage` (1-based): the base width, doubled per stage."""
    return width * 2 ** (stage - 1)


def stage_stride(stage):
    """Stride of a stage's first unit: 1 in the first stage, 2 in the later ones."""
    return 1 if stage == 1 else 2


@keras.saving.register_keras_serializable(package="vit_keras")
class ResNetStage(keras.layers.Layer):
    """One ResNet stage: `units` bottleneck units, named `unit1`..`unitN`.

    The first unit carries the stride (and projects the shortcut); the others
    keep the shape. The original checkpoint's `block{s}/unit{u}` is this
    layer (named `block{s}`) and its `unit{u}`.

    Args:
        units: int. Number of bottleneck units.
        filters: int. Bottleneck width; output channels are `4 * filters`.
        strides: int. Stride of the first unit. Defaults to 1.
        prestandardized: bool. The convs' stored kernels are already
            standardised (see `StdConv2D`). Defaults to False.
        ws_epsilon: float. Weight-standardisation epsilon (see `StdConv2D`).
            Defaults to 1e-5.
        gn_epsilon: float. GroupNorm epsilon (1e-6 in Google's checkpoints,
            1e-5 in timm's). Defaults to 1e-6.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Example:
    >>> stage = ResNetStage(units=2, filters=32, strides=2, name="block2")
    >>> tuple(stage(keras.ops.ones((1, 16, 16, 64))).shape), stage.units[1].name
    ((1, 8, 8, 128), 'unit2')
    """

    def __init__(self, units, filters, strides=1, prestandardized=False, ws_epsilon=WS_EPSILON,
                 gn_epsilon=GN_EPSILON, **kwargs):
        super().__init__(**kwargs)
        self.num_units = units
        self.filters = filters
        self.strides = strides
        self.prestandardized = prestandardized
        self.ws_epsilon = ws_epsilon
        self.gn_epsilon = gn_epsilon

    def build(self, input_shape):
        shape = input_shape
        self.units = []
        for u in range(1, self.num_units + 1):
            unit = ResNetUnit(self.filters, self.strides if u == 1 else 1, self.prestandardized,
                              self.ws_epsilon, self.gn_epsilon, name=f"unit{u}", dtype=self.dtype_policy)
            unit.build(shape)
            shape = unit.compute_output_shape(shape)
            self.units.append(unit)
        self.built = True

    def call(self, inputs):
        x = inputs
        for unit in self.units:
            x = unit(x)
        return x

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        return (b, _halved(h, self.strides), _halved(w, self.strides), 4 * self.filters)

    def get_config(self):
        config = super().get_config()
        config.update({"units": self.num_units, "filters": self.filters, "strides": self.strides,
                       "prestandardized": self.prestandardized, "ws_epsilon": self.ws_epsilon,
                       "gn_epsilon": self.gn_epsilon})
        return config


@keras.saving.register_keras_serializable(package="vit_keras")
class ResNet(keras.layers.Layer):
    """The ResNet stem of the hybrid ViT: root block and bottleneck stages.

    `conv_root` (7x7/2) -> `gn_root` -> relu -> 3x3/2 max-pool, then one
    `ResNetStage` per entry of `block_units`, named `block1`, `block2`, ...
    (the original checkpoint's tree: `block{s}/unit{u}/conv1` is
    `resnet.stages[s-1].units[u-1].conv1`). Stage s (1-based) has width
    `64 * w * 2**(s-1)` and stride 1 for the first stage, 2 for the later
    ones. SAME padding everywhere. Total stride: `4 * 2**(len(block_units) - 1)`,
    and 4 for the root alone (`block_units=()`, as R+ViT-Ti/16).

    Args:
        block_units: tuple of int. Units per stage, e.g. `(3, 4, 9)` for R50;
            `()` for the root alone.
        width_factor: float. Multiplies the base width 64. Defaults to 1.
        prestandardized: bool. The convs' stored kernels are already
            standardised (see `StdConv2D`). Defaults to False.
        ws_epsilon: float. Weight-standardisation epsilon (see `StdConv2D`).
            Defaults to 1e-5.
        gn_epsilon: float. GroupNorm epsilon (1e-6 in Google's checkpoints,
            1e-5 in timm's). Defaults to 1e-6.
        remat: bool. Recompute each stage in the backward pass (see
            `Encoder`). Defaults to False.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Example:
    >>> resnet = ResNet(block_units=(1, 1), width_factor=0.5)
    >>> tuple(resnet(keras.ops.ones((1, 32, 32, 3))).shape)
    (1, 4, 4, 256)
    >>> [stage.name for stage in resnet.stages]
    ['block1', 'block2']
    """

    def __init__(self, block_units, width_factor=1, prestandardized=False, ws_epsilon=WS_EPSILON,
                 gn_epsilon=GN_EPSILON, remat=False, **kwargs):
        super().__init__(**kwargs)
        self.block_units = tuple(block_units)
        self.width_factor = width_factor
        self.prestandardized = prestandardized
        self.ws_epsilon = ws_epsilon
        self.gn_epsilon = gn_epsilon
        self.remat = bool(remat)

    @property
    def width(self):
        return int(64 * self.width_factor)

    @property
    def stride(self):
        return resnet_stride(self.block_units)

    @property
    def units(self):
        """Every unit, stage by stage.

        Also how `.keras` files saved before the stages existed still load:
        they stored the units as this flat list, and Keras tries this path when
        a unit is not found under `stages`.
        """
        return [unit for stage in self.stages for unit in stage.units]

    def build(self, input_shape):
        self.conv_root = _std_conv(self.width, 7, 2, "conv_root", self.prestandardized, self.ws_epsilon,
                                   self.dtype_policy)
        self.conv_root.build(input_shape)
        shape = self.conv_root.compute_output_shape(input_shape)
        self.gn_root = _group_norm("gn_root", epsilon=self.gn_epsilon, dtype=self.dtype_policy)
        self.gn_root.build(shape)
        b, h, w, c = shape
        shape = (b, _halved(h, 2), _halved(w, 2), c)  # the max-pool
        self.stages = []
        for s, count in enumerate(self.block_units, start=1):
            stage = ResNetStage(count, stage_width(s, self.width), stage_stride(s), self.prestandardized,
                                self.ws_epsilon, self.gn_epsilon, name=f"block{s}", dtype=self.dtype_policy)
            stage.build(shape)
            shape = stage.compute_output_shape(shape)
            self.stages.append(stage)
        self.built = True

    def convs(self):
        """Every `StdConv2D` of the stem: the root's, then each unit's."""
        return [self.conv_root] + [conv for unit in self.units for conv in unit.convs()]

    def root(self, inputs, pooled=True):
        """The root block: relu(gn_root(conv_root(x))), then the 3x3/2 max-pool when `pooled`."""
        x = ops.relu(self.gn_root(self.conv_root(inputs)))
        return ops.max_pool(x, 3, strides=2, padding="same") if pooled else x

    def call(self, inputs):
        x = self.root(inputs)
        for stage in self.stages:
            x = remat_call(stage, x) if self.remat else stage(x)
        return x

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        s = self.stride
        return (b, _halved(h, s), _halved(w, s), resnet_channels(self.block_units, self.width_factor))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "block_units": list(self.block_units),
                "width_factor": self.width_factor,
                "prestandardized": self.prestandardized,
                "ws_epsilon": self.ws_epsilon,
                "gn_epsilon": self.gn_epsilon,
                "remat": self.remat,
            }
        )
        return config
