"""`.keras` files reload in a fresh process, without custom_objects, with equal outputs."""

import subprocess
import sys
import textwrap

import numpy as np

import vit_keras
from conftest import assert_close


def test_keras_file_reloads_in_fresh_process(tiny_r50, tmp_path):
    model = tiny_r50.model()
    path = tmp_path / "model.keras"
    model.save(path)
    out = tmp_path / "out.npy"
    # Importing the package registers its layers; no custom_objects, safe mode on.
    script = textwrap.dedent(
        f"""
        import numpy as np, keras, vit_keras
        model = keras.saving.load_model({str(path)!r}, safe_mode=True)
        np.save({str(out)!r}, np.asarray(model(np.load({str(tiny_r50.dir / 'inputs.npz')!r})["images"])))
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    assert_close(np.load(out), tiny_r50.expected["logits"], 2e-5)


def test_attention_model_of_reloaded_model(tiny_vit, tmp_path):
    import keras

    path = tmp_path / "m.keras"
    tiny_vit.model().save(path)
    reloaded = keras.saving.load_model(path)
    logits, weights = vit_keras.attention_model(reloaded)(tiny_vit.images)
    assert_close(weights[1], tiny_vit.expected["attn_1"], 1e-5)
    assert_close(logits, tiny_vit.expected["logits"], 2e-5)


def test_folded_model_reloads_folded(tiny_r50, tmp_path):
    """The folded copy's config says its kernels are standardised, so a reload does not redo it."""
    import keras

    folded = vit_keras.fold_weight_standardization(tiny_r50.model())
    path = tmp_path / "folded.keras"
    folded.save(path)
    reloaded = keras.saving.load_model(path)
    assert reloaded.get_layer("embeddings").resnet.units[0].conv1.prestandardized
    assert_close(reloaded(tiny_r50.images), tiny_r50.expected["logits"], 2e-5)
    assert vit_keras.fold_weight_standardization(reloaded) is reloaded
