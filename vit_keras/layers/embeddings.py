"""Image to tokens: patches (or the ResNet's feature map), class token, positions."""

import keras
import numpy as np
from keras import ops

from vit_keras.layers.resnet import GN_EPSILON, ResNet, resnet_stride
from vit_keras.layers.std_conv import WS_EPSILON

POSEMBS = ("learn", "sincos2d")


def posemb_sincos_2d(rows, cols, width, temperature=10_000.0):
    """big_vision's fixed 2-D sin-cos position table `[1, rows * cols, width]` (float32).

    With q = width / 4 and w_k = temperature^(-k / (q - 1)), token i * cols + j
    (row i, column j) is `[sin(j w), cos(j w), sin(i w), cos(i w)]`: the column
    fills the first half, the row the second (MoCo v3's layout).

    Example:
    >>> table = posemb_sincos_2d(2, 3, 8)
    >>> table.shape, float(table[0, 1, 0]), float(table[0, 1, 4])  # row 0, column 1
    ((1, 6, 8), 0.8414709568023682, 0.0)
    """
    if width % 4:
        raise ValueError(f"posemb='sincos2d' needs a width divisible by 4, got {width}.")
    q = width // 4
    omega = 1.0 / temperature ** (np.arange(q) / max(q - 1, 1))
    y, x = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    x = x.reshape(-1, 1) * omega
    y = y.reshape(-1, 1) * omega
    table = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return table[None].astype("float32")


@keras.saving.register_keras_serializable(package="vit_keras")
class Embeddings(keras.layers.Layer):
    """Turns images into the encoder's input tokens.

    The image (or, for the hybrid, the ResNet's feature map) is cut into
    `patch_size` x `patch_size` patches by a strided conv named `embedding`,
    the grid is flattened row-major, a learned class token `cls` is prepended
    at index 0 (unless `class_token=False`, as for the original's `gap`
    classifier), the position embedding (class slot included) is added, and
    dropout is applied. With `posemb="sincos2d"` there is no learned
    `pos_embedding`: big_vision's fixed table (`posemb_sincos_2d`) is added
    to the patch tokens, before the class token (which gets none).

    Args:
        hidden_size: int. Width of the tokens.
        patch_size: int. Patch size in pixels of the conv's input (1 for the
            hybrid, which patches the ResNet's feature map).
        dropout: float. Dropout after adding the position embedding.
            Defaults to 0.
        resnet_layers: tuple of int or None. Units per ResNet stage; None for
            the plain ViT. Defaults to None.
        resnet_width_factor: float. ResNet width multiplier. Defaults to 1.
        prestandardized: bool. The ResNet's stored conv kernels are already
            standardised (see `StdConv2D`). Defaults to False.
        class_token: bool. Prepend the class token `cls`. Defaults to True.
        posemb: str. "learn" (a learned `pos_embedding`) or "sincos2d" (the
            fixed table of big_vision). Defaults to "learn".
        ws_epsilon: float. The ResNet's weight-standardisation epsilon.
            Defaults to 1e-5.
        gn_epsilon: float. The ResNet's GroupNorm epsilon. Defaults to 1e-6.
        remat: bool. Recompute each ResNet stage in the backward pass (see
            `Encoder`). Defaults to False.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Example:
    >>> emb = Embeddings(hidden_size=32, patch_size=16)
    >>> tuple(emb(keras.ops.ones((2, 32, 48, 3))).shape)
    (2, 7, 32)
    """

    def __init__(
        self,
        hidden_size,
        patch_size,
        dropout=0.0,
        resnet_layers=None,
        resnet_width_factor=1,
        prestandardized=False,
        class_token=True,
        posemb="learn",
        ws_epsilon=WS_EPSILON,
        gn_epsilon=GN_EPSILON,
        remat=False,
        **kwargs,
    ):
        if posemb not in POSEMBS:
            raise ValueError(f"Unknown posemb {posemb!r}; use one of {POSEMBS}.")
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.patch_size = patch_size
        self.dropout = dropout
        self.resnet_layers = None if resnet_layers is None else tuple(resnet_layers)
        self.resnet_width_factor = resnet_width_factor
        self.prestandardized = prestandardized
        self.class_token = class_token
        self.posemb = posemb
        self.ws_epsilon = ws_epsilon
        self.gn_epsilon = gn_epsilon
        self.remat = bool(remat)

    @property
    def stride(self):
        """Pixels of the input image per token along each axis."""
        resnet = 1 if self.resnet_layers is None else resnet_stride(self.resnet_layers)
        return resnet * self.patch_size

    def grid_size(self, image_shape):
        """Returns the token grid `(rows, cols)` for an input `(H, W)`."""
        h, w = image_shape
        if h is None or w is None:
            raise ValueError("Embeddings needs a static image height and width.")
        if h % self.stride or w % self.stride:
            raise ValueError(
                f"Image size {h}x{w} is not divisible by the model's stride "
                f"{self.stride} (patch size {self.patch_size}"
                + ("" if self.resnet_layers is None else " on the ResNet's stride-"
                   f"{self.stride // self.patch_size} feature map")
                + ")."
            )
        return h // self.stride, w // self.stride

    def build(self, input_shape):
        gh, gw = self.grid_size(input_shape[1:3])
        shape = input_shape
        if self.resnet_layers is not None:
            self.resnet = ResNet(
                self.resnet_layers,
                self.resnet_width_factor,
                self.prestandardized,
                self.ws_epsilon,
                self.gn_epsilon,
                remat=self.remat,
                name="resnet",
                dtype=self.dtype_policy,
            )
            self.resnet.build(shape)
            shape = self.resnet.compute_output_shape(shape)
        self.embedding = keras.layers.Conv2D(
            self.hidden_size,
            self.patch_size,
            strides=self.patch_size,
            padding="valid",
            kernel_initializer="lecun_normal",
            name="embedding",
            dtype=self.dtype_policy,
        )
        self.embedding.build(shape)
        if self.class_token:
            self.cls = self.add_weight(
                shape=(1, 1, self.hidden_size), initializer="zeros", name="cls"
            )
        if self.posemb == "sincos2d":
            self.sincos = posemb_sincos_2d(gh, gw, self.hidden_size)
        else:
            self.pos_embedding = self.add_weight(
                shape=(1, int(self.class_token) + gh * gw, self.hidden_size),
                initializer=keras.initializers.RandomNormal(stddev=0.02),
                name="pos_embedding",
            )
        self.dropout_layer = keras.layers.Dropout(self.dropout, name="dropout", dtype=self.dtype_policy)
        self.built = True

    def patch_grid(self, images):
        """Returns the patch-embedding grid `[batch, rows, cols, hidden]`."""
        x = images if self.resnet_layers is None else self.resnet(images)
        return self.embedding(x)

    def call(self, images, training=None):
        return self.tokens(self.patch_grid(images), training=training)

    def tokens(self, grid, training=None):
        """Patch-embedding grid `[batch, rows, cols, hidden]` -> tokens: class token, positions, dropout.

        Written with no batch size, so that it also runs on symbolic inputs
        (`vit_keras.features_model` calls it in a functional graph).
        """
        rows, cols = grid.shape[1:3]
        x = ops.reshape(grid, (-1, rows * cols, self.hidden_size))
        if self.posemb == "sincos2d":  # the patches only, as big_vision
            x = x + ops.cast(self.sincos, x.dtype)
        if self.class_token:
            cls = ops.zeros_like(x[:, :1]) + ops.cast(self.cls, x.dtype)  # one per image
            x = ops.concatenate([cls, x], axis=1)
        if self.posemb == "learn":
            x = x + ops.cast(self.pos_embedding, x.dtype)
        return self.dropout_layer(x, training=training)

    def compute_output_shape(self, input_shape):
        gh, gw = self.grid_size(input_shape[1:3])
        return (input_shape[0], int(self.class_token) + gh * gw, self.hidden_size)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_size": self.hidden_size,
                "patch_size": self.patch_size,
                "dropout": self.dropout,
                "resnet_layers": None
                if self.resnet_layers is None
                else list(self.resnet_layers),
                "resnet_width_factor": self.resnet_width_factor,
                "prestandardized": self.prestandardized,
                "class_token": self.class_token,
                "posemb": self.posemb,
                "ws_epsilon": self.ws_epsilon,
                "gn_epsilon": self.gn_epsilon,
                "remat": self.remat,
            }
        )
        return config
