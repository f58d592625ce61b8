"""Image helpers of the pipelines and their users: decode, resize, image sizes.

`decode_file` (the pipelines' reader), `read_image` (a user's file, checked:
one-line errors, a pixel limit before decoding) and `resize` are the NumPy
side (Pillow; no TensorFlow); `decode` and `decode_error` are TensorFlow's
decoder as the `tf.data` pipeline, `evaluate` and the image-folder check use
it. `height_width` is the package's one image-size normaliser
(`vit_keras.sizes`).
"""

import os
import re

import numpy as np

from vit_keras.preprocessing import MAX_PIXELS
from vit_keras.sizes import height_width

__all__ = ["decode", "decode_error", "decode_file", "height_width", "read_image", "resize"]


def _tf():
    import tensorflow as tf

    return tf


def decode_file(path):
    """An image file as uint8 `[H, W, 3]`: grey and palette images become RGB, alpha is dropped, first frame."""
    import PIL.Image

    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def pillow_reason(file):
    """Why Pillow (the `ImagePipeline`'s decoder) cannot give `file`'s pixels, in one line; None if it can."""
    try:
        image = decode_file(file)
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, ...
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None if image.ndim == 3 and image.size else "decodes to no pixels"


def read_image(path, max_pixels=MAX_PIXELS):
    """An image file -> uint8 pixels `[H, W, 3]` (first frame); one-line ValueError naming the path.

    Refused: what is not a readable local file, a folder, what Pillow cannot
    decode, and images whose header announces more than `max_pixels` pixels
    (checked before decoding).
    """
    import PIL.Image

    path = os.fspath(path)
    if "://" in path:
        raise ValueError(f"{path}: cannot read the image: not a local file (download it first).")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a folder, not an image file.")
    try:
        with PIL.Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ValueError(f"{path}: image exceeds the limit of {max_pixels} pixels ({width}x{height}).")
            return np.asarray(image.convert("RGB"))
    except PIL.UnidentifiedImageError:
        raise ValueError(f"{path}: undecodable image (not a format Pillow reads).") from None
    except (OSError, PIL.Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read the image: {e.strerror or e}") from None


def decode(image):
    """A `tf.data` element's image as uint8 `[H, W, 3]`: encoded bytes are decoded, grey becomes RGB.

    Args:
        image: tf.Tensor. Encoded image bytes (a scalar string: JPEG, PNG,
            GIF (first frame), BMP, WebP) or pixels `[H, W]`, `[H, W, 1]` or
            `[H, W, 3]`.
    """
    tf = _tf()
    if image.dtype == tf.string:
        image = tf.io.decode_image(image, channels=3, expand_animations=False)
    if image.shape.rank == 2 or image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(tf.reshape(image, tf.concat([tf.shape(image)[:2], [1]], 0)))
    return tf.ensure_shape(image, [None, None, 3])


def decode_error(file):
    """Why TensorFlow's image decoder rejects `file` (str or bytes path), in one line without op names."""
    tf = _tf()
    try:
        tf.io.decode_image(tf.io.read_file(file), channels=3, expand_animations=False)
    except tf.errors.OpError as e:
        lines = [line.strip() for line in (e.message or "").splitlines() if line.strip()]
        text = re.sub(r"\{\{.*?\}\}\s*", "", lines[0] if lines else "")
        return re.sub(r"\s*\[Op:\w+\].*$", "", text) or type(e).__name__
    return "could not be decoded"


def resize(image, size):
    """Antialiased bilinear resize of `[H, W, C]` pixels to float32 `size` (as `tf.image.resize(antialias=True)`).

    Each channel is resized in float by Pillow, whose bilinear filter widens
    with the scale when shrinking, as TensorFlow's antialiasing does.

    Args:
        image: array. Pixels `[H, W, C]`.
        size: int or (height, width). The output size.

    Example:
    >>> resize(np.zeros((8, 6, 3), "uint8"), (4, 3)).shape
    (4, 3, 3)
    """
    import PIL.Image

    height, width = height_width(size, "size")
    image = np.asarray(image, "float32")
    if image.shape[:2] == (height, width):
        return image
    channels = [
        np.asarray(PIL.Image.fromarray(np.ascontiguousarray(image[..., c]), mode="F").resize(
            (width, height), PIL.Image.BILINEAR))
        for c in range(image.shape[-1])
    ]
    return np.stack(channels, -1)
