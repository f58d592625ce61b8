"""Plain Keras `fit` under MultiWorkerMirroredStrategy, without vit_keras's patch.

Exits 0 if it trains; keras-team/keras#20585 makes it fail in Keras 3.15.
"""

import numpy as np
import tensorflow as tf

strategy = tf.distribute.MultiWorkerMirroredStrategy()
import keras  # noqa: E402

with strategy.scope():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
x = np.ones((32, 4), "float32")
model.fit(tf.data.Dataset.from_tensor_slices((x, x[:, :2])).batch(8), epochs=1, verbose=0)
