"""The optimizers that `vit-keras train` compiles with, registered for `.keras` files.

`import vit_keras` imports this module, so `keras.models.load_model` opens every
file that `train` writes (`model.keras`, `best.keras`, `last.keras`) with its
optimizer, on every backend.

>>> import keras
>>> from vit_keras import optimizers
>>> keras.saving.get_registered_object("vit_keras>SGD") is optimizers.SGD
True
"""

import keras


def _replicas_in_sync():
    """Replicas of the `tf.distribute` strategy whose replica context this runs in (1 outside one)."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    context = tf.distribute.get_replica_context() if tf.distribute.has_strategy() else None
    return context.num_replicas_in_sync if context is not None else 1


class ClipAfterAllReduce:
    """Optimizer mixin: global-norm clipping of the summed gradient, not of each replica's part.

    Keras 3.15 clips each replica's gradient before the replicas' gradients are
    summed (`BaseOptimizer._backend_apply_gradients`, then the TensorFlow
    backend's `_all_reduce_sum_gradients`), so with `global_clipnorm` two
    replicas take another step than one device on the same batch. Here the
    clipping waits for the sum. One device, JAX and PyTorch are unchanged.
    `tests/test_distributed.py::test_keras_still_clips_per_replica` fails once
    Keras clips after the sum itself; then this mixin can go.
    """

    def _clip_gradients(self, grads):
        return grads if _replicas_in_sync() > 1 else super()._clip_gradients(grads)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        reduced = super()._all_reduce_sum_gradients(grads_and_vars)
        if _replicas_in_sync() <= 1:
            return reduced
        present = [(g, v) for g, v in reduced if g is not None]
        clipped = iter(super()._clip_gradients([g for g, _ in present]))
        return [(g if g is None else next(clipped), v) for g, v in reduced]


@keras.saving.register_keras_serializable(package="vit_keras")
class SGD(ClipAfterAllReduce, keras.optimizers.SGD):
    """`keras.optimizers.SGD`, clipping the replicas' summed gradient (see `ClipAfterAllReduce`)."""


@keras.saving.register_keras_serializable(package="vit_keras")
class AdamW(ClipAfterAllReduce, keras.optimizers.AdamW):
    """`keras.optimizers.AdamW`, clipping the replicas' summed gradient (see `ClipAfterAllReduce`)."""
