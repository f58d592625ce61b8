"""bfloat16: `dtype=` on the builders, `inference_copy`, and its accuracy against float32.

Bounds, from bfloat16's 8-bit significand: one rounding to bfloat16 is off by
at most u = 2**-8 of the value. A forward pass rounds the output of each of
its N matmuls and convolutions (and their weights) once; their relative
errors add at most linearly, so the logits may move by N * u times their
float32 scale (`logit_bound`: N counts the model's kernels, q, k and v
separately, which over-counts the depth). The softmax moves each
probability by at most half the largest logit change (its Jacobian
diag(p) - p p^T has infinity-norm max 2 p (1 - p) <= 1/2), and the top-1 class
may change only where float32's top-2 margin is within twice the logit bound.
Measured errors are a fraction of these bounds (README, "bfloat16").

The same checks run on JAX and PyTorch in tests/backend_run.py.
"""

import os

import keras
import numpy as np
import pytest

import vit_keras

U = 2.0 ** -8  # bfloat16's unit roundoff: 8 significant bits


def softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kernels(model):
    """The model's matmul and convolution kernels (weights of rank >= 2) outside the head."""
    skip = {id(v) for layer in model.layers if layer.name == "head" for v in layer.weights}
    return sum(1 for v in model.weights if len(v.shape) >= 2 and id(v) not in skip)


def logit_bound(model, reference_logits):
    return kernels(model) * U * float(np.abs(reference_logits).max())


def check_against(logits, reference, bound, what):
    """Logits within `bound`, probabilities within bound / 2, top-1 the same wherever float32's margin allows."""
    logits, reference = np.asarray(logits, np.float64), np.asarray(reference, np.float64)
    assert logits.dtype == reference.dtype and logits.shape == reference.shape
    dlogit = float(np.abs(logits - reference).max())
    dprob = float(np.abs(softmax(logits) - softmax(reference)).max())
    top2 = np.sort(reference, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * bound
    agree = logits.argmax(-1) == reference.argmax(-1)
    assert dlogit <= bound, f"{what}: logits off by {dlogit:.4f} > {bound:.4f}"
    assert dprob <= bound / 2, f"{what}: probabilities off by {dprob:.4f} > {bound / 2:.4f}"
    assert agree[clear].all(), f"{what}: top-1 changed on {np.flatnonzero(clear & ~agree)} (clear margins)"
    return dlogit, dprob, float(agree.mean())


def tiny(**kwargs):
    """A one-block hybrid (ResNet root and one unit), 64 px."""
    return vit_keras.build_model(image_size=64, patch_size=1, num_layers=1, hidden_size=64, num_heads=4, mlp_dim=128,
                                 classes=10, resnet_layers=(1,), resnet_width_factor=0.5, **kwargs)


def every_layer(model):
    """Every layer of the model, nested ones included (not the input)."""
    return [layer for layer in model._flatten_layers(include_self=False)
            if not isinstance(layer, keras.layers.InputLayer)]


@pytest.mark.parametrize("dtype, variables, compute", [("bfloat16", "bfloat16", "bfloat16"),
                                                        ("mixed_bfloat16", "float32", "bfloat16"),
                                                        ("float32", "float32", "float32")])
def test_dtype_reaches_every_layer(dtype, variables, compute):
    model = tiny(dtype=dtype)
    head = model.get_layer("head")
    layers = [layer for layer in every_layer(model) if layer is not head]
    assert len(layers) > 20  # the nested ones too: blocks, attention, MLP, ResNet units, convs, norms
    assert {layer.dtype_policy.name for layer in layers} == {dtype}
    assert {layer.compute_dtype for layer in layers} == {compute}
    assert {keras.backend.standardize_dtype(v.dtype) for layer in layers for v in layer.weights
            if v.trainable} == {variables}
    assert head.dtype_policy.name == "float32"
    logits = model(np.zeros((1, 64, 64, 3), "float32"))
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"


def test_mixed_model_reloads_mixed_and_copies_to_bfloat16(tmp_path):
    """Nested layers reload in their parent's policy (they took the global one); its copy is bfloat16 throughout."""
    model = tiny(dtype="mixed_bfloat16")
    model.save(tmp_path / "mixed.keras")
    loaded = keras.saving.load_model(tmp_path / "mixed.keras")
    head = loaded.get_layer("head")
    assert {layer.dtype_policy.name for layer in every_layer(loaded) if layer is not head} == {"mixed_bfloat16"}
    copy = vit_keras.inference_copy(loaded, "bfloat16")
    head = copy.get_layer("head")
    assert {layer.dtype_policy.name for layer in every_layer(copy) if layer is not head} == {"bfloat16"}
    assert head.dtype_policy.name == "float32" and keras.backend.standardize_dtype(head.kernel.dtype) == "float32"


def test_dtype_none_takes_the_global_policy():
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = tiny()
    finally:
        keras.config.set_dtype_policy("float32")
    block = model.get_layer("Transformer").blocks[0]
    assert block.mlp.dense_0.dtype_policy.name == "mixed_bfloat16"


@pytest.mark.parametrize("make", [
    lambda: vit_keras.create("vit_hybrid_tiny", classes=10, image_size=64, dtype="float16"),
    lambda: vit_keras.vit_r50_b16(dtype="bf16"),  # before its weights would be downloaded
    lambda: vit_keras.build_model(32, 16, 2, 64, 4, 128, classes=10, dtype=np.float32),
])
def test_unknown_dtype_is_one_line(make):
    with pytest.raises(ValueError, match=r"^dtype must be one of 'float32', 'mixed_bfloat16', 'bfloat16'") as e:
        make()
    assert "\n" not in str(e.value)


def test_inference_copy_bad_input():
    with pytest.raises(ValueError, match=r"^dtype must be one of 'bfloat16', 'float32'"):
        vit_keras.inference_copy(tiny(), dtype="mixed_bfloat16")
    with pytest.raises(ValueError, match="^inference_copy takes a keras.Model, got str"):
        vit_keras.inference_copy("model.keras")


def test_builder_takes_dtype():
    model = vit_keras.vit_ti16(image_size=32, classes=10, pretrained=False, dtype="bfloat16")
    dense = model.get_layer("Transformer").blocks[-1].mlp.dense_1
    assert keras.backend.standardize_dtype(dense.kernel.dtype) == "bfloat16"


def numpy_normalized(x, axes):
    x = np.asarray(x, np.float64)
    mean = x.mean(axes, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(axes, keepdims=True) + 1e-6)


def within_one_rounding(got, expected):
    got = keras.ops.convert_to_numpy(keras.ops.cast(got, "float32"))
    return bool(np.all(np.abs(got - expected) <= U * np.abs(expected) + 1e-4))


def test_statistics_and_softmax_stay_float32():
    """Under "bfloat16", norms take their statistics and attention its softmax in float32.

    Inputs 1000 + N(0, 1): bfloat16 holds them to 4 (its spacing there), and a mean
    or variance summed in bfloat16 would be off by more than the spread itself. The
    reference is float64 NumPy on the same bfloat16 inputs; the outputs may differ
    by their own rounding to bfloat16, u |y| (and float32's 1e-4 here).
    """
    from vit_keras.layers import Attention, GroupNorm

    rng = np.random.default_rng(0)
    x = keras.ops.cast(1000 + rng.normal(size=(2, 4, 4, 64)), "bfloat16")
    exact = keras.ops.convert_to_numpy(keras.ops.cast(x, "float32"))
    group = np.moveaxis(exact.reshape(2, 4, 4, 2, 32), 3, 1)  # [B, groups, H, W, C/G]
    expected = np.moveaxis(numpy_normalized(group, (2, 3, 4)), 1, 3).reshape(exact.shape)
    got = GroupNorm(groups=2, dtype="bfloat16")(x)
    assert keras.backend.standardize_dtype(got.dtype) == "bfloat16"
    assert within_one_rounding(got, expected)
    norm = vit_keras.layers.block.layer_norm("LayerNorm_0", dtype="bfloat16")
    assert within_one_rounding(norm(x), numpy_normalized(exact, -1))
    _, weights = Attention(num_heads=2, dtype="bfloat16")(keras.ops.cast(rng.normal(size=(2, 9, 64)), "bfloat16"))
    weights = keras.ops.convert_to_numpy(weights)
    assert weights.dtype == np.float32 and np.abs(weights.sum(-1) - 1).max() < 1e-5  # bfloat16 sums: 1 +- 4e-3


def run(model, images):
    """Eager call: cheaper than `predict`'s tracing for a few tiny batches."""
    return keras.ops.convert_to_numpy(model(images, training=False))


def test_fixtures_in_bfloat16(case):
    """Each vit_jax fixture: the bfloat16 copy against the upstream float32 logits, and against float32 Keras."""
    f32 = case.model()
    copy = vit_keras.inference_copy(f32, "bfloat16")
    layers = [layer for layer in every_layer(copy) if layer.name != "head"]
    assert {layer.compute_dtype for layer in layers} == {"bfloat16"}
    assert {keras.backend.standardize_dtype(v.dtype) for layer in layers for v in layer.weights} == {"bfloat16"}
    n = len(case.images)  # the fixture's images, then 16 more
    images = np.concatenate([case.images, np.random.default_rng(0).uniform(
        -1, 1, (16,) + case.images.shape[1:]).astype("float32")])
    logits, reference = run(copy, images), run(f32, images)
    assert logits.dtype == np.float32
    expected = case.expected["logits"]
    check_against(logits[:n], expected, logit_bound(copy, expected), f"{case.name} vs vit_jax")
    bound = logit_bound(copy, reference)
    dlogit, dprob, agree = check_against(logits, reference, bound, f"{case.name} vs float32")
    print(f"{case.name}: |dlogit| {dlogit:.4f} (bound {bound:.4f}) |dprob| {dprob:.4f} (bound {bound / 2:.4f}) "
          f"top-1 agreement {agree:.3f}")


def test_create_in_bfloat16_loads_the_checkpoint(tiny_r50):
    """`dtype="bfloat16"` with weights: the checkpoint is rounded once as it is assigned."""
    model = tiny_r50.model(dtype="bfloat16")
    conv = model.get_layer("embeddings").resnet.conv_root
    assert keras.backend.standardize_dtype(conv.kernel.dtype) == "bfloat16"
    check_against(run(model, tiny_r50.images), tiny_r50.expected["logits"],
                  logit_bound(model, tiny_r50.expected["logits"]), "tiny_r50 dtype=bfloat16")


def test_inference_copy_saves_and_loads(tiny_r50, tmp_path):
    copy = vit_keras.inference_copy(tiny_r50.model(), "bfloat16")
    assert copy.get_layer("embeddings").resnet.prestandardized  # standardised in float32, then rounded
    assert vit_keras.inference_copy(copy, "bfloat16") is copy  # a copy already: no second one
    path = tmp_path / "bf16.keras"
    copy.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    for a, b in zip(copy.weights, loaded.weights):
        assert keras.backend.standardize_dtype(b.dtype) == keras.backend.standardize_dtype(a.dtype)
        np.testing.assert_array_equal(np.asarray(b, "float32"), np.asarray(a, "float32"))
    np.testing.assert_array_equal(run(loaded, tiny_r50.images), run(copy, tiny_r50.images))
    # Rounded once, from the float32 weights: each stored weight is the nearest bfloat16 of the original's.
    original = vit_keras.fold_weight_standardization(tiny_r50.model())
    for a, b in zip(original.weights, loaded.weights):
        expected = keras.ops.convert_to_numpy(keras.ops.cast(keras.ops.cast(a, "bfloat16"), "float32")) \
            if keras.backend.standardize_dtype(b.dtype) == "bfloat16" else np.asarray(a)
        np.testing.assert_array_equal(np.asarray(b, "float32"), expected, err_msg=a.path)


def test_features_output_is_cast_to_float32(tiny_vit):
    model = tiny_vit.model(include_top=False)
    copy = vit_keras.inference_copy(model, "bfloat16")
    assert copy.layers[-1].name == "float32_output"
    features = run(copy, tiny_vit.images)
    assert features.dtype == np.float32
    reference = run(model, tiny_vit.images)
    assert np.abs(features - reference).max() <= kernels(model) * U * np.abs(reference).max()


def test_float32_inference_copy_is_the_folded_model(tiny_r50):
    model = tiny_r50.model()
    copy = vit_keras.inference_copy(model, dtype="float32")
    assert {layer.compute_dtype for layer in every_layer(copy)} == {"float32"}
    np.testing.assert_allclose(run(copy, tiny_r50.images), tiny_r50.expected["logits"], atol=2e-5)


@pytest.mark.slow
def test_demo_model_top1_in_bfloat16(demo_run):
    """The README's demo model (trained on digits): bfloat16 against float32 on every held-out image."""
    from vit_keras import data

    out, _ = demo_run
    model = keras.saving.load_model(out / "model.keras")
    copy = vit_keras.inference_copy(model, "bfloat16")
    images, labels = data.pixels(data.load("digits").test, model.input_shape[1:3])
    x = images.astype("float32") / 127.5 - 1
    reference, logits = model.predict(x, verbose=0), copy.predict(x, verbose=0)
    dlogit, dprob, agree = check_against(logits, reference, logit_bound(model, reference), "demo model")
    print(f"demo model, {len(images)} digits test images: top-1 agreement {agree:.4f}, max |dlogit| {dlogit:.4f}, "
          f"max |dprob| {dprob:.4f}, accuracy {np.mean(reference.argmax(-1) == labels):.4f} (float32) "
          f"{np.mean(logits.argmax(-1) == labels):.4f} (bfloat16)")
    assert len(images) == 360 and agree >= 0.99  # README: 100 % on 360 images


# ----------------------------------------------------------------------------- exports


def pixels(model, count, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (count,) + tuple(model.input_shape[1:])).astype("float32")


def rounded_to_bfloat16(model):
    """An independent float32 computation of what the ONNX file holds: the folded model, each weight rounded."""
    folded = vit_keras.fold_weight_standardization(model)
    rounded = [keras.ops.convert_to_numpy(keras.ops.cast(keras.ops.cast(w, "bfloat16"), "float32"))
               for w in folded.get_weights()]
    return vit_keras.model.copy_model(folded, lambda config: config, rounded)


@pytest.mark.slow
def test_export_onnx_in_bfloat16(tiny_vit, tmp_path, capsys, monkeypatch):
    """`vit-keras export --format onnx --precision bfloat16`: bfloat16 weights in the file, float32 in and out."""
    pytest.importorskip("tf2onnx")
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from vit_keras import cli
    from vit_keras.predict import probabilities
    from vit_keras.serving import onnx as vit_onnx

    model = tiny_vit.model()
    model.save(tmp_path / "m.keras")
    argv = ["export", "--model", str(tmp_path / "m.keras"), "--format", "onnx"]
    assert cli.main([*argv, "--out", str(tmp_path / "f32")]) == 0
    assert cli.main([*argv, "--out", str(tmp_path / "bf16"), "--precision", "bfloat16"]) == 0, capsys.readouterr().err
    proto = onnx.load(str(tmp_path / "bf16" / vit_onnx.ONNX_FILE))
    weights = [t for t in proto.graph.initializer if np.prod(t.dims) > 1 and t.data_type in (1, 16)]
    assert weights and {t.data_type for t in weights} == {onnx.TensorProto.BFLOAT16}
    assert [(i.name, i.type.tensor_type.elem_type) for i in proto.graph.input] == [("images", onnx.TensorProto.FLOAT)]
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    size = {p: os.path.getsize(tmp_path / p / vit_onnx.ONNX_FILE) for p in ("f32", "bf16")}
    assert size["bf16"] < 0.6 * size["f32"]
    images = pixels(model, 8)
    got = vit_onnx.onnx_predict(tmp_path / "bf16", images)
    np.testing.assert_allclose(got, np.asarray(probabilities(rounded_to_bfloat16(model), images)), atol=1e-5, rtol=0)
    reference = np.asarray(probabilities(model, images))
    logits = keras.ops.convert_to_numpy(model(images / 127.5 - 1))
    assert np.abs(got - reference).max() <= logit_bound(model, logits) / 2
    # Weights as external data (ViT-H/14's path, forced here) are rounded there.
    monkeypatch.setattr(vit_onnx, "EXTERNAL_DATA_BYTES", 0)
    vit_onnx.export_onnx(model, str(tmp_path / "external"), precision="bfloat16")
    assert os.path.getsize(tmp_path / "external" / vit_onnx.EXTERNAL_DATA_FILE) < 0.6 * size["f32"]
    np.testing.assert_allclose(vit_onnx.onnx_predict(tmp_path / "external", images), got, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_export_saved_model_in_bfloat16(tiny_vit, tmp_path, capsys):
    """`--precision bfloat16` SavedModel: bfloat16 variables, the float32 export's signatures and float32 outputs."""
    import tensorflow as tf

    from vit_keras import cli
    from vit_keras.predict import probabilities

    model = tiny_vit.model()
    model.save(tmp_path / "m.keras")
    code = cli.main(["export", "--model", str(tmp_path / "m.keras"), "--format", "saved_model", "--out",
                     str(tmp_path / "sm"), "--name", "vit", "--precision", "bfloat16"])
    assert code == 0, capsys.readouterr().err
    loaded = tf.saved_model.load(str(tmp_path / "sm" / "vit" / "1"))
    assert "bfloat16" in {v.dtype.name for v in loaded.variables}
    signature = loaded.signatures["predict_images"]
    assert signature.structured_input_signature[1]["images"].dtype == tf.float32
    images = pixels(model, 8)
    served = signature(images=tf.constant(images))
    assert served["probabilities"].dtype == tf.float32 and served["scores"].dtype == tf.float32
    png = [tf.io.encode_png(tf.constant(image.round().astype("uint8"))) for image in images[:2]]
    from_bytes = loaded.signatures["serving_default"](image_bytes=tf.stack(png))["probabilities"].numpy()
    reference = np.asarray(probabilities(model, images))
    bound = logit_bound(model, keras.ops.convert_to_numpy(model(images / 127.5 - 1))) / 2
    assert np.abs(served["probabilities"].numpy() - reference).max() <= bound
    assert np.abs(from_bytes - np.asarray(probabilities(model, images[:2].round()))).max() <= bound
    weights = loaded.signatures["attention"](images=tf.constant(images[:2]))["attention"]
    assert weights.dtype == tf.float32 and np.allclose(weights.numpy().sum(-1), 1, atol=1e-5)


def test_tflite_refuses_bfloat16_before_loading(tmp_path, capsys):
    from vit_keras import cli

    code = cli.main(["export", "--model", str(tmp_path / "missing.keras"), "--format", "tflite", "--out",
                     str(tmp_path / "t"), "--dataset", "digits", "--precision", "bfloat16"])
    err = capsys.readouterr().err
    assert code == 2 and "TFLite has no bfloat16 kernels" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "t").exists()
    with pytest.raises(ValueError, match=r"^precision must be one of 'float32', 'bfloat16'"):
        from vit_keras import serving

        serving.export(str(tmp_path / "missing.keras"), "onnx", str(tmp_path / "o"), precision="float16")
