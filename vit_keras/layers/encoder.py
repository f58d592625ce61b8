"""The transformer encoder: the blocks and the final LayerNorm."""

import keras

from vit_keras.layers.block import LN_EPSILON, Block, layer_norm


@keras.saving.register_keras_serializable(package="vit_keras")
class Encoder(keras.layers.Layer):
    """`num_layers` blocks named `encoderblock_{i}`, then `encoder_norm`.

    Args:
        num_layers: int. Number of blocks.
        num_heads: int. Attention heads per block.
        mlp_dim: int. Width of each MLP's hidden layer.
        dropout: float. Dropout inside the blocks. Defaults to 0.
        attention_dropout: float. Dropout on attention weights. Defaults to 0.
        layer_norm_epsilon: float. LayerNorm epsilon (1e-6 in Google's and timm's
            checkpoints, 1e-12 in Hugging Face's). Defaults to 1e-6.
        gelu_approximate: bool. The MLP's GELU in tanh form (Google's); False
            is the exact erf form (timm's, Hugging Face's). Defaults to True.
        remat: bool. Recompute each block in the backward pass instead of
            keeping its activations (`keras.remat`: `tf.recompute_grad`,
            `jax.checkpoint`, `torch.utils.checkpoint`). Same outputs and
            gradients, less memory. Defaults to False.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: tensor `[batch, tokens, D]`.
        training: bool or None. Dropout on. Defaults to None.
        return_weights: bool. Also return every block's attention weights;
            False runs the fused attention (see `Attention`), as the models of
            `build_model` do (`attention_model` gets the weights back).
            Defaults to True.
        return_intermediates: bool. Return `(tokens, intermediates)`, the
            dict of what each block gave (as timm's `forward_intermediates`,
            big_vision's `(x, out)`): `"blocks"`, block 0..L-1's output
            tokens (before the final LayerNorm), and with `return_weights`
            `"weights"`, their attention weights. The one path
            `attention_model` and `features_model` take (through
            `WithIntermediates`). Defaults to False.
        class_token_only: bool. The last block computes token 0 alone
            (`Block`'s `class_token_only`), so the tokens out are
            `[batch, 1, D]`: all a `"token"` classifier reads, for about one
            block's work less (`build_model` asks for it). Defaults to False.

    Returns:
        `(tokens [batch, tokens, D], [weights of block 0, ..., L-1])`, each
        weights tensor `[batch, heads, tokens, tokens]` in float32, or
        `tokens` with `return_weights=False`; `(tokens, intermediates)` with
        `return_intermediates=True`.

    Example:
    >>> enc = Encoder(num_layers=2, num_heads=4, mlp_dim=64)
    >>> x, weights = enc(keras.ops.ones((2, 5, 32)))
    >>> tuple(x.shape), len(weights), tuple(weights[0].shape)
    ((2, 5, 32), 2, (2, 4, 5, 5))
    >>> x, out = enc(keras.ops.ones((2, 5, 32)), return_weights=False, return_intermediates=True)
    >>> sorted(out), len(out["blocks"]), tuple(out["blocks"][1].shape)
    (['blocks'], 2, (2, 5, 32))
    """

    def __init__(
        self, num_layers, num_heads, mlp_dim, dropout=0.0, attention_dropout=0.0,
        layer_norm_epsilon=LN_EPSILON, gelu_approximate=True, remat=False, **kwargs
    ):
        super().__init__(**kwargs)
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.layer_norm_epsilon = layer_norm_epsilon
        self.gelu_approximate = gelu_approximate
        self.remat = bool(remat)

    def build(self, input_shape):
        self.blocks = []
        for i in range(self.num_layers):
            block = Block(
                self.num_heads,
                self.mlp_dim,
                self.dropout,
                self.attention_dropout,
                self.layer_norm_epsilon,
                self.gelu_approximate,
                name=f"encoderblock_{i}",
                dtype=self.dtype_policy,
            )
            block.build(input_shape)
            self.blocks.append(block)
        self.encoder_norm = layer_norm("encoder_norm", self.layer_norm_epsilon, self.dtype_policy)
        self.encoder_norm.build(input_shape)
        self.built = True

    def call(self, inputs, training=None, return_weights=True, return_intermediates=False, class_token_only=False):
        x = inputs
        blocks, weights = [], []
        for i, block in enumerate(self.blocks):
            last_only = class_token_only and i == len(self.blocks) - 1  # the class token's row alone
            if return_weights:
                x, w = block(x, training=training, class_token_only=last_only)
                weights.append(w)
            elif self.remat:
                x = remat_call(block, x, training=training, return_weights=False, class_token_only=last_only)
            else:
                x = block(x, training=training, return_weights=False, class_token_only=last_only)
            blocks.append(x)
        x = self.encoder_norm(x)
        if return_intermediates:
            return x, ({"blocks": blocks, "weights": weights} if return_weights else {"blocks": blocks})
        return (x, weights) if return_weights else x

    def compute_output_shape(self, input_shape):
        b, t, _ = input_shape
        return input_shape, [(b, self.num_heads, t, t)] * self.num_layers

    def compute_output_spec(self, inputs, training=None, return_weights=True, return_intermediates=False,
                            class_token_only=False):
        b, t, d = inputs.shape

        def tokens(last=True):
            return keras.KerasTensor((b, 1, d) if class_token_only and last else (b, t, d), dtype=self.compute_dtype)

        last = self.num_layers - 1
        weights = [keras.KerasTensor((b, self.num_heads, 1 if class_token_only and i == last else t, t),
                                     dtype="float32") for i in range(self.num_layers)]
        if return_intermediates:
            blocks = [tokens(i == last) for i in range(self.num_layers)]
            return tokens(), ({"blocks": blocks, "weights": weights} if return_weights else {"blocks": blocks})
        return (tokens(), weights) if return_weights else tokens()

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "mlp_dim": self.mlp_dim,
                "dropout": self.dropout,
                "attention_dropout": self.attention_dropout,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "gelu_approximate": self.gelu_approximate,
                "remat": self.remat,
            }
        )
        return config


def remat_call(layer, inputs, **kwargs):
    """`layer(inputs, **kwargs)` recomputed in the backward pass (`keras.remat`).

    The layer runs statelessly inside the recomputed function, its variables
    passed in and its new non-trainable values (dropout's seed state) passed
    out and assigned outside: the recomputation then draws the same dropout
    masks, and no value traced inside `jax.checkpoint` leaks out of it. The
    keywords are bound outside (`tf.recompute_grad` takes none in a graph).
    """
    trainable, frozen = layer.trainable_variables, layer.non_trainable_variables

    def run(x, trainable_values, frozen_values):
        return layer.stateless_call(trainable_values, frozen_values, x, **kwargs)

    outputs, new_frozen = keras.remat(run)(inputs, [v.value for v in trainable], [v.value for v in frozen])
    for variable, value in zip(frozen, new_frozen):
        variable.assign(value)
    return outputs
