"""A few steps of the training recipe on fixed data, on one device and on two replicas; saves the weights.

Used by test_distributed.py in a fresh process: `python recipe_run.py ours|keras START.keras OUT_PREFIX`
(`ours`: `training.make_optimizer`; `keras`: the same SGD from `keras.optimizers`). The CPU is split
into two logical devices; "single" runs under the default strategy (one device), "mirrored" on both.
Writes OUT_PREFIX-single.npz and OUT_PREFIX-mirrored.npz.
"""

import sys

import numpy as np
import tensorflow as tf

kind, start, out = sys.argv[1:4]
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

from vit_keras import distribute, training  # noqa: E402

rng = np.random.default_rng(0)
x = rng.uniform(-1, 1, (128, 32, 32, 3)).astype("float32")
y = keras.utils.to_categorical(rng.integers(0, 10, 128), 10)
for mode in ("single", "mirrored"):
    strategy = distribute.get_strategy("mirrored" if mode == "mirrored" else None)
    with strategy.scope():
        model = keras.saving.load_model(start)
        optimizer = training.make_optimizer("sgd", 0.03, 10, 1, clipnorm=1.0)
        if kind == "keras":
            optimizer = keras.optimizers.SGD.from_config(optimizer.get_config())
        model.compile(optimizer=optimizer, loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(32), epochs=1, verbose=0, shuffle=False)
    assert strategy.num_replicas_in_sync == (2 if mode == "mirrored" else 1)
    values = [getattr(v.value, "values", (v.value,))[0] for v in model.trainable_variables]
    np.savez(f"{out}-{mode}.npz", *[np.asarray(v) for v in values])
