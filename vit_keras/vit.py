"""Model entry points, with the arguments of the existing `vit-keras` package."""

import keras
import numpy as np

from vit_keras import checkpoint, presets
from vit_keras.model import build_model
from vit_keras.utils import get_imagenet_classes


def preprocess_inputs(X):
    """Maps pixels in 0..255 to [-1, 1], as the original: `X / 127.5 - 1`.

    Args:
        X: array or tensor of pixels in 0..255, any shape.

    Example:
    >>> preprocess_inputs(np.array([0.0, 127.5, 255.0]))
    array([-1.,  0.,  1.], dtype=float32)
    """
    if isinstance(X, (np.ndarray, list, tuple, int, float)):
        return np.asarray(X, dtype="float32") / 127.5 - 1
    return keras.ops.cast(X, "float32") / 127.5 - 1.0


_DOC = """Builds {title}.

    Args:
        image_size: int or (height, width). Input resolution. Defaults to 224.
        classes: int. Outputs of the head. Defaults to 1000.
        activation: str. Activation of the head. Defaults to "linear".
        include_top: bool. False outputs the class token's representation.
            Defaults to True.
        pretrained: bool. Load `weights`. Defaults to True.
        pretrained_top: bool. Load the checkpoint's head when its shape fits
            (else it is re-initialised, with a log line). Defaults to True.
        weights: str. "imagenet21k", "imagenet21k+imagenet2012", or a local
            path or URL of an original `.npz` checkpoint. Defaults to
            "imagenet21k+imagenet2012".

    Example:
    >>> model = {name}(image_size=224, classes=10, pretrained=False)
    """


def _entry(model_name, title):
    def builder(
        image_size=224,
        classes=1000,
        activation="linear",
        include_top=True,
        pretrained=True,
        pretrained_top=True,
        weights="imagenet21k+imagenet2012",
    ):
        path = checkpoint.resolve(weights, model=model_name) if pretrained else None
        imagenet_top = pretrained and pretrained_top and include_top and classes == 1000
        return build_model(
            image_size=image_size,
            classes=classes,
            activation=activation,
            include_top=include_top,
            name=model_name.replace("_", "-"),
            weights=path,
            pretrained_top=pretrained_top,
            class_names=get_imagenet_classes()
            if imagenet_top and weights == "imagenet21k+imagenet2012" else None,
            **presets.CONFIGS[model_name],
        )

    builder.__name__ = builder.__qualname__ = model_name
    builder.__doc__ = _DOC.format(title=title, name=model_name)
    return builder


vit_ti16 = _entry("vit_ti16", "ViT-Ti/16")
vit_s16 = _entry("vit_s16", "ViT-S/16")
vit_b16 = _entry("vit_b16", "ViT-B/16")
vit_b32 = _entry("vit_b32", "ViT-B/32")
vit_l16 = _entry("vit_l16", "ViT-L/16")
vit_l32 = _entry("vit_l32", "ViT-L/32")
vit_r26_s32 = _entry("vit_r26_s32", "the hybrid R26+ViT-S/32")
vit_r50_b16 = _entry("vit_r50_b16", "the hybrid R50+ViT-B/16")
vit_r50_l32 = _entry("vit_r50_l32", "the hybrid R50+ViT-L/32")

BUILDERS = {name: globals()[name] for name in presets.CONFIGS}
