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

The package, in the order its modules import each other:
- `images`: the image helpers other modules use: decode (Pillow and
  TensorFlow), `read_image` (checked), resize, `height_width` (the one
  image-size normaliser).
- `datasets`: `digits`, `image_folder`, `tfds_dataset`, `load`; `Splits`,
  `Examples`; the decodability checks.
- `numpy_pipeline`: `ImagePipeline`, `crop_box`: the recipe in NumPy.
- `pipeline`: `make_pipeline` (the recipe in `tf.data`), `pixels`.

Every name is importable from `vit_keras.data` itself, as before the split.
"""

from vit_keras.data.datasets import (
    IMAGE_EXTENSIONS,
    SPLITS,
    Examples,
    Splits,
    digits,
    image_folder,
    load,
    logger,  # noqa: F401  (the old module's name: the "vit_keras" logger)
    tfds_dataset,
    undecodable,
    undecodable_by_pillow,
    use_tf_data,
)
from vit_keras.data.images import decode, decode_error, decode_file, height_width, read_image, resize
from vit_keras.data.numpy_pipeline import ImagePipeline, crop_box
from vit_keras.data.pipeline import make_pipeline, pixels
from vit_keras.preprocessing import preprocess_inputs

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "Examples",
    "ImagePipeline",
    "Splits",
    "crop_box",
    "decode",
    "decode_error",
    "decode_file",
    "digits",
    "height_width",
    "image_folder",
    "load",
    "make_pipeline",
    "pixels",
    "preprocess_inputs",
    "read_image",
    "resize",
    "tfds_dataset",
    "undecodable",
    "undecodable_by_pillow",
    "use_tf_data",
]
