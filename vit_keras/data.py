"""Input pipelines: TFDS datasets by name, folders of images, and the offline `digits`.

Every source yields `(image, label)` with the image as uint8 `[H, W, 3]` or as
encoded bytes; `make_pipeline` decodes, augments, resizes to the model's
resolution, batches and prefetches, producing `([-1, 1] images, one-hot labels)`.

On the TensorFlow backend the splits are `tf.data` datasets and the pipeline is
`tf.data`. On JAX and PyTorch `digits` and image folders are `Examples` (NumPy
arrays, or file names) and the pipeline is an `ImagePipeline`, a
`keras.utils.PyDataset` that decodes with Pillow and augments in NumPy with the
same recipe (inception crop, flip, antialiased resize, `x / 127.5 - 1`, one-hot
labels); it needs no TensorFlow. TFDS datasets need TensorFlow on every
backend and stay `tf.data` (Keras feeds them to JAX and PyTorch too).
"""

import dataclasses
import functools
import logging
import os
import re
import threading

import keras
import numpy as np

from vit_keras.image_check import EXTENSIONS as IMAGE_EXTENSIONS  # .webp too: both decoders read it
from vit_keras.preprocessing import preprocess_inputs

# The splits every dataset is given as (`Splits` fields).
SPLITS = ("test", "validation", "train")

logger = logging.getLogger("vit_keras")


def _tf():
    import tensorflow as tf

    return tf


def use_tf_data():
    """Whether sources and pipelines are `tf.data`: on the TensorFlow backend."""
    return keras.backend.backend() == "tensorflow"


@dataclasses.dataclass
class Examples:
    """A split held without TensorFlow: images and their integer labels.

    Args:
        images: array. uint8 pixels `[n, H, W, 3]`, or `n` image file names.
        labels: array. int64 class indices `[n]`.
    """

    images: np.ndarray
    labels: np.ndarray

    def __len__(self):
        return len(self.labels)

    def image(self, index):
        """Image `index` as uint8 `[H, W, 3]` (a file is decoded as the TF pipeline does)."""
        image = self.images[index]
        return decode_file(image) if isinstance(image, str) else np.asarray(image)


def decode_file(path):
    """An image file as uint8 `[H, W, 3]`: grey and palette images become RGB, alpha is dropped, first frame."""
    import PIL.Image

    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _split(images, labels, tf_data):
    if tf_data:
        return _tf().data.Dataset.from_tensor_slices((images, labels))
    return Examples(np.asarray(images), np.asarray(labels, "int64"))


@dataclasses.dataclass
class Splits:
    """The three splits of a dataset and what the pipeline needs to know of it.

    The splits are `tf.data.Dataset`s on the TensorFlow backend (and for TFDS
    datasets), else `Examples`.
    """

    train: object
    validation: object
    test: object
    class_names: list
    num_train: int
    flip: bool = True  # off where a mirror image changes the label (digits)
    crop_area: tuple = (0.05, 1.0)


def digits(tf_data=None):
    """scikit-learn's 1,797 handwritten 8x8 digits (offline); a fifth held out for test.

    Args:
        tf_data: bool or None. Splits as `tf.data` datasets (else `Examples`);
            None: on the TensorFlow backend. Defaults to None.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    tf_data = use_tf_data() if tf_data is None else tf_data
    data = load_digits()
    images = np.repeat((data.images * (255.0 / 16.0))[..., None], 3, -1).astype("float32")
    # Stored upsampled to 32x32 so that random crops are not cut on the coarse 8x8 grid
    # (half-pixel bilinear, as tf.image.resize, on any backend).
    images = keras.ops.convert_to_numpy(keras.ops.image.resize(images, (32, 32), interpolation="bilinear"))
    images = images.clip(0, 255).round().astype("uint8")
    labels = data.target.astype("int64")
    # The split is fixed (seed 0) whatever the training seed, so results compare.
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=0
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_train, y_train, test_size=0.05, stratify=y_train, random_state=0
    )
    return Splits(
        train=_split(x_train, y_train, tf_data),
        validation=_split(x_val, y_val, tf_data),
        test=_split(x_test, y_test, tf_data),
        class_names=[str(i) for i in range(10)],
        num_train=len(x_train),
        flip=False,  # a mirrored digit is another digit, or none
        crop_area=(0.5, 1.0),  # an 8x8 digit has little detail to spare
    )


def image_folder(path, seed=0, fractions=(0.8, 0.1), check=True, tf_data=None):
    """A folder with one sub-folder of images per class, split 80/10/10 by a seeded shuffle.

    Hidden sub-folders (`.ipynb_checkpoints`) are no classes, and hidden folders
    and files inside class folders are not images of the class; they and files
    with other extensions are left out with a log line that counts them. With
    `check`, every file is decoded once up front by the decoder training uses
    (TensorFlow's for `tf.data`, Pillow's for `Examples`), in parallel, and a
    folder with any file that does not decode is refused with the names of
    those files (none is skipped: a silently smaller dataset is worse than an
    error). Files that decoded are remembered (`image_check`): a rerun decodes
    only new or changed ones.
    """
    from vit_keras import image_check

    tf_data = use_tf_data() if tf_data is None else tf_data
    listing = image_check.list_folder(path)  # hidden folders/files and other extensions left out, counted
    class_names, files, labels, counts = listing.class_names, listing.files, listing.labels, listing.counts
    _report_unused(path, listing)
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
    if check:  # decoded in parallel, only files new or changed since the last check (image_check)
        bad = image_check.check_files(path, files, "tensorflow" if tf_data else "pillow")
        if bad:
            shown = "; ".join(f"{image_check.shown(f)}: {reason}" for f, reason in bad[:10])
            more = f"; and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise ValueError(
                f"Image folder {path}: {len(bad)} of {len(files)} files cannot be decoded "
                f"(remove or replace them): {shown}{more}"
            )
    order = np.random.default_rng(seed).permutation(len(files))
    files, labels = np.array(files)[order], np.array(labels, "int64")[order]
    n_train = max(1, int(fractions[0] * len(files)))
    n_val = max(1, int(fractions[1] * len(files)))
    if n_train + n_val >= len(files):
        raise ValueError(f"{path} has {len(files)} images: too few for train, validation and test splits "
                         f"(at least {n_train + n_val + 1} needed).")

    def split(lo, hi):
        if not tf_data:
            return Examples(np.array([str(f) for f in files[lo:hi]], dtype=object), labels[lo:hi])
        tf = _tf()
        names = np.array([os.fsencode(f) for f in files[lo:hi]], dtype=object)  # names that are not UTF-8 too
        return tf.data.Dataset.from_tensor_slices((names, labels[lo:hi])).map(
            lambda f, y: (tf.io.read_file(f), y), num_parallel_calls=tf.data.AUTOTUNE
        )

    return Splits(
        train=split(0, n_train),
        validation=split(n_train, n_train + n_val),
        test=split(n_train + n_val, len(files)),
        class_names=class_names,
        num_train=n_train,
    )


def _report_unused(path, listing):
    """One line each for the files of class folders that are not used: hidden ones, other extensions."""
    from vit_keras.image_check import shown

    for what, found in (("hidden (dot-named) file(s) or folder(s)", listing.hidden),
                        (f"file(s) not ending in {'/'.join(IMAGE_EXTENSIONS)}", listing.others)):
        if found:
            examples = ", ".join(shown(os.path.relpath(f, path)) for f in found[:3])
            more = f" and {len(found) - 3} more" if len(found) > 3 else ""
            logger.warning("Image folder %s: %d %s in class folders are not used: %s%s.",
                           shown(path), len(found), what, examples, more)


def undecodable(files):
    """`[(file, reason)]` for each file that TensorFlow's image decoder (the pipeline's) rejects.

    Every file is read and decoded once, in parallel; only the failures are
    decoded a second time, to give their reason.
    """
    tf = _tf()
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


def undecodable_by_pillow(files):
    """`[(file, reason)]` for each file that Pillow (the `ImagePipeline`'s decoder) rejects."""
    from concurrent.futures import ThreadPoolExecutor

    def reason(file):
        try:
            image = decode_file(file)
        except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, ...
            return str(e).splitlines()[0] if str(e) else type(e).__name__
        return None if image.ndim == 3 and image.size else "decodes to no pixels"

    files = [str(f) for f in files]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        reasons = list(pool.map(reason, files))
    return [(f, r) for f, r in zip(files, reasons) if r is not None]


def _decode_error(file):
    tf = _tf()
    try:
        tf.io.decode_image(tf.io.read_file(file), channels=3, expand_animations=False)
    except tf.errors.OpError as e:
        lines = [line.strip() for line in (e.message or "").splitlines() if line.strip()]
        text = re.sub(r"\{\{.*?\}\}\s*", "", lines[0] if lines else "")
        return re.sub(r"\s*\[Op:\w+\].*$", "", text) or type(e).__name__
    return "could not be decoded"


def tfds_dataset(name, data_dir=None, download=False):
    """A `tensorflow_datasets` dataset; 2% of train is held out when it has no validation split."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ValueError(f"Dataset {name!r} is a TFDS name, which needs TensorFlow and tensorflow-datasets "
                         f"({e}); 'digits' and folders of images train without them.") from None
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


def load(dataset, data_dir=None, download=False, tf_data=None):
    """Returns the `Splits` of `digits`, a folder of class folders, or a TFDS name.

    Args:
        tf_data: bool or None. For `digits` and folders: `tf.data` splits
            (else `Examples`); None: on the TensorFlow backend. TFDS names are
            always `tf.data`. Defaults to None.
    """
    if dataset == "digits":
        return digits(tf_data)
    if os.path.isdir(dataset):
        return image_folder(dataset, tf_data=tf_data)
    if os.sep in dataset or dataset.startswith("."):
        raise ValueError(f"Unknown dataset {dataset!r}: no such folder.")
    return tfds_dataset(dataset, data_dir, download)


def pixels(ds, image_size, count=None):
    """Up to `count` images of a split as uint8 pixels `[n, H, W, 3]` at `image_size`, and their labels."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if isinstance(ds, Examples):
        n = len(ds) if count is None else min(count, len(ds))
        images = [np.round(resize(ds.image(i), (height, width))).astype("uint8") for i in range(n)]
        return np.stack(images), ds.labels[:n]
    tf = _tf()
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
    tf = _tf()
    if image.dtype == tf.string:
        image = tf.io.decode_image(image, channels=3, expand_animations=False)
    if image.shape.rank == 2 or image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(tf.reshape(image, tf.concat([tf.shape(image)[:2], [1]], 0)))
    return tf.ensure_shape(image, [None, None, 3])


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
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if isinstance(ds, Examples):
        return ImagePipeline(ds, (height, width), num_classes, batch_size, training=training, flip=flip,
                             crop_area=crop_area, randaugment=randaugment, mixup=mixup, cutmix=cutmix,
                             seed=seed, repeat=repeat)
    tf = _tf()

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


def resize(image, size):
    """Antialiased bilinear resize of `[H, W, C]` pixels to float32 `size` (as `tf.image.resize(antialias=True)`).

    Each channel is resized in float by Pillow, whose bilinear filter widens
    with the scale when shrinking, as TensorFlow's antialiasing does.
    """
    import PIL.Image

    height, width = size
    image = np.asarray(image, "float32")
    if image.shape[:2] == (height, width):
        return image
    channels = [
        np.asarray(PIL.Image.fromarray(np.ascontiguousarray(image[..., c]), mode="F").resize(
            (width, height), PIL.Image.BILINEAR))
        for c in range(image.shape[-1])
    ]
    return np.stack(channels, -1)


def crop_box(rng, height, width, area_range, aspect_range=(3 / 4, 4 / 3), attempts=100):
    """`(top, left, h, w)` of an inception crop, as `tf.image.sample_distorted_bounding_box`.

    A box of a uniform share of the area in `area_range` and a uniform aspect
    ratio (w/h) in `aspect_range`, placed uniformly; the whole image when no
    attempt fits.
    """
    area = height * width
    for _ in range(attempts):
        target = rng.uniform(*area_range) * area
        ratio = rng.uniform(*aspect_range)
        h = int(round(np.sqrt(target / ratio)))
        w = int(round(np.sqrt(target * ratio)))
        if 0 < h <= height and 0 < w <= width:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return 0, 0, height, width


class ImagePipeline(keras.utils.PyDataset):
    """`make_pipeline` without TensorFlow: batches of `([-1, 1] images, one-hot labels)` from `Examples`.

    Training batches draw a new seeded permutation of the examples for each
    pass over them; each image's crop and flip are drawn from `(seed, pass,
    index)`, so a batch is the same whatever worker makes it. RandAugment,
    MixUp and CutMix are the Keras layers of the `tf.data` pipeline, applied
    to each batch.

    Args:
        examples: Examples. The split.
        image_size: (height, width). Output resolution.
        num_classes: int. Width of the one-hot labels.
        batch_size: int. Images per batch.
        training: bool. Shuffle, augment, and drop a last partial batch.
            Defaults to False.
        flip: bool. Random left-right flips in training. Defaults to True.
        crop_area: (min, max). Share of the area of the inception crop in
            training. Defaults to (0.05, 1.0).
        randaugment: bool. RandAugment in training. Defaults to False.
        mixup: bool. MixUp in training. Defaults to False.
        cutmix: bool. CutMix in training (one of the two per batch with
            MixUp). Defaults to False.
        seed: int. Seed of the shuffles and augmentations. Defaults to 0.
        repeat: bool. Training batches without end (`fit` gets
            `steps_per_epoch`). Defaults to False.
        workers: int. Threads that make batches. Defaults to 2.
    """

    def __init__(self, examples, image_size, num_classes, batch_size, training=False, flip=True,
                 crop_area=(0.05, 1.0), randaugment=False, mixup=False, cutmix=False, seed=0,
                 repeat=False, workers=2):
        super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=8)
        if training and len(examples) < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {len(examples)} examples of the split.")
        self.examples = examples
        self.image_size = tuple(image_size)
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.training = training
        self.flip = flip
        self.crop_area = tuple(crop_area)
        self.seed = seed
        self.repeat = repeat
        self.epoch = 0  # the pass, for training without `repeat`
        self.lock = threading.Lock()  # the Keras augmentation layers keep seed state
        self.randaugment = (keras.layers.RandAugment(value_range=(0, 255), seed=seed)
                            if training and randaugment else None)
        self.mixers = [m for m, on in ((keras.layers.MixUp, mixup), (keras.layers.CutMix, cutmix)) if training and on]
        self.mixers = [m(seed=seed) for m in self.mixers]

    @property
    def per_pass(self):
        """Batches in one pass over the examples."""
        n = len(self.examples)
        return n // self.batch_size if self.training else -(-n // self.batch_size)

    @property
    def num_batches(self):
        return None if self.training and self.repeat else self.per_pass

    def __len__(self):
        if self.num_batches is None:
            raise TypeError("A repeating training ImagePipeline has no length.")
        return self.num_batches

    @functools.lru_cache(maxsize=4)
    def _order(self, epoch):
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def on_epoch_end(self):
        self.epoch += 1

    def __getitem__(self, index):
        if self.training:
            epoch, index = divmod(index, self.per_pass) if self.repeat else (self.epoch, index)
            rows = self._order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        else:
            epoch, rows = 0, np.arange(index * self.batch_size,
                                       min(len(self.examples), (index + 1) * self.batch_size))
        images = np.stack([self._image(int(row), epoch) for row in rows])
        labels = np.eye(self.num_classes, dtype="float32")[self.examples.labels[rows]]
        if self.randaugment is not None:
            with self.lock:
                images = keras.ops.convert_to_numpy(self.randaugment(images, training=True))
        images = preprocess_inputs(images)
        if self.mixers:
            mixer = self.mixers[0]
            if len(self.mixers) == 2:  # one of the two per batch
                mixer = self.mixers[int(np.random.default_rng([self.seed, epoch, index, 1]).integers(2))]
            with self.lock:
                out = mixer({"images": images, "labels": labels}, training=True)
            images, labels = (keras.ops.convert_to_numpy(out[k]) for k in ("images", "labels"))
        return images.astype("float32"), labels.astype("float32")

    def _image(self, row, epoch):
        image = self.examples.image(row)
        if self.training:
            rng = np.random.default_rng([self.seed, epoch, row])
            top, left, h, w = crop_box(rng, image.shape[0], image.shape[1], self.crop_area)
            image = image[top:top + h, left:left + w]
            if self.flip and rng.random() < 0.5:
                image = image[:, ::-1]
        return np.clip(resize(image, self.image_size), 0.0, 255.0)
