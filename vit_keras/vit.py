"""Name -> config -> model: `create`, and the model entry points with the arguments of the older `vit-keras`."""

import dataclasses
import logging
import os

from vit_keras import precision, presets, sources
from vit_keras.model import build_model
from vit_keras.preprocessing import preprocess_inputs  # noqa: F401 (part of this module's API)
from vit_keras.utils import get_imagenet_classes

# The checkpoints whose 1000-class head is ImageNet-1k's.
IMAGENET_1K = (presets.I1K, presets.AUGREG_I1K)
POOLED = ("token", "gap", "map")
logger = logging.getLogger("vit_keras")


def is_checkpoint_path(name):
    """Whether `name` is a checkpoint on disk (a file, a folder, big_vision's `checkpoint.bv` prefix)."""
    return isinstance(name, (str, os.PathLike)) and (
        os.path.isdir(name) or os.path.isfile(name) or os.path.isfile(f"{os.fspath(name)}-LAST"))


def config_from(source, name="vit"):
    """The `ViTConfig` of the model a `sources.Source` holds: its config.json, else read from its shapes."""
    arch = dict(source.config) if source.config else sources.infer_config(source.checkpoint.params,
                                                                           source.checkpoint.path)
    arch.pop("image_size", None)
    return presets.ViTConfig(name=name, title=f"from {source.checkpoint.path}", **arch, **source.numerics)


def _image_size_of(source):
    arch = source.config or sources.infer_config(source.checkpoint.params, source.checkpoint.path)
    return arch["image_size"]


def get_config(name_or_config):
    """The `ViTConfig` of a builder or small-config name (or the config itself)."""
    if isinstance(name_or_config, presets.ViTConfig):
        return name_or_config
    config = presets.ALL_CONFIGS.get(name_or_config)
    if config is None and isinstance(name_or_config, str) and ("/" in name_or_config or os.sep in name_or_config):
        raise ValueError(f"{name_or_config}: no such checkpoint file or folder (nor a model name).")
    if config is None:
        raise ValueError(f"Unknown model {name_or_config!r}; known: {', '.join(presets.ALL_CONFIGS)}.")
    return config


def create(
    name_or_config,
    weights=None,
    classes=1000,
    image_size=None,
    *,
    pretrained=None,
    pretrained_top=True,
    include_top=True,
    activation="linear",
    dropout=None,
    attention_dropout=None,
    classifier=None,
    keep_pre_logits=None,
    checkpoint_grid=None,
    class_names=None,
    name=None,
    checkpoint_prefix=None,
    remat=False,
    input_channels=3,
    dtype=None,
):
    """Builds a model from a name or a `ViTConfig`, with weights resolved and read once.

    The one path from a name to a model: the `vit_*` builders, `vit-keras
    train` and `vit-keras evaluate` all come here.

    Args:
        name_or_config: str or ViTConfig. A builder name ("vit_r50_b16"), a
            small config ("vit_hybrid_tiny"), a config, or a checkpoint path
            (an `.npz`, a `transformers` folder, an Orbax folder: the
            architecture is read from it, and it is the weights).
        weights: str or None. A published name ("imagenet21k",
            "imagenet21k+imagenet2012", "augreg_in21k",
            "augreg_in21k_ft_in1k"), or a path or URL of a checkpoint: an
            original or big_vision `.npz`, a timm `model.safetensors`, a
            `transformers` folder or an Orbax folder (`vit_keras.sources`).
            The file fixes its numerics (GELU form, epsilons), its position
            embedding (learned or sincos2d) and, unless `classifier` is
            given, its pooling (token, gap or map). Defaults to None
            (random initialisation).
        classes: int or None. Outputs of the head; None takes the
            checkpoint's. Defaults to 1000.
        image_size: int, (height, width) or None. Input resolution; None takes
            the published checkpoint's resolution, else 224. Defaults to None.
        pretrained: bool or None. Whether to load `weights`; None loads them
            when given. Defaults to None.
        pretrained_top: bool. Load the checkpoint's head when its shape fits
            (else it is re-initialised, with a log line). Defaults to True.
        include_top: bool. False outputs the pooled representation.
            Defaults to True.
        activation: str. Activation of the head. Defaults to "linear".
        dropout: float or None. None takes the config's. Defaults to None.
        attention_dropout: float or None. None takes the config's.
            Defaults to None.
        classifier: str or None. None takes the config's (see `build_model`).
            Defaults to None.
        keep_pre_logits: bool or None. See `build_model`. Defaults to None.
        checkpoint_grid: (rows, cols) or None. See `build_model`.
            Defaults to None.
        class_names: list of str or None. Names kept in the head; None takes
            ImageNet-1k's for a published ImageNet-1k head. Defaults to None.
        name: str or None. Model name; None takes the config's name with
            dashes. Defaults to None.
        checkpoint_prefix: str or None. The tower of a two-tower file
            (SigLIP/LiT: "img"). Defaults to None.
        remat: bool. Recompute each encoder block (and ResNet stage) in the
            backward pass. Defaults to False.
        input_channels: int. Channels of the input images; a checkpoint's
            first convolution is adapted (see `build_model`). Defaults to 3.
        dtype: str or None. Keras dtype policy of the layers: "float32",
            "mixed_bfloat16" or "bfloat16"; the logits stay float32 (see
            `build_model`). None takes Keras's global policy (float32 unless
            set). Defaults to None.

    Example:
    >>> model = create("vit_hybrid_tiny", classes=10, image_size=64)
    >>> model.name, model.output_shape
    ('vit-hybrid-tiny', (None, 10))
    """
    precision.check_dtype(dtype)  # before any file is read
    source = None
    # A checkpoint on disk names the architecture itself.
    if name_or_config not in presets.ALL_CONFIGS and is_checkpoint_path(name_or_config):
        if weights is not None and os.fspath(weights) != os.fspath(name_or_config):
            raise ValueError(f"{name_or_config} is a checkpoint and names the architecture; weights={weights!r} "
                             "would be a second one.")
        weights = os.fspath(name_or_config)
        source = sources.load(weights, prefix=checkpoint_prefix)
        config = config_from(source)
        if image_size is None:
            image_size = _image_size_of(source)
        if classes == 1000:  # the default: the file's head
            classes = None
    else:
        config = get_config(name_or_config)
    if pretrained is None:  # load what there is
        pretrained = weights is not None
    if pretrained and weights is None:
        raise ValueError(f"{config.name} has no published weights: pass pretrained=False or a path/URL.")
    published = pretrained and weights in presets.WEIGHT_NAMES
    if image_size is None:
        image_size = presets.find_preset(config.name, weights).resolution if published else 224
    params = None
    if pretrained:
        if source is None:
            source = sources.load(weights, model=config.name, image_size=image_size, prefix=checkpoint_prefix)
        params = source.checkpoint
        # The file fixes what the architecture's name cannot say: numerics, position embedding, pooling.
        kinds = sources.file_kinds(params.params)
        fixed = {**source.numerics, "posemb": kinds["posemb"]}
        if classifier is None and config.classifier in POOLED:
            fixed["classifier"] = kinds["classifier"]
        changed = {k: v for k, v in fixed.items() if getattr(config, k) != v}
        if changed:
            logger.info("%s: the checkpoint sets %s.", config.name, changed)
            config = dataclasses.replace(config, **changed)
        if class_names is None and source.class_names and pretrained_top and include_top \
                and classes in (len(source.class_names), None):
            class_names = source.class_names
    if class_names is None and published and weights in IMAGENET_1K and pretrained_top and include_top \
            and classes in (1000, None):
        class_names = get_imagenet_classes()
    overrides = {k: v for k, v in dict(dropout=dropout, attention_dropout=attention_dropout,
                                       classifier=classifier).items() if v is not None}
    return build_model(
        **dataclasses.replace(config, **overrides).build_args(),
        image_size=image_size,
        classes=classes,
        activation=activation,
        include_top=include_top,
        name=name or config.name.replace("_", "-"),
        weights=params,
        pretrained_top=pretrained_top,
        keep_pre_logits=keep_pre_logits,
        checkpoint_grid=checkpoint_grid,
        class_names=class_names,
        remat=remat,
        input_channels=input_channels,
        dtype=dtype,
    )


# The builders: `create` with a name, and the defaults of the older vit-keras (224 px, 1000 classes,
# the ImageNet-1k file). Other arguments (activation, include_top, pretrained, ...) are `create`'s.


def vit_ti16(image_size=224, classes=1000, *, weights="imagenet21k+imagenet2012", **kwargs):
    """ViT-Ti/16 through `create` (its published weights: `presets.PRESETS`, the README\'s table)."""
    return create("vit_ti16", weights=weights, classes=classes, image_size=image_size, **kwargs)


def vit_s16(image_size=224, classes=1000, *, weights="imagenet21k+imagenet2012", **kwargs):
    """ViT-S/16 through `create` (its published weights: `presets.PRESETS`, the README\'s table)."""
    return create("vit_s16", weights=weights, classes=classes, image_size=image_size, **kwargs)


def vit_s32(image_size=224, classes=1000, *, weights="augreg_in21k_ft_in1k", **kwargs):
    """ViT-S/32 through `create` (its published weights: `presets.PRESETS`, the README\'s table)."""
    return create("vit_s32", weights=weights, classes=classes, image_size=image_size, **kwargs)


def vit_b8(image_size=224, classes=1000, *, weights="augreg_in21k_ft_in1k", **kwargs):
    """ViT-B/8 through `create` (its published weights: `presets.PRESETS`, the README\'s table)."""
    return create("vit_b8", weights=weights, classes=classes, image_size=image_size, **kwargs)


def vit_b16(image_size=224, classes=1000, *, weights="imagenet21k+imagenet2012", **kwargs):
    """ViT-B/16 through `create` (its published weights: `presets.PRESETS`, the README\'s table)."""
    return create("vit_b16", weights=weights, classes=classes, image_size=image_size, **kwargs)


def vit_b32(image_size=224, classes=1000, *, weights="imagenet21k+imagenet2012", **kwargs):
    """ViT-B/32 through `create` (its published weights: `presets.PRESETS`, the README\'s table)."""
    return create("vit_b32", weights=weights, classes=classes, image_size=image_size, **kwargs)


def vit_l16(image_size=224, classes=1000, *, weights="imagenet21k+imagenet2012", **kwargs):
    """ViT-L/16 through `create` (its published weights: `presets.PRESETS`, the README\'s table)."""
    return create("vit_l16", weights=weights, classes=classes, image_size=image_size, **kwargs)


def vit_l32(image_size=224, classes=1000, *, weights="imagenet21k+imagenet2012", **kwargs):
    """ViT-L/32 through `create` (its published weights: `presets.PRESETS`, the README\'s table)."""
    return create("vit_l32", weights=weights, classes=classes, image_size=image_size, **kwargs)


def vit_h14(image_size=224, classes=1000, *, weights="imagenet21k", **kwargs):
    """ViT-H/14 through `create` (its published weights: `presets.PRESETS`, the README\'s table)."""
    return create("vit_h14", weights=weights, classes=classes, image_size=image_size, **kwargs)


def vit_r_ti16(image_size=224, classes=1000, *, weights="augreg_in21k_ft_in1k", **kwargs):
    """R+ViT-Ti/16 through `create` (its published weights: `presets.PRESETS`, the README\'s table)."""
    return create("vit_r_ti16", weights=weights, classes=classes, image_size=image_size, **kwargs)


def vit_r26_s32(image_size=224, classes=1000, *, weights="imagenet21k+imagenet2012", **kwargs):
    """R26+ViT-S/32 through `create` (its published weights: `presets.PRESETS`, the README\'s table)."""
    return create("vit_r26_s32", weights=weights, classes=classes, image_size=image_size, **kwargs)


def vit_r26_b32(image_size=224, classes=1000, *, weights=None, **kwargs):
    """R26+ViT-B/32 through `create` (its published weights: `presets.PRESETS`, the README\'s table)."""
    return create("vit_r26_b32", weights=weights, classes=classes, image_size=image_size, **kwargs)


def vit_r50_b16(image_size=224, classes=1000, *, weights="imagenet21k+imagenet2012", **kwargs):
    """R50+ViT-B/16 through `create` (its published weights: `presets.PRESETS`, the README\'s table)."""
    return create("vit_r50_b16", weights=weights, classes=classes, image_size=image_size, **kwargs)


def vit_r50_l32(image_size=224, classes=1000, *, weights="imagenet21k+imagenet2012", **kwargs):
    """R50+ViT-L/32 through `create` (its published weights: `presets.PRESETS`, the README\'s table)."""
    return create("vit_r50_l32", weights=weights, classes=classes, image_size=image_size, **kwargs)


BUILDERS = {name: globals()[name] for name in presets.CONFIGS}
