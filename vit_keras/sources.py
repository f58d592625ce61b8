"""Checkpoints from every source, read into the published key names (`checkpoint.canonical`).

- Google's `.npz` (vit_jax, big_vision, training files, two-tower files): `vit_keras.checkpoint`.
- timm state_dicts (`model.safetensors`) and Hugging Face `transformers` folders (`config.json` +
  `model.safetensors`): a name walk with one translation table per source, below. The files are read
  by a small numpy reader of the safetensors format (no torch, no pickles).
- Orbax / tensorstore folders (vit_jax's `checkpoint_<step>/`, big_vision's `checkpoint.bv-<step>/`):
  read with `orbax-checkpoint` (the `orbax` extra) into the same flat tree.

Each source also brings its numerics (`Source.numerics`, fields of `ViTConfig`): torch's exact GELU,
timm's GroupNorm and weight-standardisation epsilons, Hugging Face's LayerNorm epsilon.
"""

import json
import os
import re
import typing
import warnings

import numpy as np

from vit_keras import checkpoint
from vit_keras.sizes import height_width, is_int

TIMM_NUMERICS = dict(layer_norm_epsilon=1e-6, gelu_approximate=False, ws_epsilon=1e-8, gn_epsilon=1e-5)
ORBAX_EXTRA = "pip install 'vit_keras[orbax]'"


class Source(typing.NamedTuple):
    """A checkpoint read from any source: the arrays under the published names and what it says of itself."""

    checkpoint: checkpoint.Checkpoint  # (path, {published key: float32 array})
    kind: str  # "npz", "timm", "transformers" or "orbax"
    numerics: dict  # ViTConfig fields the source fixes (empty: Google's)
    config: dict = None  # architecture fields the source records (Hugging Face's config.json), else None
    class_names: list = None  # Hugging Face's id2label, when it names the classes


# ----------------------------------------------------------------------------- safetensors


_ST_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_MAX_HEADER = 100 << 20


def read_safetensors(path):
    """Reads a `.safetensors` file into `{name: float32 array}`, checking it as hostile input.

    The format: an 8-byte little-endian header length n, n bytes of JSON
    `{name: {"dtype", "shape", "data_offsets": [begin, end]}}` (offsets into
    the data after the header), then the raw little-endian bytes. Every entry
    is checked against the file before any array is read: a floating-point
    dtype, a shape whose byte size equals its span, spans inside the file
    that do not overlap.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file: it is {size} bytes long.")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise ValueError(f"{path} is not a safetensors file: its header claims {n:,} bytes of {size:,}.")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({e}).") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path} is not a safetensors file: its header is not a JSON object.")
        header.pop("__metadata__", None)
        data_size = size - 8 - n
        spans = []
        for name, entry in header.items():
            ok = (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                  and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)
                  and all(is_int(d) and d >= 0 for d in entry["shape"])
                  and len(entry["data_offsets"]) == 2 and all(is_int(o) for o in entry["data_offsets"]))
            if not ok:
                raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}.")
            if entry["dtype"] not in _ST_DTYPES:
                raise ValueError(f"{path}: {name} has dtype {entry['dtype']}; a checkpoint holds floating-point "
                                 f"arrays ({', '.join(_ST_DTYPES)}).")
            begin, end = entry["data_offsets"]
            want = int(np.prod(entry["shape"], dtype=np.int64)) * _ST_DTYPES[entry["dtype"]].itemsize
            if not 0 <= begin <= end <= data_size or end - begin != want:
                raise ValueError(f"{path}: {name} declares shape {tuple(entry['shape'])} ({want:,} bytes) at bytes "
                                 f"[{begin}, {end}) of {data_size:,}: the file is corrupt.")
            spans.append((begin, end, name))
        spans.sort()
        for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
            if begin < end:
                raise ValueError(f"{path}: tensors {a} and {b} overlap: the file is corrupt.")
        out = {}
        for begin, end, name in spans:
            entry = header[name]
            f.seek(8 + n + begin)
            raw = np.frombuffer(f.read(end - begin), dtype=_ST_DTYPES[entry["dtype"]])
            if entry["dtype"] == "BF16":  # bfloat16 is the top half of a float32
                raw = (raw.astype("<u4") << 16).view("<f4")
            out[name] = raw.astype("float32").reshape(entry["shape"])
    return out


# ----------------------------------------------------------------------------- torch layouts


def _linear(w):
    # torch's Linear stores (out, in); the checkpoint tree's kernels are (in, out).
    return np.ascontiguousarray(w.T)


def _conv(w):
    # torch's convs are OIHW; Keras's (and Flax's) HWIO.
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _same(w):
    return w


_BLOCK = "Transformer/encoderblock_{0}/"
_TIMM = [  # (torch name, published name, transform); {0}, {1} are the numbers the pattern captured
    (r"cls_token", "cls", _same),
    (r"pos_embed", checkpoint.POSEMB_KEY, _same),
    (r"patch_embed\.proj\.weight", "embedding/kernel", _conv),
    (r"patch_embed\.proj\.bias", "embedding/bias", _same),
    (r"patch_embed\.backbone\.stem\.conv\.weight", "conv_root/kernel", _conv),
    (r"patch_embed\.backbone\.stem\.norm\.weight", "gn_root/scale", _same),
    (r"patch_embed\.backbone\.stem\.norm\.bias", "gn_root/bias", _same),
    (r"patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.conv([123])\.weight", "block{0+}/unit{1+}/conv{2}/kernel",
     _conv),
    (r"patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.norm([123])\.weight", "block{0+}/unit{1+}/gn{2}/scale",
     _same),
    (r"patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.norm([123])\.bias", "block{0+}/unit{1+}/gn{2}/bias", _same),
    (r"patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.downsample\.conv\.weight",
     "block{0+}/unit{1+}/conv_proj/kernel", _conv),
    (r"patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.downsample\.norm\.weight",
     "block{0+}/unit{1+}/gn_proj/scale", _same),
    (r"patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.downsample\.norm\.bias",
     "block{0+}/unit{1+}/gn_proj/bias", _same),
    (r"blocks\.(\d+)\.norm1\.weight", _BLOCK + "LayerNorm_0/scale", _same),
    (r"blocks\.(\d+)\.norm1\.bias", _BLOCK + "LayerNorm_0/bias", _same),
    (r"blocks\.(\d+)\.attn\.qkv\.weight", _BLOCK + "MultiHeadDotProductAttention_1/{{}}/kernel", "qkv_kernel"),
    (r"blocks\.(\d+)\.attn\.qkv\.bias", _BLOCK + "MultiHeadDotProductAttention_1/{{}}/bias", "qkv_bias"),
    (r"blocks\.(\d+)\.attn\.proj\.weight", _BLOCK + "MultiHeadDotProductAttention_1/out/kernel", _linear),
    (r"blocks\.(\d+)\.attn\.proj\.bias", _BLOCK + "MultiHeadDotProductAttention_1/out/bias", _same),
    (r"blocks\.(\d+)\.norm2\.weight", _BLOCK + "LayerNorm_2/scale", _same),
    (r"blocks\.(\d+)\.norm2\.bias", _BLOCK + "LayerNorm_2/bias", _same),
    (r"blocks\.(\d+)\.mlp\.fc1\.weight", _BLOCK + "MlpBlock_3/Dense_0/kernel", _linear),
    (r"blocks\.(\d+)\.mlp\.fc1\.bias", _BLOCK + "MlpBlock_3/Dense_0/bias", _same),
    (r"blocks\.(\d+)\.mlp\.fc2\.weight", _BLOCK + "MlpBlock_3/Dense_1/kernel", _linear),
    (r"blocks\.(\d+)\.mlp\.fc2\.bias", _BLOCK + "MlpBlock_3/Dense_1/bias", _same),
    (r"norm\.weight", "Transformer/encoder_norm/scale", _same),
    (r"norm\.bias", "Transformer/encoder_norm/bias", _same),
    (r"head\.weight", "head/kernel", _linear),
    (r"head\.bias", "head/bias", _same),
]
_HF_LAYER = r"vit\.encoder\.layer\.(\d+)\."
_HF = [
    (r"vit\.embeddings\.cls_token", "cls", _same),
    (r"vit\.embeddings\.position_embeddings", checkpoint.POSEMB_KEY, _same),
    (r"vit\.embeddings\.patch_embeddings\.projection\.weight", "embedding/kernel", _conv),
    (r"vit\.embeddings\.patch_embeddings\.projection\.bias", "embedding/bias", _same),
    *[(_HF_LAYER + rf"attention\.attention\.{n}\.weight", _BLOCK + f"MultiHeadDotProductAttention_1/{n}/kernel",
       _linear) for n in ("query", "key", "value")],
    *[(_HF_LAYER + rf"attention\.attention\.{n}\.bias", _BLOCK + f"MultiHeadDotProductAttention_1/{n}/bias", _same)
      for n in ("query", "key", "value")],
    (_HF_LAYER + r"attention\.output\.dense\.weight", _BLOCK + "MultiHeadDotProductAttention_1/out/kernel", _linear),
    (_HF_LAYER + r"attention\.output\.dense\.bias", _BLOCK + "MultiHeadDotProductAttention_1/out/bias", _same),
    (_HF_LAYER + r"layernorm_before\.weight", _BLOCK + "LayerNorm_0/scale", _same),
    (_HF_LAYER + r"layernorm_before\.bias", _BLOCK + "LayerNorm_0/bias", _same),
    (_HF_LAYER + r"layernorm_after\.weight", _BLOCK + "LayerNorm_2/scale", _same),
    (_HF_LAYER + r"layernorm_after\.bias", _BLOCK + "LayerNorm_2/bias", _same),
    (_HF_LAYER + r"intermediate\.dense\.weight", _BLOCK + "MlpBlock_3/Dense_0/kernel", _linear),
    (_HF_LAYER + r"intermediate\.dense\.bias", _BLOCK + "MlpBlock_3/Dense_0/bias", _same),
    (_HF_LAYER + r"output\.dense\.weight", _BLOCK + "MlpBlock_3/Dense_1/kernel", _linear),
    (_HF_LAYER + r"output\.dense\.bias", _BLOCK + "MlpBlock_3/Dense_1/bias", _same),
    (r"vit\.layernorm\.weight", "Transformer/encoder_norm/scale", _same),
    (r"vit\.layernorm\.bias", "Transformer/encoder_norm/bias", _same),
    # ViTModel's pooler is a Dense + tanh on the class token: the published files' pre_logits.
    (r"vit\.pooler\.dense\.weight", "pre_logits/kernel", _linear),
    (r"vit\.pooler\.dense\.bias", "pre_logits/bias", _same),
    (r"classifier\.weight", "head/kernel", _linear),
    (r"classifier\.bias", "head/bias", _same),
]
# transformers 5 names its modules anew (`vit.layers.N.attention.q_proj`, `mlp.fc1`); `save_pretrained` still
# writes the names above, but a `save_file(model.state_dict())` has these.
_HF_LAYERS = r"vit\.layers\.(\d+)\."
_HF += [
    *[(_HF_LAYERS + rf"attention\.{p}_proj\.weight", _BLOCK + f"MultiHeadDotProductAttention_1/{n}/kernel", _linear)
      for p, n in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out"))],
    *[(_HF_LAYERS + rf"attention\.{p}_proj\.bias", _BLOCK + f"MultiHeadDotProductAttention_1/{n}/bias", _same)
      for p, n in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out"))],
    *[(_HF_LAYERS + rf"{a}\.{w}", _BLOCK + f"{b}/{v}", _same) for a, b in (
        ("layernorm_before", "LayerNorm_0"), ("layernorm_after", "LayerNorm_2")) for w, v in (
        ("weight", "scale"), ("bias", "bias"))],
    (_HF_LAYERS + r"mlp\.fc1\.weight", _BLOCK + "MlpBlock_3/Dense_0/kernel", _linear),
    (_HF_LAYERS + r"mlp\.fc1\.bias", _BLOCK + "MlpBlock_3/Dense_0/bias", _same),
    (_HF_LAYERS + r"mlp\.fc2\.weight", _BLOCK + "MlpBlock_3/Dense_1/kernel", _linear),
    (_HF_LAYERS + r"mlp\.fc2\.bias", _BLOCK + "MlpBlock_3/Dense_1/bias", _same),
]
_TABLES = {"timm": [(re.compile(p + "$"), t, f) for p, t, f in _TIMM],
           "transformers": [(re.compile(p + "$"), t, f) for p, t, f in _HF]}


def _target(template, groups):
    # "{0+}" is a torch index (from 0) as a checkpoint number (from 1): timm's stages[0] is block1.
    def sub(m):
        value = int(groups[int(m.group(1))])
        return str(value + 1 if m.group(2) else value)

    return re.sub(r"\{(\d)(\+?)\}", sub, template).replace("{{}}", "{}")


def translate(state, kind, path="checkpoint"):
    """A torch state_dict of `kind` ("timm", "transformers") -> published names and layouts.

    Names no rule knows are kept as they are, so the strict accounting of
    `checkpoint.load_weights` (`report`) lists them as unused and nothing loads.
    """
    out = {}
    for name, value in state.items():
        for pattern, template, transform in _TABLES[kind]:
            m = pattern.match(name)
            if not m:
                continue
            target = _target(template, m.groups())
            if transform in ("qkv_kernel", "qkv_bias"):  # timm fuses q, k and v into one Linear
                if value.shape[0] % 3:
                    raise ValueError(f"{path}: {name} {value.shape} does not split into query, key and value.")
                for part, n in zip(np.split(value, 3, axis=0), ("query", "key", "value")):
                    out[target.format(n)] = _linear(part) if transform == "qkv_kernel" else part
            else:
                out[target] = transform(value)
            break
        else:
            out[name] = value
    return out


def _kind_of(keys, path):
    """Which torch library wrote a state_dict, from its names."""
    if any(k.startswith("vit.") for k in keys):
        return "transformers"
    if any(k.startswith(("patch_embed.", "blocks.")) for k in keys):
        return "timm"
    if any(k.startswith(("embeddings.patch_embeddings", "encoder.layer.", "layers.")) for k in keys):
        return "transformers_base"
    groups = sorted({k.split(".")[0] for k in keys})
    raise ValueError(f"{path}: unknown safetensors layout; found top-level names {groups[:12]}. Known: timm "
                     "VisionTransformer state_dicts (patch_embed., blocks.) and Hugging Face ViT (vit.).")


# ----------------------------------------------------------------------------- Hugging Face folders

# Hugging Face's activation names -> the tanh form or not.
_HF_GELU = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True}


def read_hf_config(folder):
    """`config.json` of a `transformers` ViT folder -> (architecture fields, numerics, class names)."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            c = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable transformers config.json ({e}).") from None
    if not isinstance(c, dict) or c.get("model_type") != "vit":
        kind = c.get("model_type") if isinstance(c, dict) else None
        raise ValueError(f"{path}: model_type {kind!r} is not a transformers ViT ('vit'); only ViTModel and "
                         "ViTForImageClassification folders load.")
    act = c.get("hidden_act", "gelu")
    if act not in _HF_GELU:
        raise ValueError(f"{path}: hidden_act {act!r} is not a GELU; known: {sorted(_HF_GELU)}.")
    if c.get("num_channels", 3) != 3 or not c.get("qkv_bias", True):
        raise ValueError(f"{path}: num_channels must be 3 and qkv_bias true (got {c.get('num_channels')}, "
                         f"{c.get('qkv_bias')}).")
    try:
        patch = c.get("patch_size", 16)
        patch = int(patch if isinstance(patch, int) else patch[0])
        size = c.get("image_size", 224)
        size = height_width(size)
        arch = dict(patch_size=patch, num_layers=int(c["num_hidden_layers"]), hidden_size=int(c["hidden_size"]),
                    num_heads=int(c["num_attention_heads"]), mlp_dim=int(c["intermediate_size"]),
                    classifier="token", image_size=size)
        numerics = dict(layer_norm_epsilon=float(c.get("layer_norm_eps", 1e-12)), gelu_approximate=_HF_GELU[act])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ValueError(f"{path}: a ViT config needs num_hidden_layers, hidden_size, num_attention_heads, "
                         f"intermediate_size ({e!r}).") from None
    labels = c.get("id2label") or {}
    names = None
    try:
        names = [str(labels[str(i)]) for i in range(len(labels))]
    except KeyError:
        names = None
    if names and all(n == f"LABEL_{i}" for i, n in enumerate(names)):  # transformers' placeholders
        names = None
    return arch, numerics, names


def _hf_folder_state(folder):
    """The state_dict of a `transformers` folder: `model.safetensors` or its shards (never a pickle)."""
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return read_safetensors(single)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        state = {}
        for shard in shards:
            if os.path.basename(shard) != shard:
                raise ValueError(f"{index}: shard {shard!r} is not a file name in the folder.")
            state.update(read_safetensors(os.path.join(folder, shard)))
        return state
    raise ValueError(f"{folder}: a transformers folder needs model.safetensors (pytorch_model.bin is a pickle "
                     "and is never read: re-save it with save_pretrained(safe_serialization=True)).")


# ----------------------------------------------------------------------------- Orbax folders


def is_orbax_folder(folder):
    """An Orbax / tensorstore checkpoint folder (vit_jax's checkpoint_<step>/, big_vision's checkpoint.bv-<step>/)."""
    names = set(os.listdir(folder))
    return bool(names & {"_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint", "d"}) or any(
        n.startswith("ocdbt.process") for n in names)


def read_orbax(folder):
    """Restores an Orbax checkpoint folder into `{"a/b/c": float array}` with orbax-checkpoint, on the CPU."""
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise ValueError(f"{folder} is an Orbax checkpoint folder; reading it needs orbax-checkpoint and "
                         f"tensorstore: {ORBAX_EXTRA}") from None
    try:
        with warnings.catch_warnings():  # "sharding info not provided": restored on this host's CPU, as wanted
            warnings.simplefilter("ignore")
            tree = ocp.PyTreeCheckpointer().restore(os.path.abspath(folder))
    except Exception as e:  # orbax raises many kinds; one line naming the folder
        raise ValueError(f"{folder}: Orbax could not restore it ({type(e).__name__}: {e}).") from None
    flat = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}/")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{prefix}{i}/")
        elif node is not None:
            flat[prefix[:-1]] = np.asarray(node)

    walk(tree, "")
    return flat


def _vit_jax_train_state(flat):
    # vit_jax's train.py saves the tuple (params, opt_state, step): Flax names its parts "0", "1", "2".
    if "2" in flat and all(k == "2" or k.startswith(("0/", "1/")) for k in flat) and any(
            k.startswith("0/Transformer/") for k in flat):
        return {k[2:]: v for k, v in flat.items() if k.startswith("0/")}
    return flat


def _training_state(flat):
    # Beside params/, a Flax TrainState or a big_vision-style state keeps the optimizer and counters.
    if not any(k.startswith("params/") for k in flat):
        return flat
    return {k: v for k, v in flat.items() if not (k in ("step", "count") or k.startswith(
        ("opt/", "chrono/", "opt_state/")))}


def _orbax_params(folder, prefix):
    flat = _training_state(_vit_jax_train_state(read_orbax(folder)))
    bad = sorted(k for k, v in flat.items() if v.dtype.kind != "f")
    if bad:
        raise ValueError(f"{folder}: {', '.join(bad[:8])} hold {flat[bad[0]].dtype} values; a checkpoint holds "
                         "floating-point arrays.")
    params = checkpoint.canonical({k: v.astype("float32") for k, v in flat.items()}, folder, prefix)
    return checkpoint.check_finite(params, folder)


# ----------------------------------------------------------------------------- big_vision's tensorstore folders


def _zarr_driver(leaf):
    names = set(os.listdir(leaf)) if os.path.isdir(leaf) else set()
    return "zarr" if ".zarray" in names else "zarr3" if "zarr.json" in names else None


def is_big_vision_ts(folder):
    """big_vision's `checkpoint.bv-<step>/`: one zarr array per leaf, named by its path with "~" for "/"."""
    return any(_zarr_driver(os.path.join(folder, n)) for n in os.listdir(folder))


def big_vision_ts_step(path):
    """`.../checkpoint.bv` (big_vision's prefix, with a `-LAST` file beside it) -> the step folder it names."""
    last = f"{path}-LAST"
    if os.path.isdir(path) or not os.path.isfile(last):
        return None
    with open(last, encoding="utf-8") as f:
        step = f.read().strip()
    if not re.fullmatch(r"\d+(-tmp)?", step):
        raise ValueError(f"{last} names {step!r}, not a step folder.")
    return f"{path}-{step}"


def read_big_vision_ts(folder):
    """Reads the `params` arrays of a big_vision tensorstore checkpoint folder (its `opt~`, `chrono~` unread)."""
    try:
        import tensorstore as ts
    except ImportError:
        raise ValueError(f"{folder} is a big_vision tensorstore checkpoint; reading it needs tensorstore: "
                         f"{ORBAX_EXTRA}") from None
    leaves = sorted(n for n in os.listdir(folder) if _zarr_driver(os.path.join(folder, n)))
    params = [n for n in leaves if n.startswith("params~")]  # big_vision's load_params reads params/ only
    out = {}
    for name in params or leaves:
        leaf = os.path.abspath(os.path.join(folder, name))
        try:
            store = ts.open({"driver": _zarr_driver(leaf), "kvstore": {"driver": "file", "path": leaf}},
                            open=True, read=True).result()
            if store.dtype.numpy_dtype.kind not in "fV" or store.dtype.name not in (
                    "float16", "bfloat16", "float32", "float64"):
                raise ValueError(f"{folder}: {name.replace('~', '/')} has dtype {store.dtype.name}; a checkpoint "
                                 "holds floating-point arrays.")
            out[name.replace("~", "/")] = np.asarray(store.read().result()).astype("float32")
        except ValueError as e:
            if str(e).startswith(str(folder)):
                raise
            raise ValueError(f"{folder}: tensorstore could not read {name} ({e}).") from None
    return out


# ----------------------------------------------------------------------------- one entry point


def load(weights, model=None, image_size=None, prefix=None):
    """Reads `weights` (preset name, URL, `.npz`, `.safetensors`, `transformers` or Orbax folder) -> `Source`.

    The kind is taken from the file itself (a folder's files, the npz/safetensors
    magic), never from its name alone.

    Args:
        weights: str or os.PathLike. What to read.
        model: str or None. The builder name, for a published weights name.
        image_size: int, (h, w) or None. Picks among published resolutions.
        prefix: str or None. The tower of a two-tower file ("img").
    """
    if isinstance(weights, (str, os.PathLike)):
        weights = big_vision_ts_step(os.fspath(weights)) or weights
    if isinstance(weights, (str, os.PathLike)) and os.path.isdir(weights):
        folder = os.fspath(weights)
        if os.path.isfile(os.path.join(folder, "config.json")):
            arch, numerics, names = read_hf_config(folder)
            state = _hf_folder_state(folder)
            if _kind_of(state, folder) == "transformers_base":  # ViTModel saves its names without "vit."
                state = {f"vit.{k}": v for k, v in state.items()}
            params = checkpoint.check_finite(translate(state, "transformers", folder), folder)
            return Source(checkpoint.Checkpoint(folder, params), "transformers", numerics, arch, names)
        if is_orbax_folder(folder):
            return Source(checkpoint.Checkpoint(folder, _orbax_params(folder, prefix)), "orbax", {})
        if is_big_vision_ts(folder):
            params = checkpoint.canonical(read_big_vision_ts(folder), folder, prefix)
            return Source(checkpoint.Checkpoint(folder, checkpoint.check_finite(params, folder)), "big_vision_ts", {})
        inside = sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n)) and (
            is_orbax_folder(os.path.join(folder, n)) or is_big_vision_ts(os.path.join(folder, n))))
        if inside:  # a training run's workdir: which step is the user's choice
            raise ValueError(f"{folder} holds checkpoints {inside[:8]}: pass one of them.")
        raise ValueError(f"{folder} is a folder but neither a transformers folder (config.json + "
                         "model.safetensors) nor an Orbax checkpoint (_METADATA, manifest.ocdbt, ...).")
    path = checkpoint.resolve(weights, model=model, image_size=image_size)
    with open(path, "rb") as f:
        magic = f.read(9)
    if path.endswith(".safetensors") or magic[8:9] == b"{":  # 8-byte header length, then the JSON header
        state = read_safetensors(path)
        kind = _kind_of(state, path)
        if kind == "transformers_base":
            state, kind = {f"vit.{k}": v for k, v in state.items()}, "transformers"
        numerics = TIMM_NUMERICS if kind == "timm" else {}
        arch = names = None
        folder = os.path.dirname(os.path.abspath(path))
        if kind == "transformers":
            if not os.path.isfile(os.path.join(folder, "config.json")):
                raise ValueError(f"{path}: a transformers model.safetensors needs its config.json beside it "
                                 "(the LayerNorm epsilon and GELU form are there).")
            arch, numerics, names = read_hf_config(folder)
        params = checkpoint.check_finite(translate(state, kind, path), path)
        return Source(checkpoint.Checkpoint(path, params), kind, numerics, arch, names)
    return Source(checkpoint.Checkpoint(path, checkpoint.read(path, prefix)), "npz", {})


# ----------------------------------------------------------------------------- the architecture a file holds


def file_kinds(params):
    """The position embedding and pooling a checkpoint was trained with: {"posemb", "classifier"}."""
    posemb = "learn" if checkpoint.POSEMB_KEY in params else "sincos2d"
    if any(k.startswith("MAPHead_0/") for k in params):
        classifier = "map"
    else:
        classifier = "token" if "cls" in params else "gap"
    return dict(posemb=posemb, classifier=classifier)


def _count(params, pattern):
    found = {m.group(1) for k in params if (m := re.match(pattern, k))}
    return len(found)


def infer_config(params, path="checkpoint"):
    """The `ViTConfig` fields of the model a checkpoint holds, read from its shapes (and the image size).

    Every field comes from the arrays: patch size and width from `embedding`,
    blocks by count, heads from the query kernel's middle axis (a torch file
    stores (D, D) and cannot say: the caller must name the architecture),
    the ResNet's stages and width from its units and `conv_root`.
    """
    try:
        embedding = params["embedding/kernel"]
        block = "Transformer/encoderblock_0/"
        query = params[block + "MultiHeadDotProductAttention_1/query/kernel"]
        mlp = params[block + "MlpBlock_3/Dense_0/kernel"]
    except KeyError as e:
        raise ValueError(f"{path}: cannot read the architecture from the file: no {e.args[0]}.") from None
    if query.ndim != 3:
        raise ValueError(f"{path}: a torch state_dict does not record the number of heads: name the architecture, "
                         "e.g. vit_keras.create('vit_b16', weights=...).")
    resnet_layers, width_factor = None, 1
    if "conv_root/kernel" in params:
        stages = _count(params, r"block(\d+)/")
        resnet_layers = tuple(_count(params, rf"block{s}/unit(\d+)/") for s in range(1, stages + 1))
        width_factor = params["conv_root/kernel"].shape[-1] / 64
    kinds = file_kinds(params)
    stride = embedding.shape[0] * (1 if resnet_layers is None else 4 * 2 ** max(len(resnet_layers) - 1, 0))
    image_size = 224
    if kinds["posemb"] == "learn":
        tokens = params[checkpoint.POSEMB_KEY].shape[1] - (kinds["classifier"] == "token")
        side = int(round(np.sqrt(tokens)))
        image_size = side * stride if side * side == tokens else 224
    return dict(patch_size=int(embedding.shape[0]), num_layers=_count(params, r"Transformer/encoderblock_(\d+)/"),
                hidden_size=int(embedding.shape[-1]), num_heads=int(query.shape[1]), mlp_dim=int(mlp.shape[-1]),
                resnet_layers=resnet_layers,
                resnet_width_factor=width_factor, image_size=image_size, **kinds)
