"""SavedModel for TF Serving and TFLite for phones, checked where they will run."""

import io
import json
import os
import re
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
    expected = reference_probabilities(model, held_out[0][:1].astype("float32"))[0]
    # saved_model_cli prints each output as "Result for output key NAME:" then the array.
    sections = dict(re.findall(r"Result for output key (\w+):\s*\n(.*?)(?=\nResult for output key|\Z)",
                               run.stdout, re.S))
    labels = re.findall(r"b'([^']*)'", sections["labels"])
    assert labels == [str(c) for c in np.argsort(-expected)[:5]], (labels, expected)
    probabilities = np.array([float(v) for v in re.findall(r"[-+0-9.e]+", sections["probabilities"])])
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


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
    assert {w.dtype for w in copy.weights} == {"float32"}
    assert "bfloat16" in json.dumps(result.model.get_config()) and "bfloat16" not in json.dumps(copy.get_config())
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(copy(x / 127.5 - 1), result.model(x / 127.5 - 1), atol=0.1)
    lite = export.convert_tflite(result.model, "float32")
    np.testing.assert_allclose(export.tflite_predict(lite, x), reference_probabilities(copy, x), atol=1e-4)


def test_export_command(demo_model, tmp_path):
    out, _ = demo_model
    done = subprocess.run(
        [sys.executable, "-m", "vit_keras.cli", "export", "--model", str(out / "model.keras"),
         "--format", "tflite", "--variants", "float32", "--out", str(tmp_path / "lite")],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "held-out digits images" in done.stdout and "float32" in done.stdout
    assert sorted(os.listdir(tmp_path / "lite")) == ["class_names.json", "float32.tflite", "vit_keras_export.json"]
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


# ----------------------------------------------------------------------------- careless input, memory


@pytest.fixture(scope="module")
def tiny_model():
    """A tiny ViT (32x32, one block) with a random head, so its classes differ."""
    import vit_keras

    model = vit_keras.build_model(32, 16, num_layers=1, hidden_size=32, num_heads=2, mlp_dim=64, classes=3)
    head = model.get_layer("head")
    head.kernel.assign(np.random.default_rng(0).normal(0, 0.5, head.kernel.shape).astype("float32"))
    return model


def snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_never_replaces_the_run_folder(tiny_model, tmp_path, capsys):
    """Issue 11: `--out R --overwrite` with R the run folder deleted the model, metrics and logs."""
    import keras

    from vit_keras import cli

    run = tmp_path / "runs" / "exp" / "1"  # a run folder that a SavedModel version path can also name
    run.mkdir(parents=True)
    tiny_model.save(run / "model.keras")
    (run / "metrics.json").write_text(json.dumps({"dataset": "digits"}))
    (run / "logs").mkdir()
    (run / "logs" / "train.csv").write_text("epoch,loss\n0,1.0\n")
    before = snapshot(run)
    model = str(run / "model.keras")
    for args in (["--format", "tflite", "--out", str(run), "--variants", "float32"],
                 ["--format", "saved_model", "--out", str(tmp_path / "runs"), "--name", "exp", "--version", "1"]):
        code = cli.main(["export", "--model", model, *args, "--overwrite"])
        err = capsys.readouterr().err
        assert code == 2 and str(run) in err and "contains the input model" in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert snapshot(run) == before
    keras.saving.load_model(run / "model.keras")
    # A SavedModel version folder that is not an earlier export (the user's files) is refused too.
    (run / "m" / "1").mkdir(parents=True)
    (run / "m" / "1" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="was not written by vit-keras export"):
        export.export_saved_model(tiny_model, str(run), name="m", version=1, overwrite=True)
    assert (run / "m" / "1" / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_only_an_earlier_export(tiny_model, tmp_path):
    out = tmp_path / "lite"
    export.export_tflite(tiny_model, str(out), variants=["float32"])
    manifest = json.loads((out / export.MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["class_names.json", "float32.tflite"]
    export.export_tflite(tiny_model, str(out), variants=["float32"], overwrite=True)  # an earlier export: replaced
    # A file the user put into the export folder is not lost: the folder is not replaced.
    (out / "my_notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="files the export did not write.*my_notes.txt"):
        export.export_tflite(tiny_model, str(out), variants=["float32"], overwrite=True)
    assert (out / "my_notes.txt").read_text() == "mine" and (out / "float32.tflite").exists()
    # A file where the folder would go is not replaced either, nor is a `.old` folder beside it touched.
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FileExistsError, match="not an export folder"):
        export.export_tflite(tiny_model, str(tmp_path / "file"), variants=["float32"], overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["file", "lite"]


def test_exports_follow_the_umask(tiny_model, tmp_path):
    """Issue 11: mkdtemp made the export 0700, unreadable to a TF Serving process of another user."""
    old = os.umask(0o022)
    try:
        export.export_tflite(tiny_model, str(tmp_path / "lite"), variants=["float32"])
        path = export.export_saved_model(tiny_model, str(tmp_path / "serving"), name="tiny")
    finally:
        os.umask(old)
    for root in (tmp_path / "lite", tmp_path / "serving"):
        folders = [root, *[p for p in root.rglob("*") if p.is_dir()]]
        files = [p for p in root.rglob("*") if p.is_file()]
        assert files and {oct(p.stat().st_mode & 0o777) for p in folders} == {"0o755"}, root
        assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}, root
    assert os.path.exists(os.path.join(path, "saved_model.pb"))


@pytest.mark.parametrize("args, message", [
    (["--version", "-1"], "must be a positive integer"),
    (["--version", "0"], "must be a positive integer"),
    (["--name", "../x"], "must be a plain folder name"),
    (["--name", "a/b"], "must be a plain folder name"),
])
def test_export_refuses_bad_version_and_name(args, message, tmp_path, capsys):
    from vit_keras import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--model", str(tmp_path / "m.keras"), "--format", "saved_model",
                  "--out", str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_saved_model_refuses_bad_version_and_name(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="must be a plain folder name"):
        export.export_saved_model(tiny_model, str(tmp_path / "serving"), name="../escaped")
    with pytest.raises(ValueError, match="version must be a positive integer"):
        export.export_saved_model(tiny_model, str(tmp_path / "serving"), name="m", version=-1)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "serving").exists()


def test_parity_table_runs_in_bounded_batches(tiny_model, tmp_path, monkeypatch):
    """Issue 16: the parity table pushed every image through Keras and each interpreter at once."""
    from ai_edge_litert.interpreter import Interpreter

    images = np.random.default_rng(3).integers(0, 256, (10, 32, 32, 3)).astype("uint8")
    files = export.export_tflite(tiny_model, str(tmp_path / "lite"), variants=["float32", "int8"],
                                 representative_images=images)
    # Independent figures: Keras on all images at once, each file through a plain interpreter at once.
    reference = reference_probabilities(tiny_model, images)
    expected = {}
    for variant, path in files.items():
        interpreter = Interpreter(model_path=path)
        inp = interpreter.get_input_details()[0]
        interpreter.resize_tensor_input(inp["index"], images.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], images.astype(inp["dtype"]))
        interpreter.invoke()
        out = interpreter.get_output_details()[0]
        probs = interpreter.get_tensor(out["index"]).astype("float32")
        if out["dtype"] != np.float32:
            probs = (probs - out["quantization"][1]) * out["quantization"][0]
        expected[variant] = probs
    # Spy on what the parity table asks of LiteRT and Keras (the real calls run).
    from ai_edge_litert.interpreter import SignatureRunner

    fed, keras_batches = [], []
    original_call = SignatureRunner.__call__
    monkeypatch.setattr(SignatureRunner, "__call__",
                        lambda self, **kw: (fed.append(kw["images"].shape), original_call(self, **kw))[1])
    original_predict = type(tiny_model).predict_on_batch
    monkeypatch.setattr(type(tiny_model), "predict_on_batch",
                        lambda self, x, *a, **kw: (keras_batches.append(len(x)),
                                                   original_predict(self, x, *a, **kw))[1])
    rows = {r["variant"]: r for r in export.parity_table(tiny_model, files, images, batch_size=4)}
    assert fed and max(shape[0] for shape in fed) <= 4, fed
    assert sum(keras_batches) == len(images) and max(keras_batches) <= 4, keras_batches
    for variant, probs in expected.items():
        assert rows[variant]["max_abs_diff"] == pytest.approx(float(np.abs(probs - reference).max()), abs=1e-6)
        assert rows[variant]["top1_agreement"] == np.mean(probs.argmax(-1) == reference.argmax(-1))
    # tflite_predict reuses a given interpreter; its input never grows beyond the batch.
    interpreter = export.tflite_interpreter(files["float32"])
    streamed = export.tflite_predict(interpreter, images, batch_size=3)
    assert interpreter.get_input_details()[0]["shape"][0] <= 3
    np.testing.assert_allclose(streamed, expected["float32"], atol=1e-6)


def test_class_names_must_fit_the_outputs(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="2 class names given for a model with"):
        export.label_names(tiny_model, ["cat", "dog"])
    with pytest.raises(ValueError, match="int8 variant needs representative_images"):
        export.export_tflite(tiny_model, str(tmp_path / "t"), variants=("float32", "int8"))
    assert not (tmp_path / "t").exists()  # refused before converting anything


def test_int8_input_takes_pixels_as_they_are(tiny_model):
    """Calibrated on dim images only (100..150), the uint8 input must still be the identity on pixels 0..255."""
    from ai_edge_litert.interpreter import Interpreter

    rng = np.random.default_rng(0)
    dim = rng.uniform(100, 150, (8, *tiny_model.input_shape[1:])).astype("float32")
    blob = export.convert_tflite(tiny_model, "int8", dim)
    interpreter = Interpreter(model_content=blob)
    details = interpreter.get_input_details()[0]
    assert details["dtype"] == np.uint8 and details["quantization"] == (1.0, 0)


def test_an_export_prepares_its_model_once(tmp_path, monkeypatch):
    """Issue 21: the TFLite export made a float32 copy for the files and another for the parity table."""
    import keras

    import vit_keras
    from vit_keras import model as vit_model
    from vit_keras import serving

    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = vit_keras.build_model(32, 16, num_layers=1, hidden_size=32, num_heads=2, mlp_dim=64, classes=3)
    finally:
        keras.config.set_dtype_policy("float32")
    head = mixed.get_layer("head")
    head.kernel.assign(np.random.default_rng(0).normal(0, 0.5, head.kernel.shape).astype("float32"))
    copies = []
    copy_model = vit_model.copy_model
    monkeypatch.setattr(vit_model, "copy_model", lambda *a, **kw: copies.append(copy_model(*a, **kw)) or copies[-1])
    result = serving.export(mixed, "tflite", str(tmp_path / "lite"), dataset="digits", variants=["float32"],
                            calibration=1, parity=20)
    assert len(copies) == 1  # float32 once, for the conversion and the parity table alike
    (row,) = result["rows"]
    assert row["variant"] == "float32" and row["max_abs_diff"] < 1e-4 and row["top1_agreement"] == 1.0
    # The parity table's Keras side is the float32 copy itself: independent figures from it agree.
    images, _ = data.pixels(data.load("digits").test, (32, 32), 20)
    expected = reference_probabilities(copies[0], images)
    assert float(np.abs(export.tflite_predict(result["files"]["float32"], images) - expected).max()) < 1e-4
