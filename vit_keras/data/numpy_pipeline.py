"""`make_pipeline`'s recipe without TensorFlow: a `keras.utils.PyDataset` over `Examples`.

Pillow decodes, NumPy crops (`crop_box`, as `tf.image.sample_distorted_bounding_box`),
flips and resizes (`images.resize`, as `tf.image.resize(antialias=True)`);
RandAugment, MixUp and CutMix are the same Keras layers as in `tf.data`.
Used on JAX and PyTorch for `digits` and image folders.
"""

import functools
import threading

import keras
import numpy as np

from vit_keras.data.images import height_width, resize
from vit_keras.preprocessing import preprocess_inputs


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
        image_size: int or (height, width). Output resolution.
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
        self.image_size = height_width(image_size)
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
