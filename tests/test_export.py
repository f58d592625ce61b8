"""SavedModel for TF Serving and TFLite for phones, checked where they will run."""

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import tensorflow as tf

from vit_keras import data, export


def reference_probabilities(model, pixels):
    """Keras's probabilities for float pixels 0..255: softmax(model((x - 127.5) / 127.5))."""
    logits = model(np.asarray(pixels, "float32") / 127.5 - 1.0)
    return tf.nn.softmax(logits).numpy()


@pytest.fixture(scope="module")
def demo_model(demo_run):
    out, result = demo_run
    return out, result.model


@pytest.fixture(scope="module")
def held_out(demo_model):
    images, labels = data.pixels(data.load("digits").test, 64)
    return images, labels


def encode(image, fmt):
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def test_demo_accuracy(demo_run):
    _, result = demo_run
    assert result.metrics["test_top1"] >= 0.98, result.metrics


def test_saved_model_in_fresh_process(demo_model, held_out, tmp_path):
    out, model = demo_model
    path = export.export_saved_model(model, str(tmp_path / "serving"), name="digits", version=3)
    assert path == str(tmp_path / "serving" / "digits" / "3")
    # Real image files of different formats and sizes (the digits upscaled to 80x72).
    images = held_out[0][:4]
    files = []
    for i, (image, fmt) in enumerate(zip(images, ("PNG", "JPEG", "BMP", "GIF"))):
        big = np.asarray(PIL.Image.fromarray(image).resize((72, 80)))
        files.append(tmp_path / f"img{i}.{fmt.lower()}")
        files[-1].write_bytes(encode(big, fmt))
    result = tmp_path / "result.npz"
    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf, sys
        loaded = tf.saved_model.load({path!r})
        assert "vit_keras" not in sys.modules
        files = {[str(f) for f in files]!r}
        blobs = tf.constant([open(f, "rb").read() for f in files])
        serve = loaded.signatures["serving_default"](image_bytes=blobs)
        pixels = tf.constant(np.load({str(tmp_path / 'pixels.npy')!r}))
        pred = loaded.signatures["predict_images"](images=pixels)
        attn = loaded.signatures["attention"](images=pixels)
        np.savez({str(result)!r}, labels=serve["labels"].numpy().astype(str),
                 **{{"serve_" + k: v.numpy() for k, v in serve.items() if k != "labels"}},
                 **{{"pred_" + k: v.numpy() for k, v in pred.items() if k != "labels"}},
                 **{{"attn_" + k: v.numpy() for k, v in attn.items()}})
    """)
    decoded = np.stack([
        tf.image.resize(tf.io.decode_image(f.read_bytes(), channels=3, expand_animations=False),
                        (64, 64), antialias=True).numpy() for f in files
    ]).clip(0, 255)
    np.save(tmp_path / "pixels.npy", decoded.astype("float32"))
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    got = np.load(result)
    expected = reference_probabilities(model, decoded)
    np.testing.assert_allclose(got["serve_probabilities"], expected, atol=1e-5)
    np.testing.assert_allclose(got["pred_probabilities"], expected, atol=1e-5)
    top = np.argsort(-expected, axis=-1)[:, :5]
    np.testing.assert_array_equal(got["serve_classes"], top)
    assert got["labels"].tolist() == [[str(c) for c in row] for row in top]
    np.testing.assert_allclose(got["serve_scores"], np.take_along_axis(expected, top, -1), atol=1e-5)
    assert got["attn_attention"].shape == (4, 2, 4, 17, 17)
    assert got["attn_rollout"].shape == (4, 4, 4)
    assert json.loads((tmp_path / "serving/digits/3/assets.extra/class_names.json").read_text()) == [
        str(i) for i in range(10)
    ]


def test_saved_model_cli(demo_model, held_out, tmp_path):
    _, model = demo_model
    path = export.export_saved_model(model, str(tmp_path), name="digits")
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    shown = subprocess.run([cli, "show", "--dir", path, "--all"], capture_output=True, text=True, check=True)
    for text in ("serving_default", "predict_images", "attention", "image_bytes", "probabilities", "rollout"):
        assert text in shown.stdout, text
    image_file = tmp_path / "digit.png"
    image_file.write_bytes(encode(held_out[0][0], "PNG"))
    run = subprocess.run(
        [cli, "run", "--dir", path, "--tag_set", "serve", "--signature_def", "serving_default",
         "--input_exprs", f"image_bytes=[open({str(image_file)!r}, 'rb').read()]"],
        capture_output=True, text=True,
    )
    if run.returncode != 0 and "input_exprs" in run.stderr:  # newer CLIs refuse expressions: go through a file
        np.save(tmp_path / "bytes.npy", np.array([image_file.read_bytes()], dtype=object), allow_pickle=True)
        run = subprocess.run(
            [cli, "run", "--dir", path, "--tag_set", "serve", "--signature_def", "serving_default",
             "--inputs", f"image_bytes={tmp_path / 'bytes.npy'}"], capture_output=True, text=True,
        )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "probabilities" in run.stdout and "labels" in run.stdout
    expected = reference_probabilities(model, held_out[0][:1].astype("float32"))
    assert f"b'{np.argmax(expected)}'" in run.stdout


def test_bad_images_are_refused(demo_model, tmp_path):
    _, model = demo_model
    loaded = tf.saved_model.load(export.export_saved_model(model, str(tmp_path), name="d"))
    serve = loaded.signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="undecodable image"):
        serve(image_bytes=tf.constant([b"this is not an image"]))
    # A PNG header that claims 100000 x 100000 pixels is refused before decoding.
    huge = bytearray(encode(np.zeros((8, 8, 3), "uint8"), "PNG"))
    huge[16:24] = (100_000).to_bytes(4, "big") * 2
    with pytest.raises(tf.errors.InvalidArgumentError, match="exceeds the limit"):
        serve(image_bytes=tf.constant([bytes(huge)]))


def test_tflite_parity(demo_model, held_out, tmp_path):
    out, model = demo_model
    images = held_out[0]
    calibration, _ = data.pixels(data.load("digits").train, 64, 200)
    files = export.export_tflite(model, str(tmp_path / "tflite"), representative_images=calibration)
    assert sorted(files) == sorted(export.TFLITE_VARIANTS)
    rows = {r["variant"]: r for r in export.parity_table(model, files, images)}
    print(export.format_parity(rows.values()))
    assert rows["float32"]["max_abs_diff"] <= 1e-4
    assert rows["float16"]["max_abs_diff"] <= 5e-3
    assert rows["dynamic_int8"]["top1_agreement"] >= 0.98
    assert rows["int8"]["top1_agreement"] >= 0.98
    # The full-integer file takes uint8 pixels; each file is LiteRT-runnable with built-in ops only.
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=files["int8"])
    assert interpreter.get_input_details()[0]["dtype"] == np.uint8
    assert json.loads((tmp_path / "tflite" / "class_names.json").read_text())[3] == "3"
    # The parity figures are independent of the helper: recompute float32 directly.
    probs = export.tflite_predict(files["float32"], images[:16].astype("float32"))
    np.testing.assert_allclose(probs, reference_probabilities(model, images[:16]), atol=1e-4)


def test_exports_are_atomic_and_not_overwritten(demo_model, tmp_path):
    _, model = demo_model
    path = export.export_saved_model(model, str(tmp_path), name="m")
    stamp = os.path.getmtime(os.path.join(path, "saved_model.pb"))
    with pytest.raises(FileExistsError, match="overwrite"):
        export.export_saved_model(model, str(tmp_path), name="m")
    assert os.path.getmtime(os.path.join(path, "saved_model.pb")) == stamp
    export.export_saved_model(model, str(tmp_path), name="m", overwrite=True)
    # A failed export leaves neither a partial folder nor temporary files behind.
    with pytest.raises(ValueError, match="Unknown TFLite variant"):
        export.export_tflite(model, str(tmp_path / "lite"), variants=["float32", "float8"])
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_mixed_precision_model_exports_from_float32_copy(tmp_path):
    from vit_keras import training

    result = training.train(model="vit_tiny16", dataset="digits", image_size=32, epochs=1,
                            batch_size=64, precision="mixed_bfloat16", out=str(tmp_path / "run"), verbose=0)
    copy = export.float32_copy(result.model)
    assert {layer.dtype_policy.name for layer in copy._flatten_layers()} == {"float32"}
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(copy(x / 127.5 - 1), result.model(x / 127.5 - 1), atol=0.1)
    lite = export.convert_tflite(result.model, "float32")
    np.testing.assert_allclose(export.tflite_predict(lite, x), reference_probabilities(copy, x), atol=1e-4)


def test_export_command(demo_model, tmp_path):
    out, _ = demo_model
    done = subprocess.run(
        [sys.executable, "-m", "vit_keras.cli", "export", "--model", str(out / "model.keras"),
         "--format", "tflite", "--variants", "float32", "dynamic_int8", "--out", str(tmp_path / "lite")],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "held-out digits images" in done.stdout and "dynamic_int8" in done.stdout
    again = subprocess.run(
        [sys.executable, "-m", "vit_keras.cli", "export", "--model", str(out / "model.keras"),
         "--format", "saved_model", "--out", str(tmp_path / "sm")], capture_output=True, text=True)
    assert again.returncode == 0 and (tmp_path / "sm" / "vit-hybrid-tiny" / "1" / "saved_model.pb").exists()


def parse_wire(data):
    """A minimal protobuf wire-format reader: {field number: [raw values]} (for checking only)."""
    fields, i = {}, 0

    def varint():
        nonlocal i
        shift = value = 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while i < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 2:
            n = varint()
            value, i = data[i:i + n], i + n
        elif wire == 0:
            value = varint()
        else:
            raise AssertionError(f"unexpected wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def test_serving_warmup_file(demo_model, tmp_path):
    _, model = demo_model
    path = export.export_saved_model(model, str(tmp_path), name="digits")
    records = list(tf.data.TFRecordDataset(os.path.join(path, "assets.extra", "tf_serving_warmup_requests")))
    assert len(records) == 1
    log = parse_wire(records[0].numpy())
    request = parse_wire(parse_wire(log[6][0])[1][0])
    spec = parse_wire(request[1][0])
    assert spec[1] == [b"digits"] and spec[3] == [b"serving_default"]
    entry = parse_wire(request[2][0])
    assert entry[1] == [b"image_bytes"]
    from tensorflow.core.framework import tensor_pb2

    proto = tensor_pb2.TensorProto.FromString(entry[2][0])
    blobs = tf.make_ndarray(proto)
    out = tf.saved_model.load(path).signatures["serving_default"](image_bytes=tf.constant(blobs))
    assert out["probabilities"].shape == (1, 10)
