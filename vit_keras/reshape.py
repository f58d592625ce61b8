"""Reshaping a model: another resolution (`resize`) or channel count (`input_channels`).

A model of this package keeps its weights when its input changes: the
position embedding is resized on its token grid as the checkpoint loader does
(`checkpoint.resize_posemb`), and the first convolution of a 3-channel model
is adapted to N channels as timm's `adapt_input_conv` does (1 channel: the
kernel summed over RGB; N: the RGB kernel repeated ceil(N/3) times, the first
N kept, scaled by 3/N), so that a grey image (or N channels holding copies of
the RGB image) gives the plain ViT the features of its RGB version. The
hybrid's first convolution is weight-standardised, so there the adapted
kernel is close to, not exactly, that.

>>> import vit_keras
>>> model = vit_keras.build_model(32, 16, 2, 64, 4, 128, classes=10)
>>> resize(model, image_size=64).input_shape
(None, 64, 64, 3)
>>> resize(model, input_channels=1).input_shape
(None, 32, 32, 1)
"""

import math

import keras
import numpy as np

from vit_keras import checkpoint
from vit_keras.model import copy_model
from vit_keras.sizes import height_width, is_int


def check_input_channels(input_channels):
    """ValueError unless `input_channels` is a positive integer."""
    if not is_int(input_channels) or input_channels < 1:
        raise ValueError(f"input_channels must be a positive integer (1 grey, 3 RGB, N bands), "
                         f"got {input_channels!r}.")


def adapt_input_kernel(kernel, input_channels):
    """An HWIO kernel for 3 input channels -> one for `input_channels`.

    1: the sum over RGB (a grey image then acts as its RGB copy); N != 3:
    RGB repeated ceil(N/3) times, the first N channels kept, times 3/N (so N
    channels holding repeated RGB act as the RGB image), as timm's
    `adapt_input_conv`.

    Example:
    >>> adapt_input_kernel(np.ones((16, 16, 3, 8)), 1).shape
    (16, 16, 1, 8)
    """
    check_input_channels(input_channels)
    kernel = np.asarray(kernel)
    if kernel.shape[2] == input_channels:
        return kernel
    if kernel.ndim != 4 or kernel.shape[2] != 3:
        raise ValueError(f"Only a 3-channel first convolution can be adapted to {input_channels} "
                         f"channels; this one's kernel is {kernel.shape}.")
    if input_channels == 1:
        return kernel.sum(axis=2, keepdims=True)
    repeats = math.ceil(input_channels / 3)
    tiled = np.concatenate([kernel] * repeats, axis=2)[:, :, :input_channels]
    return (tiled * (3.0 / input_channels)).astype(kernel.dtype)


def resize(model, image_size=None, input_channels=None):
    """The same weights at another resolution and/or channel count: a new model.

    The position embedding is resized on its grid (as `load_npz` resizes a
    checkpoint's: the class token's row kept, the grid zoomed linearly,
    non-square grids too), the first convolution adapted with
    `adapt_input_kernel`. LoRA adapters are folded into their kernels first
    (`finetune.merge_lora`). Bad sizes raise a ValueError before anything is
    built.

    Args:
        model: keras.Model. A model of this package's builders (or its
            `.keras` file reloaded).
        image_size: int, (height, width) or None. New resolution; None keeps
            it. Defaults to None.
        input_channels: int or None. New channel count (from 3); None keeps
            it. Defaults to None.

    Example:
    >>> import vit_keras
    >>> model = vit_keras.build_model(32, 16, 2, 64, 4, 128, classes=10)
    >>> tuple(resize(model, image_size=(48, 64)).get_layer("embeddings").pos_embedding.shape)
    (1, 13, 64)
    """
    from vit_keras import finetune
    from vit_keras.layers import Embeddings

    try:
        embeddings = model.get_layer("embeddings")
    except ValueError:
        embeddings = None
    if not isinstance(embeddings, Embeddings):
        raise ValueError(f"resize needs a model of vit_keras's builders (an `embeddings` layer); "
                         f"{model.name!r} has none.")
    old_h, old_w, old_c = model.input_shape[1:4]
    new_h, new_w = (old_h, old_w) if image_size is None else height_width(image_size)
    new_c = old_c if input_channels is None else input_channels
    check_input_channels(new_c)
    if new_c != old_c and old_c != 3:
        raise ValueError(f"Only a 3-channel model can be adapted to {new_c} channels; {model.name!r} "
                         f"has {old_c}.")
    new_grid = embeddings.grid_size((new_h, new_w))  # ValueError on a size the patches do not divide
    old_grid = embeddings.grid_size((old_h, old_w))
    model = finetune.merge_lora(model)

    def edit(config):
        if config.get("class_name") == "InputLayer":
            shape = list(config["config"]["batch_shape"])
            config = {**config, "config": {**config["config"], "batch_shape": [shape[0], new_h, new_w, new_c]}}
        return {k: v for k, v in config.items() if k != "build_config"}

    variables = checkpoint.checkpoint_variables(model)  # the loader's name walk: {checkpoint key: (variable, layer)}
    first = variables[checkpoint.first_conv_key(embeddings)][0].path
    posemb = variables.get(checkpoint.POSEMB_KEY)  # none with big_vision's sincos2d table (made at build)
    posemb = posemb and posemb[0].path
    prefix = int(embeddings.class_token)
    values = []
    for variable in model.weights:
        value = keras.ops.convert_to_numpy(variable)
        if variable.path == posemb and old_grid != new_grid:
            value = checkpoint.resize_posemb(value.astype("float32"), new_grid, prefix, old_grid)
        elif variable.path == first and new_c != old_c:
            value = adapt_input_kernel(value, new_c)
        values.append(value.astype(keras.backend.standardize_dtype(variable.dtype)))
    return copy_model(model, edit, values)


def channel_batches(pipeline, input_channels):
    """A training or evaluation pipeline of RGB batches -> batches of `input_channels` channels.

    Images decode to RGB (grey files as three equal channels); for a 1-channel
    model the mean over RGB gives a grey file back exactly. Only 1 and 3
    channels come from image files; other counts need data of their own.
    """
    if input_channels == 3:
        return pipeline
    if input_channels != 1:
        raise ValueError(f"Image datasets give 3 (RGB) or 1 (grey) channels; input_channels={input_channels} "
                         "needs data of your own (use the library API).")
    if isinstance(pipeline, keras.utils.PyDataset):
        return _GreyBatches(pipeline)
    import tensorflow as tf

    return pipeline.map(lambda x, y: (tf.reduce_mean(x, axis=-1, keepdims=True), y),
                        num_parallel_calls=tf.data.AUTOTUNE)


class _GreyBatches(keras.utils.PyDataset):
    """A `PyDataset` of RGB batches as grey ones (the mean over the channels)."""

    def __init__(self, pipeline):
        super().__init__(workers=getattr(pipeline, "workers", 1), use_multiprocessing=False,
                         max_queue_size=getattr(pipeline, "max_queue_size", 8))
        self.pipeline = pipeline

    @property
    def num_batches(self):
        return self.pipeline.num_batches

    def __len__(self):
        return len(self.pipeline)

    def __getitem__(self, index):
        images, labels = self.pipeline[index]
        return images.mean(axis=-1, keepdims=True).astype(images.dtype), labels

    def on_epoch_end(self):
        self.pipeline.on_epoch_end()
