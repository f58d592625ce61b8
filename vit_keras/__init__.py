"""vit_keras: the Vision Transformer and the R50+ViT hybrid in Keras 3.

The package reads as its pipeline: a name -> `presets.ViTConfig` -> `create`
(or a `vit_*` builder) -> a `keras.Model` -> `training` | `evaluate` |
`serving` (SavedModel, TFLite, ONNX). `features_model` gives multi-scale
feature maps for dense tasks; `visualize` draws attention.

>>> import vit_keras
>>> model = vit_keras.vit_r50_b16(image_size=384, classes=10, pretrained=False)

The submodules that need more than Keras (`training`, `data`, `evaluate`,
`visualize`, `export`, `serving`, ...) are imported when first used, so
`import vit_keras` stays light and needs no TensorFlow on the JAX and
PyTorch backends.
"""

import importlib
import sys as _sys

from vit_keras import console as _console

if _console.invoked_as_command():  # `vit-keras`: TensorFlow's own lines silenced before it is imported
    _console.configure(*_console.command_words(_sys.argv[1:]))

# optimizers, finetune: their optimizer classes are registered, so .keras files that name them load
from vit_keras import finetune, layers, optimizers, presets, utils, vit  # noqa: F401
from vit_keras.checkpoint import load_npz
from vit_keras.features import features_model
from vit_keras.model import attention_model, build_model, float32_copy, fold_weight_standardization
from vit_keras.precision import inference_copy
from vit_keras.presets import ViTConfig
from vit_keras.preprocessing import preprocess_inputs
from vit_keras.reshape import resize
from vit_keras.utils import get_imagenet_classes
from vit_keras.vit import (
    BUILDERS,
    create,
    get_config,
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

__version__ = "0.2.0"

# Imported on first use (PEP 562).
_LAZY = ("checkpoint", "cli", "data", "distribute", "download", "evaluate", "export", "features", "files",
         "model", "predict", "preprocessing", "reshape", "serving", "sources", "training", "visualize")


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f"vit_keras.{name}")
    raise AttributeError(f"module 'vit_keras' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BUILDERS",
    "ViTConfig",
    "attention_model",
    "build_model",
    "create",
    "features_model",
    "finetune",
    "float32_copy",
    "fold_weight_standardization",
    "get_config",
    "get_imagenet_classes",
    "inference_copy",
    "layers",
    "load_npz",
    "preprocess_inputs",
    "presets",
    "resize",
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
