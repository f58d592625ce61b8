"""Full-size R50+ViT-B/16 and ViT-B/16 convert to TFLite (slow: set VIT_KERAS_SLOW=1).

Figures from a run are in README.md (benchmarks/export_latency.py measures them).
"""

import os

import numpy as np
import pytest

import vit_keras
from vit_keras import export

pytestmark = pytest.mark.skipif(not os.environ.get("VIT_KERAS_SLOW"), reason="set VIT_KERAS_SLOW=1")


@pytest.mark.parametrize("builder", [vit_keras.vit_r50_b16, vit_keras.vit_b16], ids=lambda b: b.__name__)
def test_full_size_tflite(builder):
    model = builder(image_size=224, classes=10, pretrained=False)
    rng = np.random.default_rng(0)
    head = model.get_layer("head")
    head.kernel.assign(rng.normal(0, 0.05, head.kernel.shape).astype("float32"))
    x = rng.uniform(0, 255, (1, 224, 224, 3)).astype("float32")
    reference = np.asarray(export.probabilities(model, x))
    for variant in ("float32", "dynamic_int8"):
        probs = export.tflite_predict(export.convert_tflite(model, variant), x)
        tolerance = 1e-4 if variant == "float32" else 5e-2
        np.testing.assert_allclose(probs, reference, atol=tolerance)
