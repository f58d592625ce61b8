"""Top-1/top-5 accuracy with the original evaluation preprocessing, streamed in batches."""

import os

import keras
import numpy as np
import tensorflow as tf

from vit_keras import data, files, loader, presets
from vit_keras.model import class_names
from vit_keras.preprocessing import MEAN, STD, preprocess_inputs


def load_model(model, weights=None, image_size=None, checkpoint_prefix=None):
    """A model to evaluate: a `keras.Model`, a `.keras` file, a checkpoint, or a model name with `weights`.

    A name loads `weights` (its default published checkpoint when None) with
    the checkpoint's own head, at `image_size` (default: the checkpoint's
    resolution). `loader.load_model`: the one loader of models.
    """
    # classes=None: the head as the checkpoint has it; image_size None: the checkpoint's resolution.
    return loader.load_model(model, weights=weights or loader.DEFAULT, classes=None, image_size=image_size,
                             checkpoint_prefix=checkpoint_prefix)


def _preset(model, weights, image_size):
    """The published checkpoint a builder name with `weights` loads, or None."""
    if not isinstance(model, str) or model not in loader.NAMES:
        return None
    weights = weights or presets.default_weights(model)
    return presets.find_preset(model, weights, image_size) if weights in presets.WEIGHT_NAMES else None


LABEL_MAPS = ("names", "position")


def check_labels(model_names, dataset_names, dataset, label_map="names"):
    """ValueError unless the model's class names are the dataset's, in order (or `label_map="position"`).

    A model without names (or with the default "0".."C-1") is taken by position.
    """
    if label_map not in LABEL_MAPS:
        raise ValueError(f"Unknown label_map {label_map!r}; use one of {LABEL_MAPS}.")
    if label_map == "position" or not model_names or list(model_names) == list(dataset_names):
        return
    if sorted(model_names) == sorted(dataset_names):
        problem = "the same class names in another order"
    else:
        differ = [f"{m!r} vs {d!r}" for m, d in zip(model_names, dataset_names) if m != d]
        problem = f"other class names ({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''})"
    raise ValueError(f"The model's head has {problem} than {dataset}; its accuracy would be meaningless. Pass "
                     "--label-map position (label_map='position') to score class i of the model as class i "
                     "of the dataset.")


def check_json_path(path):
    """Makes the folder of a `--json` file; ValueError if the path is a folder or cannot be written."""
    if path is None:
        return
    if os.path.isdir(path):
        raise ValueError(f"--json {path} is a folder; give a file name (e.g. {os.path.join(path, 'eval.json')}).")
    parent = os.path.dirname(os.path.abspath(path))
    files.output_folder(parent)


def evaluate(model, dataset, weights=None, image_size=None, split="test", batch_size=32,
             data_dir=None, download=False, verbose=1, label_map="names", checkpoint_prefix=None):
    """Top-1 and top-5 accuracy of `model` on a split of `dataset`.

    Preprocessing is the original's evaluation: decode, resize to the model's
    resolution (bilinear, no crop), normalise with the checkpoint's mean and
    std (`x / 127.5 - 1` for every published one). Images stream through in
    batches of `batch_size` under a progress bar (`console.Progress`).

    Args:
        model: keras.Model, str. A model, a `.keras` file or a builder name.
        dataset: str. "digits", a folder of class folders, or a TFDS name.
        weights: str or None. For a builder name: a published name, path or
            URL. Defaults to the builder's default checkpoint.
        image_size: int or (h, w) or None. For a builder name. Defaults to the
            checkpoint's resolution.
        split: str. "test", "validation" or "train". Defaults to "test".
        batch_size: int. Images per forward pass. Defaults to 32.
        data_dir: str or None. TFDS data directory. Defaults to None.
        download: bool. Let TFDS download the dataset. Defaults to False.
        verbose: int. 1 shows a progress bar. Defaults to 1.
        label_map: str. "names": the model's class names must be the
            dataset's (a ValueError says how they differ); "position": class
            i of the model is class i of the dataset. Defaults to "names".
        checkpoint_prefix: str or None. The tower of a two-tower file ("img").
            Defaults to None.

    Returns:
        dict with `top1`, `top5`, `count`, `model`, `dataset`, `split`, `image_size`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if split not in data.SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {data.SPLITS}.")
    if label_map not in LABEL_MAPS:
        raise ValueError(f"Unknown label_map {label_map!r}; use one of {LABEL_MAPS}.")
    preset = _preset(model, weights, image_size)
    model_arg = model
    mean, std = (preset.mean, preset.std) if preset else (MEAN, STD)
    model = load_model(model, weights, image_size, checkpoint_prefix)
    splits = data.load(dataset, data_dir=data_dir, download=download, tf_data=True)  # on any backend
    classes = model.output_shape[-1]
    if classes != len(splits.class_names):
        raise ValueError(f"Model {model.name!r} has {classes} outputs but {dataset} has "
                         f"{len(splits.class_names)} classes.")
    if not (isinstance(model_arg, str) and model_arg in loader.NAMES):  # a builder's head: ImageNet's names
        check_labels(class_names(model), splits.class_names, dataset, label_map)
    height, width = model.input_shape[1:3]

    def prepare(image, label):
        image = tf.image.resize(data.decode(image), (height, width))  # bilinear, as the original
        return preprocess_inputs(tf.clip_by_value(image, 0.0, 255.0), mean, std), label

    ds = getattr(splits, split).map(prepare, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    total = int(getattr(splits, split).cardinality().numpy())
    if total > 0:  # redrawn on a terminal, a few lines in a log
        from vit_keras import console

        bar = console.Progress(f"Evaluating on {split} of {dataset}", total, "image", enabled=bool(verbose))
    else:
        bar = keras.utils.Progbar(None, verbose=verbose, unit_name="image")
    top1 = top5 = seen = 0
    k = min(5, classes)
    for images, labels in ds:
        logits = keras.ops.convert_to_numpy(model(np.asarray(images), training=False)).astype("float32")
        labels = np.asarray(labels)
        best = np.argsort(-logits, axis=-1)[:, :k]
        top1 += int(np.sum(best[:, 0] == labels))
        top5 += int(np.sum(np.any(best == labels[:, None], axis=-1)))
        seen += len(labels)
        bar.update(seen, values=[("top1", top1 / seen)])
    if not seen:
        raise ValueError(f"The {split} split of {dataset} is empty.")
    size = (height, width) if height != width else height
    return {"model": model.name, "dataset": dataset, "split": split, "image_size": size,
            "count": seen, "top1": top1 / seen, "top5": top5 / seen}
