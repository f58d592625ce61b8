"""Input pipelines: TFDS datasets by name, folders of images, and the offline `digits`.

Every source yields `(image, label)` with the image as uint8 `[H, W, 3]` or as
encoded bytes; `make_pipeline` decodes, augments, resizes to the model's
resolution, batches and prefetches, producing `([-1, 1] images, one-hot labels)`.
"""

import dataclasses
import logging
import os
import pathlib
import re

import numpy as np
import tensorflow as tf

from vit_keras.vit import preprocess_inputs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")

logger = logging.getLogger("vit_keras")


@dataclasses.dataclass
class Splits:
    """The three splits of a dataset and what the pipeline needs to know of it."""

    train: tf.data.Dataset
    validation: tf.data.Dataset
    test: tf.data.Dataset
    class_names: list
    num_train: int
    flip: bool = True  # off where a mirror image changes the label (digits)
    crop_area: tuple = (0.05, 1.0)


def digits():
    """scikit-learn's 1,797 handwritten 8x8 digits (offline); a fifth held out for test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = np.repeat((data.images * (255.0 / 16.0))[..., None], 3, -1).astype("float32")
    # Stored upsampled to 32x32 so that random crops are not cut on the coarse 8x8 grid.
    images = tf.image.resize(images, (32, 32), method="bilinear").numpy().clip(0, 255).round().astype("uint8")
    labels = data.target.astype("int64")
    # The split is fixed (seed 0) whatever the training seed, so results compare.
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=0
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_train, y_train, test_size=0.05, stratify=y_train, random_state=0
    )
    ds = tf.data.Dataset.from_tensor_slices
    return Splits(
        train=ds((x_train, y_train)),
        validation=ds((x_val, y_val)),
        test=ds((x_test, y_test)),
        class_names=[str(i) for i in range(10)],
        num_train=len(x_train),
        flip=False,  # a mirrored digit is another digit, or none
        crop_area=(0.5, 1.0),  # an 8x8 digit has little detail to spare
    )


def image_folder(path, seed=0, fractions=(0.8, 0.1), check=True):
    """A folder with one sub-folder of images per class, split 80/10/10 by a seeded shuffle.

    Hidden sub-folders (`.ipynb_checkpoints`) are no classes. With `check`, every
    file is decoded once up front by the decoder training uses, and a folder with
    any file that does not decode is refused with the names of those files (none
    is skipped: a silently smaller dataset is worse than an error).
    """
    root = pathlib.Path(path)
    class_names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels, counts = [], [], {}
    for label, name in enumerate(class_names):
        found = sorted(
            str(f) for f in (root / name).rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS
        )
        files += found
        labels += [label] * len(found)
        counts[name] = len(found)
    with_images = [name for name in class_names if counts[name]]
    empty = [name for name in class_names if not counts[name]]
    if len(with_images) < 2:
        raise ValueError(
            f"Image folder {path} has {len(with_images)} class sub-folder(s) with images "
            f"({', '.join(with_images) or 'none'}"
            + (f"; empty: {', '.join(empty)}" if empty else "")
            + f"); training needs at least two classes, each a sub-folder of "
            f"{'/'.join(IMAGE_EXTENSIONS)} files."
        )
    if empty:
        logger.warning("Image folder %s: class folder(s) %s hold no images; the model still gets "
                       "an output for each.", path, ", ".join(empty))
    if len(files) < 3:
        raise ValueError(f"Image folder {path} has {len(files)} images; it needs at least 3.")
    if check:
        bad = undecodable(files)
        if bad:
            shown = "; ".join(f"{f}: {reason}" for f, reason in bad[:10])
            more = f"; and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise ValueError(
                f"Image folder {path}: {len(bad)} of {len(files)} files cannot be decoded "
                f"(remove or replace them): {shown}{more}"
            )
    order = np.random.default_rng(seed).permutation(len(files))
    files, labels = np.array(files)[order], np.array(labels, "int64")[order]
    n_train = max(1, int(fractions[0] * len(files)))
    n_val = max(1, int(fractions[1] * len(files)))

    def split(lo, hi):
        return tf.data.Dataset.from_tensor_slices((files[lo:hi], labels[lo:hi])).map(
            lambda f, y: (tf.io.read_file(f), y), num_parallel_calls=tf.data.AUTOTUNE
        )

    return Splits(
        train=split(0, n_train),
        validation=split(n_train, n_train + n_val),
        test=split(n_train + n_val, len(files)),
        class_names=class_names,
        num_train=n_train,
    )


def undecodable(files):
    """`[(file, reason)]` for each file that TensorFlow's image decoder (the pipeline's) rejects.

    Every file is read and decoded once, in parallel; only the failures are
    decoded a second time, to give their reason.
    """
    files = [str(f) for f in files]
    if not files:
        return []

    def decode(index, file):
        image = tf.io.decode_image(tf.io.read_file(file), channels=3, expand_animations=False)
        return index, tf.shape(image)

    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(files)), files))
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False).ignore_errors()
    good = {int(index) for index, _ in ds.as_numpy_iterator()}
    return [(f, _decode_error(f)) for i, f in enumerate(files) if i not in good]


def _decode_error(file):
    try:
        tf.io.decode_image(tf.io.read_file(file), channels=3, expand_animations=False)
    except tf.errors.OpError as e:
        lines = [line.strip() for line in (e.message or "").splitlines() if line.strip()]
        text = re.sub(r"\{\{.*?\}\}\s*", "", lines[0] if lines else "")
        return re.sub(r"\s*\[Op:\w+\].*$", "", text) or type(e).__name__
    return "could not be decoded"


def tfds_dataset(name, data_dir=None, download=False):
    """A `tensorflow_datasets` dataset; 2% of train is held out when it has no validation split."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError and friends
        raise ValueError(f"Unknown dataset {name!r}: {str(e).splitlines()[0]}") from None
    available = set(builder.info.splits.keys()) or {"train", "test"}
    has_val = "validation" in available
    names = {
        "train": "train" if has_val else "train[:98%]",
        "validation": "validation" if has_val else "train[98%:]",
        "test": "test" if "test" in available else "validation",
    }
    try:
        loaded = {
            key: tfds.load(
                name, split=split, data_dir=data_dir, download=download, as_supervised=True
            )
            for key, split in names.items()
        }
    except AssertionError as e:  # tfds's "could not find data" when download=False
        raise ValueError(
            f"Dataset {name!r} is not prepared in {data_dir or '~/tensorflow_datasets'} "
            f"({str(e).splitlines()[0]}). Prepare it with download=True (--download), "
            "which needs the network."
        ) from None
    label = builder.info.features["label"]
    num_train = int(loaded["train"].cardinality().numpy())
    if num_train < 0:
        num_train = builder.info.splits["train"].num_examples
    return Splits(
        train=loaded["train"],
        validation=loaded["validation"],
        test=loaded["test"],
        class_names=list(label.names),
        num_train=num_train,
    )


def load(dataset, data_dir=None, download=False):
    """Returns the `Splits` of `digits`, a folder of class folders, or a TFDS name."""
    if dataset == "digits":
        return digits()
    if os.path.isdir(dataset):
        return image_folder(dataset)
    if os.sep in dataset or dataset.startswith("."):
        raise ValueError(f"Unknown dataset {dataset!r}: no such folder.")
    return tfds_dataset(dataset, data_dir, download)


def pixels(ds, image_size, count=None):
    """Up to `count` images of a split as uint8 pixels `[n, H, W, 3]` at `image_size`, and their labels."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if count is not None:
        ds = ds.take(count)
    ds = ds.map(
        lambda x, y: (tf.cast(tf.round(tf.clip_by_value(
            tf.image.resize(_decode(x), (height, width), antialias=True), 0, 255)), tf.uint8), y),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    images, labels = zip(*ds.as_numpy_iterator())
    return np.stack(images), np.array(labels)


def _decode(image):
    if image.dtype == tf.string:
        image = tf.io.decode_image(image, channels=3, expand_animations=False)
    if image.shape.rank == 2 or image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(tf.reshape(image, tf.concat([tf.shape(image)[:2], [1]], 0)))
    return tf.ensure_shape(image, [None, None, 3])


def _random_crop(image, area_range, seed):
    """The original recipe's inception crop: a random box of the given share of the area."""
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
    """Decode -> (crop, flip) -> resize -> batch -> (RandAugment) -> [-1, 1] -> (MixUp/CutMix)."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size

    def prepare(index, example):
        image, label = example
        image = _decode(image)
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
        import keras

        augment = keras.layers.RandAugment(value_range=(0, 255), seed=seed)
        ds = ds.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda x, y: (preprocess_inputs(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    if training and (mixup or cutmix):
        import keras

        mixers = [m for m, on in ((keras.layers.MixUp(seed=seed), mixup), (keras.layers.CutMix(seed=seed), cutmix)) if on]

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
