"""`.keras` files saved by earlier versions still load and give the same outputs.

`tests/fixtures/saved_before/` holds the tiny fixture models saved by the
version before the ResNet had `ResNetStage` layers (commit 489251d), whose
`.keras` files store the ResNet's units as one flat list.
"""

import pathlib

import keras
import numpy as np
import pytest

import vit_keras
from conftest import assert_close

SAVED = pathlib.Path(__file__).parent / "fixtures" / "saved_before"


@pytest.mark.parametrize("name", ["tiny_r50", "tiny_vit"])
def test_old_keras_file_loads(name, request):
    case = request.getfixturevalue(name)
    model = keras.saving.load_model(SAVED / f"{name}.keras")
    # The fixture's logits are Google's: the weights landed where they belong.
    assert_close(model(case.images), case.expected["logits"], 2e-5, f"{name} logits")
    if name == "tiny_r50":
        stages = model.get_layer("embeddings").resnet.stages
        assert [s.name for s in stages] == [f"block{i + 1}" for i in range(len(stages))]


def test_new_keras_file_round_trip(tiny_r50, tmp_path):
    model = tiny_r50.model()
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    assert_close(reloaded(tiny_r50.images), tiny_r50.expected["logits"], 2e-5, "reloaded logits")
    # Saved under the stage tree, loaded back by names.
    names = {v.path: np.asarray(v) for v in reloaded.weights}
    assert any("/block1/unit1/conv1/" in path for path in names)
    assert vit_keras.checkpoint.checkpoint_variables(reloaded).keys() == \
        vit_keras.checkpoint.checkpoint_variables(model).keys()
