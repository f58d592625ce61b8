"""`features_model`: the multi-scale feature maps equal Google's intermediates (tests/fixtures/vit_jax)."""

import keras
import numpy as np
import pytest

import vit_keras
from conftest import assert_close


def _grid(tokens, rows, cols, prefix):
    return tokens[:, prefix:].reshape(len(tokens), rows, cols, -1)


def _close(got, ref, what):
    assert_close(got, ref, 1e-4 * np.abs(ref).max(), what)


def test_hybrid_features_are_the_original_intermediates(tiny_r50):
    model = tiny_r50.model()
    features = vit_keras.features_model(model, blocks=[0, 1])
    out = {k: np.asarray(v) for k, v in features(tiny_r50.images).items()}
    e = tiny_r50.expected
    assert list(out) == vit_keras.features.feature_names(model, [0, 1])
    # The root: after GroupNorm and ReLU, before the max-pool (stride 2).
    _close(out["root"], np.maximum(e["resnet/gn_root"], 0), "root")
    for s in (1, 2, 3):
        _close(out[f"stage{s}"], e[f"resnet/block{s}"], f"stage{s}")
    rows, cols = e["embedding_out"].shape[1:3]
    for i in (0, 1):
        _close(out[f"encoderblock_{i}"], _grid(e[f"block_{i}_out"], rows, cols, 1), f"encoderblock_{i}")
    _close(out["encoder"], _grid(e["encoder_out"], rows, cols, 1), "encoder")
    assert [out[k].shape[1] for k in ("root", "stage1", "stage2", "stage3", "encoder")] == [32, 16, 8, 4, 4]


def test_plain_vit_without_class_token(tiny_vit_gap):
    """A non-square gap model: only encoder features, its 2x3 grid."""
    model = tiny_vit_gap.model()
    out = vit_keras.features_model(model)(tiny_vit_gap.images)
    assert list(out) == ["encoder"]
    e = tiny_vit_gap.expected
    _close(out["encoder"], _grid(e["encoder_out"], 2, 3, 0), "encoder")


def test_reloaded_model_and_bad_blocks(tiny_r50, tmp_path):
    model = tiny_r50.model()
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    out = vit_keras.features_model(reloaded)(tiny_r50.images)
    _close(out["stage3"], tiny_r50.expected["resnet/block3"], "stage3 after reload")
    with pytest.raises(ValueError, match=r"blocks \[2\] out of range: the encoder has blocks 0..1"):
        vit_keras.features_model(model, blocks=[2])


def test_segmentation_example_learns_the_masks():
    """examples/segmentation.py: a decoder on the features learns digit masks (IoU far above all-ink)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "examples" / "segmentation.py"
    spec = importlib.util.spec_from_file_location("segmentation_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    iou, all_ink = example.main(["--epochs", "2", "--images", "400"])
    assert iou > all_ink + 0.3, (iou, all_ink)
