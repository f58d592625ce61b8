"""A few steps of the training recipe on fixed data, on one device or two replicas; saves the weights.

Used by test_distributed.py in fresh processes:
`python recipe_run.py single|mirrored ours|keras START.keras OUT.npz`
(`ours`: `training.make_optimizer`; `keras`: the same SGD from `keras.optimizers`).
"""

import sys

import numpy as np
import tensorflow as tf

mode, kind, start, out = sys.argv[1:5]
if mode == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

from vit_keras import distribute, training  # noqa: E402

strategy = distribute.get_strategy("mirrored" if mode == "mirrored" else None)
rng = np.random.default_rng(0)
x = rng.uniform(-1, 1, (128, 32, 32, 3)).astype("float32")
y = keras.utils.to_categorical(rng.integers(0, 10, 128), 10)
with strategy.scope():
    model = keras.saving.load_model(start)
    optimizer = training.make_optimizer("sgd", 0.03, 10, 1, clipnorm=1.0)
    if kind == "keras":
        optimizer = keras.optimizers.SGD.from_config(optimizer.get_config())
    model.compile(optimizer=optimizer, loss=keras.losses.CategoricalCrossentropy(from_logits=True))
model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(32), epochs=1, verbose=0, shuffle=False)
values = [getattr(v.value, "values", (v.value,))[0] for v in model.trainable_variables]
np.savez(out, *[np.asarray(v) for v in values])
