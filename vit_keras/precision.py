"""Precision of the models: the `dtype=` of `create` and the builders, and bfloat16 inference copies.

`dtype` is a Keras dtype policy name, passed to every layer (and from each
layer to the layers it makes in `build`, so a `.keras` file reloads with the
same policy). The head stays float32 under every policy, so logits are
float32. Under the half-precision policies the numerics that need float32
keep it: LayerNorm's statistics (`keras.ops.layer_normalization` computes in
float32 whatever its input), GroupNorm's statistics, the weight
standardisation of the hybrid's kernels, and the attention softmax
(`layers.Attention`; the fused `keras.ops.dot_product_attention` does its
softmax in float32 on TensorFlow and JAX, and PyTorch's CPU kernel
accumulates bfloat16 in float32).
"""

# What `create`, the builders and `build_model` take as `dtype`.
DTYPES = ("float32", "mixed_bfloat16", "bfloat16")
# What `inference_copy` makes: weights stored once in this dtype.
INFERENCE_DTYPES = ("bfloat16", "float32", "auto")
# CPU flags (Linux /proc/cpuinfo) with native bfloat16 matmuls; without them oneDNN emulates bfloat16.
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# `vit-keras export --precision` (SavedModel and ONNX; TFLite has variants of its own).
EXPORT_PRECISIONS = ("float32", "bfloat16")


def check_dtype(dtype, allowed=DTYPES, what="dtype"):
    """ValueError naming the accepted values unless `dtype` is one of them (None passes: the global policy).

    >>> check_dtype("float16")
    Traceback (most recent call last):
    ...
    ValueError: dtype must be one of 'float32', 'mixed_bfloat16', 'bfloat16' (a Keras dtype policy name), got 'float16'.
    """
    if dtype is None or (isinstance(dtype, str) and dtype in allowed):
        return dtype
    shown = ", ".join(repr(d) for d in allowed)
    raise ValueError(f"{what} must be one of {shown} (a Keras dtype policy name), got {dtype!r}.")


def _policy(config, name):
    return {**config, "config": {**config["config"], "name": name}}


def _is_head(config):
    return config.get("class_name") == "ClassifierHead" or config.get("registered_name") == "vit_keras>ClassifierHead"


def inference_copy(model, dtype="auto"):
    """A copy of a trained model for inference, its weights stored once in `dtype`.

    Under `"bfloat16"` every layer runs the Keras `"bfloat16"` policy: the
    weights are cast once, here (not on every call, as under
    `mixed_bfloat16`), and the matmuls and convolutions run in bfloat16.
    LayerNorm and GroupNorm statistics, the attention softmax and the weight
    standardisation stay float32 (see this module's docstring); the hybrid's
    kernels are standardised in float32 from the original's kernels first
    (`fold_weight_standardization`) and only then rounded. The head keeps
    float32 weights and gives float32 logits; a model whose output is not
    the head's gets a float32 cast layer `float32_output` at its end.
    `"float32"` gives the float32 copy with the standardisation folded. The
    copy saves and loads as `.keras`; a bfloat16 copy given again comes back
    as it is. For inference and export; train the original. Accuracy against float32: README, "bfloat16".

    Args:
        model: keras.Model. A model of this package (trained, fine-tuned or
            loaded from `.keras`), in any precision.
        dtype: str. "bfloat16", "float32", or "auto": bfloat16 where this CPU
            has AVX512-BF16 or AMX, else float32 (`fast_inference_dtype`:
            where bfloat16 is emulated it is slower than float32).
            Defaults to "auto".

    Example:
    >>> import vit_keras, keras
    >>> model = vit_keras.build_model(32, 16, 2, 64, 4, 128, classes=10)
    >>> fast = inference_copy(model, "bfloat16")
    >>> fast.get_layer("Transformer").blocks[0].attention.query.kernel.dtype
    'bfloat16'
    >>> str(keras.backend.standardize_dtype(fast(keras.ops.zeros((1, 32, 32, 3))).dtype))
    'float32'
    """
    import keras

    from vit_keras import model as vit_model

    check_dtype(dtype, INFERENCE_DTYPES)
    if not isinstance(model, keras.Model):
        raise ValueError(f"inference_copy takes a keras.Model, got {type(model).__name__}.")
    if dtype == "auto":
        dtype = fast_inference_dtype()
    if dtype == "bfloat16" and _is_bfloat16_copy(model):  # as float32_copy: nothing to do, no second copy
        return model
    # The kernels standardised in float32 from the original's, one weight at a time (no float32 folded copy).
    weights = (_float32(w) for w in vit_model.folded_weights(model))
    resnet = vit_model._resnet(model)
    fold = resnet is not None and not resnet.prestandardized

    def edit(config):
        if fold:
            config = vit_model._prestandardize(config)
        if config.get("class_name") == "DTypePolicy":
            return _policy(config, dtype)
        if _is_head(config) and isinstance(config.get("config", {}).get("dtype"), dict):  # logits stay float32
            return {**config, "config": {**config["config"], "dtype": _policy(config["config"]["dtype"], "float32")}}
        return config

    copy = vit_model.copy_model(model, edit, weights)
    if all(keras.backend.standardize_dtype(t.dtype) == "float32" for t in copy.outputs):
        return copy
    names = ["float32_output"] if len(copy.outputs) == 1 else [f"float32_output_{i}" for i in range(len(copy.outputs))]
    cast = [t if keras.backend.standardize_dtype(t.dtype) == "float32" else
            keras.layers.Identity(dtype="float32", name=name)(t) for t, name in zip(copy.outputs, names)]
    inputs = copy.inputs[0] if len(copy.inputs) == 1 else copy.inputs
    return keras.Model(inputs, cast[0] if len(cast) == 1 else cast, name=copy.name)


def _is_bfloat16_copy(model):
    """Whether `model` is a bfloat16 `inference_copy` already: every weight but the head's in bfloat16."""
    import keras

    weights = [w for layer in model.layers if layer.name != "head" for w in layer.weights]
    return bool(weights) and all(keras.backend.standardize_dtype(w.dtype) == "bfloat16" for w in weights)


def _float32(weight):
    """A weight as float32 numpy when it is floating (bfloat16 included), else as it is (seed states)."""
    import numpy as np

    weight = np.asarray(weight)
    return weight.astype("float32") if weight.dtype.kind == "f" or weight.dtype.name == "bfloat16" else weight


def bfloat16_cpu(cpuinfo="/proc/cpuinfo"):
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX; Linux's `/proc/cpuinfo` flags).

    False where the flags cannot be read (not Linux): oneDNN would emulate
    bfloat16 there, slower than float32.
    """
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in BFLOAT16_CPU_FLAGS)


def fast_inference_dtype(cpuinfo="/proc/cpuinfo"):
    """`inference_copy(dtype="auto")`'s choice: "bfloat16" on a CPU with AVX512-BF16 or AMX, else "float32".

    On those CPUs the bfloat16 copy is the faster one (`benchmarks/RESULTS.md`);
    elsewhere bfloat16 is emulated and float32 is kept.
    """
    return "bfloat16" if bfloat16_cpu(cpuinfo) else "float32"
