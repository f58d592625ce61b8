"""The training and evaluation recipe as a `tf.data` pipeline, and a split as pixels.

`make_pipeline`: decode -> (inception crop, flip) -> antialiased resize ->
batch -> (RandAugment) -> `x / 127.5 - 1` -> (MixUp/CutMix) -> prefetch,
giving `([-1, 1] images, one-hot labels)`. `Examples` (no TensorFlow) get the
same recipe in NumPy, `numpy_pipeline.ImagePipeline`.
"""

import keras
import numpy as np

from vit_keras.data.datasets import Examples
from vit_keras.data.images import decode, height_width, resize
from vit_keras.data.numpy_pipeline import ImagePipeline
from vit_keras.preprocessing import preprocess_inputs


def _tf():
    import tensorflow as tf

    return tf


def pixels(ds, image_size, count=None):
    """Up to `count` images of a split as uint8 pixels `[n, H, W, 3]` at `image_size`, and their labels."""
    height, width = height_width(image_size)
    if isinstance(ds, Examples):
        n = len(ds) if count is None else min(count, len(ds))
        images = [np.round(resize(ds.image(i), (height, width))).astype("uint8") for i in range(n)]
        return np.stack(images), ds.labels[:n]
    tf = _tf()
    if count is not None:
        ds = ds.take(count)
    ds = ds.map(
        lambda x, y: (tf.cast(tf.round(tf.clip_by_value(
            tf.image.resize(decode(x), (height, width), antialias=True), 0, 255)), tf.uint8), y),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    images, labels = zip(*ds.as_numpy_iterator())
    return np.stack(images), np.array(labels)


def _random_crop(image, area_range, seed):
    """The original recipe's inception crop: a random box of the given share of the area."""
    tf = _tf()
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        seed=seed,
        area_range=area_range,
        aspect_ratio_range=(3 / 4, 4 / 3),
        min_object_covered=0,
    )
    return tf.slice(image, begin, size)


def make_pipeline(
    ds,
    image_size,
    num_classes,
    batch_size,
    training=False,
    flip=True,
    crop_area=(0.05, 1.0),
    randaugment=False,
    mixup=False,
    cutmix=False,
    shuffle_buffer=10_000,
    seed=0,
    repeat=False,
):
    """Decode -> (crop, flip) -> resize -> batch -> (RandAugment) -> [-1, 1] -> (MixUp/CutMix).

    A `tf.data.Dataset` gets a `tf.data` pipeline; `Examples` get an
    `ImagePipeline` (a `keras.utils.PyDataset`) with the same arguments.
    """
    height, width = height_width(image_size)
    if isinstance(ds, Examples):
        return ImagePipeline(ds, (height, width), num_classes, batch_size, training=training, flip=flip,
                             crop_area=crop_area, randaugment=randaugment, mixup=mixup, cutmix=cutmix,
                             seed=seed, repeat=repeat)
    tf = _tf()

    def prepare(index, example):
        image, label = example
        image = decode(image)
        if training:
            # Stateless randomness keyed by (seed, element index): the same run augments the
            # same way whatever the thread interleaving, and every epoch differently.
            crop_seed, flip_seed = tf.unstack(
                tf.random.experimental.stateless_split(tf.stack([tf.cast(seed, tf.int64), index]), 2)
            )
            image = _random_crop(image, crop_area, crop_seed)
            if flip:
                image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        image = tf.image.resize(image, (height, width), antialias=True)
        image = tf.ensure_shape(tf.clip_by_value(image, 0.0, 255.0), [height, width, 3])
        return image, tf.one_hot(label, num_classes)

    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()
    ds = ds.enumerate().map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=training)
    if training and randaugment:
        augment = keras.layers.RandAugment(value_range=(0, 255), seed=seed)
        ds = ds.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda x, y: (preprocess_inputs(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    if training and (mixup or cutmix):
        mixers = [m for m, on in ((keras.layers.MixUp(seed=seed), mixup), (keras.layers.CutMix(seed=seed), cutmix))
                  if on]

        def mix(x, y):
            data = {"images": x, "labels": y}
            if len(mixers) == 1:
                out = mixers[0](data, training=True)
            else:  # one of the two per batch
                out = tf.cond(
                    tf.random.uniform([]) < 0.5,
                    lambda: mixers[0](data, training=True),
                    lambda: mixers[1](data, training=True),
                )
            return out["images"], out["labels"]

        ds = ds.map(mix, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
