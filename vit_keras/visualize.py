"""Where the model looks: attention rollout, heat maps over the image, overlay pictures.

Attention rollout (Abnar & Zuidema, 2020): fuse each block's heads, optionally
discard the lowest weights, add the identity for the residual path,
renormalise the rows, and multiply the blocks' matrices from first to last;
the class token's row over the patch grid is the map.
"""

import collections
import os

import numpy as np
from keras import ops

from vit_keras.model import attention_model
from vit_keras.data.images import read_image, resize
from vit_keras.preprocessing import preprocess_inputs

HEAD_FUSIONS = ("mean", "max", "min")


def grid_shape(model):
    """The token grid (rows, cols) of a model of this package (the ResNet's feature map for the hybrid)."""
    return model.get_layer("embeddings").grid_size(model.input_shape[1:3])


def rollout(weights, head_fusion="mean", discard_ratio=0.0):
    """Attention rollout of a list of `[batch, heads, T, T]` weights -> `[batch, T, T]`.

    Args:
        weights: list of tensors. Each block's attention probabilities, first block first.
        head_fusion: str. How heads are fused: "mean", "max" or "min". Defaults to "mean".
        discard_ratio: float. Share of each row's lowest fused weights set to zero
            before the identity is added. Defaults to 0.
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"Unknown head_fusion {head_fusion!r}; use one of {HEAD_FUSIONS}.")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}.")
    result = None
    for w in weights:
        w = ops.cast(w, "float32")
        a = {"mean": ops.mean, "max": ops.max, "min": ops.min}[head_fusion](w, axis=1)
        tokens = a.shape[-1]
        discard = int(tokens * discard_ratio)
        if discard:
            threshold = ops.top_k(a, tokens - discard, sorted=True)[0][..., -1:]
            a = ops.where(a >= threshold, a, ops.zeros_like(a))
        a = a + ops.eye(tokens, dtype="float32")
        a = a / ops.sum(a, axis=-1, keepdims=True)
        result = a if result is None else ops.matmul(a, result)
    return result


def rollout_grid(weights, grid, head_fusion="mean", discard_ratio=0.0):
    """The class token's rollout over the patch grid, `[batch, rows, cols]`, scaled to max 1.

    A model without a class token (the `gap` and `unpooled` classifiers) pools
    all tokens, so its map is the rollout averaged over every token's row.
    """
    r = rollout(weights, head_fusion, discard_ratio)
    if r.shape[-1] == grid[0] * grid[1]:
        r = ops.mean(r, axis=1)
    else:
        r = r[:, 0, 1:]
    r = ops.reshape(r, (-1, grid[0], grid[1]))
    return r / ops.maximum(ops.max(r, axis=(1, 2), keepdims=True), 1e-12)


def attention_heatmap(model, images, head_fusion="mean", discard_ratio=0.0):
    """Heat maps of where the class token attends, upsampled to the image: `[batch, H, W]` in [0, 1].

    Args:
        model: keras.Model. A model of this package (hybrid, non-square and
            fine-tuned ones included).
        images: array `[batch, H, W, 3]` as the model takes them (preprocessed, in [-1, 1]).
        head_fusion, discard_ratio: see `rollout`.
    """
    _, weights = attention_model(model)(images, training=False)
    return heatmap_from_weights(model, weights, head_fusion, discard_ratio)


def heatmap_from_weights(model, weights, head_fusion="mean", discard_ratio=0.0):
    """`attention_heatmap` for attention weights already computed by `attention_model(model)`."""
    grid = rollout_grid(weights, grid_shape(model), head_fusion, discard_ratio)
    height, width = model.input_shape[1:3]
    maps = ops.image.resize(grid[..., None], (height, width), interpolation="bilinear")
    return np.clip(np.asarray(maps)[..., 0], 0.0, 1.0)


def attention_map(model, image):
    """The existing vit-keras API: an image in 0..255 -> the image weighted by its attention map.

    The image may have any size: it is resized to the model's input for the
    model, and the map is resized back to the image.
    """
    image = np.asarray(image)
    height, width = model.input_shape[1:3]
    x = ops.image.resize(image[None].astype("float32"), (height, width))
    heat = attention_heatmap(model, preprocess_inputs(x))
    heat = np.asarray(ops.image.resize(heat[..., None], image.shape[:2]))[0]
    return (image * np.clip(heat, 0.0, 1.0)).astype("uint8")


def save_overlay(image, heatmap, path, predictions=None, title=None):
    """Saves a PNG: the image, the heat map, and the heat map over the image with the top predictions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = np.asarray(image)
    image = image.astype("uint8") if image.max() > 1.0 else (image * 255).astype("uint8")
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(heatmap, cmap="inferno", vmin=0, vmax=1)
    axes[1].set_title("attention rollout")
    axes[2].imshow(image)
    axes[2].imshow(heatmap, cmap="inferno", alpha=0.55, vmin=0, vmax=1)
    if predictions:
        axes[2].set_title("\n".join(f"{name}: {p:.1%}" for name, p in predictions[:3]), fontsize=9)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def attention_targets(images, out):
    """One PNG path per input: `<stem>_attention.png`, numbered (`<stem>_2_attention.png`, ...)
    where inputs share a file name, and never the path of an input."""
    inputs = {os.path.realpath(p) for p in images if "://" not in p}
    used, targets = set(), []
    for path in images:
        stem = os.path.splitext(os.path.basename(path.rstrip("/")))[0] or "image"
        target, i = os.path.join(out, f"{stem}_attention.png"), 2
        while target in used or os.path.realpath(target) in inputs:
            target, i = os.path.join(out, f"{stem}_{i}_attention.png"), i + 1
        used.add(target)
        targets.append(target)
    return targets


AttentionFile = collections.namedtuple("AttentionFile", ["image", "png", "top", "numbered"])


def attention_files(model, images, out, head_fusion="mean", discard_ratio=0.0, top=3):
    """Writes one PNG per image file: the image, its rollout heat map, the top predictions.

    Runs on any Keras backend (Pillow decodes). Inputs with the same file name
    get numbered PNGs. A missing, unreadable or undecodable image, a model
    that cannot be loaded, or an `out` that is a file or cannot be written is
    a ValueError naming the path; images are checked before anything is written.

    Args:
        model: keras.Model or str. A model of this package, or a `.keras` file.
        images: list of str. Image files (JPEG, PNG, GIF, BMP, ...).
        out: str. Folder for the PNGs (created).
        head_fusion, discard_ratio: see `rollout`.
        top: int. Predictions shown and returned. Defaults to 3.

    Returns:
        One `AttentionFile(image, png, top, numbered)` per image: `top` is a
        list of `(label, probability)`; `numbered` says the PNG got a number.
    """
    from vit_keras import files, predict

    model = files.load_keras(model)
    height, width = model.input_shape[1:3]
    pixels = np.stack([resize(read_image(path), (height, width)) for path in images])
    files.output_folder(out)
    attn = attention_model(model)  # one forward pass gives logits and weights
    names = predict.label_names(model)
    written = []
    for path, target, image in zip(images, attention_targets(images, out), pixels):
        outputs, weights = attn(preprocess_inputs(image[None]), training=False)
        heat = heatmap_from_weights(model, weights, head_fusion, discard_ratio)[0]
        best = predict.top_k(ops.convert_to_numpy(predict.as_probabilities(model, outputs)), names, top)[0]
        try:
            save_overlay(np.clip(image, 0, 255).astype("uint8"), heat, target, predictions=best)
        except OSError as e:
            raise ValueError(f"cannot write {target}: {e.strerror or e}") from None
        stem = os.path.splitext(os.path.basename(path.rstrip("/")))[0] or "image"
        written.append(AttentionFile(path, target, best, os.path.basename(target) != f"{stem}_attention.png"))
    return written
