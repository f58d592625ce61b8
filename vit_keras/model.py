"""Assembles the Vision Transformer with the functional API."""

import os

import keras
import numpy as np

from vit_keras.layers import ClassifierHead, Embeddings, Encoder, ExtractToken, MAPHead, WithIntermediates
from vit_keras.layers.std_conv import standardize_kernel
from vit_keras.precision import check_dtype
from vit_keras.presets import ViTConfig, check_architecture
from vit_keras.sizes import height_width, is_int


def _memory_bytes():
    """This machine's physical memory in bytes (None where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def _check_memory(grid, hidden_size, classifier, size):
    """ValueError when one image at `size` cannot fit: its position embedding or one attention map.

    Checked before any variable is made, so an absurd `image_size` is one line
    rather than an allocator's crash.
    """
    memory = _memory_bytes()
    tokens = grid[0] * grid[1] + (classifier in ("token", "token_unpooled"))
    need = max(tokens * hidden_size, tokens * tokens) * 4  # float32 bytes
    if memory and need > memory:
        raise ValueError(f"image_size {size[0]}x{size[1]} gives {tokens:,} tokens: one image needs "
                         f"{need / 2**30:,.0f} GiB for its position embedding or one attention map, more than "
                         f"this machine's {memory / 2**30:,.0f} GiB. Use a smaller image_size.")


CLASSIFIERS = ("token", "gap", "unpooled", "token_unpooled", "map")
# Google's numerics; a checkpoint from timm or Hugging Face brings its own (`vit_keras.sources`).
GOOGLE_NUMERICS = dict(layer_norm_epsilon=1e-6, gelu_approximate=True, ws_epsilon=1e-5, gn_epsilon=1e-6)


def build_model(
    image_size,
    patch_size,
    num_layers,
    hidden_size,
    num_heads,
    mlp_dim,
    classes,
    dropout=ViTConfig.dropout,
    attention_dropout=ViTConfig.attention_dropout,
    activation="linear",
    include_top=True,
    representation_size=None,
    resnet_layers=None,
    resnet_width_factor=ViTConfig.resnet_width_factor,
    classifier=ViTConfig.classifier,
    name="vit",
    weights=None,
    pretrained_top=True,
    keep_pre_logits=None,
    checkpoint_grid=None,
    class_names=None,
    posemb=ViTConfig.posemb,
    layer_norm_epsilon=None,
    gelu_approximate=None,
    ws_epsilon=None,
    gn_epsilon=None,
    checkpoint_prefix=None,
    remat=False,
    input_channels=3,
    dtype=None,
):
    """Builds a ViT (or, with `resnet_layers`, a hybrid ResNet+ViT) from its architecture.

    The fields are those of the original config (`ViTConfig`, whose defaults
    these are). Layers carry the original checkpoint's names (`embeddings`
    holds `embedding`, `cls`, the position embedding and, for the hybrid,
    `resnet`; `Transformer` is the encoder; `pre_logits`, `head`), so weight
    loading (`vit_keras.load_weights`) is a name map. This function builds
    only; `weights` is the one-call form kept for older code: the checkpoint
    is read, the top fitted to it (`LoadPolicy.top`), then `load_weights`
    runs, as `create` does.

    Args:
        image_size: int or (height, width). Input resolution; need not be square.
        patch_size: int. Patch size; for the hybrid, on the ResNet's feature map
            (1 for R50+ViT-B/16).
        num_layers: int. Transformer blocks.
        hidden_size: int. Token width.
        num_heads: int. Attention heads.
        mlp_dim: int. MLP hidden width.
        classes: int or None. Outputs of the head; None takes the
            checkpoint's (with `weights`), or with `include_top=False`.
        dropout: float. Dropout after the embedding and inside the blocks.
            Defaults to `ViTConfig.dropout` (0.0).
        attention_dropout: float. Dropout on the attention weights. Defaults
            to 0.
        activation: str. Activation of the head. Defaults to "linear".
        include_top: bool. With False the model outputs the pooled
            representation (after `pre_logits` when the model has one).
            Defaults to True.
        representation_size: int or None. Width of the tanh `pre_logits` layer
            before the head. With `weights`, None takes the checkpoint's when
            it is kept (see `keep_pre_logits`). Defaults to None.
        resnet_layers: tuple of int or None. Units per ResNet stage, e.g.
            (3, 4, 9); `()` for the ResNet root alone (R+ViT-Ti/16); None for
            the plain ViT. Defaults to None.
        resnet_width_factor: float. ResNet width multiplier. Defaults to 1.
        classifier: str. The original's pooling: "token" (the class token),
            "gap" (no class token; mean of the normalised tokens), "unpooled"
            (no class token; the head applies to every token) or
            "token_unpooled" (class token kept, every token out) or "map"
            (no class token; big_vision's attention pooling, `MAPHead`).
            Defaults to "token".
        name: str. Model name. Defaults to "vit".
        weights: str, `checkpoint.Checkpoint` or None. A checkpoint to load
            (path or URL, any `vit_keras.sources` format, or one already
            read). Defaults to None.
        pretrained_top: bool. With `weights`: `LoadPolicy.pretrained_top`.
            Defaults to True.
        keep_pre_logits: bool or None. With `weights`:
            `LoadPolicy.keep_pre_logits` (None keeps the checkpoint's
            `pre_logits` only with its head, as the original's
            `load_pretrained`). Defaults to None.
        checkpoint_grid: (rows, cols) or None. With `weights`:
            `LoadPolicy.checkpoint_grid`. Defaults to None.
        class_names: list of str or None. Names of the classes, kept in the
            head's config (and so in `.keras` files). Defaults to None.
        posemb: str. "learn" or "sincos2d" (big_vision's fixed table).
            Defaults to "learn".
        layer_norm_epsilon: float or None. None: the weights' source's
            (1e-12 for Hugging Face), else 1e-6. Defaults to None.
        gelu_approximate: bool or None. The tanh GELU; None: False for timm
            and Hugging Face weights, else True. Defaults to None.
        ws_epsilon: float or None. The ResNet's weight-standardisation
            epsilon; None: 1e-8 for timm weights, else 1e-5. Defaults to None.
        gn_epsilon: float or None. The ResNet's GroupNorm epsilon; None: 1e-5
            for timm weights, else 1e-6. Defaults to None.
        checkpoint_prefix: str or None. With `weights`: the tower to read
            from a two-tower file (SigLIP/LiT `params/img/...`: "img").
            Defaults to None.
        remat: bool. Recompute each encoder block (and ResNet stage) in the
            backward pass: less memory, same gradients. Defaults to False.
        input_channels: int. Channels of the input images. A 3-channel
            checkpoint's first convolution is adapted (1: summed over RGB;
            N: repeated and scaled by 3/N, see `reshape.adapt_input_kernel`).
            Defaults to 3.
        dtype: str or None. A Keras dtype policy name for every layer but
            the head (whose logits stay float32): "float32", "mixed_bfloat16"
            (float32 weights, bfloat16 compute) or "bfloat16" (bfloat16
            weights and compute; `vit_keras.inference_copy` makes one from a
            trained model). None takes Keras's global policy
            (`keras.config.dtype_policy()`, float32 unless set).
            Defaults to None.

    Example:
    >>> model = build_model(32, 16, num_layers=2, hidden_size=64, num_heads=4,
    ...                     mlp_dim=128, classes=10)
    >>> model.output_shape
    (None, 10)
    """
    if classifier not in CLASSIFIERS:
        raise ValueError(f"Unknown classifier {classifier!r}; use one of {CLASSIFIERS}.")
    check_dtype(dtype)
    check_architecture(patch_size, num_layers, hidden_size, num_heads, mlp_dim, dropout, attention_dropout,
                       representation_size, resnet_layers, resnet_width_factor)
    if classes is not None and (not is_int(classes) or classes < 1):
        raise ValueError(f"classes must be a positive integer (or None with weights), got {classes!r}.")
    if classes is None and include_top and weights is None:
        raise ValueError("classes=None takes the checkpoint's head classes: it needs weights.")
    from vit_keras import reshape

    reshape.check_input_channels(input_channels)
    height, width = height_width(image_size)
    numerics = dict(layer_norm_epsilon=layer_norm_epsilon, gelu_approximate=gelu_approximate,
                    ws_epsilon=ws_epsilon, gn_epsilon=gn_epsilon)
    if weights is not None:  # the one-call form: read, fit the top, build, load (`vit.build_loaded`)
        from vit_keras import checkpoint, vit

        policy = checkpoint.LoadPolicy(pretrained_top, keep_pre_logits, checkpoint_grid)
        return vit.build_loaded(
            weights, policy, checkpoint_prefix=checkpoint_prefix, image_size=image_size, patch_size=patch_size,
            num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads, mlp_dim=mlp_dim, classes=classes,
            dropout=dropout, attention_dropout=attention_dropout, activation=activation, include_top=include_top,
            representation_size=representation_size, resnet_layers=resnet_layers,
            resnet_width_factor=resnet_width_factor, classifier=classifier, name=name, class_names=class_names,
            posemb=posemb, remat=remat, input_channels=input_channels, dtype=dtype, **numerics)
    numerics = {**GOOGLE_NUMERICS, **{k: v for k, v in numerics.items() if v is not None}}  # given: kept
    embeddings = Embeddings(
        hidden_size,
        patch_size,
        dropout=dropout,
        resnet_layers=resnet_layers,
        resnet_width_factor=resnet_width_factor,
        class_token=classifier in ("token", "token_unpooled"),
        posemb=posemb,
        ws_epsilon=numerics["ws_epsilon"],
        gn_epsilon=numerics["gn_epsilon"],
        remat=remat,
        name="embeddings",
        dtype=dtype,
    )
    _check_memory(embeddings.grid_size((height, width)), hidden_size, classifier, (height, width))
    inputs = keras.Input((height, width, input_channels), name="image")
    x = embeddings(inputs)
    # Without the weights the attention is fused (flash attention on a GPU); `attention_model` has them.
    # A token classifier reads token 0 alone, so the last block computes only that row.
    y = Encoder(num_layers, num_heads, mlp_dim, dropout=dropout,
                attention_dropout=attention_dropout, layer_norm_epsilon=numerics["layer_norm_epsilon"],
                gelu_approximate=numerics["gelu_approximate"], remat=remat, name="Transformer", dtype=dtype)(
        x, return_weights=False, class_token_only=classifier == "token")
    if classifier == "token":
        y = ExtractToken(name="class_token", dtype=dtype)(y)
    elif classifier == "gap":  # the mean of the normalised tokens, as the original (no fc_norm)
        y = keras.layers.GlobalAveragePooling1D(name="gap", dtype=dtype)(y)
    elif classifier == "map":  # big_vision's attention pooling: a probe attends to the normalised tokens
        # Its probe's attention is an output of the layer's node (one query: nothing to save by fusing),
        # so that `attention_model` can take it.
        y, _ = MAPHead(num_heads, mlp_dim, numerics["layer_norm_epsilon"], numerics["gelu_approximate"],
                       name="MAPHead_0", dtype=dtype)(y, return_weights=True)
    if representation_size:
        y = keras.layers.Dense(representation_size, activation="tanh",
                               kernel_initializer="lecun_normal", name="pre_logits", dtype=dtype)(y)
    if include_top:
        # The original zero-initialises the head; logits stay float32 under mixed precision.
        y = ClassifierHead(
            classes,
            class_names=class_names,
            activation=activation,
            kernel_initializer="zeros",
            name="head",
            dtype="float32",
        )(y)
    return keras.Model(inputs, y, name=name)


def class_names(model):
    """Returns the class names stored in the model's head, or None."""
    try:
        return model.get_layer("head").class_names
    except (ValueError, AttributeError):
        return None


def find_encoder(model):
    """Returns the model's one `Encoder` layer."""
    encoders = [layer for layer in model.layers if isinstance(layer, Encoder)]
    if len(encoders) != 1:
        raise ValueError(
            f"Expected one vit_keras Encoder layer in model {model.name!r}, found {len(encoders)}."
        )
    return encoders[0]


def attention_model(model, map_head=False):
    """Returns a model that shares `model`'s weights and also outputs attention.

    Its outputs are `(model's outputs, [weights of block 0, ..., L-1])`, each
    weights tensor `[batch, heads, tokens, tokens]` (softmax probabilities, float32).
    With `map_head=True` (a `classifier="map"` model) a third output is the
    MAP head's probe attention `[batch, heads, 1, tokens]`.
    The model's own encoder runs its attention fused, without weights; here
    the same layers run again on new inputs, the encoder through its one
    path with intermediates (`Encoder(..., return_intermediates=True)`, in a
    `WithIntermediates` layer) asked for the weights. The result saves and
    reloads as a `.keras` file.

    Args:
        model: keras.Model. A model from this package's builders (fine-tuned
            or reloaded from `.keras` too).
        map_head: bool. Also output the MAP head's attention. Defaults to False.

    Example:
    >>> model = build_model(32, 16, 2, 64, 4, 128, classes=10)
    >>> logits, weights = attention_model(model)(keras.ops.zeros((1, 32, 32, 3)))
    >>> len(weights), tuple(weights[0].shape)
    (2, (1, 4, 5, 5))
    """
    encoder = find_encoder(model)
    heads = [layer for layer in model.layers if isinstance(layer, MAPHead)]
    if map_head and len(heads) != 1:
        raise ValueError(f"map_head=True: model {model.name!r} has no MAP head (classifier='map').")
    with_weights = WithIntermediates(encoder)
    weights, pooled = [], []

    def call(layer, *args, **kwargs):
        if layer is encoder:
            x, out = with_weights(args[0], training=kwargs.get("training"), return_weights=True)
            weights.extend(out["weights"])
            # What the model's graph takes from its encoder: the tokens (and the weights in a model
            # saved before the fused attention, whose encoder returned them).
            return (x, out["weights"]) if kwargs.get("return_weights", True) else x
        if map_head and layer is heads[0]:
            y, w = layer(*args, **kwargs)  # called with return_weights=True by build_model
            pooled.append(w)
            return y, w
        return layer(*args, **kwargs)

    # The same layers (no copies) called on new inputs; the encoder with its intermediates.
    graph = keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call)
    if len(weights) != encoder.num_layers:
        raise ValueError(f"The encoder of model {model.name!r} is not on the path from its inputs to its outputs.")
    outputs = graph.outputs[0] if len(graph.outputs) == 1 else graph.outputs
    inputs = graph.inputs[0] if len(graph.inputs) == 1 else graph.inputs
    return keras.Model(inputs, (outputs, weights, *pooled), name=f"{model.name}_attention")


def copy_model(model, edit_config, weights=None):
    """A new model from `model`'s config, each nested dict passed through `edit_config`.

    `edit_config(config) -> config` sees every dict of the config tree (layer
    configs, dtype policies, ...). The copy gets `weights`, or `model`'s.
    """

    def walk(config):
        if isinstance(config, dict):
            return edit_config({k: walk(v) for k, v in config.items()})
        if isinstance(config, list):
            return [walk(v) for v in config]
        return config

    copy = model.__class__.from_config(walk(model.get_config()))
    # One variable at a time (`weights` may be a generator): no second full copy of the weights in memory.
    for target, value in zip(copy.weights, model.weights if weights is None else weights, strict=True):
        target.assign(value)
    return copy


def _prestandardize(config):
    """A config dict with the hybrid's layers marked as holding standardised kernels."""
    if config.get("class_name") in ("Embeddings", "ResNet", "ResNetStage", "ResNetUnit", "StdConv2D"):
        return {**config, "config": {**config["config"], "prestandardized": True}}
    return config


def folded_weights(model):
    """`model.weights` as float32 numpy, one at a time, the ResNet kernels standardised (for a
    `_prestandardize`d copy; as they are where the model's kernels already are)."""
    resnet = _resnet(model)
    kernels = {} if resnet is None or resnet.prestandardized else {
        id(conv.kernel): conv.ws_epsilon for conv in resnet.convs()}
    for variable in model.weights:
        value = np.asarray(variable)
        if id(variable) in kernels:
            kernel = keras.ops.convert_to_tensor(value.astype("float32"))  # a tensor: NumPy - torch fails
            value = keras.ops.convert_to_numpy(standardize_kernel(kernel, kernels[id(variable)])).astype("float32")
        yield value


def _policy_names(config):
    """The names of every dtype policy in a model's config tree."""
    if isinstance(config, dict):
        own = [config["config"]["name"]] if config.get("class_name") == "DTypePolicy" else []
        return own + [n for v in config.values() for n in _policy_names(v)]
    if isinstance(config, list):
        return [n for v in config for n in _policy_names(v)]
    return []


def float32_copy(model):
    """A float32 copy of a model trained in mixed precision (TFLite cannot convert bf16).

    A model that is float32 throughout is returned as it is.
    """
    if all(name == "float32" for name in _policy_names(model.get_config())):
        return model

    def as_float32(config):
        if config.get("class_name") == "DTypePolicy":
            return {**config, "config": {**config["config"], "name": "float32"}}
        return config

    return copy_model(model, as_float32, (np.asarray(w, "float32") for w in model.weights))


def fold_weight_standardization(model):
    """Returns a copy of `model` whose ResNet kernels are standardised once, now.

    The hybrid's convolutions standardise their kernels on every call; the
    copy stores the standardised kernels instead (`prestandardized=True`), so
    inference skips that work (`benchmarks/RESULTS.md` has what it saves).
    Outputs are the same within float32
    rounding. For inference and export; train the original, since training
    the copy would update the standardised kernels directly. A model without
    a ResNet is returned as it is. The SavedModel export uses this.

    Args:
        model: keras.Model. A hybrid from this package's builders.

    Example:
    >>> model = build_model(32, 1, 1, 64, 4, 128, classes=10, resnet_layers=(1,),
    ...                     include_top=False)  # the head starts at zero: compare features
    >>> fast = fold_weight_standardization(model)
    >>> x = keras.random.uniform((1, 32, 32, 3), seed=0)
    >>> features = np.asarray(model(x))
    >>> bool(np.abs(features).max() > 0.1 and np.allclose(features, fast(x), atol=1e-5))
    True
    """
    resnet = _resnet(model)
    if resnet is None or resnet.prestandardized:
        return model

    return copy_model(model, _prestandardize, folded_weights(model))


def _resnet(model):
    """The hybrid's `ResNet` layer, or None."""
    try:
        embeddings = model.get_layer("embeddings")
    except ValueError:
        return None
    return embeddings.resnet if getattr(embeddings, "resnet_layers", None) is not None else None
