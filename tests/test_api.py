"""The public API, including the names that code written for the older vit-keras package uses."""

import numpy as np

import vit_keras


def test_vit_keras_compatible_names():
    from vit_keras import utils, visualize, vit

    model = vit.vit_b32(image_size=64, classes=3, activation="sigmoid", include_top=True,
                        pretrained=False, pretrained_top=False)
    assert model.output_shape == (None, 3)
    assert model.get_layer("head").activation.__name__ == "sigmoid"
    np.testing.assert_allclose(vit.preprocess_inputs(np.array([0, 127.5, 255])), [-1, 0, 1])
    classes = utils.get_imagenet_classes()
    assert len(classes) == 1000 and classes[0] == "tench" and classes[999] == "toilet_tissue"
    assert callable(visualize.attention_map)
    for name in ("vit_b16", "vit_b32", "vit_l16", "vit_l32", "vit_r50_b16", "vit_ti16", "vit_s16",
                 "vit_r26_s32", "vit_r50_l32"):
        assert getattr(vit_keras, name) is getattr(vit, name) is vit_keras.BUILDERS[name]


def test_builders_take_non_square_sizes_and_drop_the_top():
    model = vit_keras.vit_r26_s32(image_size=(64, 96), include_top=False, pretrained=False)
    assert model.output_shape == (None, 384)
    assert model.get_layer("embeddings").grid_size((64, 96)) == (2, 3)


def test_default_model_has_one_output_and_attention_model_shares_weights():
    model = vit_keras.vit_ti16(image_size=32, classes=4, pretrained=False)
    assert len(model.outputs) == 1
    attn = vit_keras.attention_model(model)
    assert {id(w) for w in attn.weights} == {id(w) for w in model.weights}
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    out, weights = attn(x)
    np.testing.assert_allclose(out, model(x), atol=1e-6)
    assert len(weights) == 12 and weights[0].shape == (2, 3, 5, 5)
    np.testing.assert_allclose(np.asarray(weights[3]).sum(-1), 1.0, atol=1e-5)


def test_wrong_image_size_names_both_sizes():
    import pytest

    model = vit_keras.vit_ti16(image_size=32, classes=4, pretrained=False)
    with pytest.raises(ValueError, match=r"expected shape=\(None, 32, 32, 3\), found shape=\(1, 48, 48, 3\)"):
        model(np.zeros((1, 48, 48, 3), "float32"))
