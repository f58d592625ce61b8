"""Assembles the Vision Transformer with the functional API."""

import numbers
import os

import keras
import numpy as np

from vit_keras.layers import ClassifierHead, Embeddings, Encoder, ExtractToken, MAPHead
from vit_keras.layers.std_conv import standardize_kernel
from vit_keras.precision import check_dtype
from vit_keras.presets import check_architecture


def _image_shape(image_size):
    sizes = (image_size,) if isinstance(image_size, numbers.Number) else tuple(image_size)
    if (len(sizes) not in (1, 2) or
            not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in sizes)):
        raise ValueError(f"image_size must be a positive integer or a (height, width) pair of them, "
                         f"got {image_size!r}.")
    return (int(sizes[0]),) * 2 if len(sizes) == 1 else (int(sizes[0]), int(sizes[1]))


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
    dropout=0.1,
    attention_dropout=0.0,
    activation="linear",
    include_top=True,
    representation_size=None,
    resnet_layers=None,
    resnet_width_factor=1,
    classifier="token",
    name="vit",
    weights=None,
    pretrained_top=True,
    keep_pre_logits=None,
    checkpoint_grid=None,
    class_names=None,
    posemb="learn",
    layer_norm_epsilon=None,
    gelu_approximate=None,
    ws_epsilon=None,
    gn_epsilon=None,
    checkpoint_prefix=None,
    remat=False,
    input_channels=3,
    dtype=None,
):
    """Builds a ViT (or, with `resnet_layers`, a hybrid ResNet+ViT).

    The fields are those of the original config. Layers carry the original
    checkpoint's names (`embeddings` holds `embedding`, `cls`, the position
    embedding and, for the hybrid, `resnet`; `Transformer` is the encoder;
    `pre_logits`, `head`), so weight loading is a name map.

    Args:
        image_size: int or (height, width). Input resolution; need not be square.
        patch_size: int. Patch size; for the hybrid, on the ResNet's feature map
            (1 for R50+ViT-B/16).
        num_layers: int. Transformer blocks.
        hidden_size: int. Token width.
        num_heads: int. Attention heads.
        mlp_dim: int. MLP hidden width.
        classes: int or None. Outputs of the head; None takes the
            checkpoint's (with `weights`).
        dropout: float. Dropout after the embedding and inside the blocks.
            Defaults to 0.1.
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
        weights: str, `checkpoint.Checkpoint` or None. A local path or URL
            of an original `.npz` checkpoint to load (or one already read).
            Defaults to None.
        pretrained_top: bool. Load the checkpoint's head when its shape fits.
            Defaults to True.
        keep_pre_logits: bool or None. Keep the checkpoint's `pre_logits`
            layer. None keeps it only when the checkpoint's head is loaded
            too; a new head (other `classes`, `pretrained_top=False`) or no
            top drops it, as the original's `load_pretrained`. Defaults to None.
        checkpoint_grid: (rows, cols) or None. The checkpoint's position
            embedding grid when it is not square. Defaults to None.
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
        checkpoint_prefix: str or None. The tower to load from a two-tower
            file (SigLIP/LiT `params/img/...`: "img"). Defaults to None.
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
    if classes is not None and (isinstance(classes, bool) or not isinstance(classes, numbers.Integral)
                                or classes < 1):
        raise ValueError(f"classes must be a positive integer (or None with weights), got {classes!r}.")
    if classes is None and weights is None:
        raise ValueError("classes=None takes the checkpoint's head classes: it needs weights.")
    from vit_keras import reshape

    reshape.check_input_channels(input_channels)
    height, width = _image_shape(image_size)
    params = None
    numerics = dict(layer_norm_epsilon=layer_norm_epsilon, gelu_approximate=gelu_approximate,
                    ws_epsilon=ws_epsilon, gn_epsilon=gn_epsilon)
    numerics = {k: v for k, v in numerics.items() if v is not None}  # given: kept
    if weights is not None:
        from vit_keras import checkpoint

        if not isinstance(weights, checkpoint.Checkpoint):
            from vit_keras import sources

            source = sources.load(weights, prefix=checkpoint_prefix)
            weights = source.checkpoint
            numerics = {**source.numerics, **numerics}  # the source's, where not given
        path, params = weights
        if classes is None:
            classes = checkpoint.head_classes(params)
            if classes is None and include_top:
                raise ValueError(f"{path} has no head: classes=None cannot take its class count; pass classes.")
        if representation_size is None and checkpoint.representation_size(params):
            head_kept = (include_top and pretrained_top and checkpoint.head_classes(params) == classes)
            keep = head_kept if keep_pre_logits is None else keep_pre_logits
            representation_size = checkpoint.representation_size(params) if keep else None
    numerics = {**GOOGLE_NUMERICS, **numerics}
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
    y = Encoder(num_layers, num_heads, mlp_dim, dropout=dropout,
                attention_dropout=attention_dropout, layer_norm_epsilon=numerics["layer_norm_epsilon"],
                gelu_approximate=numerics["gelu_approximate"], remat=remat, name="Transformer", dtype=dtype)(
        x, return_weights=False)
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
    model = keras.Model(inputs, y, name=name)
    if params is not None:
        params = reshape.adapt_input_params(params, input_channels)
        checkpoint.assign(model, params, pretrained_top=pretrained_top,
                          checkpoint_grid=checkpoint_grid, source=path)
    return model


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
    the same layers run again on new inputs with the blocks asked for them.
    (A model saved before the fused attention has the weights in its graph
    already, and they are taken from there.)

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
    if isinstance(encoder.output, (list, tuple)) and not map_head:
        # Keras keeps a layer's outputs flattened: the tokens, then block 0..L-1's weights.
        _, *weights = encoder.output
        outputs = model.outputs[0] if len(model.outputs) == 1 else model.outputs
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        return keras.Model(inputs, (outputs, weights), name=f"{model.name}_attention")
    weights, pooled = [], []

    def call(layer, *args, **kwargs):
        if map_head and layer is heads[0]:
            y, w = layer(*args, **kwargs)  # called with return_weights=True by build_model
            pooled.append(w)
            return y, w
        if layer is not encoder:
            return layer(*args, **kwargs)
        # The encoder's blocks one by one (Keras checks a graph against each layer's first call,
        # so the encoder itself cannot be called again with other outputs).
        x, training = args[0], kwargs.get("training")
        for block in encoder.blocks:
            x, w = block(x, training=training, return_weights=True)
            weights.append(w)
        return encoder.encoder_norm(x)

    # The same layers (no copies) called on new inputs; the encoder through its blocks.
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
