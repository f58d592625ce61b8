"""Encoded images and pixels entering a served graph: header limits, decoding, shape checks."""

import tensorflow as tf

from vit_keras.preprocessing import MAX_PIXELS
from vit_keras.sizes import height_width

# A GIF's blocks are walked (to count every frame) in at most this many steps; runs of
# equal-sized data sub-blocks take one step, so ordinary GIFs need a few steps per frame.
MAX_GIF_STEPS = 4096


def _image_size_from_header(data):
    """(height, width) read from a JPEG/PNG/GIF/BMP header, without decoding; (-1, -1) if unknown."""

    def uint(lo, n, little):
        raw = tf.io.decode_raw(tf.strings.substr(data, lo, n), tf.uint8)
        raw = tf.cast(raw, tf.int64)
        order = tf.range(n, dtype=tf.int64) if little else tf.range(n - 1, -1, -1, dtype=tf.int64)
        return tf.reduce_sum(raw * tf.bitwise.left_shift(tf.constant(1, tf.int64), 8 * order))

    magic = tf.strings.substr(data, 0, 4)
    long_enough = tf.strings.length(data) >= 26
    is_png = tf.logical_and(tf.equal(magic, b"\x89PNG"), long_enough)
    is_gif = tf.logical_and(tf.strings.regex_full_match(magic, "GIF8"), long_enough)
    is_bmp = tf.logical_and(tf.equal(tf.strings.substr(data, 0, 2), b"BM"), long_enough)

    def bmp_height():
        # BMP heights are signed 32-bit (negative: stored top-down); the magnitude counts.
        h = uint(22, 4, True)
        return tf.where(h >= 2**31, 2**32 - h, h)

    def jpeg():
        shape = tf.image.extract_jpeg_shape(data)
        return tf.cast(shape[0], tf.int64), tf.cast(shape[1], tf.int64)

    def other():
        unknown = (tf.constant(-1, tf.int64), tf.constant(-1, tf.int64))
        return tf.case(
            [
                (is_png, lambda: (uint(20, 4, False), uint(16, 4, False))),
                (is_gif, lambda: (uint(8, 2, True), uint(6, 2, True))),
                (is_bmp, lambda: (bmp_height(), uint(18, 4, True))),
            ],
            default=lambda: unknown,
        )

    return tf.cond(tf.io.is_jpeg(data), jpeg, other)


@tf.function(input_signature=[tf.TensorSpec([], tf.string)])  # a graph loop, also when called eagerly
def _gif_frames(data, max_steps=MAX_GIF_STEPS):
    """Walks a GIF's blocks: (pixels of all frames, the file cut after its first frame, walked).

    Every image descriptor counts (a 64x64 screen may hold a 10000x10000 frame, and
    the decoder reads every frame before it returns the first). `walked` is False if
    the walk needed more than `max_steps` steps. The cut file (first frame, then the
    trailer) is what gets decoded.
    """
    raw = tf.cast(tf.io.decode_raw(data, tf.uint8), tf.int64)
    n = tf.size(raw, out_type=tf.int64)
    padded = tf.concat([raw, tf.zeros([16], tf.int64)], 0)  # reads past the end give 0
    one, two, zero = (tf.constant(v, tf.int64) for v in (1, 2, 0))
    window = tf.range(256, dtype=tf.int64)

    def get(i):
        return tf.gather(padded, tf.minimum(tf.cast(i, tf.int64), n + 15))

    def color_table(packed):  # size of the colour table that follows, from a packed-fields byte
        return tf.where(packed >= 128, 3 * tf.bitwise.left_shift(one, (packed & 7) + 1), zero)

    def step(pos, mode, frames, pixels, first_end, done):
        # mode 0: at a block introducer; 1: in data sub-blocks; 2: in the sub-blocks of an image.
        c = get(pos)
        at_block = tf.equal(mode, 0)
        is_ext = at_block & tf.equal(c, 0x21)
        is_image = at_block & tf.equal(c, 0x2C)
        area = (get(pos + 5) + 256 * get(pos + 6)) * (get(pos + 7) + 256 * get(pos + 8))
        image_end = pos + 11 + color_table(get(pos + 9))  # descriptor, local table, LZW code size
        ends = ~at_block & tf.equal(c, 0)
        # A run of sub-blocks of c bytes each is skipped in one step.
        same = tf.equal(get(pos + (c + 1) * window), c)
        run = tf.reduce_min(tf.where(same, tf.constant(256, tf.int64), window))
        new_pos = tf.where(is_ext, pos + 2, tf.where(is_image, image_end,
                                                     tf.where(ends, pos + 1, pos + (c + 1) * run)))
        new_mode = tf.where(is_ext, one, tf.where(is_image, two, tf.where(ends, zero, mode)))
        first_end = tf.where(ends & tf.equal(mode, 2) & tf.equal(frames, 1), new_pos, first_end)
        done = (at_block & ~is_ext & ~is_image) | (new_pos > n)  # trailer, junk or end of data
        return (new_pos, new_mode, frames + tf.cast(is_image, tf.int64),
                pixels + tf.where(is_image, area, zero), first_end, done)

    start = 13 + color_table(get(10))
    _, _, frames, pixels, first_end, done = tf.while_loop(
        lambda *state: ~state[-1], step, (start, zero, zero, zero, zero, tf.constant(False)),
        maximum_iterations=max_steps,
    )
    first = tf.strings.join([tf.strings.substr(data, tf.constant(0, tf.int64), first_end), ";"])
    cut = tf.where((frames >= 1) & (first_end > 0), first, data)
    return pixels, cut, done


def decode_images(image_bytes, image_size, max_pixels=MAX_PIXELS):
    """A batch of encoded images -> float32 pixels [N, H, W, 3] in 0..255, resized.

    Raises InvalidArgumentError for bytes that are not a JPEG, PNG, GIF or BMP
    image and for images over `max_pixels`, before decoding them. A GIF counts
    every frame toward the limit, and only its first frame is decoded.
    """
    height, width = height_width(image_size)
    image_bytes = _checked_bytes(image_bytes)

    def one(data):
        # Each check runs before what follows it (explicit control dependencies: inside
        # map_fn's loop nothing else orders them before the decoder).
        h, w = _image_size_from_header(data)
        known = tf.debugging.assert_greater_equal(
            h, tf.constant(0, tf.int64),
            message="image_bytes: undecodable image (not a JPEG, PNG, GIF or BMP file)",
        )
        with tf.control_dependencies([known] if known is not None else []):
            is_gif = tf.strings.regex_full_match(tf.strings.substr(data, 0, 4), "GIF8")
            frame_pixels, data, walked = tf.cond(
                is_gif, lambda: _gif_frames(data),
                lambda: (tf.constant(0, tf.int64), tf.identity(data), tf.constant(True)),
            )
        checks = [
            tf.debugging.assert_equal(
                walked, True,
                message=f"image_bytes: GIF has too many blocks (more than {MAX_GIF_STEPS} steps) "
                        "to check against the pixel limit",
            ),
            tf.debugging.assert_less_equal(
                tf.maximum(h * w, frame_pixels), tf.constant(max_pixels, tf.int64),
                message=f"image_bytes: image exceeds the limit of {max_pixels} pixels"
                        " (a GIF counts the pixels of all its frames)",
            ),
        ]
        with tf.control_dependencies([c for c in checks + [known] if c is not None]):
            image = tf.io.decode_image(data, channels=3, expand_animations=False)
        image = tf.image.resize(image, (height, width), antialias=True)
        return tf.clip_by_value(image, 0.0, 255.0)

    return tf.map_fn(one, image_bytes, fn_output_signature=tf.TensorSpec((height, width, 3), tf.float32))


def _checked_bytes(image_bytes):
    """`image_bytes` after an in-graph check that it is a vector [N] of strings."""
    shape = tf.shape(image_bytes)
    check = tf.debugging.Assert(
        tf.equal(tf.size(shape), 1),
        ["image_bytes: expected a string vector [N] of encoded images, got shape", shape],
        summarize=8,
    )
    with tf.control_dependencies([check]):
        image_bytes = tf.identity(image_bytes)
    return tf.ensure_shape(image_bytes, [None])


def checked_pixels(images, image_size):
    """`images` after in-graph checks: shape [N, H, W, 3] at `image_size`, every pixel finite.

    A served graph must not reach an op with a tensor it cannot take: a rank-3
    tensor there is a CHECK failure that aborts the whole server. Fails with
    InvalidArgumentError naming the expected and the given shape, or the NaN/Inf.
    """
    height, width = height_width(image_size)
    shape = tf.shape(images)
    dims = tf.concat([shape, tf.zeros([4], tf.int32)], 0)[1:4]  # padded: any rank slices
    shape_ok = tf.logical_and(tf.equal(tf.size(shape), 4),
                              tf.reduce_all(tf.equal(dims, [height, width, 3])))
    check_shape = tf.debugging.Assert(
        shape_ok,
        [f"images: expected float32 pixels of shape [N, {height}, {width}, 3], got shape", shape],
        summarize=8,
    )
    with tf.control_dependencies([check_shape]):
        check_finite = tf.debugging.Assert(
            tf.reduce_all(tf.math.is_finite(images)),
            ["images: pixels must be finite numbers in 0..255 (found NaN or Inf)"],
        )
    with tf.control_dependencies([check_shape, check_finite]):
        images = tf.identity(images)
    return tf.ensure_shape(images, [None, height, width, 3])
