"""Where the examples come from: the offline `digits`, folders of class folders, TFDS names.

Every source gives `Splits` (train, validation, test) whose elements are
`(image, label)` with the image as uint8 `[H, W, 3]` or as encoded bytes. On
the TensorFlow backend (and for TFDS names, on every backend) the splits are
`tf.data` datasets; on JAX and PyTorch `digits` and image folders are
`Examples` (NumPy arrays, or file names), which need no TensorFlow. A folder's
files are checked to decode before training (`image_check`; `undecodable`,
`undecodable_by_pillow` are the plain checks).
"""

import dataclasses
import logging
import os

import keras
import numpy as np

from vit_keras.data.images import decode_error, decode_file, pillow_reason
from vit_keras.image_check import EXTENSIONS as IMAGE_EXTENSIONS  # .webp too: both decoders read it

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
    return [(f, decode_error(f)) for i, f in enumerate(files) if i not in good]


def undecodable_by_pillow(files):
    """`[(file, reason)]` for each file that Pillow (the `ImagePipeline`'s decoder) rejects."""
    from concurrent.futures import ThreadPoolExecutor

    files = [str(f) for f in files]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        reasons = list(pool.map(pillow_reason, files))
    return [(f, r) for f, r in zip(files, reasons) if r is not None]

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
