"""Hostile requests to the SavedModel signatures: INVALID_ARGUMENT naming the problem, and a living server.

Each request runs in a fresh process, as TF Serving would run it: a CHECK failure inside
TensorFlow aborts the process (rc -6), which fails the test instead of killing pytest.
"""

import io
import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import tensorflow as tf

import vit_keras
from vit_keras import export

SIZE = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny ViT with a random head (so the classes differ), exported as a SavedModel."""
    model = vit_keras.build_model(SIZE, 16, num_layers=1, hidden_size=32, num_heads=2, mlp_dim=64, classes=3)
    head = model.get_layer("head")
    head.kernel.assign(np.random.default_rng(0).normal(0, 0.5, head.kernel.shape).astype("float32"))
    path = export.export_saved_model(model, str(tmp_path_factory.mktemp("serving")), name="tiny")
    return model, path


def run_requests(path, signature, cases, tmp_path):
    """Calls `signature` once per case in one fresh process; {case: [error type, message] or outputs}."""
    inputs = tmp_path / f"{signature}_inputs.npz"
    np.savez(inputs, **{name: value for name, value in cases.items()})
    script = textwrap.dedent(f"""
        import json, numpy as np, tensorflow as tf
        fn = tf.saved_model.load({path!r}).signatures[{signature!r}]
        key = "image_bytes" if {signature!r} == "serving_default" else "images"
        results = {{}}
        with np.load({str(inputs)!r}, allow_pickle=True) as cases:
            for name in cases.files:
                try:
                    out = fn(**{{key: tf.constant(cases[name])}})
                    results[name] = {{k: v.numpy().tolist() for k, v in out.items() if v.dtype != tf.string}}
                except Exception as e:
                    results[name] = [type(e).__name__, getattr(e, "message", str(e))]
        print("RESULTS" + json.dumps(results))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"the serving process died (rc {done.returncode}): {done.stderr[-3000:]}"
    return json.loads(done.stdout.split("RESULTS", 1)[1])


def assert_refused(result, *words):
    assert isinstance(result, list), f"accepted: {result}"
    kind, message = result
    assert kind == "InvalidArgumentError", result
    for word in words:
        assert word in message, (word, message)


def reference_probabilities(model, pixels):
    return tf.nn.softmax(model(np.asarray(pixels, "float32") / 127.5 - 1.0)).numpy()


@pytest.mark.parametrize("signature", ["predict_images", "attention"])
def test_pixel_signatures_refuse_bad_shapes_and_values(tiny, signature, tmp_path):
    model, path = tiny
    good = np.random.default_rng(1).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    nan, inf = good.copy(), good.copy()
    nan[1, 3, 4, 0] = np.nan
    inf[0, 0, 0, 2] = -np.inf
    cases = {
        "rank3": good[0],                                   # aborted the process before (CHECK failure)
        "rank5": good[None],                                # was silently accepted
        "small": np.zeros((1, 16, 16, 3), "float32"),
        "gray": np.zeros((1, SIZE, SIZE, 1), "float32"),
        "nan": nan,                                         # was a "confident" class
        "inf": inf,
        "float64": good.astype("float64"),
        "good": good,
    }
    results = run_requests(path, signature, cases, tmp_path)
    expected = f"images: expected float32 pixels of shape [N, {SIZE}, {SIZE}, 3], got shape"
    assert_refused(results["rank3"], expected, f"[{SIZE} {SIZE} 3]")
    assert_refused(results["rank5"], expected, f"[1 2 {SIZE} {SIZE} 3]")
    assert_refused(results["small"], expected, "[1 16 16 3]")
    assert_refused(results["gray"], expected, f"[1 {SIZE} {SIZE} 1]")
    assert_refused(results["nan"], "images: pixels must be finite", "NaN or Inf")
    assert_refused(results["inf"], "images: pixels must be finite", "NaN or Inf")
    assert_refused(results["float64"], "float", "double")  # the signature's dtype, checked by the runtime
    # The checks do not change what a good request gets.
    if signature == "predict_images":
        np.testing.assert_allclose(results["good"]["probabilities"], reference_probabilities(model, good), atol=1e-5)
    else:
        assert np.asarray(results["good"]["rollout"]).shape == (2, 2, 2)


def png(image):
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def gif_bomb():
    """A GIF whose logical screen is 64x64 and whose one frame is 10000x10000 (about 75 KB)."""
    image = PIL.Image.new("P", (10000, 10000), 0)
    image.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    buf = io.BytesIO()
    image.save(buf, format="GIF")
    data = bytearray(buf.getvalue())
    data[6:10] = struct.pack("<HH", 64, 64)
    assert len(data) < 100_000 and data.count(struct.pack("<HH", 10000, 10000)) >= 1
    return bytes(data)


def test_serving_default_refuses_bad_requests(tiny, tmp_path):
    model, path = tiny
    image = np.random.default_rng(2).integers(0, 256, (SIZE, SIZE, 3)).astype("uint8")
    cases = {
        "scalar": np.array(png(image), dtype=object),
        "matrix": np.array([[png(image)]], dtype=object),
        "floats": np.zeros((1, SIZE, SIZE, 3), "float32"),
        "gif_bomb": np.array([gif_bomb()], dtype=object),
        "good": np.array([png(image)], dtype=object),
    }
    results = run_requests(path, "serving_default", cases, tmp_path)
    assert_refused(results["scalar"], "image_bytes: expected a string vector [N] of encoded images", "got shape] []")
    assert_refused(results["matrix"], "image_bytes: expected a string vector [N]", "[1 1]")
    assert_refused(results["floats"], "string", "float")
    assert_refused(results["gif_bomb"], f"image exceeds the limit of {export.MAX_PIXELS} pixels")
    np.testing.assert_allclose(results["good"]["probabilities"], reference_probabilities(model, image[None]),
                               atol=1e-5)


def test_saved_model_cli_rank3_is_an_error_not_an_abort(tiny, tmp_path):
    """The TF1 session path (saved_model_cli, like TF Serving) gets the same in-graph check."""
    _, path = tiny
    np.save(tmp_path / "rank3.npy", np.zeros((SIZE, SIZE, 3), "float32"))
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    run = subprocess.run([cli, "run", "--dir", path, "--tag_set", "serve", "--signature_def", "predict_images",
                          "--inputs", f"images={tmp_path / 'rank3.npy'}"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode > 0, (run.returncode, run.stderr[-2000:])
    assert f"images: expected float32 pixels of shape [N, {SIZE}, {SIZE}, 3]" in run.stderr, run.stderr[-2000:]


# ----------------------------------------------------------------------------- GIF frames


def gif_frame_block(image):
    """The image block (descriptor, tables, LZW data) of a one-frame GIF PIL writes for `image`."""
    buf = io.BytesIO()
    image.save(buf, format="GIF", optimize=False)
    data = buf.getvalue()
    pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    while data[pos] == 0x21:  # extensions PIL may write before the frame
        pos += 2
        while data[pos]:
            pos += data[pos] + 1
        pos += 1
    assert data[pos] == 0x2C and data[-1] == 0x3B
    return data[:13 + (3 << ((data[10] & 7) + 1))], data[pos:-1]


def animated_gif(screen, frames):
    """A GIF with a `screen` (w, h) logical screen and the given P-mode frames (any sizes)."""
    head, first = gif_frame_block(frames[0])
    blocks = [first] + [gif_frame_block(f)[1] for f in frames[1:]]
    return head[:6] + struct.pack("<HH", *screen) + head[10:] + b"".join(blocks) + b";"


def palette_image(size, index):
    image = PIL.Image.new("P", size, index)
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    return image


def test_gif_counts_every_frame_and_decodes_only_the_first():
    # Each frame fits the limit on its own and the screen is small, but together they do not.
    two = animated_gif((64, 64), [palette_image((64, 64), 0), palette_image((100, 100), 1)])
    with pytest.raises(tf.errors.InvalidArgumentError, match="image exceeds the limit of 12000 pixels"):
        export.decode_images(tf.constant([two]), (8, 8), max_pixels=12000)
    # Within the limit: the first frame (red), not the second (green), is the image.
    pixels = export.decode_images(tf.constant([two]), (8, 8), max_pixels=14096).numpy()
    np.testing.assert_allclose(pixels[0], np.broadcast_to([255, 0, 0], (8, 8, 3)), atol=0.5)
    # An ordinary animation (50 frames) is walked in a few steps per frame.
    frames = [palette_image((32, 32), i % 3) for i in range(50)]
    pixels = export.decode_images(tf.constant([animated_gif((32, 32), frames)]), (4, 4)).numpy()
    np.testing.assert_allclose(pixels[0], np.broadcast_to([255, 0, 0], (4, 4, 3)), atol=0.5)


def test_gif_with_too_many_blocks_is_refused():
    """The block walk is bounded: thousands of tiny comment blocks are refused, not walked for minutes."""
    head, frame = gif_frame_block(palette_image((8, 8), 0))
    comments = b"\x21\xfe\x01x\x00" * 5000
    data = head + comments + frame + b";"
    with pytest.raises(tf.errors.InvalidArgumentError, match="GIF has too many blocks"):
        export.decode_images(tf.constant([data]), (8, 8))
