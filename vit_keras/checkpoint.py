"""Reads checkpoints in the original `.npz` format and loads them into a model by layer name.

Keys are the original Flax paths joined by '/'. Reading: the file is found
(`resolve`), checked and read (`read`), and the layouts that Google's code
wrote over the years are rewritten to one (the published pre-Linen names) by
small quirk functions (`canonical`). Loading: `load_weights` runs `plan` (the
one place a checkpoint key becomes a variable: `checkpoint_variables` is the
name walk), `adapt` (value quirks: heads, position grid, input channels),
`report` (missing, unused and mis-shaped keys in one error; nothing is
assigned then) and `apply`, under a `LoadPolicy`.
"""

import dataclasses
import logging
import os
import re
import typing
import urllib.parse
import zipfile
import zlib

import numpy as np

from vit_keras import download, presets
from vit_keras.layers import Embeddings
from vit_keras.sizes import is_int

logger = logging.getLogger("vit_keras")

POSEMB_KEY = "Transformer/posembed_input/pos_embedding"
_VAR_NAMES = {"gamma": "scale", "beta": "bias"}  # Keras norm weights -> Flax names
LAYOUTS = ("vit_jax (pre-Linen names, as published)", "vit_jax Linen names", "opt/target/ or params/ prefix",
           "big_vision (root pos_embedding, per-block or stacked encoderblock)")


# ----------------------------------------------------------------------------- finding the file


def resolve(weights, model=None, image_size=None):
    """Returns a local file for a preset name, a URL or a path.

    Preset names need `model` (and pick the file of `image_size` where there
    are several). URLs are fetched once into a cache keyed by the whole URL
    (`vit_keras.download`), verified by sha256 where the preset knows it and
    checked to be a readable `.npz`.
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
        preset = presets.find_preset(model, weights, image_size)
        weights, sha256 = preset.url, preset.sha256
    scheme = urllib.parse.urlparse(weights).scheme
    if scheme in ("http", "https"):
        return download.fetch(weights, sha256=sha256, check=check_npz)
    if os.path.isfile(weights):
        return weights
    raise ValueError(
        f"Unknown weights {weights!r}: not a published checkpoint set "
        f"({', '.join(presets.WEIGHT_NAMES)}), an http(s) URL or an existing file."
    )


# ----------------------------------------------------------------------------- reading it safely


def ignored_keys(keys):
    """Keys a loader skips unread: a big_vision training file's optimizer state and counters.

    big_vision's `load_params` takes `params/` when present; `opt/` (bfloat16
    momentum stored as void `V2`, int32 counts) and `chrono/` (int64 counters)
    are training state, not the model.
    """
    keys = list(keys)
    if not any(k.startswith("params/") for k in keys):
        return set()
    rest = {k for k in keys if not k.startswith("params/")}
    return rest if all(k.startswith(("opt/", "chrono/")) for k in rest) else set()


def _headers(path):
    """{key: (shape, dtype)} from the npy headers of an `.npz`, reading no array data.

    Refuses what is not a zip archive, pickled or non-float arrays, and arrays
    that declare more bytes than the archive holds (a tiny file could
    otherwise ask for gigabytes).
    """
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"\x93NUM":
        raise ValueError(f"{path} is not an .npz checkpoint: it holds a single array (.npy).")
    if magic[:2] != b"PK":
        raise ValueError(
            f"{path} is not an .npz checkpoint: it is not a zip archive (it starts with {magic!r})."
        )
    found = {}
    with zipfile.ZipFile(path) as archive:
        skip = ignored_keys(name[: -len(".npy")] for name in archive.namelist())
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise ValueError(f"{path} is not an .npz checkpoint: it holds {info.filename!r}.")
            key = info.filename[: -len(".npy")]
            if key in skip:
                continue
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(member, max_header_size=10_000)
                header_bytes = member.tell()
            if dtype.hasobject:
                raise ValueError(f"{path}: {key} holds pickled objects; checkpoints are never unpickled.")
            if dtype.kind != "f":
                raise ValueError(f"{path}: {key} has dtype {dtype}; a checkpoint holds floating-point arrays.")
            declared = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            # A deflated member can claim any uncompressed size, but deflate expands at most 1032x.
            available = info.file_size if info.compress_type == zipfile.ZIP_STORED else min(
                info.file_size, 1032 * info.compress_size)
            if declared > available - header_bytes:
                raise ValueError(
                    f"{path}: {key} declares shape {tuple(shape)} ({declared:,} bytes) but the "
                    f"archive holds at most {max(available - header_bytes, 0):,}: the file is corrupt."
                )
            found[key] = (tuple(shape), dtype)
    return found


_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError)


def check_npz(path):
    """Raises ValueError unless `path` is a readable `.npz` of float arrays (headers only)."""
    try:
        return _headers(path)
    except _ZIP_ERRORS as e:
        raise ValueError(f"{path} is not a readable .npz checkpoint ({e}).") from None


def read_npz(path):
    """Reads an `.npz` checkpoint into a dict as stored (no pickles, nothing rewritten)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such checkpoint file.")
    check_npz(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            skip = ignored_keys(data.files)
            return {key: data[key] for key in data.files if key not in skip}
    except _ZIP_ERRORS as e:  # e.g. a bit flipped inside an array: the CRC no longer matches
        raise ValueError(f"{path} is not a readable .npz checkpoint ({e}).") from None


# ----------------------------------------------------------------------------- layout quirks


def _strip_prefix(params):
    # Old Flax optimizer checkpoints hold the weights under opt/target/; newer ones under params/.
    for prefix in ("opt/target/", "params/"):
        if params and all(k.startswith(prefix) for k in params):
            return {k[len(prefix):]: v for k, v in params.items()}
    return params


def _unstack_blocks(params):
    # big_vision's scanned encoder stores all blocks in one encoderblock with a leading layer axis.
    stacked = {k: v for k, v in params.items() if k.startswith("Transformer/encoderblock/")}
    out = {k: v for k, v in params.items() if k not in stacked}
    for key, value in stacked.items():
        rest = key[len("Transformer/encoderblock/"):]
        for i in range(value.shape[0]):
            out[f"Transformer/encoderblock_{i}/{rest}"] = value[i]
    return out


def _root_posemb(params):
    # big_vision keeps pos_embedding at the root and adds it to the patches only, not to
    # the class token: here the class slot gets a zero row, which computes the same.
    if "pos_embedding" not in params:
        return params
    out = dict(params)
    posemb = out.pop("pos_embedding")
    if "cls" in out:
        posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
    out[POSEMB_KEY] = posemb
    return out


# Linen numbers submodules per class (LayerNorm_0, LayerNorm_1, MlpBlock_0); the published
# files number them across classes (LayerNorm_0, MultiHeadDotProductAttention_1, ...).
_LINEN_TO_PUBLISHED = {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
                       "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}
_LINEN_RE = re.compile(r"(encoderblock_\d+/)(" + "|".join(_LINEN_TO_PUBLISHED) + r")/")


def _published_names(params):
    return {_LINEN_RE.sub(lambda m: m.group(1) + _LINEN_TO_PUBLISHED[m.group(2)] + "/", k): v
            for k, v in params.items()}


def _squeeze_group_norm(params):
    # Published hybrid files store GroupNorm scale/bias as (1, 1, 1, C).
    return {k: (v.reshape(-1) if re.search(r"(^|/)gn[^/]*/(scale|bias)$", k) and v.ndim == 4 else v)
            for k, v in params.items()}


def towers(params):
    """Top-level groups that hold a ViT of their own (`img/Transformer/...`): a two-tower file's towers."""
    return sorted({k.split("/")[0] for k in params
                   if "/" in k and k.split("/", 1)[1].startswith(("Transformer/", "embedding/"))})


def select_tower(params, prefix, path="checkpoint"):
    """The subtree `prefix/` of a two-tower file (SigLIP, LiT: `img`, `txt`), or refuses naming the towers."""
    groups = sorted({k.split("/")[0] for k in params if "/" in k})
    if prefix is None:
        found = towers(params)
        if found and not any(k.startswith("Transformer/") for k in params):
            raise ValueError(
                f"{path} holds towers {groups} (a two-tower file, e.g. SigLIP or LiT; a ViT under {found}): "
                f"pass checkpoint_prefix={found[0]!r} for the image tower."
            )
        return params
    prefix = prefix.strip("/")
    out = {k[len(prefix) + 1:]: v for k, v in params.items() if k.startswith(prefix + "/")}
    if not out:
        raise ValueError(f"{path} has no group {prefix!r} (checkpoint_prefix); its groups: {groups}.")
    return out


def canonical(params, path="checkpoint", prefix=None):
    """Rewrites any known layout into the published names; refuses an unknown one."""
    params = select_tower(_strip_prefix(params), prefix, path)
    params = _published_names(_root_posemb(_unstack_blocks(params)))
    params = _squeeze_group_norm(params)
    if not any(k.startswith("Transformer/encoderblock_") for k in params):
        groups = sorted({k.split("/")[0] for k in params})
        raise ValueError(
            f"{path}: unknown checkpoint layout; found top-level groups {groups[:12]}"
            f"{' ...' if len(groups) > 12 else ''} but no Transformer/encoderblock_N. "
            f"Known layouts: {'; '.join(LAYOUTS)}."
        )
    return params


class Checkpoint(typing.NamedTuple):
    """A checkpoint read once: where it came from and its arrays under the published names."""

    path: str
    params: dict


def read(path, prefix=None):
    """Reads a checkpoint file into `{published key: float array}`, validated.

    Every array is checked before anything is used: floating point, finite,
    and no bigger than the file; the layout is rewritten to the published names.
    A training file's `opt/` and `chrono/` are skipped; `prefix` picks a tower.
    """
    params = canonical(read_npz(path), path, prefix)
    return check_finite(params, path)


def check_finite(params, path):
    """Refuses arrays with NaN or Inf, naming them."""
    bad = sorted(k for k, v in params.items() if not np.all(np.isfinite(v)))
    if bad:
        raise ValueError(
            f"{path}: {len(bad)} array(s) hold NaN or Inf values: {', '.join(bad[:8])}"
            f"{' ...' if len(bad) > 8 else ''}. Nothing was loaded."
        )
    return params


def representation_size(params):
    """Width of the checkpoint's `pre_logits` layer, or None."""
    return _outputs(params, "pre_logits")


def head_classes(params):
    """Outputs of the checkpoint's head, or None."""
    return _outputs(params, "head")


# ----------------------------------------------------------------------------- the name walk


def _checkpoint_key(path):
    """A variable's path in the model's layer tree -> its key in the original checkpoint.

    The layer tree is the checkpoint tree (`Transformer/encoderblock_0/...`,
    `resnet/block1/unit1/conv1/kernel`), with three quirks of the original.
    """
    parts = path.split("/")
    # The original keeps the position embedding inside the Transformer scope.
    if parts == ["embeddings", "pos_embedding"]:
        return POSEMB_KEY
    # The original inlines the embedding wrapper and the ResNet at the tree's root.
    if parts[0] == "embeddings":
        parts = parts[2:] if parts[1:2] == ["resnet"] else parts[1:]
    # Keras's LayerNorm weights are Flax's scale and bias.
    return "/".join(parts[:-1] + [_VAR_NAMES.get(parts[-1], parts[-1])])


def checkpoint_variables(model):
    """Maps each original checkpoint key to the model's variable and the top-level layer holding it."""
    found = {}
    for layer in model.layers:
        for variable in layer.weights:
            inner = variable.path[len(layer.path):] if variable.path.startswith(layer.path + "/") else ""
            if not inner:
                raise ValueError(f"Variable {variable.path} is not under its layer's path {layer.path}: "
                                 "the model's layers were not built by this package's builders.")
            found[_checkpoint_key(layer.name + inner)] = (variable, layer)
    return found


# ----------------------------------------------------------------------------- position embedding


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


def posemb_grid(posemb, prefix_tokens=1, grid=None):
    """The (rows, cols) of a checkpoint's position embedding: `grid`, or its square."""
    tokens = posemb.shape[1] - prefix_tokens
    if grid is not None:
        if grid[0] * grid[1] != tokens:
            raise ValueError(f"checkpoint_grid {tuple(grid)} does not hold the {tokens} position tokens.")
        return tuple(grid)
    side = int(round(np.sqrt(tokens)))
    if side * side != tokens:
        raise ValueError(
            f"The checkpoint's position embedding has {tokens} grid tokens, which is not a square "
            "grid: pass checkpoint_grid=(rows, cols)."
        )
    return side, side


def resize_posemb(posemb, grid_shape, prefix_tokens=1, old_grid=None):
    """Resizes a `[1, prefix + h*w, D]` position embedding to `grid_shape` (rows, cols).

    As the original's `load_pretrained`: the class row (if any) is kept, the
    rest is reshaped to its grid (square unless `old_grid` says otherwise),
    zoomed linearly with corners aligned and flattened back.
    """
    old = posemb_grid(posemb, prefix_tokens, old_grid)
    prefix, grid = posemb[:, :prefix_tokens], posemb[0, prefix_tokens:]
    grid = zoom_linear(grid.reshape(*old, -1), grid_shape)
    grid = grid.reshape(1, grid_shape[0] * grid_shape[1], -1).astype(posemb.dtype)
    return np.concatenate([prefix, grid], axis=1)


# ----------------------------------------------------------------------------- loading: plan, adapt, report, apply
#
# `load_weights` is four small steps, in the order of vit_jax's inspect_params -> load_pretrained ->
# interpolate_posembed: `plan` is where a checkpoint key becomes a variable (every key and every
# variable accounted for, the head policy applied), `adapt` rewrites values to their variable's
# layout (one quirk function each), `report` refuses a bad fit in one error, `apply` assigns.


@dataclasses.dataclass(frozen=True)
class LoadPolicy:
    """What `load_weights` does where the model and the checkpoint differ on purpose.

    Args:
        pretrained_top: bool. Load the checkpoint's head where the model's has
            its shape; else, and with False, the head is re-initialised (with
            a log line). Defaults to True.
        keep_pre_logits: bool or None. Whether a model built for the
            checkpoint has its `pre_logits` layer (`top`); None: as `head`
            says (kept with the head, dropped with a new one). Defaults to None.
        checkpoint_grid: (rows, cols) or None. The checkpoint's position
            embedding grid when it is not square. Defaults to None.
        head: presets.HeadPolicy. The checkpoint's top as data: its preset's
            `head`, else the original's rule. Defaults to `HeadPolicy()`.

    Example:
    >>> params = {"head/kernel": np.zeros((64, 10)), "pre_logits/kernel": np.zeros((64, 64))}
    >>> LoadPolicy().top(params, classes=3, include_top=True)  # a new head: pre_logits dropped
    {'classes': 3, 'representation_size': None}
    >>> LoadPolicy().top(params, classes=None, include_top=True)
    {'classes': 10, 'representation_size': 64}
    """

    pretrained_top: bool = True
    keep_pre_logits: bool = None
    checkpoint_grid: tuple = None
    head: presets.HeadPolicy = presets.HeadPolicy()

    def __post_init__(self):
        if not isinstance(self.pretrained_top, (bool, np.bool_)):
            raise ValueError(f"pretrained_top must be True or False, got {self.pretrained_top!r}.")
        if not isinstance(self.keep_pre_logits, (bool, np.bool_, type(None))):
            raise ValueError(f"keep_pre_logits must be True, False or None, got {self.keep_pre_logits!r}.")
        grid = self.checkpoint_grid
        if grid is not None and not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(
                is_int(v) and v > 0 for v in grid)):
            raise ValueError(f"checkpoint_grid must be (rows, cols) of positive integers or None, got {grid!r}.")
        if not isinstance(self.head, presets.HeadPolicy):
            raise ValueError(f"head must be a presets.HeadPolicy, got {self.head!r}.")

    def loads_head(self, params, classes):
        """Whether the checkpoint's head is loaded into a head of `classes` outputs (None: no top)."""
        return self.pretrained_top and classes is not None and _outputs(params, self.head.head) == classes

    def keeps(self, group, params, classes):
        """Whether the checkpoint's layer `group` belongs in a model of `classes` outputs (None: no top)."""
        if _outputs(params, group) is None:
            return False
        if group == "pre_logits" and self.keep_pre_logits is not None:
            return self.keep_pre_logits
        return group not in self.head.tied or self.loads_head(params, classes)

    def top(self, params, classes, include_top=True, representation_size=None, source="checkpoint"):
        """The `build_model` arguments the checkpoint's top decides: `classes` and `representation_size`.

        `classes=None` takes the checkpoint's head classes; `representation_size`
        None takes the checkpoint's `pre_logits` width where it is kept.
        """
        if classes is None and include_top:
            classes = _outputs(params, self.head.head)
            if classes is None:
                raise ValueError(f"{source} has no head: classes=None cannot take its class count; pass classes.")
        if representation_size is None and self.keeps("pre_logits", params, classes if include_top else None):
            representation_size = _outputs(params, "pre_logits")
        return dict(classes=classes, representation_size=representation_size)


def _outputs(params, group):
    """The output width of the checkpoint's layer `group` (its kernel's last axis), or None where it has none."""
    kernel = params.get(f"{group}/kernel")
    return None if kernel is None else int(kernel.shape[-1])


def _group(key):
    return key.split("/", 1)[0]


class Plan(typing.NamedTuple):
    """Every checkpoint key and every model variable, accounted for by `plan` (values adapted by `adapt`).

    load: {key: (variable, value)} to assign; fresh: {key: (variable, layer,
    why)} re-initialised by the policy (a new head); dropped: {key: why}
    checkpoint keys the policy leaves out; missing: {key: variable shape};
    unused: {key: checkpoint shape}; notes: (quirk, key, old shape, new
    shape) for each value `adapt` rewrote.
    """

    load: dict
    fresh: dict
    dropped: dict
    missing: dict
    unused: dict
    notes: tuple = ()


def plan(model, params, policy=LoadPolicy()):
    """Pairs each checkpoint key with the model's variable of that name; the one place a key becomes a variable.

    The head (`policy.head.head`) is loaded only where `policy.loads_head` and
    its shapes fit; otherwise its variables are re-initialised, and the
    checkpoint's layers tied to it are dropped when the model has none.
    Nothing is checked for shape here (`adapt` may still reshape).
    """
    targets = checkpoint_variables(model)  # {key: (variable, its top-level layer)}
    head = policy.head.head
    classes = targets[f"{head}/kernel"][0].shape[-1] if f"{head}/kernel" in targets else None
    head_fits = policy.loads_head(params, classes) and all(
        tuple(params[k].shape) == tuple(variable.shape)
        for k, (variable, _) in targets.items() if _group(k) == head and k in params)
    load, fresh, missing = {}, {}, {}
    for key, (variable, layer) in targets.items():
        if _group(key) == head and not head_fits:
            why = ("pretrained_top=False" if not policy.pretrained_top
                   else f"checkpoint has {tuple(params[key].shape)}" if key in params else "checkpoint has no head")
            fresh[key] = (variable, layer, why)
        elif key in params:
            load[key] = (variable, params[key])
        else:
            missing[key] = tuple(variable.shape)
    groups = {_group(k) for k in targets}
    dropped = {}
    for key in params:
        if key in targets or _group(key) in groups:
            continue
        if _group(key) == head:
            dropped[key] = "the model has no top"
        elif _group(key) in policy.head.tied and not head_fits:
            dropped[key] = ("the head is new, as the original's load_pretrained does; keep it with "
                            "keep_pre_logits=True")
    unused = {k: tuple(v.shape) for k, v in params.items() if k not in targets and k not in dropped}
    return Plan(load, fresh, dropped, missing, unused)


# Each quirk: (key, value, the variable's shape, `_Layout` of the model) -> value in the variable's layout.


class _Layout(typing.NamedTuple):
    """What the quirks need to know of the model (read once by `adapt`)."""

    grid: tuple  # the position embedding's (rows, cols) at the model's input size
    prefix_tokens: int  # 1 with a class token, else 0
    first_conv: str  # the key of the kernel that sees the image
    checkpoint_grid: tuple  # the policy's


_ATTENTION_RE = re.compile(r"MultiHeadDotProductAttention_\d+/(query|key|value|out)/(kernel|bias)$")


def _split_heads(key, value, want, layout):
    # torch sources (timm, Hugging Face) store attention as (D, D) matrices: the split into
    # heads is row-major, as their forward pass views it, so it is the model's to make.
    if _ATTENTION_RE.search(key) and value.ndim < len(want) and value.size == int(np.prod(want)):
        return value.reshape(want)
    return value


def _resize_grid(key, value, want, layout):
    # The original fine-tunes at other resolutions by zooming the position grid (load_pretrained).
    if key != POSEMB_KEY or value.shape[-1] != want[-1]:
        return value
    tokens = value.shape[1] - layout.prefix_tokens
    if layout.checkpoint_grid is None and value.shape == want and round(np.sqrt(tokens)) ** 2 != tokens:
        return value  # a non-square grid of the model's token count: trained at this size
    old = posemb_grid(value, layout.prefix_tokens, layout.checkpoint_grid)
    if old == layout.grid:  # resize whenever the layout differs, not only the token count
        return value
    return resize_posemb(value, layout.grid, layout.prefix_tokens, old)


def first_conv_key(embeddings):
    """The checkpoint key of the kernel that sees the image: the ResNet root's, else the patch embedding's."""
    return "conv_root/kernel" if embeddings.resnet_layers is not None else "embedding/kernel"


def _adapt_input_channels(key, value, want, layout):
    # A 3-channel checkpoint in a model of other input channels: timm's adapt_input_conv.
    if key != layout.first_conv or value.ndim != 4 or value.shape[2] != 3 or want[2] == 3:
        return value
    from vit_keras import reshape  # reshape imports this module

    return reshape.adapt_input_kernel(value, want[2])


QUIRKS = (_split_heads, _resize_grid, _adapt_input_channels)


def adapt(plan, model, policy=LoadPolicy()):
    """Returns `plan` with each value rewritten to its variable's layout by the `QUIRKS`, in order."""
    embeddings = model.get_layer("embeddings")
    layout = _Layout(grid=embeddings.grid_size(model.input_shape[1:3]), prefix_tokens=int(embeddings.class_token),
                     first_conv=first_conv_key(embeddings),
                     checkpoint_grid=policy.checkpoint_grid and tuple(policy.checkpoint_grid))
    load, notes = {}, list(plan.notes)
    for key, (variable, value) in plan.load.items():
        want = tuple(variable.shape)
        for quirk in QUIRKS:
            new = quirk(key, value, want, layout)
            if new is not value:
                notes.append((quirk.__name__.strip("_"), key, tuple(value.shape), tuple(new.shape)))
            value = new
        load[key] = (variable, value)
    return plan._replace(load=load, notes=tuple(notes))


def _hints(plan):
    """One line per known mismatch of the model's kind and the checkpoint's, or none."""
    lines = []
    if POSEMB_KEY in plan.missing and any(k.startswith("Transformer/") for k in plan.load):
        lines.append("  (the checkpoint has no position embedding: a big_vision posemb='sincos2d' model)")
    if any(k.startswith("MAPHead_0/") for k in plan.unused):
        lines.append("  (the checkpoint pools with a MAP head: classifier='map')")
    if "cls" in plan.missing:
        lines.append("  (the checkpoint has no class token: classifier='gap' or 'map')")
    return lines


def report(plan, model_name="model", source="checkpoint", policy=LoadPolicy()):
    """Raises one ValueError listing every missing, unused and mis-shaped key; returns `plan` when all fit."""
    wrong = [f"{k}: checkpoint {tuple(value.shape)}, model {tuple(variable.shape)}"
             for k, (variable, value) in plan.load.items() if tuple(value.shape) != tuple(variable.shape)]
    if not (plan.missing or plan.unused or wrong):
        return plan
    lines = [f"Checkpoint {source} does not fit model {model_name!r}:"]
    for title, items in (("missing", [f"{k} {s}" for k, s in plan.missing.items()]),
                         ("unused", [f"{k} {s}" for k, s in plan.unused.items()]), ("wrong shape", wrong)):
        if items:
            lines += [f"  {title} ({len(items)}):", *(f"    {item}" for item in sorted(items))]
    if any(_group(k) in policy.head.tied for k in plan.unused):
        lines.append(f"  (the checkpoint's head was trained on its {'/'.join(policy.head.tied)} layer: keep it "
                     "with keep_pre_logits=True, or re-initialise the head with pretrained_top=False)")
    lines += _hints(plan)
    raise ValueError("\n".join(lines))


def apply(plan):
    """Assigns the planned values and re-initialises the policy's fresh variables, with log lines."""
    for variable, value in plan.load.values():
        variable.assign(value)
    for key, (variable, layer, why) in plan.fresh.items():
        initializer = layer.kernel_initializer if key.endswith("kernel") else layer.bias_initializer
        variable.assign(initializer(variable.shape, variable.dtype))
        logger.warning("Re-initialised %s %s (%s).", key, tuple(variable.shape), why)
    for quirk in dict.fromkeys(note[0] for note in plan.notes):
        notes = [note for note in plan.notes if note[0] == quirk]
        if len(notes) > 2:
            logger.info("Adapted %d arrays (%s).", len(notes), quirk)
        for _, key, old, new in notes if len(notes) <= 2 else ():
            logger.info("Adapted %s %s -> %s (%s).", key, old, new, quirk)
    for group, why in {_group(k): why for k, why in plan.dropped.items()}.items():
        logger.info("Dropped the checkpoint's %s layer (%s).", group, why)


def _embeddings_of(model, source):
    """The model's `Embeddings` layer; ValueError for a model this loader cannot fill right."""
    try:
        layer = model.get_layer("embeddings")
    except (ValueError, AttributeError):
        layer = None
    if not isinstance(layer, Embeddings):
        raise ValueError(f"Cannot load {source} into {getattr(model, 'name', model)!r}: it is not a model of "
                         "this package (build it with vit_keras.create, a vit_* builder or build_model).")
    # A folded copy stores standardised kernels: the checkpoint's raw ones would skip the standardisation.
    if layer.prestandardized:
        raise ValueError(f"Cannot load {source} into {model.name!r}: its ResNet kernels are folded "
                         "(fold_weight_standardization, an inference copy). Load into the model first, then fold.")
    return layer


def load_weights(model, checkpoint, policy=None):
    """Loads a checkpoint into a model of this package: `plan`, `adapt`, `report`, `apply`.

    Any layout and source `vit_keras.sources` reads loads (original and
    big_vision `.npz`, timm, Hugging Face, Orbax). The position embedding is
    resized whenever the token grid differs; a 3-channel first convolution
    is adapted to the model's input channels; the head is re-initialised
    (with a log line) when its shape differs or with
    `policy.pretrained_top=False`, and the layers tied to it (`pre_logits`)
    are dropped then when the model has none. Anything else missing, unused
    or mis-shaped raises one `ValueError` listing it all; nothing is assigned
    then.

    Args:
        model: keras.Model. Built by this package (`create`, a builder,
            `build_model`).
        checkpoint: `Checkpoint`, or str. A checkpoint read once (as
            `create` does; `sources.load(...).checkpoint`), or a path or URL
            read here.
        policy: LoadPolicy or None. Head, `pre_logits` and grid choices;
            None: `LoadPolicy()`. Defaults to None.

    Example:
    >>> import vit_keras
    >>> model = vit_keras.build_model(32, 16, 2, 64, 4, 128, classes=3)
    >>> path = "tests/fixtures/vit_jax/tiny_vit/params.npz"  # 10 classes: a new head
    >>> vit_keras.load_weights(model, path, LoadPolicy()).output_shape
    (None, 3)
    """
    policy = LoadPolicy() if policy is None else policy
    if not isinstance(policy, LoadPolicy):
        raise ValueError(f"policy must be a vit_keras.LoadPolicy or None, got {policy!r}.")
    if not isinstance(checkpoint, Checkpoint):
        from vit_keras import sources  # sources imports this module

        checkpoint = sources.load(checkpoint).checkpoint
    _embeddings_of(model, checkpoint.path)
    steps = adapt(plan(model, checkpoint.params, policy), model, policy)
    apply(report(steps, model.name, checkpoint.path, policy))
    return model


def assign(model, params, pretrained_top=True, checkpoint_grid=None, source="checkpoint"):
    """`load_weights` of canonical `params` (from `read`) under the policy of these arguments."""
    return load_weights(model, Checkpoint(source, params), LoadPolicy(pretrained_top, checkpoint_grid=checkpoint_grid))


def load_npz(model, path, pretrained_top=True, checkpoint_grid=None):
    """Loads an original `.npz` checkpoint into a model of this package (`load_weights` of an `.npz`).

    Any known layout loads (published pre-Linen names, Linen names,
    `opt/target/` or `params/` prefixes, big_vision's); see `load_weights` for
    what is resized, re-initialised, dropped or refused.

    Args:
        model: keras.Model. Built by this package.
        path: str. A local path or URL of an `.npz` file.
        pretrained_top: bool. Load the head when it fits. Defaults to True.
        checkpoint_grid: (rows, cols) or None. The checkpoint's position-embedding
            grid when it is not square. Defaults to None.
    """
    path = resolve(path)
    return assign(model, read(path), pretrained_top, checkpoint_grid, source=path)
