"""Model configurations and the published checkpoints, as flat tables."""

import dataclasses

# The original configs (vit_jax/configs/models.py). For the hybrids the patch
# size is counted on the ResNet's feature map.
CONFIGS = {
    "vit_ti16": dict(patch_size=16, num_layers=12, hidden_size=192, num_heads=3, mlp_dim=768),
    "vit_s16": dict(patch_size=16, num_layers=12, hidden_size=384, num_heads=6, mlp_dim=1536),
    "vit_b16": dict(patch_size=16, num_layers=12, hidden_size=768, num_heads=12, mlp_dim=3072),
    "vit_b32": dict(patch_size=32, num_layers=12, hidden_size=768, num_heads=12, mlp_dim=3072),
    "vit_l16": dict(patch_size=16, num_layers=24, hidden_size=1024, num_heads=16, mlp_dim=4096),
    "vit_l32": dict(patch_size=32, num_layers=24, hidden_size=1024, num_heads=16, mlp_dim=4096),
    "vit_r26_s32": dict(
        patch_size=1, num_layers=12, hidden_size=384, num_heads=6, mlp_dim=1536,
        resnet_layers=(2, 2, 2, 2),
    ),
    "vit_r50_b16": dict(
        patch_size=1, num_layers=12, hidden_size=768, num_heads=12, mlp_dim=3072,
        resnet_layers=(3, 4, 9),
    ),
    "vit_r50_l32": dict(
        patch_size=1, num_layers=24, hidden_size=1024, num_heads=16, mlp_dim=4096,
        resnet_layers=(3, 4, 6, 3),
    ),
}

# Small configurations with no published weights, for laptops, demos and tests.
SMALL_CONFIGS = {
    # ResNet width 32, one unit per stage (stride 16), then a 2-layer ViT of width 64.
    "vit_hybrid_tiny": dict(
        patch_size=1, num_layers=2, hidden_size=64, num_heads=4, mlp_dim=128,
        resnet_layers=(1, 1, 1), resnet_width_factor=0.5,
    ),
    "vit_tiny16": dict(patch_size=16, num_layers=2, hidden_size=64, num_heads=4, mlp_dim=128),
}


ALL_CONFIGS = {**CONFIGS, **SMALL_CONFIGS}


@dataclasses.dataclass(frozen=True)
class Preset:
    """One published checkpoint: where it is and what it expects."""

    model: str
    weights: str
    url: str
    resolution: int
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    sha256: str = None  # not published by Google; keras.utils.get_file checks it when set
    license: str = "Apache-2.0"


_GCS = "https://storage.googleapis.com/vit_models/"
_AUGREG = _GCS + "augreg/"
_FT = "--imagenet2012-steps_20k-lr_{lr}-res_384.npz"

PRESETS = [
    Preset("vit_b16", "imagenet21k", _GCS + "imagenet21k/ViT-B_16.npz", 224),
    Preset("vit_b16", "imagenet21k+imagenet2012", _GCS + "imagenet21k+imagenet2012/ViT-B_16.npz", 384),
    Preset("vit_b32", "imagenet21k", _GCS + "imagenet21k/ViT-B_32.npz", 224),
    Preset("vit_b32", "imagenet21k+imagenet2012", _GCS + "imagenet21k+imagenet2012/ViT-B_32.npz", 384),
    Preset("vit_l16", "imagenet21k", _GCS + "imagenet21k/ViT-L_16.npz", 224),
    Preset("vit_l16", "imagenet21k+imagenet2012", _GCS + "imagenet21k+imagenet2012/ViT-L_16.npz", 384),
    Preset("vit_l32", "imagenet21k", _GCS + "imagenet21k/ViT-L_32.npz", 224),
    Preset("vit_l32", "imagenet21k+imagenet2012", _GCS + "imagenet21k+imagenet2012/ViT-L_32.npz", 384),
    Preset("vit_r50_b16", "imagenet21k", _GCS + "imagenet21k/R50+ViT-B_16.npz", 224),
    Preset("vit_r50_b16", "imagenet21k+imagenet2012", _GCS + "imagenet21k+imagenet2012/R50+ViT-B_16.npz", 384),
    # The smaller and the R26/R50-L hybrids are published only from the "AugReg" study.
    Preset("vit_ti16", "imagenet21k", _AUGREG + "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz", 224),
    Preset("vit_ti16", "imagenet21k+imagenet2012", _AUGREG + "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0" + _FT.format(lr="0.03"), 384),
    Preset("vit_s16", "imagenet21k", _AUGREG + "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz", 224),
    Preset("vit_s16", "imagenet21k+imagenet2012", _AUGREG + "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0" + _FT.format(lr="0.03"), 384),
    Preset("vit_r26_s32", "imagenet21k", _AUGREG + "R26_S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0.npz", 224),
    Preset("vit_r26_s32", "imagenet21k+imagenet2012", _AUGREG + "R26_S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0" + _FT.format(lr="0.01"), 384),
    Preset("vit_r50_l32", "imagenet21k", _AUGREG + "R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1.npz", 224),
    Preset("vit_r50_l32", "imagenet21k+imagenet2012", _AUGREG + "R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1" + _FT.format(lr="0.01"), 384),
]

WEIGHT_NAMES = tuple(sorted({p.weights for p in PRESETS}))


def find_preset(model, weights):
    """Returns the `Preset` of `model` trained as `weights`, or raises ValueError."""
    for preset in PRESETS:
        if preset.model == model and preset.weights == weights:
            return preset
    have = [p.weights for p in PRESETS if p.model == model]
    raise ValueError(
        f"No published {weights!r} checkpoint for {model}; known: {have}. "
        "Pass a local path or URL of an .npz file instead."
    )
