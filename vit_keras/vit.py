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
        classes: int or None. Outputs of the head; None takes the
            checkpoint's (21843 for the ImageNet-21k files). Defaults to 1000.
        activation: str. Activation of the head. Defaults to "linear".
        include_top: bool. False outputs the pooled representation.
            Defaults to True.
        pretrained: bool or None. Load `weights`; None loads them when there
            are any ({pretrained} by default). Defaults to None.
        pretrained_top: bool. Load the checkpoint's head when its shape fits
            (else it is re-initialised, with a log line). Defaults to True.
        weights: str. {names}, or a local path or URL of an original `.npz`
            checkpoint. Where a name was published at several resolutions,
            the file of `image_size` is taken, else the first. Defaults to
            {weights!r}.
        dropout: float or None. Dropout; None takes the original config's
            ({dropout}). Defaults to None.
        attention_dropout: float or None. Dropout on attention weights; None
            takes the original config's (0.0). Defaults to None.
        classifier: str or None. "token", "gap", "unpooled" or
            "token_unpooled" (see `build_model`); None takes the original
            config's ("token"). Defaults to None.
        keep_pre_logits: bool or None. Keep a checkpoint's `pre_logits` layer
            when the head is new (see `build_model`). Defaults to None.

    Example:
    >>> model = {name}(image_size=224, classes=10, pretrained=False)
    """


def _entry(model_name):
    config = presets.CONFIGS[model_name]
    default = presets.default_weights(model_name)

    def builder(
        image_size=224,
        classes=1000,
        activation="linear",
        include_top=True,
        pretrained=None,
        pretrained_top=True,
        weights=default,
        dropout=None,
        attention_dropout=None,
        classifier=None,
        keep_pre_logits=None,
    ):
        if pretrained is None:  # load what there is: the default checkpoint, or the given weights
            pretrained = weights is not None
        if pretrained and weights is None:
            raise ValueError(f"{model_name} has no published weights: pass pretrained=False or a path/URL.")
        path = checkpoint.resolve(weights, model=model_name, image_size=image_size) if pretrained else None
        imagenet_top = pretrained and pretrained_top and include_top and classes in (1000, None)
        names = get_imagenet_classes() if imagenet_top and weights in IMAGENET_1K else None
        return build_model(
            **dict(config, dropout=config["dropout"] if dropout is None else dropout,
                   classifier=classifier or config["classifier"]),
            attention_dropout=attention_dropout or 0.0,
            image_size=image_size,
            classes=classes,
            activation=activation,
            include_top=include_top,
            name=model_name.replace("_", "-"),
            weights=path,
            pretrained_top=pretrained_top,
            keep_pre_logits=keep_pre_logits,
            class_names=names,
        )

    have = sorted({p.weights for p in presets.PRESETS if p.model == model_name})
    builder.__name__ = builder.__qualname__ = model_name
    builder.__doc__ = _DOC.format(
        title=presets.TITLES[model_name], name=model_name, weights=default, pretrained=default is not None,
        names=", ".join(repr(w) for w in have) if have else "No published weights", dropout=config["dropout"],
    )
    return builder


# The checkpoints whose 1000-class head is ImageNet-1k's.
IMAGENET_1K = (presets.I1K, presets.AUGREG_I1K)

vit_ti16 = _entry("vit_ti16")
vit_s16 = _entry("vit_s16")
vit_s32 = _entry("vit_s32")
vit_b8 = _entry("vit_b8")
vit_b16 = _entry("vit_b16")
vit_b32 = _entry("vit_b32")
vit_l16 = _entry("vit_l16")
vit_l32 = _entry("vit_l32")
vit_h14 = _entry("vit_h14")
vit_r_ti16 = _entry("vit_r_ti16")
vit_r26_s32 = _entry("vit_r26_s32")
vit_r26_b32 = _entry("vit_r26_b32")
vit_r50_b16 = _entry("vit_r50_b16")
vit_r50_l32 = _entry("vit_r50_l32")

BUILDERS = {name: globals()[name] for name in presets.CONFIGS}
