"""Loads checkpoints in the original `.npz` format by layer name.

Keys are the original Flax paths joined by '/'. Every key must be accounted
for: missing, unused and mis-shaped keys raise one error listing them all.
"""

import logging
import os
import re
import urllib.parse
import zipfile

import keras
import numpy as np

from vit_keras import presets
from vit_keras.layers import Embeddings, ResNet

logger = logging.getLogger("vit_keras")

POSEMB_KEY = "Transformer/posembed_input/pos_embedding"
_VAR_NAMES = {"gamma": "scale", "beta": "bias"}  # Keras norm weights -> Flax names


def resolve(weights, model=None):
    """Returns a local file for a preset name, a URL or a path.

    URLs and presets are fetched with `keras.utils.get_file` (cached under
    `~/.keras/vit_keras`, or `$KERAS_HOME`), with the sha256 where known.
    """
    if not isinstance(weights, (str, os.PathLike)):
        raise ValueError(f"weights must be a name, path or URL, got {weights!r}.")
    weights = os.fspath(weights)
    sha256 = None
    if weights in presets.WEIGHT_NAMES:
        if model is None:
            raise ValueError(
                f"weights={weights!r} names a published checkpoint set; use a builder "
                "such as vit_keras.vit_r50_b16 or pass a path or URL."
            )
        preset = presets.find_preset(model, weights)
        weights, sha256 = preset.url, preset.sha256
    scheme = urllib.parse.urlparse(weights).scheme
    if scheme in ("http", "https"):
        fname = os.path.basename(urllib.parse.urlparse(weights).path)
        return keras.utils.get_file(
            fname=fname, origin=weights, file_hash=sha256, cache_subdir="vit_keras"
        )
    if os.path.isfile(weights):
        return weights
    raise ValueError(
        f"Unknown weights {weights!r}: not a published checkpoint set "
        f"({', '.join(presets.WEIGHT_NAMES)}), an http(s) URL or an existing file."
    )


def _open_npz(path):
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path} is not an .npz checkpoint ({e}).") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is not an .npz checkpoint (it holds a single array).")
    return data


def read_npz(path):
    """Reads an original `.npz` checkpoint into a dict (no pickles allowed)."""
    with _open_npz(path) as data:
        return {key: data[key] for key in data.files}


def representation_size(path):
    """Returns the width of the checkpoint's `pre_logits` layer, or None."""
    with _open_npz(path) as data:  # reads that one array only
        return int(data["pre_logits/kernel"].shape[-1]) if "pre_logits/kernel" in data.files else None


def _scope(layer):
    """The layer's segment of the checkpoint path."""
    # The original inlines the embedding wrapper and the ResNet at the tree's root.
    if isinstance(layer, (Embeddings, ResNet)):
        return ""
    # Keras forbids '/' in names: unit "block2_unit1" is the original "block2/unit1".
    match = re.fullmatch(r"(block\d+)_(unit\d+)", layer.name)
    return "/".join(match.groups()) if match else layer.name


def _variable_key(layer, variable, prefix):
    # The original keeps the position embedding inside the Transformer scope.
    if isinstance(layer, Embeddings) and variable.name == "pos_embedding":
        return POSEMB_KEY
    return "/".join(p for p in (prefix, _VAR_NAMES.get(variable.name, variable.name)) if p)


def checkpoint_variables(model):
    """Maps each original checkpoint key to the model's variable and its layer."""
    found = {}

    def walk(layer, prefix):
        children = layer._flatten_layers(include_self=False, recursive=False)
        inner = {id(v) for child in children for v in child.weights}
        for variable in layer.weights:
            if id(variable) not in inner:
                found[_variable_key(layer, variable, prefix)] = (variable, layer)
        for child in children:
            scope = _scope(child)
            walk(child, "/".join(p for p in (prefix, scope) if p))

    for layer in model.layers:
        walk(layer, _scope(layer))
    return found


def _squeeze_group_norm(key, value):
    # Published hybrid files store GroupNorm scale/bias as (1, 1, 1, C).
    if re.search(r"(^|/)gn[^/]*/(scale|bias)$", key) and value.ndim == 4:
        return value.reshape(-1)
    return value


def zoom_linear(grid, new_shape):
    """Resizes `[h, w, D]` linearly with corners aligned (as `scipy.ndimage.zoom(order=1)`)."""
    out = np.asarray(grid, dtype=np.float64)
    for axis, new in enumerate(new_shape):
        old = out.shape[axis]
        if old == new:
            continue
        pos = np.arange(new) * ((old - 1) / (new - 1)) if new > 1 else np.zeros(1)
        lo = np.clip(np.floor(pos).astype(int), 0, old - 1)
        hi = np.minimum(lo + 1, old - 1)
        frac = (pos - lo).reshape([-1 if a == axis else 1 for a in range(out.ndim)])
        out = np.take(out, lo, axis) * (1 - frac) + np.take(out, hi, axis) * frac
    return out


def resize_posemb(posemb, grid_shape):
    """Resizes a `[1, 1 + n*n, D]` position embedding to `grid_shape` (rows, cols).

    As the original's `interpolate_posembed`: the class row is kept, the rest
    is reshaped to its square grid, zoomed linearly with corners aligned and
    flattened back.
    """
    cls, grid = posemb[:, :1], posemb[0, 1:]
    old = int(round(np.sqrt(len(grid))))
    if old * old != len(grid):
        raise ValueError(
            f"Cannot resize position embedding {posemb.shape}: its {len(grid)} grid "
            "tokens do not form a square grid."
        )
    grid = zoom_linear(grid.reshape(old, old, -1), grid_shape)
    grid = grid.reshape(1, grid_shape[0] * grid_shape[1], -1).astype(posemb.dtype)
    return np.concatenate([cls, grid], axis=1)


def load_npz(model, path, pretrained_top=True):
    """Loads an original `.npz` checkpoint into a model of this package.

    The position embedding is resized when the grid differs; the head is
    re-initialised (with a log line) when its shape differs or with
    `pretrained_top=False`; a model without a top ignores the checkpoint's
    `head` and `pre_logits`. Anything else missing, unused or mis-shaped
    raises one `ValueError` that lists it all; nothing is assigned then.

    Args:
        model: keras.Model. Built by this package.
        path: str. A local path or URL of an `.npz` file.
        pretrained_top: bool. Load the head when it fits. Defaults to True.
    """
    path = resolve(path)
    params = {k: _squeeze_group_norm(k, v) for k, v in read_npz(path).items()}
    targets = checkpoint_variables(model)
    assign, missing, mismatched, reinit = [], [], [], []
    for key, (variable, layer) in targets.items():
        if key not in params:
            missing.append(f"{key} {tuple(variable.shape)}")
            continue
        value = params[key]
        want = tuple(variable.shape)
        if key == POSEMB_KEY and value.shape != want and value.shape[-1] == want[-1]:
            embeddings = layer
            grid = embeddings.grid_size(model.input_shape[1:3])
            logger.info("Resizing position embedding %s -> %s.", value.shape, want)
            value = resize_posemb(value, grid)
        if key.startswith("head/") and (not pretrained_top or value.shape != want):
            reinit.append((variable, layer, key, value.shape))
            continue
        if value.shape != want:
            mismatched.append(f"{key}: checkpoint {value.shape}, model {want}")
            continue
        assign.append((variable, value))
    has_top = any(k.startswith("head/") for k in targets)
    unused = [
        f"{k} {v.shape}"
        for k, v in params.items()
        if k not in targets and (has_top or not k.startswith(("head/", "pre_logits/")))
    ]
    if missing or unused or mismatched:
        lines = [f"Checkpoint {path} does not fit model {model.name!r}:"]
        for title, items in (("missing", missing), ("unused", unused), ("wrong shape", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in sorted(items))
        if any(k.startswith("pre_logits/") for k in unused):
            lines.append("  (the checkpoint has a pre_logits layer: build with representation_size)")
        raise ValueError("\n".join(lines))
    for variable, value in assign:
        variable.assign(value)
    for variable, layer, key, shape in reinit:
        initializer = layer.kernel_initializer if key.endswith("kernel") else layer.bias_initializer
        variable.assign(initializer(variable.shape, variable.dtype))
        why = "pretrained_top=False" if not pretrained_top else f"checkpoint has {shape}"
        logger.warning("Re-initialised %s %s (%s).", key, tuple(variable.shape), why)
    dropped = [k for k in params if k.startswith(("head/", "pre_logits/")) and k not in targets]
    if dropped:
        logger.info("Model has no top: skipped %s.", ", ".join(sorted(dropped)))
    return model
