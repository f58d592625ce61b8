"""A layer's "with intermediates" call as a layer of its own, for functional graphs."""

import keras


@keras.saving.register_keras_serializable(package="vit_keras")
class WithIntermediates(keras.layers.Layer):
    """Calls `layer(inputs, return_intermediates=True, ...)`: `(outputs, intermediates)`, same variables.

    `Encoder`, `Embeddings` and `ResNet` give what each step computed when
    called with `return_intermediates=True`. A model's own layer cannot make
    that call in a new functional graph: Keras checks every call of a layer
    against the outputs of its first call (one tensor in the model), so this
    layer makes it instead, holding the model's layer itself (no copy: the
    variables are the model's). `attention_model` and `features_model` are
    built with it; their `.keras` files hold the wrapped layer's config.

    Args:
        layer: keras.layers.Layer. A layer whose `call` takes
            `return_intermediates` (`Encoder`, `Embeddings`, `ResNet`).
        **kwargs: base layer arguments (`name`, `dtype`, ...). The dtype
            defaults to the wrapped layer's policy.

    Call arguments:
        inputs: the wrapped layer's input.
        training: bool or None. Dropout on. Defaults to None.
        **call_kwargs: more arguments of the wrapped layer's call (the
            encoder's `return_weights`).

    Example:
    >>> from vit_keras.layers import Encoder
    >>> encoder = Encoder(num_layers=2, num_heads=4, mlp_dim=64)
    >>> tokens = keras.Input((5, 32))
    >>> x, out = WithIntermediates(encoder)(encoder(tokens, return_weights=False), return_weights=False)
    >>> [tuple(t.shape) for t in out["blocks"]]
    [(None, 5, 32), (None, 5, 32)]
    """

    def __init__(self, layer, **kwargs):
        kwargs.setdefault("dtype", layer.dtype_policy)
        kwargs.setdefault("name", f"{layer.name}_intermediates")
        super().__init__(**kwargs)
        self.layer = layer

    def build(self, input_shape):
        if not self.layer.built:  # a reloaded file: the wrapped layer comes from its config
            self.layer.build(input_shape)
        self.built = True

    def call(self, inputs, training=None, **call_kwargs):
        return self.layer(inputs, training=training, return_intermediates=True, **call_kwargs)

    def compute_output_spec(self, inputs, training=None, **call_kwargs):
        return self.layer.compute_output_spec(inputs, return_intermediates=True, **call_kwargs)

    def get_config(self):
        config = super().get_config()
        config.update({"layer": keras.saving.serialize_keras_object(self.layer)})
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["layer"] = keras.saving.deserialize_keras_object(config["layer"])
        return cls(**config)
