"""TFLite files through their SignatureDefs, as apps call them, checked against Keras.

One tiny hybrid (ResNet stem, 2 blocks), trained for a few epochs on scikit-learn's
digits at 32x32 so that its predictions mean something, exported once to all four
variants.
"""

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")

import keras

import vit_keras
from vit_keras.model import attention_model
from vit_keras.serving import tflite

SIZE = 32
SERVING = {"inputs": ["images"], "outputs": ["probabilities"]}
ATTENTION = {"inputs": ["images"], "outputs": ["rollout"]}


def digits():
    """scikit-learn's 1,797 digits (8x8, 0..16) as RGB uint8 pixels at SIZE x SIZE, shuffled."""
    from sklearn.datasets import load_digits

    d = load_digits()
    k = SIZE // 8
    images = np.clip(np.kron(d.images, np.ones((k, k))) * 16, 0, 255).astype("uint8")
    order = np.random.default_rng(0).permutation(len(images))
    return np.repeat(images[order, :, :, None], 3, axis=-1), d.target[order]


def keras_probabilities(model, pixels):
    """softmax(model(x / 127.5 - 1)) in NumPy: Keras's answer, computed apart from the export code."""
    logits = np.asarray(model.predict(np.asarray(pixels, "float32") / 127.5 - 1.0, verbose=0), "float64")
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def numpy_rollout(weights, grid):
    """Attention rollout of the class token (mean over heads, + identity, rows renormalised), max 1."""
    result = None
    for w in weights:
        a = np.asarray(w, "float64").mean(axis=1)
        a = a + np.eye(a.shape[-1])
        a = a / a.sum(-1, keepdims=True)
        result = a if result is None else a @ result
    r = result[:, 0, 1:].reshape(-1, *grid)
    return r / r.max(axis=(1, 2), keepdims=True)


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(0)
    images, labels = digits()
    model = vit_keras.build_model(image_size=SIZE, patch_size=1, num_layers=2, hidden_size=64, num_heads=4,
                                  mlp_dim=128, classes=10, resnet_layers=(1, 1, 1), resnet_width_factor=0.5)
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(images[:1400] / 127.5 - 1.0, labels[:1400], batch_size=50, epochs=5, verbose=0)
    return model, images[:1400], images[1400:]


@pytest.fixture(scope="module")
def files(trained, tmp_path_factory):
    model, train, _ = trained
    return tflite.export_tflite(model, str(tmp_path_factory.mktemp("tflite") / "out"),
                                representative_images=train[:64])


def test_signatures(files):
    """Every file: `serving_default` images -> probabilities, run by a plain `invoke()` too; the
    float-activation files also `attention` images -> rollout; built-in ops only, no variables."""
    assert sorted(files) == sorted(tflite.TFLITE_VARIANTS)
    for variant, path in files.items():
        interpreter = tflite.tflite_interpreter(path)
        expected = {"serving_default": SERVING}
        if variant in ("float32", "float16", "dynamic_int8"):
            expected["attention"] = ATTENTION
        assert interpreter.get_signature_list() == expected, variant
        # Subgraph 0 (what `invoke()` and Java's `Interpreter.run` execute) is serving_default.
        assert interpreter.get_input_details()[0]["name"] == "images", variant
        assert interpreter.get_output_details()[0]["name"] == "probabilities", variant
        ops = {op["op_name"] for op in interpreter._get_ops_details()}
        assert not {op for op in ops if op.startswith("Flex") or op == "CUSTOM"}, (variant, ops)
        assert not ops & {"VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "CALL_ONCE"}, (variant, ops)


def test_dynamic_batch(files, trained):
    """A batch of 4 through the signature runner equals 4 single calls, and Keras (float32)."""
    model, _, test = trained
    images = test[:4]
    reference = keras_probabilities(model, images)
    for variant, path in files.items():
        runner = tflite.tflite_interpreter(path).get_signature_runner("serving_default")
        dtype = runner.get_input_details()["images"]["dtype"]
        batch = runner(images=images.astype(dtype))["probabilities"]
        single = np.concatenate([runner(images=images[i:i + 1].astype(dtype))["probabilities"] for i in range(4)])
        assert batch.shape == (4, 10) and batch.dtype == np.float32, variant
        np.testing.assert_allclose(batch, single, atol=1e-5, err_msg=variant)
        atol = {"float32": 1e-5, "float16": 5e-3}.get(variant, 0.2)
        np.testing.assert_allclose(batch, reference, atol=atol, err_msg=variant)


def test_int8_takes_pixels_as_they_are(files):
    details = tflite.tflite_interpreter(files["int8"]).get_signature_runner("serving_default").get_input_details()
    images = details["images"]
    assert images["dtype"] == np.uint8
    assert images["quantization"] == (1.0, 0)
    assert list(images["shape_signature"]) == [-1, SIZE, SIZE, 3]


def test_int8_recipe(files, trained):
    """Convolutions and dense layers run in int8; the rest in float; top-1 agrees with Keras."""
    model, _, test = trained
    interpreter = tflite.tflite_interpreter(files["int8"])
    interpreter.allocate_tensors()
    kinds = {}
    for op in interpreter._get_ops_details():
        if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "SOFTMAX", "SQUARED_DIFFERENCE"):
            dtype = interpreter._get_tensor_details(op["inputs"][0], 0)["dtype"]
            kinds.setdefault(op["op_name"], set()).add(np.dtype(dtype).name)
    assert kinds["CONV_2D"] == {"int8"} and kinds["FULLY_CONNECTED"] == {"int8"}, kinds
    assert kinds["BATCH_MATMUL"] == kinds["SOFTMAX"] == kinds["SQUARED_DIFFERENCE"] == {"float32"}, kinds
    probs = tflite.tflite_predict(interpreter, test)
    reference = keras_probabilities(model, test)
    assert np.mean(probs.argmax(-1) == reference.argmax(-1)) >= 0.98
    assert np.abs(probs - reference).mean() < 0.01


def test_attention_signature(files, trained):
    """`attention` gives the class token's rollout over the grid, as computed from Keras's weights."""
    model, _, test = trained
    images = test[:3]
    _, weights = attention_model(model)(images.astype("float32") / 127.5 - 1.0)
    grid = model.get_layer("embeddings").grid_size((SIZE, SIZE))
    reference = numpy_rollout(weights, grid)
    for variant, atol in (("float32", 1e-5), ("float16", 5e-3), ("dynamic_int8", 0.1)):
        rollout = tflite.tflite_rollout(files[variant], images)
        assert rollout.shape == (3, *grid), variant
        np.testing.assert_allclose(rollout, reference, atol=atol, err_msg=variant)
    with pytest.raises(ValueError, match="no attention signature"):
        tflite.tflite_rollout(files["int8"], images)


def test_predict_through_signature_and_without(files, trained, tmp_path):
    """`tflite_predict` runs serving_default in batches; a file without SignatureDefs (as written
    before them) still runs through its first input and output."""
    from tensorflow.lite.tools import flatbuffer_utils

    model, _, test = trained
    reference = keras_probabilities(model, test[:5])
    np.testing.assert_allclose(tflite.tflite_predict(files["float32"], test[:5], batch_size=2), reference,
                               atol=1e-5)
    old = flatbuffer_utils.read_model(files["float32"])
    old.signatureDefs = []
    path = tmp_path / "old.tflite"
    flatbuffer_utils.write_model(old, str(path))
    interpreter = tflite.tflite_interpreter(str(path))
    assert interpreter.get_signature_list() == {}
    np.testing.assert_allclose(tflite.tflite_predict(interpreter, test[:5], batch_size=2), reference, atol=1e-5)


def test_refused(trained):
    model, train, _ = trained
    with pytest.raises(ValueError, match="needs representative_images"):
        tflite.convert_tflite(model, "int8")
    with pytest.raises(ValueError, match="no attention signature"):
        tflite.convert_tflite(model, "int8", train[:2], attention=True)
    with pytest.raises(ValueError, match="Unknown TFLite variant"):
        tflite.convert_tflite(model, "int4")


def test_strict_int8_quantises_every_op(trained, tmp_path):
    """`int8_ops=None` (`vit-keras export --strict-int8`): the full-integer file for integer-only accelerators."""
    from vit_keras import cli

    model, train, test = trained
    blob = tflite.convert_tflite(model, "int8", train[:16], int8_ops=None)
    interpreter = tflite.tflite_interpreter(blob)
    interpreter.allocate_tensors()
    kinds = {op["op_name"]: np.dtype(interpreter._get_tensor_details(op["inputs"][0], 0)["dtype"]).name
             for op in interpreter._get_ops_details()
             if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "SOFTMAX")}
    assert set(kinds.values()) == {"int8"}, kinds
    probs = tflite.tflite_predict(interpreter, test[:50])
    assert np.mean(probs.argmax(-1) == keras_probabilities(model, test[:50]).argmax(-1)) >= 0.9
    args = cli.parser().parse_args(["export", "--model", "m.keras", "--format", "tflite", "--out", "o",
                                    "--strict-int8"])
    assert args.strict_int8
