"""Helpers kept under the module path of the existing `vit-keras` package."""

import importlib.resources

from vit_keras.checkpoint import load_npz, read_npz  # noqa: F401 (vit-keras names)


def get_imagenet_classes():
    """Returns the 1,000 ImageNet-1k class names, in the label order of the checkpoints.

    Example:
    >>> get_imagenet_classes()[:3]
    ['tench', 'goldfish', 'great_white_shark']
    """
    text = importlib.resources.files("vit_keras").joinpath("imagenet2012.txt").read_text()
    return text.splitlines()
