"""The classification head, which keeps the class names with the model."""

import keras


@keras.saving.register_keras_serializable(package="vit_keras")
class ClassifierHead(keras.layers.Dense):
    """A `Dense` layer that also stores the names of its classes in its config.

    The names travel inside `.keras` files, so a saved model can label its
    predictions and exports can write them beside the model.

    Args:
        units: int. Number of classes.
        class_names: list of str or None. One name per class. Defaults to None.
        **kwargs: the arguments of `keras.layers.Dense`.

    Example:
    >>> head = ClassifierHead(2, class_names=["cat", "dog"])
    >>> tuple(head(keras.ops.ones((1, 4))).shape), head.class_names
    ((1, 2), ['cat', 'dog'])
    """

    def __init__(self, units, class_names=None, **kwargs):
        super().__init__(units, **kwargs)
        if class_names is not None and len(class_names) != units:
            raise ValueError(f"{len(class_names)} class names given for {units} classes.")
        self.class_names = None if class_names is None else [str(c) for c in class_names]

    def get_config(self):
        config = super().get_config()
        config["class_names"] = self.class_names
        return config
