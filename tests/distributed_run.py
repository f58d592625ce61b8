"""Runs a short `train` under a distribution strategy and saves each replica's weights.

Used by test_distributed.py in fresh processes: `python distributed_run.py STRATEGY OUT`.
For `mirrored` it first splits the CPU into two logical devices; for
`multi_worker` the cluster comes from TF_CONFIG.
"""

import json
import os
import sys

import numpy as np
import tensorflow as tf

strategy, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
if strategy == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

from vit_keras import distribute, training  # noqa: E402

config = training.TrainConfig(model="vit_tiny16", dataset="digits", image_size=32, epochs=1, batch_size=32,
                              strategy=strategy, out=out, verbose=0)
result = training.train(config)
replicas = []
for variable in result.model.trainable_variables:
    values = getattr(variable.value, "values", None) or (variable.value,)
    replicas.append([np.asarray(v) for v in values])
name = f"weights-{distribute.task_id()}.npz"
np.savez(os.path.join(out, name), *[r for var in replicas for r in var])
with open(os.path.join(out, name + ".json"), "w") as f:
    json.dump({"replicas_per_variable": len(replicas[0]), "metrics": result.metrics}, f)
