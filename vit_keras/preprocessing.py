"""The input preprocessing of the original models (a leaf module: keras and numpy only)."""

import keras
import numpy as np

# Images with more pixels than this are refused before they are decoded (served requests and files).
MAX_PIXELS = 4096 * 4096

# Every published checkpoint normalises pixels / 255 with these (`presets.Preset.mean/std`):
# that is x / 127.5 - 1, the scaling that the exports and training pipelines apply.
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def preprocess_inputs(X, mean=MEAN, std=STD):
    """Maps pixels in 0..255 to the model's input: `(X / 255 - mean) / std`.

    With the published checkpoints' mean and std (the defaults) that is the
    original's `X / 127.5 - 1`, computed exactly so.

    Args:
        X: array or tensor of pixels in 0..255, shape `[..., 3]` (any shape
            with the default mean and std).
        mean: tuple of 3 floats. Per-channel mean of pixels / 255.
            Defaults to (0.5, 0.5, 0.5).
        std: tuple of 3 floats. Per-channel standard deviation of pixels / 255.
            Defaults to (0.5, 0.5, 0.5).

    Example:
    >>> preprocess_inputs(np.array([0.0, 127.5, 255.0]))
    array([-1.,  0.,  1.], dtype=float32)
    """
    as_numpy = isinstance(X, (np.ndarray, list, tuple, int, float))
    X = np.asarray(X, dtype="float32") if as_numpy else keras.ops.cast(X, "float32")
    if tuple(mean) == MEAN and tuple(std) == STD:
        return X / np.float32(127.5) - np.float32(1.0)
    scale = np.float32(1 / 255) / np.asarray(std, "float32")
    return X * scale - np.asarray(mean, "float32") / np.asarray(std, "float32")
