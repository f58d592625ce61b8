"""`vit_keras.data` as a package: the old module's names, its image helpers, and the one image-size normaliser."""

import re

import numpy as np
import pytest

from vit_keras import data, sizes
from vit_keras.data import datasets, images, numpy_pipeline, pipeline

# Every public name of the single-file `vit_keras/data.py` (0.2.0), by the submodule that now defines it.
OLD_NAMES = {
    datasets: ["SPLITS", "IMAGE_EXTENSIONS", "logger", "use_tf_data", "Examples", "Splits", "digits",
               "image_folder", "undecodable", "undecodable_by_pillow", "tfds_dataset", "load"],
    images: ["decode_file", "resize"],
    numpy_pipeline: ["crop_box", "ImagePipeline"],
    pipeline: ["pixels", "make_pipeline"],
}


def test_the_old_module_names_import_from_the_package():
    from vit_keras.data import (  # noqa: F401  (the import itself is the test)
        IMAGE_EXTENSIONS, SPLITS, Examples, ImagePipeline, Splits, crop_box, decode_file, digits, image_folder, load,
        logger, make_pipeline, pixels, preprocess_inputs, resize, tfds_dataset, undecodable, undecodable_by_pillow,
        use_tf_data)
    import vit_keras

    assert vit_keras.data is data
    for module, names in OLD_NAMES.items():
        for name in names:
            assert getattr(data, name) is getattr(module, name), name
    assert data.SPLITS == ("test", "validation", "train")
    assert data.IMAGE_EXTENSIONS == (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
    assert data.preprocess_inputs is vit_keras.preprocess_inputs
    assert data.logger.name == "vit_keras"


def test_the_image_helpers_have_public_names():
    """What other modules used as privates (`data._decode`, `data._decode_error`) and `visualize.read_image`."""
    from vit_keras import visualize

    for name in ("decode", "decode_error", "decode_file", "read_image", "resize", "height_width"):
        assert getattr(data, name) is getattr(images, name) and name in data.__all__, name
    assert visualize.read_image is images.read_image
    assert data.height_width is sizes.height_width
    assert not hasattr(data, "_decode") and not hasattr(data, "_decode_error")


def test_decode_reads_bytes_and_grey_pixels_as_pillow_does(tmp_path):
    import PIL.Image
    import tensorflow as tf

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    PIL.Image.fromarray(rgb).save(tmp_path / "rgb.png")
    PIL.Image.fromarray(grey).save(tmp_path / "grey.png")
    for name, expected in (("rgb.png", rgb), ("grey.png", np.repeat(grey[..., None], 3, -1))):
        encoded = tf.io.read_file(str(tmp_path / name))
        np.testing.assert_array_equal(data.decode(encoded).numpy(), expected)
        np.testing.assert_array_equal(data.decode_file(tmp_path / name), expected)
        np.testing.assert_array_equal(data.read_image(tmp_path / name), expected)
    np.testing.assert_array_equal(data.decode(tf.constant(grey)).numpy(), np.repeat(grey[..., None], 3, -1))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert "Unknown image file format" in data.decode_error(str(tmp_path / "bad.png"))
    with pytest.raises(ValueError, match=r"bad\.png: undecodable image"):
        data.read_image(tmp_path / "bad.png")


ACCEPTED = [
    (224, (224, 224)),
    (np.int64(7), (7, 7)),
    (np.uint16(7), (7, 7)),
    ((32, 48), (32, 48)),
    ([32, 48], (32, 48)),
    ((32,), (32, 32)),
    ([32], (32, 32)),
    ((np.int32(32), np.int64(48)), (32, 48)),
    (np.array([32, 48]), (32, 48)),
    (np.array([32, 48], "uint8"), (32, 48)),
    (1, (1, 1)),
]


@pytest.mark.parametrize("value, expected", ACCEPTED)
def test_height_width_accepts(value, expected):
    got = sizes.height_width(value)
    assert got == expected and type(got) is tuple
    assert all(type(side) is int for side in got)  # Python ints: JSON and Keras shapes take them


REJECTED = [None, True, False, 0, -3, 224.0, 2.5, "224", "224x224", b"224", (), (0, 5), (5, -1), (1, 2, 3),
            (224.0, 224.0), (True, 2), (32, None), ("32", "48"), [[32, 48]], np.array(224), np.array([[32, 48]]),
            np.array([32.0, 48.0]), {32: 48}, range(2)]


@pytest.mark.parametrize("value", REJECTED, ids=repr)
def test_height_width_refuses_with_one_line(value):
    with pytest.raises(ValueError) as info:
        sizes.height_width(value)
    message = str(info.value)
    assert message == f"image_size must be a positive integer or a (height, width) pair of them, got {value!r}."
    assert "\n" not in message
    with pytest.raises(ValueError, match=r"^size must be a positive integer"):
        sizes.height_width(value, name="size")


def _examples():
    rng = np.random.default_rng(1)
    return data.Examples(rng.integers(0, 256, (4, 12, 10, 3), dtype=np.uint8), np.arange(4) % 2)


BAD = (32, 0)
MESSAGE = re.escape(f"image_size must be a positive integer or a (height, width) pair of them, got {BAD!r}.")


def test_every_entry_point_normalises_sizes_the_same_way(tmp_path):
    """Each place that takes an image size accepts an int and refuses a bad size with the same line."""
    import vit_keras
    from vit_keras import presets, reshape, training

    # data: both pipelines and `pixels`; an int is the square
    examples = _examples()
    assert data.pixels(examples, 6)[0].shape == (4, 6, 6, 3)
    assert data.make_pipeline(examples, np.int64(6), 2, 2)[0][0].shape == (2, 6, 6, 3)
    assert data.ImagePipeline(examples, 6, 2, 2).image_size == (6, 6)
    assert data.resize(examples.image(0), 6).shape == (6, 6, 3)
    for call in (lambda: data.pixels(examples, BAD), lambda: data.make_pipeline(examples, BAD, 2, 2),
                 lambda: data.ImagePipeline(examples, BAD, 2, 2)):
        with pytest.raises(ValueError, match=MESSAGE):
            call()
    # presets: (h, w) with h == w picks the published file of that side, as the int does
    assert presets.find_preset("vit_b16", presets.AUGREG_I1K, (224, 224)).url.endswith("res_224.npz")
    assert presets.find_preset("vit_b16", presets.AUGREG_I1K, [224]).url.endswith("res_224.npz")
    assert presets.find_preset("vit_b16", presets.AUGREG_I1K, (224, 300)).resolution == 384  # none: the first
    with pytest.raises(ValueError, match=MESSAGE):
        presets.find_preset("vit_b16", presets.AUGREG_I1K, BAD)
    # the model, resize, training
    with pytest.raises(ValueError, match=MESSAGE):
        vit_keras.create("vit_tiny16", classes=3, image_size=BAD)
    model = vit_keras.create("vit_tiny16", classes=3, image_size=[32])
    assert model.input_shape == (None, 32, 32, 3)
    assert reshape.resize(model, image_size=(48,)).input_shape == (None, 48, 48, 3)
    with pytest.raises(ValueError, match=MESSAGE):
        reshape.resize(model, image_size=BAD)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=MESSAGE):
        training.train(model="vit_tiny16", dataset=str(tmp_path / "missing"), out=str(out), image_size=BAD,
                       epochs=1, verbose=0)
    assert not out.exists()


def test_serving_graph_helpers_take_an_int_size():
    import PIL.Image
    import tensorflow as tf

    from vit_keras.serving import images as serving_images

    buffer = __import__("io").BytesIO()
    PIL.Image.fromarray(np.full((10, 12, 3), 200, np.uint8)).save(buffer, format="PNG")
    pixels = serving_images.decode_images(tf.constant([buffer.getvalue()]), 8)
    assert tuple(pixels.shape) == (1, 8, 8, 3)
    np.testing.assert_allclose(pixels.numpy(), 200.0, atol=1e-3)
    assert tuple(serving_images.checked_pixels(pixels, 8).shape) == (1, 8, 8, 3)
    with pytest.raises(ValueError, match=MESSAGE):
        serving_images.decode_images(tf.constant([buffer.getvalue()]), BAD)
