"""Fine-tuning big models on one device: remat, trainable subsets, layer-wise learning-rate decay, LoRA.

Each is a `TrainConfig` field and a `vit-keras train` flag of the same name
(`training.train` calls these functions); they also work on a model of your own:

>>> import vit_keras
>>> model = vit_keras.build_model(32, 16, 2, 64, 4, 128, classes=10)
>>> model = enable_lora(model, rank=4)
>>> model = set_trainable(model, lora=True)
>>> counts = param_counts(model)
>>> counts["trainable_params"] < counts["total_params"] // 10
True
"""

import numbers
import re

import keras
import numpy as np

from vit_keras import distribute
from vit_keras.sizes import is_int

# `trainable`: every weight; the head alone (a linear probe); the last N blocks, the final norm and the head.
TRAINABLE_HELP = "all | head | blocks:N"
_BLOCK = re.compile(r"(^|/)encoderblock_(\d+)(/|$)")


def parse_trainable(spec):
    """`all`, `head` or `blocks:N` -> ("all", None), ("head", None) or ("blocks", N); ValueError otherwise."""
    if spec in ("all", "head"):
        return spec, None
    if isinstance(spec, str) and spec.startswith("blocks:"):
        try:
            n = int(spec[len("blocks:"):])
        except ValueError:
            n = None
        if n is not None and n >= 1:
            return "blocks", n
    raise ValueError(f"trainable must be 'all', 'head' or 'blocks:N' with N >= 1 (the last N encoder "
                     f"blocks, the final norm and the head), got {spec!r}.")


def check_arguments(trainable=None, layer_decay=None, lora_rank=None, lora_alpha=None, input_channels=3,
                    num_layers=None, image_files=False):
    """One ValueError for the first bad fine-tuning argument; `num_layers` also bounds `blocks:N`.

    `image_files`: the data are image files, which give 1 (grey) or 3 channels.
    """
    if trainable is not None:
        kind, n = parse_trainable(trainable)
        if kind == "blocks" and num_layers is not None and n > num_layers:
            raise ValueError(f"trainable={trainable!r} asks for {n} blocks but the model has {num_layers}.")
    if layer_decay is not None and (not isinstance(layer_decay, numbers.Real) or isinstance(layer_decay, bool)
                                    or not 0 < layer_decay <= 1):
        raise ValueError(f"layer_decay must be a number in (0, 1] (0.75 is usual), got {layer_decay!r}.")
    if lora_rank is not None and (not is_int(lora_rank) or lora_rank < 1):
        raise ValueError(f"lora_rank must be a positive integer (e.g. 8), got {lora_rank!r}.")
    if lora_alpha is not None and (not isinstance(lora_alpha, numbers.Real) or isinstance(lora_alpha, bool)
                                   or not np.isfinite(lora_alpha) or lora_alpha <= 0):
        raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}.")
    if lora_alpha is not None and lora_rank is None:
        raise ValueError("lora_alpha needs lora_rank.")
    if input_channels is None:
        return
    from vit_keras.reshape import check_input_channels

    check_input_channels(input_channels)
    if image_files and input_channels not in (1, 3):
        raise ValueError(f"input_channels={input_channels}: image datasets give 1 (grey) or 3 (RGB) channels; "
                         "other counts need data of your own (the library API).")


def encoder(model):
    """The model's `Encoder` layer (see `model.find_encoder`)."""
    from vit_keras.model import find_encoder

    return find_encoder(model)


# ----------------------------------------------------------------------------- remat


def with_remat(model):
    """`model` with each encoder block (and ResNet stage) recomputed in the backward pass: a copy, same weights.

    A model built with `remat=True` is returned as it is.
    """
    layers = [encoder(model)] + [layer for layer in model.layers if hasattr(layer, "remat")]
    if all(getattr(layer, "remat", True) for layer in layers):
        return model
    from vit_keras.model import copy_model

    def remat(config):
        if config.get("class_name") in ("Encoder", "Embeddings", "ResNet"):
            return {**config, "config": {**config["config"], "remat": True}}
        return config

    return copy_model(merge_lora(model), remat)


# ----------------------------------------------------------------------------- trainable subsets


def _is_lora(variable):
    return variable.path.rsplit("/", 1)[-1].startswith("lora_kernel_")


def _top(path):
    return path.split("/", 1)[0]


def set_trainable(model, trainable=None, lora=False):
    """Marks which variables train; the others get no optimizer slots (call before `compile`).

    Args:
        model: keras.Model. A model of this package.
        trainable: str or None. `all`; `head` (the head alone: a linear
            probe); `blocks:N` (the last N encoder blocks, the encoder's final
            norm, `pre_logits` and the head). None: `all`, or with `lora`
            the adapters and the head. Defaults to None.
        lora: bool. The model has LoRA adapters (`enable_lora`): they train
            too. Defaults to False.
    """
    kind, n = parse_trainable(trainable or ("head" if lora else "all"))
    enc = encoder(model)
    if kind == "blocks" and n > enc.num_layers:
        raise ValueError(f"trainable={trainable!r} asks for {n} blocks but the model has {enc.num_layers}.")
    first = enc.num_layers - (n or 0)

    def trains(variable):
        path = variable.path
        if kind == "all" or (lora and _is_lora(variable)):
            return True
        if _top(path) in ("head", "pre_logits") and (kind == "blocks" or _top(path) == "head"):
            return True
        if kind == "blocks" and _top(path) == enc.name:
            block = _BLOCK.search(path)
            return int(block.group(2)) >= first if block else "/encoder_norm/" in path
        return False

    model.trainable = True  # every layer and variable (Keras's setter recurses); the variables decide below
    for variable in model.weights:
        if variable.dtype is not None and "float" in str(variable.dtype):
            variable.trainable = trains(variable)
    return model


def param_counts(model):
    """`{"trainable_params": ..., "total_params": ...}`: float weights, LoRA adapters included."""
    def size(variables):
        return int(sum(np.prod(v.shape) for v in variables if "float" in str(v.dtype)))

    return {"trainable_params": size(model.trainable_variables), "total_params": size(model.weights)}


# ----------------------------------------------------------------------------- LoRA


# Where Keras's `enable_lora` is a plain low-rank matrix: the attention's output projection
# `[heads*head_dim, D]` and the MLP's two Dense layers. On `query`/`key`/`value` (kernels
# `[D, heads, head_dim]`) Keras's adapter is per head (`A: [D, heads, r]`), 6x the parameters
# of a matrix adapter: they are left out by default (pass `targets` to include them).
LORA_TARGETS = ("out", "Dense_0", "Dense_1")
LORA_ALL = ("query", "key", "value", "out", "Dense_0", "Dense_1")


def lora_layers(model, targets=LORA_TARGETS):
    """The Dense and EinsumDense layers LoRA adapts in each block, by name (see `LORA_TARGETS`)."""
    unknown = set(targets) - set(LORA_ALL)
    if unknown:
        raise ValueError(f"Unknown LoRA targets {sorted(unknown)}; choose from {LORA_ALL}.")
    out = []
    for block in encoder(model).blocks:
        layers = (block.attention.query, block.attention.key, block.attention.value, block.attention.out,
                  block.mlp.dense_0, block.mlp.dense_1)
        out += [layer for layer in layers if layer.name in targets]
    return out


def enable_lora(model, rank, alpha=None, targets=LORA_TARGETS):
    """Adds LoRA adapters of `rank` to each block's projections `targets` (Keras's `enable_lora`).

    The kernel `W` acts as `W + (alpha / rank) * A @ B`, `A` he-uniform and `B`
    zero at the start (the model's outputs do not change). `W` is frozen.
    `alpha` None: `rank` (a scale of 1). Default targets: the attention's
    output projection and the MLP (`LORA_TARGETS`).
    """
    check_arguments(lora_rank=rank, lora_alpha=alpha)
    for layer in lora_layers(model, targets):
        if not layer.lora_enabled:
            layer.enable_lora(rank, lora_alpha=alpha)
    return model


def _adapted(model):
    """The layers of `model` with LoRA adapters: only `lora_layers` can have them (`enable_lora` adapts no other)."""
    from vit_keras.layers import Encoder

    if sum(isinstance(layer, Encoder) for layer in model.layers) != 1:
        return []
    return [layer for layer in lora_layers(model, LORA_ALL) if getattr(layer, "lora_enabled", False)]


def has_lora(model):
    return bool(_adapted(model))


def merge_lora(model):
    """A copy of `model` with its LoRA adapters folded into the kernels (the model itself if it has none).

    The copy is a plain model (no adapters): what `model.keras` files and the
    exports hold. Outputs equal the adapted model's within float rounding.
    """
    if not has_lora(model):
        return model
    # `layer.kernel` of an adapted layer is W + scale * A @ B; its variable W is the layer's "kernel".
    merged = {f"{layer.path}/kernel": keras.ops.convert_to_numpy(layer.kernel) for layer in _adapted(model)}
    copy = model.__class__.from_config(model.get_config())  # the inner layers' configs have no adapters
    plain = [v for v in model.weights if not _is_lora(v)]
    for old, new in zip(plain, copy.weights, strict=True):
        new.assign(merged.get(old.path, keras.ops.convert_to_numpy(old)))
    return copy


def restart_adapters(model):
    """After weights were loaded into an adapted model (Keras loads the merged kernel and zeroes
    both adapters, which then get no gradient): `A` drawn again, so training goes on from the merged model."""
    for layer in _adapted(model):
        if not np.any(keras.ops.convert_to_numpy(layer.lora_kernel_a)):
            layer.lora_kernel_a.assign(keras.initializers.HeUniform()(layer.lora_kernel_a.shape,
                                                                      layer.lora_kernel_a.dtype))


# ----------------------------------------------------------------------------- layer-wise learning-rate decay


def layer_id(path, num_layers):
    """0 for the embeddings (patches, ResNet, class token, positions), i + 1 for block i, num_layers + 1 above."""
    block = _BLOCK.search(path)
    if block:
        return int(block.group(2)) + 1
    if _top(path) == "embeddings":
        return 0
    return num_layers + 1


def lr_multiplier(path, num_layers, decay):
    """`decay ** (num_layers + 1 - layer_id)`: 1 for the head and final norm, `decay**(L - i)` for block i."""
    return float(decay) ** (num_layers + 1 - layer_id(path, num_layers))


class LayerDecay:
    """Optimizer mixin: each variable's learning rate times `lr_multiplier(variable.path)`.

    The learning rate itself is scaled, in the update and in the decoupled
    weight decay, so SGD with momentum and AdamW take the BEiT/MAE steps
    (scaling gradients would be another thing for Adam, whose step does not
    depend on the gradient's scale).
    """

    def __init__(self, *args, layer_decay=1.0, num_layers=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer_decay = float(layer_decay)
        self.num_layers = int(num_layers)
        self._lr_scale = 1.0
        self._multipliers = []

    def multiplier(self, variable):
        return lr_multiplier(variable.path, self.num_layers, self.layer_decay)

    def build(self, variables):
        super().build(variables)
        self._multipliers = [self.multiplier(v) for v in variables]

    def _get_current_learning_rate(self):
        lr = super()._get_current_learning_rate()
        return lr if self._lr_scale == 1.0 else lr * self._lr_scale

    def update_step(self, gradient, variable, learning_rate):
        scale = self._multipliers[self._get_variable_index(variable)]
        return super().update_step(gradient, variable, learning_rate * scale if scale != 1.0 else learning_rate)

    def _apply_weight_decay(self, variables):
        groups = {}
        for v in variables:
            groups.setdefault(self.multiplier(v), []).append(v)
        for scale, group in groups.items():
            self._lr_scale = scale  # read while the decay is traced
            try:
                super()._apply_weight_decay(group)
            finally:
                self._lr_scale = 1.0

    def get_config(self):
        return {**super().get_config(), "layer_decay": self.layer_decay, "num_layers": self.num_layers}


@keras.saving.register_keras_serializable(package="vit_keras")
class LayerDecaySGD(LayerDecay, distribute.SGD):
    """`distribute.SGD` with a learning rate per layer (see `LayerDecay`)."""


@keras.saving.register_keras_serializable(package="vit_keras")
class LayerDecayAdamW(LayerDecay, distribute.AdamW):
    """`distribute.AdamW` with a learning rate per layer (see `LayerDecay`)."""


def layer_decay_optimizer(optimizer, layer_decay, num_layers):
    """`distribute.SGD`/`AdamW` -> the same optimizer with layer-wise learning-rate decay."""
    classes = {distribute.SGD: LayerDecaySGD, distribute.AdamW: LayerDecayAdamW}
    cls = classes.get(type(optimizer))
    if cls is None:
        raise ValueError(f"layer_decay needs vit_keras's SGD or AdamW, not {type(optimizer).__name__}.")
    return cls.from_config({**optimizer.get_config(), "layer_decay": layer_decay, "num_layers": num_layers})


# ----------------------------------------------------------------------------- for `train`


def prepare(model, *, remat=False, trainable=None, lora_rank=None, lora_alpha=None):
    """What `train` does to a built model before `compile`: remat copy, LoRA adapters, trainable marks."""
    check_arguments(trainable, None, lora_rank, lora_alpha, num_layers=encoder(model).num_layers)
    if remat:
        model = with_remat(model)
    if lora_rank:
        enable_lora(model, lora_rank, lora_alpha)
    if trainable is not None or lora_rank:
        set_trainable(model, trainable, lora=bool(lora_rank))
    return model
