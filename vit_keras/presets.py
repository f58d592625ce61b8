"""Model configurations and the published checkpoints, as flat tables.

`CONFIGS` maps a builder name to its `ViTConfig` (the original architecture);
`PRESETS` lists the published checkpoints (`Preset`: model, weights name,
URL, resolution, head classes, mean/std, sha256, licence).
"""

import dataclasses
import math
import numbers

from vit_keras.sizes import height_width, is_int


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """An architecture: the fields of the original config (vit_jax/configs/models.py).

    Every field is an argument of `vit_keras.build_model`; `create` builds
    from it. For the hybrids `patch_size` counts on the ResNet's feature map.

    Args:
        name: str. Builder name, e.g. "vit_r50_b16".
        title: str. The original's name, e.g. "R50+ViT-B/16".
        patch_size: int. Patch size (on the ResNet's feature map for hybrids).
        num_layers: int. Transformer blocks.
        hidden_size: int. Token width.
        num_heads: int. Attention heads.
        mlp_dim: int. MLP hidden width.
        dropout: float. Dropout rate of the original fine-tuning config.
            Defaults to 0.0.
        attention_dropout: float. Dropout on attention weights (0.0 in every
            original config). Defaults to 0.0.
        classifier: str. "token", "gap", "unpooled" or "token_unpooled".
            Defaults to "token".
        representation_size: int or None. Width of the tanh `pre_logits`
            layer (None: none; a loaded checkpoint's is kept with its head).
            Defaults to None.
        resnet_layers: tuple of int or None. Units per ResNet stage; `()` for
            the root alone; None for no ResNet. Defaults to None.
        resnet_width_factor: float. ResNet width multiplier. Defaults to 1.
        posemb: str. "learn" or "sincos2d" (big_vision's fixed table).
            Defaults to "learn".
        layer_norm_epsilon: float. LayerNorm epsilon (Hugging Face: 1e-12).
            Defaults to 1e-6.
        gelu_approximate: bool. tanh GELU (Google's); False: erf (timm, Hugging
            Face). Defaults to True.
        ws_epsilon: float. ResNet weight-standardisation epsilon (timm: 1e-8).
            Defaults to 1e-5.
        gn_epsilon: float. ResNet GroupNorm epsilon (timm: 1e-5).
            Defaults to 1e-6.

    Example:
    >>> CONFIGS["vit_r50_b16"].resnet_layers
    (3, 4, 9)
    """

    name: str
    title: str
    patch_size: int
    num_layers: int
    hidden_size: int
    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    attention_dropout: float = 0.0
    classifier: str = "token"
    representation_size: int = None
    resnet_layers: tuple = None
    resnet_width_factor: float = 1
    # Added by issue 24: big_vision's position table, and the numerics of timm / Hugging Face weights.
    posemb: str = "learn"
    layer_norm_epsilon: float = 1e-6
    gelu_approximate: bool = True
    ws_epsilon: float = 1e-5
    gn_epsilon: float = 1e-6

    def __post_init__(self):
        check_architecture(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                              if f.name in ARCHITECTURE_FIELDS})

    def build_args(self):
        """The `build_model` arguments of this architecture (all fields but name and title)."""
        fields = dataclasses.asdict(self)
        del fields["name"], fields["title"]
        return fields


ARCHITECTURE_FIELDS = ("patch_size", "num_layers", "hidden_size", "num_heads", "mlp_dim", "dropout",
                       "attention_dropout", "representation_size", "resnet_layers", "resnet_width_factor")


def check_architecture(patch_size, num_layers, hidden_size, num_heads, mlp_dim, dropout=0.0,
                       attention_dropout=0.0, representation_size=None, resnet_layers=None, resnet_width_factor=1):
    """ValueError naming the first field that cannot make a model (`ViTConfig` and `build_model` call it).

    >>> check_architecture(16, 12, 768, 7, 3072)
    Traceback (most recent call last):
    ...
    ValueError: hidden_size 768 is not divisible by num_heads 7 (each head gets hidden_size / num_heads).
    """
    def count(value):
        return is_int(value) and value >= 1

    def share(value):
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 <= value < 1

    for field, value in (("patch_size", patch_size), ("num_layers", num_layers), ("hidden_size", hidden_size),
                         ("num_heads", num_heads), ("mlp_dim", mlp_dim)):
        if not count(value):
            raise ValueError(f"{field} must be a positive integer, got {value!r}.")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads} "
                         "(each head gets hidden_size / num_heads).")
    for field, value in (("dropout", dropout), ("attention_dropout", attention_dropout)):
        if not share(value):
            raise ValueError(f"{field} must be a rate in [0, 1), got {value!r}.")
    if representation_size is not None and not count(representation_size):
        raise ValueError(f"representation_size must be a positive integer or None, got {representation_size!r}.")
    if resnet_layers is not None and (isinstance(resnet_layers, (str, bytes)) or not all(
            count(n) for n in resnet_layers)):
        raise ValueError(f"resnet_layers must be a tuple of positive unit counts (or () for the root alone, None "
                         f"for no ResNet), got {resnet_layers!r}.")
    if not (isinstance(resnet_width_factor, numbers.Real) and not isinstance(resnet_width_factor, bool)
            and 0 < resnet_width_factor < 1e3 and math.isfinite(resnet_width_factor)):
        raise ValueError(f"resnet_width_factor must be a positive number, got {resnet_width_factor!r}.")


def _vit(name, title, patch, layers, width, heads, mlp, dropout, **extra):
    return name, ViTConfig(name, title, patch, layers, width, heads, mlp, dropout, **extra)


# The original configs (vit_jax/configs/models.py), dropout included (attention dropout is
# 0.0 in all of them). For the hybrids the patch size is counted on the ResNet's feature
# map; the root alone (`resnet_layers=()`) has stride 4, so R+ViT-Ti/16 has stride 32.
CONFIGS = dict([
    _vit("vit_ti16", "ViT-Ti/16", 16, 12, 192, 3, 768, 0.0),
    _vit("vit_s16", "ViT-S/16", 16, 12, 384, 6, 1536, 0.0),
    _vit("vit_s32", "ViT-S/32", 32, 12, 384, 6, 1536, 0.0),
    _vit("vit_b8", "ViT-B/8", 8, 12, 768, 12, 3072, 0.0),
    _vit("vit_b16", "ViT-B/16", 16, 12, 768, 12, 3072, 0.0),
    _vit("vit_b32", "ViT-B/32", 32, 12, 768, 12, 3072, 0.0),
    _vit("vit_l16", "ViT-L/16", 16, 24, 1024, 16, 4096, 0.1),
    _vit("vit_l32", "ViT-L/32", 32, 24, 1024, 16, 4096, 0.0),
    _vit("vit_h14", "ViT-H/14", 14, 32, 1280, 16, 5120, 0.1),
    _vit("vit_r_ti16", "R+ViT-Ti/16", 8, 12, 192, 3, 768, 0.0, resnet_layers=()),
    _vit("vit_r26_s32", "R26+ViT-S/32", 1, 12, 384, 6, 1536, 0.0, resnet_layers=(2, 2, 2, 2)),
    _vit("vit_r26_b32", "R26+ViT-B/32", 1, 12, 768, 12, 3072, 0.0, resnet_layers=(2, 2, 2, 2)),
    _vit("vit_r50_b16", "R50+ViT-B/16", 1, 12, 768, 12, 3072, 0.1, resnet_layers=(3, 4, 9)),
    _vit("vit_r50_l32", "R50+ViT-L/32", 1, 24, 1024, 16, 4096, 0.1, resnet_layers=(3, 4, 6, 3)),
])

# Small configurations with no published weights, for laptops, demos and tests.
SMALL_CONFIGS = dict([
    # ResNet width 32, one unit per stage (stride 16), then a 2-layer ViT of width 64.
    _vit("vit_hybrid_tiny", "R(tiny)+ViT", 1, 2, 64, 4, 128, 0.0, resnet_layers=(1, 1, 1),
         resnet_width_factor=0.5),
    _vit("vit_tiny16", "ViT-tiny/16", 16, 2, 64, 4, 128, 0.0),
])


ALL_CONFIGS = {**CONFIGS, **SMALL_CONFIGS}


@dataclasses.dataclass(frozen=True)
class HeadPolicy:
    """A checkpoint's top as data, read by the loader (as timm's pretrained cfg names its `classifier`).

    `checkpoint.LoadPolicy` takes it from the checkpoint's `Preset` (a file
    that is no preset gets the default, the original's rule).

    Args:
        head: str. The checkpoint's classifier layer: loaded where the model's
            head has its shape, else re-initialised. Defaults to "head".
        tied: tuple of str. Layers trained for that head (the tanh
            `pre_logits`): kept with the head, dropped with a new one (the
            original's "drop-head variant"). Defaults to ("pre_logits",).

    Example:
    >>> find_preset("vit_b16", "imagenet21k").head
    HeadPolicy(head='head', tied=('pre_logits',))
    """

    head: str = "head"
    tied: tuple = ("pre_logits",)


@dataclasses.dataclass(frozen=True)
class Preset:
    """One published checkpoint: where it is and what it expects."""

    model: str  # a key of CONFIGS
    weights: str  # one of WEIGHT_NAMES
    url: str
    resolution: int  # the image size it was trained (or fine-tuned) at
    classes: int = 1000  # outputs of its head
    mean: tuple = (0.5, 0.5, 0.5)  # pixels / 255 are normalised as (x - mean) / std
    std: tuple = (0.5, 0.5, 0.5)
    sha256: str = None  # Google publishes none; verified after download when set
    license: str = "Apache-2.0"
    head: HeadPolicy = HeadPolicy()  # what loading keeps of its head and pre_logits (issue 21)


_GCS = "https://storage.googleapis.com/vit_models/"
I21K, I1K = "imagenet21k", "imagenet21k+imagenet2012"
AUGREG_I21K, AUGREG_I1K = "augreg_in21k", "augreg_in21k_ft_in1k"

# The recommended AugReg checkpoints ("How to train your ViT", vit_jax README): the
# ImageNet-21k run with the best upstream validation accuracy, and its ImageNet-1k
# fine-tuning (learning rate as published) at 384 and, where that file is known, 224.
_AUGREG = {
    # model: (pre-training run, {resolution: fine-tuning learning rate})
    "vit_ti16": ("Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0", {384: "0.03", 224: "0.03"}),
    "vit_s16": ("S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0", {384: "0.03", 224: "0.03"}),
    "vit_s32": ("S_32-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0", {384: "0.01"}),
    "vit_b8": ("B_8-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0", {224: "0.01"}),
    "vit_b16": ("B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0", {384: "0.03", 224: "0.01"}),
    "vit_b32": ("B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0", {384: "0.01"}),
    "vit_l16": ("L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0", {384: "0.01"}),
    "vit_r_ti16": ("R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0", {384: "0.03", 224: "0.03"}),
    "vit_r26_s32": ("R26_S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0", {384: "0.01"}),
    "vit_r50_l32": ("R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1", {384: "0.01", 224: "0.01"}),
}


def _augreg_presets():
    for model, (run, finetuned) in _AUGREG.items():
        yield Preset(model, AUGREG_I21K, f"{_GCS}augreg/{run}.npz", 224, classes=21843)
        for res, lr in finetuned.items():
            url = f"{_GCS}augreg/{run}--imagenet2012-steps_20k-lr_{lr}-res_{res}.npz"
            yield Preset(model, AUGREG_I1K, url, res)


# The 2020 checkpoints of the paper: ImageNet-21k at 224, fine-tuned on ImageNet-1k at 384.
_ORIGINAL = {"vit_b16": "ViT-B_16", "vit_b32": "ViT-B_32", "vit_l16": "ViT-L_16",
             "vit_l32": "ViT-L_32", "vit_r50_b16": "R50+ViT-B_16", "vit_h14": "ViT-H_14"}


def _original_presets():
    for model, file in _ORIGINAL.items():
        yield Preset(model, I21K, f"{_GCS}imagenet21k/{file}.npz", 224, classes=21843)
        if model != "vit_h14":  # ViT-H/14 was published pre-trained only
            yield Preset(model, I1K, f"{_GCS}imagenet21k+imagenet2012/{file}.npz", 384)


def _aliases():
    # Before the AugReg names existed, these models' "imagenet21k" and
    # "imagenet21k+imagenet2012" meant the AugReg files; those names keep working.
    for model in ("vit_ti16", "vit_s16", "vit_r26_s32", "vit_r50_l32"):
        run, finetuned = _AUGREG[model]
        yield Preset(model, I21K, f"{_GCS}augreg/{run}.npz", 224, classes=21843)
        lr = finetuned[384]
        yield Preset(model, I1K, f"{_GCS}augreg/{run}--imagenet2012-steps_20k-lr_{lr}-res_384.npz", 384)


PRESETS = [*_original_presets(), *_aliases(), *_augreg_presets()]

WEIGHT_NAMES = (I21K, I1K, AUGREG_I21K, AUGREG_I1K)


def default_weights(model):
    """The checkpoint a builder loads when `weights` is not given, or None."""
    have = {p.weights for p in PRESETS if p.model == model}
    return next((w for w in (I1K, AUGREG_I1K, I21K, AUGREG_I21K) if w in have), None)


def find_preset(model, weights, image_size=None):
    """Returns the `Preset` of `model` trained as `weights`, or raises ValueError.

    Where a checkpoint was published at several resolutions, the one equal to
    `image_size` (int or (h, w)) is chosen, else the first listed.
    """
    found = [p for p in PRESETS if p.model == model and p.weights == weights]
    if not found:
        have = sorted({p.weights for p in PRESETS if p.model == model})
        raise ValueError(
            f"No published {weights!r} checkpoint for {model}; known: {have}. "
            "Pass a local path or URL of an .npz file instead."
        )
    height, width = (None, None) if image_size is None else height_width(image_size)
    side = height if height == width else None
    return next((p for p in found if p.resolution == side), found[0])
