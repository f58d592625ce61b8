"""Multi-scale features for dense tasks (segmentation, detection): the hybrid as an encoder.

TransUNet-style decoders take the ResNet's feature maps at strides 2, 4, 8 and
the transformer's tokens at stride 16; `features_model` gives them all, by name,
from one pass that shares the model's weights.
"""

import keras
from keras import ops

from vit_keras.layers import WithIntermediates
from vit_keras.model import find_encoder
from vit_keras.sizes import is_int


def feature_names(model, blocks=()):
    """The output names `features_model(model, blocks)` gives, shallow to deep."""
    embeddings = model.get_layer("embeddings")
    names = []
    if embeddings.resnet_layers is not None:
        names += ["root"] + [f"stage{s}" for s in range(1, len(embeddings.resnet_layers) + 1)]
    return names + [f"encoderblock_{i}" for i in sorted(set(blocks))] + ["encoder"]


def features_model(model, blocks=()):
    """A `keras.Model` from images to a dict of named feature maps of `model` (same weights).

    Outputs, all `[batch, rows, cols, channels]` (the input is preprocessed
    images, as the model's):
    - `root`: the ResNet root after GroupNorm and ReLU, before the max-pool
      (stride 2); hybrids only.
    - `stage1`, `stage2`, ...: each ResNet stage (strides 4, 8, 16 for R50);
      hybrids only.
    - `encoderblock_{i}` for each `i` in `blocks`: block i's output tokens
      (before the final LayerNorm), as a grid.
    - `encoder`: the encoded tokens (after the final LayerNorm) as a grid
      `[batch, h, w, hidden]` (the class token left out).

    Dropout runs as in the model (`training=` when calling the result).

    Args:
        model: keras.Model. A model from this package's builders (fine-tuned
            or reloaded from `.keras` too).
        blocks: iterable of int. Transformer blocks (0-based) whose tokens to
            output too, like timm's `forward_intermediates`. Defaults to ().

    Example:
    >>> import vit_keras
    >>> model = vit_keras.create("vit_hybrid_tiny", classes=10, image_size=64)
    >>> features = features_model(model, blocks=[0])(keras.ops.zeros((1, 64, 64, 3)))
    >>> {name: tuple(x.shape) for name, x in features.items()}  # doctest: +NORMALIZE_WHITESPACE
    {'root': (1, 32, 32, 32), 'stage1': (1, 16, 16, 128), 'stage2': (1, 8, 8, 256),
     'stage3': (1, 4, 4, 512), 'encoderblock_0': (1, 4, 4, 64), 'encoder': (1, 4, 4, 64)}
    """
    embeddings = model.get_layer("embeddings")
    encoder = find_encoder(model)
    blocks = [blocks] if isinstance(blocks, (str, bytes)) else list(blocks)
    if not all(is_int(i) for i in blocks):
        raise ValueError(f"blocks must be block indices (integers), got {blocks!r}.")
    blocks = sorted(set(int(i) for i in blocks))
    bad = [i for i in blocks if not 0 <= i < encoder.num_layers]
    if bad:
        raise ValueError(f"blocks {bad} out of range: the encoder has blocks 0..{encoder.num_layers - 1}.")
    images = keras.Input(model.input_shape[1:], name="image")
    # The layers' one path with intermediates: the ResNet's maps, then every block's tokens.
    tokens, outputs = WithIntermediates(embeddings)(images)
    encoded, out = WithIntermediates(encoder)(tokens, return_weights=False)
    rows, cols = embeddings.grid_size(model.input_shape[1:3])
    prefix = int(embeddings.class_token)

    def as_grid(t):
        return ops.reshape(t[:, prefix:], (-1, rows, cols, t.shape[-1]))

    outputs = dict(outputs)
    for i in blocks:
        outputs[f"encoderblock_{i}"] = as_grid(out["blocks"][i])
    outputs["encoder"] = as_grid(encoded)
    return keras.Model(images, outputs, name=f"{model.name}_features")
