"""Distribution strategies for `train`: one device, all GPUs, several machines, TPU.

On the TensorFlow backend these are `tf.distribute` strategies. On JAX,
`mirrored` and `tpu` are `keras.distribution.DataParallel` over all local
devices; PyTorch trains on one device.
"""

import contextlib
import json
import os

import keras
import numpy as np

# The optimizers live in `vit_keras.optimizers`, which `import vit_keras` imports (saved models name them).
from vit_keras.optimizers import SGD, AdamW, ClipAfterAllReduce  # noqa: F401

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


class KerasDistribution:
    """What `train` needs of a strategy, off TensorFlow: a scope and a replica count.

    Args:
        distribution: keras.distribution.Distribution or None. Active inside
            `scope()` (model building, `fit` and `evaluate`); None: one device.
            Defaults to None.
    """

    def __init__(self, distribution=None):
        self.distribution = distribution

    @property
    def num_replicas_in_sync(self):
        if self.distribution is None:
            return 1
        return int(np.prod(self.distribution.device_mesh.shape))

    def scope(self):
        return contextlib.nullcontext() if self.distribution is None else self.distribution.scope()


def run_scope(strategy):
    """The scope that `fit` and `evaluate` run in: a Keras distribution's, none for `tf.distribute`."""
    return strategy.scope() if isinstance(strategy, KerasDistribution) else contextlib.nullcontext()


def get_strategy(name=None):
    """Returns the strategy for `name` (None: the default one) on the current Keras backend.

    TensorFlow: a `tf.distribute` strategy. JAX: a `KerasDistribution`, with
    `keras.distribution.DataParallel` over every local device for `mirrored`
    and `tpu`. PyTorch: a `KerasDistribution` of one device, `default` only.
    """
    if name not in (None, *STRATEGIES):
        raise ValueError(f"Unknown strategy {name!r}; use one of {STRATEGIES}.")
    backend = keras.backend.backend()
    if backend != "tensorflow":
        if name in (None, "default"):
            return KerasDistribution()
        if backend == "jax" and name in ("mirrored", "tpu"):
            return KerasDistribution(keras.distribution.DataParallel(
                devices=keras.distribution.list_devices()))
        hint = ("on JAX use 'mirrored' (data parallel over the local devices) or 'default'"
                if backend == "jax" else "PyTorch trains on one device: use 'default'")
        raise ValueError(f"Strategy {name!r} needs the TensorFlow backend (KERAS_BACKEND=tensorflow); {hint}.")
    import tensorflow as tf

    if name in (None, "default"):
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == "multi_worker":
        patch_multi_worker_fit()
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=os.environ.get("TPU_NAME", ""))
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"Unknown strategy {name!r}; use one of {STRATEGIES}.")


def task_id():
    return json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {}).get("index", 0)


def is_chief(strategy):
    """True on the worker that writes outputs (worker 0, or a `chief` task)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )


def patch_multi_worker_fit():
    """Makes Keras 3's `fit`/`evaluate` work under MultiWorkerMirroredStrategy.

    Upstream bug keras-team/keras#20585: Keras's TF trainer reduces across
    workers in two places that the collective all-reduce cannot take:
    1. `_maybe_symbolic_build` pulls one distributed batch and reduces it in
       eager mode only to learn the input shapes ("Attempt to convert a value
       (PerReplica...) to a Tensor"): we hand it this worker's first local
       replica batch, which has the shapes it needs.
    2. `reduce_per_replica` means every step's logs with `axis=0`, but losses
       and metric results are scalars ("Invalid reduction dimension 0 for input
       with 0 dimensions"): we reduce scalars with `axis=None`.
    Other strategies go through Keras untouched.
    tests/test_distributed.py::test_upstream_still_needs_the_patch fails once
    upstream no longer needs this; then delete it.
    """
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer.reduce_per_replica, "vit_keras_patch", False):
        return
    build, reduce = trainer.TensorFlowTrainer._maybe_symbolic_build, trainer.reduce_per_replica

    def multi_worker(strategy):
        return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)

    def local(strategy, value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if iterator is not None and multi_worker(strategy):
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(lambda v: local(strategy, v), next(it))
                break
            iterator = None
        return build(self, iterator=iterator, data_batch=data_batch)

    def reduce_per_replica(values, strategy, reduction):
        if multi_worker(strategy) and reduction in ("auto", "mean"):
            return tf.nest.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=0 if local(strategy, v).shape.rank else None),
                values,
            )
        return reduce(values, strategy, reduction)

    reduce_per_replica.vit_keras_patch = True
    trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    trainer.reduce_per_replica = reduce_per_replica
