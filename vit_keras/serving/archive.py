"""The SavedModel behind both exports (TF Serving's, and the one TFLite converts from): each weight and graph once."""

import tensorflow as tf

# The collections the reloaded object lists, as after `keras.export.ExportArchive.track(model)`.
COLLECTIONS = {
    "variables": lambda v: True,
    "trainable_variables": lambda v: v.trainable,
    "non_trainable_variables": lambda v: not v.trainable,
}


def save_endpoints(directory, endpoints, models):
    """Writes `endpoints` as a SavedModel's signatures: each weight and each traced graph stored once.

    `tf.saved_model.save` of a root that holds the models' variables and the
    endpoints; not `keras.export.ExportArchive`, which (Keras 3.15) stores
    R50+ViT-B/16 about twice over:
    - `ExportArchive.track(model)` lists the `keras.Variable` wrappers while
      the endpoints capture the `tf.Variable`s inside them, and a checkpoint
      tells objects apart by identity, so every weight was written twice
      (keras-team/keras#23553): 753 MB of variables for 376 MB of float32
      weights, held twice by every process that loads them;
    - for an endpoint given as an already traced `tf.function` (as ours
      are), `write_out` takes the signatures' concrete functions before
      `tf.saved_model.save` retraces the same functions inside its save
      context, so each signature's graph was stored twice (R50+ViT-B/16's
      `saved_model.pb` 10.8 MB; 4.1 MB written here, with the export's two
      classifying signatures sharing one function).
    Here the signatures are traced once, inside the save. The reloaded
    object's `variables`, `trainable_variables` and `non_trainable_variables`
    list the models' weights (in their order) and every endpoint is also an
    attribute, as after `ExportArchive`.

    Args:
        directory: str. Where to write (the SavedModel's own folder).
        endpoints: dict of str to `tf.function`. The signatures by key, each
            with an `input_signature`.
        models: list of keras.Model. The models the endpoints call (their
            weights make the collections).

    Example:
    >>> import os, tempfile, tensorflow as tf, keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> serve = tf.function(lambda x: {"y": model(x)}, input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    >>> path = os.path.join(tempfile.mkdtemp(), "m")
    >>> save_endpoints(path, {"serving_default": serve}, [model])
    >>> [v.shape for v in tf.saved_model.load(path).variables]
    [TensorShape([3, 2]), TensorShape([2])]
    """
    weights = list({id(v): v for model in models for v in model.weights}.values())
    inner = [v.value for v in weights]  # a Keras variable's own tf.Variable (outside any autocast scope)
    if not all(isinstance(v, tf.Variable) for v in inner):
        raise TypeError("SavedModel export needs the TensorFlow backend's variables (KERAS_BACKEND=tensorflow).")
    root = tf.__internal__.tracking.AutoTrackable()  # ExportArchive's root too (a Checkpoint adds a save counter)
    for name, keep in COLLECTIONS.items():
        setattr(root, name, [t for v, t in zip(weights, inner) if keep(v)])
    for key, fn in endpoints.items():
        setattr(root, key, fn)
    tf.saved_model.save(root, directory, signatures=dict(endpoints))
