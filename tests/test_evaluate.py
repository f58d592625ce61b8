"""`vit-keras evaluate`: top-1/top-5 with the original preprocessing, checked by an independent count."""

import json

import keras
import numpy as np
import pytest

import vit_keras
from vit_keras import cli, data, evaluate


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    model = vit_keras.build_model(48, 16, 1, 32, 2, 64, classes=10, name="digits-eval")
    head = model.get_layer("head")
    rng = np.random.default_rng(3)
    head.kernel.assign(rng.normal(size=head.kernel.shape).astype("float32"))
    path = tmp_path_factory.mktemp("eval") / "model.keras"
    model.save(path)
    return model, str(path)


def bilinear(images, size):
    """Bilinear resize with half-pixel centres and no antialiasing (the original's tf.image.resize), in numpy."""
    out = images.astype("float64")
    for axis in (1, 2):
        old = out.shape[axis]
        pos = np.clip((np.arange(size) + 0.5) * (old / size) - 0.5, 0, old - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, old - 1)
        frac = (pos - lo).reshape([-1 if a == axis else 1 for a in range(out.ndim)])
        out = np.take(out, lo, axis) * (1 - frac) + np.take(out, hi, axis) * frac
    return out


def independent_accuracy(model):
    """Top-1/top-5 counted here: the digits test split (32 px) resized to 48 in numpy, x/127.5-1, numpy ranks."""
    images, labels = zip(*data.load("digits").test.as_numpy_iterator())
    x = (bilinear(np.stack(images), 48) / 127.5 - 1).astype("float32")
    logits = np.asarray(model.predict(x, batch_size=64, verbose=0))
    labels = np.array(labels)
    ranks = np.argsort(-logits, axis=-1)
    return np.mean(ranks[:, 0] == labels), np.mean(np.any(ranks[:, :5] == labels[:, None], -1)), len(labels)


def test_evaluate_cli_on_digits(digits_model, tmp_path, capsys):
    model, path = digits_model
    out = tmp_path / "result.json"
    assert cli.main(["evaluate", "--model", path, "--dataset", "digits", "--batch-size", "50",
                     "--json", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = json.loads(out.read_text())
    assert printed == written
    top1, top5, count = independent_accuracy(model)
    assert written["count"] == count == 360
    assert written["top1"] == pytest.approx(top1) and written["top5"] == pytest.approx(top5)
    assert 0.0 < written["top1"] < written["top5"] < 1.0  # a random head: neither trivial value


def test_evaluate_refuses_what_does_not_fit(digits_model, tmp_path):
    model, path = digits_model
    other = vit_keras.build_model(48, 16, 1, 32, 2, 64, classes=3)
    with pytest.raises(ValueError, match="has 3 outputs but digits has 10 classes"):
        evaluate.evaluate(other, "digits")
    with pytest.raises(ValueError, match="Unknown model 'vit_b99'"):
        evaluate.evaluate("vit_b99", "digits")
    with pytest.raises(ValueError, match="vit_r26_b32 has no published weights"):
        evaluate.evaluate("vit_r26_b32", "digits")
    with pytest.raises(ValueError, match="cannot load the model .*: no such file"):
        evaluate.evaluate(str(tmp_path / "none.keras"), "digits")
    assert cli.main(["evaluate", "--model", path, "--dataset", "no-such-dataset/x"]) == 2
    keras.backend.clear_session()


def test_builder_with_classes_none_takes_the_checkpoint_head(tiny_vit):
    model = vit_keras.build_model(weights=str(tiny_vit.params), **tiny_vit.config(classes=None))
    assert model.output_shape == (None, 10)
    with pytest.raises(ValueError, match="needs weights"):
        vit_keras.build_model(**tiny_vit.config(classes=None))
