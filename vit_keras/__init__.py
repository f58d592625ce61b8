"""vit_keras: the Vision Transformer and the R50+ViT hybrid in Keras 3.

>>> import vit_keras
>>> model = vit_keras.vit_r50_b16(image_size=384, classes=10, pretrained=False)
"""

from vit_keras import layers, presets, utils, vit
from vit_keras.checkpoint import load_npz
from vit_keras.model import attention_model, build_model, fold_weight_standardization
from vit_keras.utils import get_imagenet_classes
from vit_keras.vit import (
    BUILDERS,
    preprocess_inputs,
    vit_b8,
    vit_b16,
    vit_b32,
    vit_h14,
    vit_l16,
    vit_l32,
    vit_r26_b32,
    vit_r26_s32,
    vit_r50_b16,
    vit_r50_l32,
    vit_r_ti16,
    vit_s16,
    vit_s32,
    vit_ti16,
)

__version__ = "0.1.0"

__all__ = [
    "BUILDERS",
    "attention_model",
    "build_model",
    "fold_weight_standardization",
    "get_imagenet_classes",
    "layers",
    "load_npz",
    "preprocess_inputs",
    "presets",
    "utils",
    "vit",
    "vit_b8",
    "vit_b16",
    "vit_b32",
    "vit_h14",
    "vit_l16",
    "vit_l32",
    "vit_r26_b32",
    "vit_r26_s32",
    "vit_r50_b16",
    "vit_r50_l32",
    "vit_r_ti16",
    "vit_s16",
    "vit_s32",
    "vit_ti16",
]
