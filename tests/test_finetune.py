"""Fine-tuning big models (issue 23): remat, trainable subsets, layer-wise decay, LoRA, resize, input channels."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

import vit_keras
from vit_keras import finetune, reshape, training

HERE = pathlib.Path(__file__).parent
FIXTURES = HERE / "fixtures" / "vit_jax"
TINY = dict(image_size=32, patch_size=16, num_layers=2, hidden_size=64, num_heads=4, mlp_dim=128, classes=10)
RUN = dict(model="vit_tiny16", dataset="digits", image_size=32, batch_size=32, epochs=1, verbose=0)


def tiny(**kwargs):
    return vit_keras.build_model(**{**TINY, "dropout": 0.0, **kwargs})


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def run_script(tmp_path, backend, *args):
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=str(HERE.parent), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, str(HERE / "finetune_run.py"), str(tmp_path), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "result.json").read_text())


# ----------------------------------------------------------------------------- remat


@pytest.mark.slow  # a process per backend
@pytest.mark.parametrize("backend", ["jax", "torch"])  # TensorFlow: the in-process tests below
def test_remat_gradients_and_one_lora_step(backend, tmp_path):
    result = run_script(tmp_path, backend)
    for kind, gap in result["remat"].items():  # the same gradients, recomputed
        assert gap["count"] > 20 and gap["max_abs"] > 1.0, kind
        assert gap["max_abs_diff"] <= 1e-5 * gap["max_abs"] + 1e-6, (kind, gap)
    adapters = [p for p in result["trainable"] if "lora_kernel" in p]
    assert len(adapters) == 2 * 2 * len(finetune.LORA_TARGETS)  # 2 blocks, A and B per target
    assert set(result["trainable"]) == set(adapters) | {"head/kernel", "head/bias"}
    assert set(result["moved"]) <= set(result["trainable"]) and {"head/kernel", "head/bias"} <= set(result["moved"])
    assert any("lora_kernel_b" in p for p in result["moved"])
    assert result["loaded_has_lora"] is False and result["loaded_vs_lora"] <= 1e-5


def test_remat_gradients_tensorflow():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    plain = tiny(resnet_layers=(1,), resnet_width_factor=0.5, patch_size=1, dropout=0.3)
    remat = tiny(resnet_layers=(1,), resnet_width_factor=0.5, patch_size=1, dropout=0.3, remat=True)
    for v in plain.weights:
        if v.path.startswith("head/"):  # the head starts at zero: no gradient would reach the body
            v.assign(rng.normal(size=v.shape).astype("float32"))
    remat.set_weights(plain.get_weights())
    for a, b in zip(plain.non_trainable_variables, remat.non_trainable_variables):
        b.assign(a.value)  # the same dropout seeds: the recomputation must draw the forward pass's masks
    x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype("float32")

    def grads(model):
        @tf.function
        def f():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(model(x, training=True)))
            return tape.gradient(loss, model.trainable_variables)

        return [g.numpy() for g in f()]

    g_plain, g_remat = grads(plain), grads(remat)
    scale = max(float(np.abs(g).max()) for g in g_plain)
    assert len(g_plain) > 20 and scale > 1.0
    for a, b in zip(g_plain, g_remat):
        np.testing.assert_allclose(b, a, atol=1e-5 * scale)


def test_remat_model_file_loads_and_remat_copy(tmp_path):
    model = tiny(resnet_layers=(1,), resnet_width_factor=0.5, patch_size=1, remat=True)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.get_layer("Transformer").remat and loaded.get_layer("embeddings").resnet.remat
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(numpy(loaded(x)), numpy(model(x)),
                               atol=1e-6)
    plain = tiny()
    copy = finetune.with_remat(plain)
    assert copy is not plain and copy.get_layer("Transformer").remat
    np.testing.assert_allclose(numpy(copy(x)), numpy(plain(x)), atol=1e-6)


# ----------------------------------------------------------------------------- trainable


@pytest.mark.parametrize("spec, blocks", [("head", 0), ("blocks:1", 1), ("all", 2)])
def test_trainable_subsets_get_no_slots(spec, blocks):
    model = finetune.set_trainable(tiny(), spec)
    paths = {v.path for v in model.trainable_variables}
    per_block = {v.path for v in model.weights if v.path.startswith("Transformer/encoderblock_1/")}
    assert {"head/kernel", "head/bias"} <= paths
    assert (per_block <= paths) == (blocks >= 1)
    assert ("Transformer/encoder_norm/gamma" in paths) == (blocks >= 1)
    assert ("embeddings/pos_embedding" in paths) == (spec == "all")
    assert not any(p.startswith("Transformer/encoderblock_0/") for p in paths) or blocks == 2
    opt = keras.optimizers.SGD(momentum=0.9)
    model.compile(optimizer=opt, loss="mse")
    opt.build(model.trainable_variables)
    # SGD with momentum: iterations, learning rate, and one momentum per trainable variable only.
    assert len(opt.variables) == 2 + len(paths)
    momenta = {tuple(v.shape) for v in opt.variables[2:]}
    assert momenta == {tuple(v.shape) for v in model.trainable_variables}


# ----------------------------------------------------------------------------- layer-wise decay


def _one_step(optimizer_cls, grads, **kwargs):
    model = tiny()
    before = [numpy(v).astype("float64") for v in model.trainable_variables]
    opt = optimizer_cls(learning_rate=0.1, layer_decay=0.5, num_layers=2, **kwargs)
    opt.apply_gradients(zip([keras.ops.convert_to_tensor(g) for g in grads], model.trainable_variables))
    after = [numpy(v).astype("float64") for v in model.trainable_variables]
    return model, before, after


def _expected_multiplier(path):
    # An independent statement of BEiT's rule for 2 blocks, decay 0.5: embeddings 0.5^3, block i 0.5^(2 - i), top 1.
    if path.startswith("embeddings/"):
        return 0.125
    for i in (0, 1):
        if path.startswith(f"Transformer/encoderblock_{i}/"):
            return 0.5 ** (2 - i)
    return 1.0


def test_layer_decay_sgd_momentum_steps():
    model = tiny()
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=v.shape).astype("float32") for v in model.trainable_variables]
    model, before, after = _one_step(finetune.LayerDecaySGD, grads, momentum=0.9)
    seen = set()
    for v, b, a, g in zip(model.trainable_variables, before, after, grads):
        m = _expected_multiplier(v.path)
        seen.add(m)
        np.testing.assert_allclose(a - b, -0.1 * m * g, rtol=1e-4, atol=1e-7, err_msg=v.path)
    assert seen == {0.125, 0.25, 0.5, 1.0}


def test_layer_decay_adamw_steps():
    model = tiny()
    rng = np.random.default_rng(1)
    grads = [rng.normal(size=v.shape).astype("float32") for v in model.trainable_variables]
    wd, b1, b2, eps = 0.05, 0.9, 0.999, 1e-7
    model, before, after = _one_step(finetune.LayerDecayAdamW, grads, weight_decay=wd, beta_1=b1, beta_2=b2,
                                     epsilon=eps)
    for v, b, a, g in zip(model.trainable_variables, before, after, grads):
        lr = 0.1 * _expected_multiplier(v.path)
        w = b - b * wd * lr  # decoupled decay with the layer's rate, then Adam's first step
        g = g.astype("float64")
        m_, v_ = (1 - b1) * g, (1 - b2) * g * g
        alpha = lr * np.sqrt(1 - b2) / (1 - b1)
        np.testing.assert_allclose(a, w - alpha * m_ / (np.sqrt(v_) + eps), rtol=1e-4, atol=1e-6, err_msg=v.path)


def test_layer_decay_optimizer_survives_a_keras_file(tmp_path):
    model = tiny()
    opt = finetune.layer_decay_optimizer(training.make_optimizer("adamw", 0.01, 10, 1), 0.75, 2)
    model.compile(optimizer=opt, loss="mse")
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded.optimizer) is finetune.LayerDecayAdamW
    assert (loaded.optimizer.layer_decay, loaded.optimizer.num_layers) == (0.75, 2)


# ----------------------------------------------------------------------------- LoRA


def test_lora_merge_and_counts():
    model = finetune.prepare(tiny(), lora_rank=4, lora_alpha=8.0)
    rng = np.random.default_rng(0)
    for v in model.weights:  # adapters and head away from their zero start
        if "lora_kernel" in v.path or v.path.startswith("head/"):
            v.assign(rng.normal(scale=0.3, size=v.shape).astype("float32"))
    x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    merged = finetune.merge_lora(model)
    assert not finetune.has_lora(merged)
    np.testing.assert_allclose(numpy(merged(x)), numpy(model(x)), atol=1e-5)
    # Independent: each merged kernel is W + alpha / rank * A @ B.
    layer = finetune.encoder(model).blocks[0].mlp.dense_0
    w, a, b = (numpy(v) for v in (layer._kernel, layer.lora_kernel_a, layer.lora_kernel_b))
    got = numpy(finetune.encoder(merged).blocks[0].mlp.dense_0.kernel)
    np.testing.assert_allclose(got, w + 2.0 * a @ b, atol=1e-5)
    counts = finetune.param_counts(model)
    kernels = [layer._kernel for layer in finetune.lora_layers(model)]
    adapters = sum(4 * (int(np.prod(k.shape[:-1])) + k.shape[-1]) for k in kernels)
    assert counts["trainable_params"] == adapters + 64 * 10 + 10
    assert counts["total_params"] == finetune.param_counts(merged)["total_params"] + adapters


def test_lora_saved_model_equals_keras(tmp_path):
    tf = pytest.importorskip("tensorflow")
    from vit_keras import serving

    model = finetune.prepare(tiny(), lora_rank=2)
    rng = np.random.default_rng(2)
    for v in model.weights:
        if "lora_kernel" in v.path or v.path.startswith("head/"):
            v.assign(rng.normal(scale=0.3, size=v.shape).astype("float32"))
    path = serving.export(model, "saved_model", str(tmp_path), name="lora")["path"]
    pixels = rng.uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    served = tf.saved_model.load(path).signatures["predict_images"](images=tf.constant(pixels))
    expected = keras.ops.softmax(model(vit_keras.preprocess_inputs(pixels)))
    np.testing.assert_allclose(served["probabilities"].numpy(), numpy(expected), atol=1e-5)


# ----------------------------------------------------------------------------- resize and input channels


def test_resize_matches_the_upstream_posemb_resize():
    case = FIXTURES / "tiny_r50_posemb"
    model = vit_keras.build_model(64, 1, 2, 64, 4, 128, classes=10, resnet_layers=(2, 2, 2), resnet_width_factor=0.5,
                                  dropout=0.0, weights=str(case / "params.npz"))
    resized = vit_keras.resize(model, image_size=96)
    assert resized.input_shape == (None, 96, 96, 3)
    np.testing.assert_allclose(numpy(resized.get_layer("embeddings").pos_embedding),
                               np.load(case / "posemb_resized.npy"), atol=1e-6)
    inputs = np.load(case / "inputs.npz")["images"]
    np.testing.assert_allclose(numpy(resized(inputs)), np.load(case / "expected.npz")["logits"], atol=2e-4)


def test_resize_a_sincos2d_model():
    """big_vision's fixed position table has no variable: resize builds it at the new size (it used to crash)."""
    kwargs = dict(TINY, image_size=32, posemb="sincos2d", classifier="gap", include_top=False)
    model = tiny(**kwargs)
    resized = vit_keras.resize(model, image_size=(48, 64), input_channels=1)
    fresh = tiny(**{**kwargs, "image_size": (48, 64)})  # the table made by the layer at that size
    fresh.set_weights(model.get_weights())
    x = np.random.default_rng(0).uniform(-1, 1, (2, 48, 64, 1)).astype("float32")
    np.testing.assert_allclose(numpy(resized(x)), numpy(fresh(np.repeat(x, 3, axis=-1))), atol=2e-5)


def _vit_fixture_model(**kwargs):
    case = FIXTURES / "tiny_vit"
    meta = json.loads((case / "meta.json").read_text())
    cfg = meta["vit_jax_model_config"]
    t = cfg["transformer"]
    return vit_keras.build_model(meta.get("image_size_params", meta.get("image_size", 32)), cfg["patches"]["size"][0],
                                 t["num_layers"], cfg["hidden_size"], t["num_heads"], t["mlp_dim"],
                                 classes=meta["num_classes"], dropout=0.0, weights=str(case / "params.npz"),
                                 **kwargs)


def test_input_channels_grey_and_many():
    rgb = _vit_fixture_model()
    size = rgb.input_shape[1]
    grey = _vit_fixture_model(input_channels=1)
    six = _vit_fixture_model(input_channels=6)
    assert grey.input_shape[-1] == 1 and six.input_shape[-1] == 6
    x = np.random.default_rng(0).uniform(-1, 1, (2, size, size, 1)).astype("float32")
    ref = numpy(rgb(np.repeat(x, 3, axis=-1)))  # a grey image is its RGB copy
    np.testing.assert_allclose(numpy(grey(x)), ref, atol=2e-5)
    color = np.random.default_rng(1).uniform(-1, 1, (2, size, size, 3)).astype("float32")
    np.testing.assert_allclose(numpy(six(np.concatenate([color, color], -1))), numpy(rgb(color)), atol=2e-5)
    np.testing.assert_allclose(numpy(vit_keras.resize(rgb, input_channels=1)(x)), ref, atol=2e-5)
    kernel = np.arange(2 * 2 * 3 * 1, dtype="float32").reshape(2, 2, 3, 1)
    np.testing.assert_array_equal(reshape.adapt_input_kernel(kernel, 4)[:, :, 3], kernel[:, :, 0] * 0.75)


# ----------------------------------------------------------------------------- train and the CLI


@pytest.mark.slow  # two training runs
def test_train_lora_layer_decay_then_continue_at_another_size(tmp_path, caplog):
    caplog.set_level("INFO", logger="vit_keras")
    first = training.train(**RUN, out=str(tmp_path / "a"), lora_rank=2, layer_decay=0.75, remat=True)
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert 0 < metrics["trainable_params"] < metrics["total_params"] / 5
    assert any("parameters trainable" in r.getMessage() for r in caplog.records)
    loaded = keras.models.load_model(tmp_path / "a" / "model.keras")
    assert not finetune.has_lora(loaded)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(numpy(loaded(x)), numpy(first.model(x)), atol=1e-5)
    again = training.train(**{**RUN, "image_size": 64, "model": str(tmp_path / "a" / "model.keras")},
                           out=str(tmp_path / "b"), trainable="head")
    assert again.model.input_shape == (None, 64, 64, 3)
    assert again.metrics["trainable_params"] == 64 * 10 + 10


def test_train_grey_single_channel(tmp_path):
    result = training.train(**RUN, out=str(tmp_path), input_channels=1, trainable="blocks:1")
    assert result.model.input_shape == (None, 32, 32, 1)
    assert keras.models.load_model(tmp_path / "model.keras").input_shape[-1] == 1


@pytest.mark.parametrize("field, value, message", [
    ("trainable", "blocks:0", "blocks:N"),
    ("trainable", "blocks:99", "has 2"),
    ("trainable", "some", "trainable must be"),
    ("layer_decay", 0.0, "layer_decay"),
    ("layer_decay", 1.5, "layer_decay"),
    ("lora_rank", 0, "lora_rank"),
    ("input_channels", 0, "input_channels"),
    ("input_channels", 4, "image datasets"),
])
def test_bad_finetune_arguments_fail_before_any_work(tmp_path, field, value, message):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        training.train(**RUN, out=str(out), **{field: value})
    assert not out.exists()


def test_bad_resize_and_channels():
    model = tiny()
    with pytest.raises(ValueError, match="not divisible"):
        vit_keras.resize(model, image_size=40)
    with pytest.raises(ValueError, match="input_channels"):
        vit_keras.resize(model, input_channels=0)
    with pytest.raises(ValueError, match="input_channels"):
        tiny(input_channels=0)
    with pytest.raises(ValueError, match="has 2"):
        finetune.set_trainable(model, "blocks:3")


def test_cli_flags_reach_the_config():
    from vit_keras import cli

    args = cli.parser().parse_args(["train", "--remat", "--trainable", "blocks:2", "--layer-decay", "0.75",
                                    "--lora-rank", "8", "--lora-alpha", "16", "--input-channels", "1"])
    config = cli.train_config(args)
    assert (config.remat, config.trainable, config.layer_decay, config.lora_rank, config.lora_alpha,
            config.input_channels) == (True, "blocks:2", 0.75, 8, 16.0, 1)
    assert cli.main(["train", "--lora-rank", "0", "--out", "/nonexistent/x"]) == 2


@pytest.mark.slow  # a process with two logical CPUs
def test_mirrored_remat_lora_layer_decay(tmp_path):
    result = run_script(tmp_path, "tensorflow", "mirrored")
    assert result["replicas"] == 2 and result["replica_gap"] == 0.0
    assert 0 < result["trainable_params"] < result["total_params"]
