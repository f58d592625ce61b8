"""The models match the Flax fixtures on every Keras backend, and `.keras` files cross backends.

Each backend runs in a process of its own (Keras picks its backend once per
process): tests/backend_run.py builds every fixture case from its `.npz`,
compares logits, attention and rollout with the fixtures, and writes the
models as `.keras`; each later backend also loads the files of the earlier
ones (TensorFlow's on JAX, TensorFlow's and JAX's on PyTorch), and the last
test loads PyTorch's here. Off TensorFlow the run hides `tensorflow` from
imports, so `import vit_keras`, building, loading and rollout are shown to
need none of it.
"""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

import vit_keras
from conftest import Case, assert_close

BACKENDS = ("tensorflow", "jax", "torch")
SCRIPT = pathlib.Path(__file__).parent / "backend_run.py"


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory):
    return tmp_path_factory.mktemp("keras_files")


def run_backend(backend, out, reads):
    env = dict(os.environ, KERAS_BACKEND=backend, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), *map(str, reads)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{backend}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixtures_on_backend(backend, keras_files):
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[backend]
    try:
        __import__(module)
    except ImportError:
        pytest.fail(f"The {backend} backend is not installed: pip install -e '.[cpu,test,jax,torch]'")
    earlier = BACKENDS[: BACKENDS.index(backend)]
    reads = [keras_files / b for b in earlier if (keras_files / b).is_dir()]
    out = run_backend(backend, keras_files / backend, reads)
    assert f"{backend}: all checks passed" in out
    for name in ("tiny_vit", "tiny_r50", "tiny_r50_posemb", "tiny_vit_gap", "tiny_rti"):
        assert f"{name} rollout_grid" in out and f"{name} build_model(weights=) attn_1" in out
    for folder in reads:
        assert f"tiny_r50 .keras from {folder.name} logits" in out
    if backend != keras.backend.backend():
        _check_keras_file_here(keras_files / backend / "tiny_vit_gap.keras")


def _check_keras_file_here(path):
    """A `.keras` that another backend wrote loads on this process's backend with the fixture's outputs."""
    case = Case("tiny_vit_gap")
    logits, weights = vit_keras.attention_model(keras.saving.load_model(path)).predict(case.images, verbose=0)
    assert_close(logits, case.expected["logits"], 2e-5, "logits")
    assert_close(weights[1], case.expected["attn_1"], 1e-5, "attn_1")


def test_image_pipeline_evaluation_matches_tf_data(tmp_path):
    """Without TensorFlow the evaluation batches are tf.data's: same pixels, resize, scaling, labels."""
    import PIL.Image

    from vit_keras import data

    digits = data.load("digits", tf_data=False)
    assert isinstance(digits.test, data.Examples)
    tf_batches = list(data.make_pipeline(data.load("digits", tf_data=True).test, 64, 10, 32))
    ours = data.make_pipeline(digits.test, 64, 10, 32)
    assert len(ours) == len(tf_batches) == 12  # 360 images, the last batch partial
    for i in (0, 11):
        assert_close(ours[i][0], tf_batches[i][0], 1e-5, f"digits batch {i}")
        assert_close(ours[i][1], tf_batches[i][1], 0, f"digits labels {i}")
    # A folder of lossless files (PNG, BMP, a grey PNG, an RGBA PNG), shrunk in one axis and grown in the other.
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i, (mode, ext) in enumerate([("RGB", "png"), ("RGB", "bmp"), ("L", "png"), ("RGBA", "png")] * 2):
            pixels = rng.integers(0, 256, (40, 40, len(mode))).astype("uint8")
            PIL.Image.fromarray(pixels.squeeze(), mode).save(tmp_path / label / f"{i}.{ext}")
    ours = data.make_pipeline(data.load(str(tmp_path), tf_data=False).train, (32, 48), 2, 16)
    theirs = next(iter(data.make_pipeline(data.load(str(tmp_path), tf_data=True).train, (32, 48), 2, 16)))
    images, labels = ours[0]
    assert images.shape == (12, 32, 48, 3)
    assert_close(images, theirs[0], 2e-3, "folder images")  # Pillow's and TF's antialiased bilinear
    assert_close(labels, theirs[1], 0, "folder labels")


def test_image_pipeline_training_batches():
    from vit_keras import data

    # Inception crops: a uniform share of the area in the range, aspect 3/4..4/3, inside the image.
    rng = np.random.default_rng(0)
    boxes = np.array([data.crop_box(rng, 60, 80, (0.3, 0.9)) for _ in range(3000)])
    top, left, h, w = boxes.T
    area = h * w / (60 * 80)
    assert np.all(top >= 0) and np.all(left >= 0) and np.all(top + h <= 60) and np.all(left + w <= 80)
    assert area.min() > 0.28 and area.max() < 0.92  # (boxes that do not fit are drawn again)
    assert np.all(w / h > 0.7) and np.all(w / h < 1.4)
    # On a square image every box of 30-50 % fits, so the share is uniform: mean 0.4.
    boxes = np.array([data.crop_box(rng, 100, 100, (0.3, 0.5)) for _ in range(3000)])
    area = boxes[:, 2] * boxes[:, 3] / 100**2
    assert abs(area.mean() - 0.4) < 0.005 and abs(np.median(area) - 0.4) < 0.01
    # Every example once per pass, in a new order each pass; a batch is a function of its index.
    n = 48
    images = np.random.default_rng(1).integers(0, 256, (n, 8, 8, 3)).astype("uint8")
    examples = data.Examples(images, np.arange(n))
    pipe = data.make_pipeline(examples, 8, n, 16, training=True, repeat=True, crop_area=(1.0, 1.0), seed=3)
    assert pipe.num_batches is None
    first = np.concatenate([pipe[i][1] for i in range(3)])
    second = np.concatenate([pipe[i][1] for i in range(3, 6)])
    np.testing.assert_array_equal(first.sum(0), np.ones(n))
    np.testing.assert_array_equal(second.sum(0), np.ones(n))
    assert not np.array_equal(first.argmax(1), second.argmax(1))
    np.testing.assert_array_equal(pipe[4][0], pipe[4][0])
    # A whole-image crop at the same size leaves the pixels; flips mirror about half of them.
    batch, onehot = pipe[0]
    originals = (images[onehot.argmax(1)] / 127.5 - 1).astype("float32")
    mirrored = [np.allclose(x, o[:, ::-1], atol=1e-5) for x, o in zip(batch, originals)]
    same = [np.allclose(x, o, atol=1e-5) for x, o in zip(batch, originals)]
    assert all(m != s for m, s in zip(mirrored, same)) and 3 <= sum(mirrored) <= 13
    no_flip = data.make_pipeline(examples, 8, n, 16, training=True, flip=False, crop_area=(1.0, 1.0))
    batch, onehot = no_flip[0]
    assert_close(batch, images[onehot.argmax(1)] / 127.5 - 1, 1e-5, "unflipped")


def test_training_on_jax_without_tensorflow(tmp_path):
    """`vit-keras train` on JAX, data parallel over two (host) devices, bf16, TensorFlow hidden."""
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = tmp_path / "run"
    args = ["--model", "vit_tiny16", "--dataset", "digits", "--image-size", "32", "--batch-size", "256",
            "--epochs", "1", "--strategy", "mirrored", "--precision", "mixed_bfloat16", "--backup-every", "2"]
    proc = subprocess.run([sys.executable, str(SCRIPT.parent / "backend_train_run.py"), str(out), *args],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics = result["metrics"]
    assert result["tensorflow_modules"] == []
    assert metrics["backend"] == "jax" and metrics["replicas"] == 2 and metrics["precision"] == "mixed_bfloat16"
    assert metrics["steps"] == 1365 // 256  # digits has 1,365 training images
    assert 0.0 <= metrics["test_top1"] <= metrics["test_top5"] <= 1.0 and np.isfinite(metrics["test_loss"])
    assert not (out / "backup").exists() and (out / "log.csv").exists()
    model = keras.saving.load_model(out / "model.keras")  # written on JAX, read on this backend
    assert model.get_layer("head").class_names == [str(i) for i in range(10)]
    assert model.get_layer("Transformer").compute_dtype == "bfloat16"


def test_gpu_benchmark_dry_run(tmp_path):
    """benchmarks/gpu.sh --dry-run: every section of the GPU run, tiny, on the CPU, both backends."""
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    proc = subprocess.run(["bash", str(SCRIPT.parent.parent / "benchmarks" / "gpu.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = {b: [json.loads(line) for line in (tmp_path / f"{b}.jsonl").read_text().splitlines()]
            for b in ("jax", "torch")}
    for backend, got in rows.items():
        parity = [r for r in got if r["section"] == "parity" and "case" in r]
        assert parity and all(r["ok"] for r in parity), parity
        for section in ("train", "infer"):
            timed = [r for r in got if r["section"] == section and "images_per_s" in r]
            assert timed and all(r["images_per_s"] > 0 for r in timed), (backend, section, got)
    assert [r for r in rows["torch"] if r["section"] == "timm" and ("images_per_s" in r or "skipped" in r)]
    assert "| backend" in proc.stdout  # the report table


def test_export_from_a_jax_process_gives_the_tensorflow_savedmodel(tmp_path):
    """`vit-keras export` under KERAS_BACKEND=jax runs the export under TensorFlow; a JAX-saved .keras serves."""
    import subprocess
    import sys

    import keras
    import tensorflow as tf

    script = (
        "import sys, vit_keras\n"
        "m = vit_keras.build_model(32, 16, 1, 32, 2, 64, classes=3, name='jaxmodel')\n"
        "h = m.get_layer('head'); import numpy as np\n"
        "h.kernel.assign(np.random.default_rng(0).normal(size=h.kernel.shape).astype('float32'))\n"
        "m.save(sys.argv[1])\n"
        "from vit_keras import cli\n"
        "sys.exit(cli.main(['export', '--model', sys.argv[1], '--format', 'saved_model', '--out', sys.argv[2]]))\n"
    )
    env = dict(os.environ, KERAS_BACKEND="jax")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.keras"), str(tmp_path / "serving")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    model = keras.saving.load_model(tmp_path / "m.keras")  # here: the TensorFlow backend
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    expected = tf.nn.softmax(model(pixels / 127.5 - 1.0), axis=-1).numpy()
    served = tf.saved_model.load(str(tmp_path / "serving" / "jaxmodel" / "1"))
    got = served.signatures["predict_images"](images=tf.constant(pixels))["probabilities"].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert expected.max() - expected.min() > 0.01  # a real head: not uniform
