"""Keras 3 layers of the Vision Transformer and its ResNet stem.

Each layer is registered with `keras.saving.register_keras_serializable`, so a
`.keras` file that uses them reloads without `custom_objects`.
"""

from vit_keras.layers.attention import Attention
from vit_keras.layers.block import Block
from vit_keras.layers.embeddings import Embeddings
from vit_keras.layers.encoder import Encoder
from vit_keras.layers.group_norm import GroupNorm
from vit_keras.layers.head import ClassifierHead
from vit_keras.layers.intermediates import WithIntermediates
from vit_keras.layers.map_head import MAPHead
from vit_keras.layers.mlp import Mlp
from vit_keras.layers.pooling import ExtractToken
from vit_keras.layers.resnet import ResNet, ResNetStage, ResNetUnit
from vit_keras.layers.std_conv import StdConv2D

__all__ = [
    "Attention",
    "Block",
    "ClassifierHead",
    "Embeddings",
    "Encoder",
    "ExtractToken",
    "GroupNorm",
    "MAPHead",
    "Mlp",
    "ResNet",
    "ResNetStage",
    "ResNetUnit",
    "StdConv2D",
    "WithIntermediates",
]
