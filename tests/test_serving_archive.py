"""The SavedModels hold each weight and each traced graph once (`serving.archive.save_endpoints`).

Keras 3.15's `ExportArchive` wrote every weight twice (keras-team/keras#23553)
and, for our `tf.function` endpoints, every signature's graph twice (traced once outside the save, once
inside). Weights are counted in the written checkpoint itself
(`tf.train.load_checkpoint`) against `count_params` of the model the export
converts; graphs in `saved_model.pb`'s function library (the functions that
hold the hybrid's convolutions: one per distinct model graph). The reloaded
object's variables are the model's, and it still serves its probabilities.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import vit_keras
from conftest import assert_close
from vit_keras.model import attention_model
from vit_keras.serving import tflite
from tensorflow.core.protobuf import saved_model_pb2

from vit_keras.serving.archive import save_endpoints
from vit_keras.serving.prepare import prepare_export_model
from vit_keras.serving.saved_model import export_saved_model


@pytest.fixture(scope="module")
def hybrid():
    model = vit_keras.build_model(32, 1, num_layers=2, hidden_size=64, num_heads=4, mlp_dim=128, classes=5,
                                  resnet_layers=(1,))
    for i, w in enumerate(model.weights):  # random values everywhere, the head included
        w.assign(np.random.default_rng(i).normal(0, 0.2, w.shape).astype("float32"))
    return model


def stored(directory):
    """(values, bytes) of every tensor in a SavedModel's checkpoint."""
    reader = tf.train.load_checkpoint(directory + "/variables/variables")
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    keys = [k for k in shapes if k != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    return (sum(int(np.prod(shapes[k])) for k in keys),
            sum(int(np.prod(shapes[k])) * dtypes[k].size for k in keys))


def model_graphs(directory):
    """How many functions of the SavedModel's library run the hybrid's convolutions."""
    saved = saved_model_pb2.SavedModel()
    with open(directory + "/saved_model.pb", "rb") as f:
        saved.ParseFromString(f.read())
    library = saved.meta_graphs[0].graph_def.library.function
    return sum(any(node.op == "Conv2D" for node in fn.node_def) for fn in library)


def weight_bytes(model):
    return sum(int(np.prod(w.shape)) * np.dtype(keras.backend.standardize_dtype(w.dtype)).itemsize
               for w in model.weights)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_saved_model_stores_each_weight_once(hybrid, precision, tmp_path):
    served_model = prepare_export_model(hybrid, precision)
    path = export_saved_model(hybrid, str(tmp_path), name="vit", precision=precision)
    values, size = stored(path)
    assert values == served_model.count_params() == hybrid.count_params()
    assert size == weight_bytes(served_model)
    assert model_graphs(path) == 2  # one shared by `serving_default` and `predict_images`, one for `attention`
    loaded = tf.saved_model.load(path)
    assert len(loaded.variables) == len(served_model.weights)
    assert len(loaded.trainable_variables) == len(served_model.trainable_weights)
    assert {v.dtype.name for v in loaded.variables} == {keras.backend.standardize_dtype(w.dtype)
                                                         for w in served_model.weights}
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    expected = tf.nn.softmax(hybrid(pixels / 127.5 - 1.0)).numpy()
    got = loaded.signatures["predict_images"](images=tf.constant(pixels))["probabilities"].numpy()
    assert_close(got, expected, 1e-5 if precision == "float32" else 2e-2, precision)


def test_tflite_source_saved_model_stores_each_weight_once(hybrid):
    model = prepare_export_model(hybrid)
    with tflite._saved_model(model, attention=True) as (directory, keys):
        values, size = stored(directory)
        graphs = model_graphs(directory)
    assert graphs == 2  # `serving_default` and `attention`
    assert keys == [tflite.SERVING_KEY, tflite.ATTENTION_KEY]
    assert (values, size) == (model.count_params(), weight_bytes(model))


def test_models_sharing_layers_are_saved_once(hybrid, tmp_path):
    attn = attention_model(hybrid)
    spec = [tf.TensorSpec([None, 32, 32, 3], tf.float32)]
    logits = tf.function(lambda x: {"logits": hybrid(x, training=False)}, input_signature=spec)
    weights = tf.function(lambda x: {"weights": attn(x, training=False)[1][0]}, input_signature=spec)
    save_endpoints(str(tmp_path), {"logits": logits, "weights": weights}, [hybrid, attn])
    assert stored(str(tmp_path)) == (hybrid.count_params(), weight_bytes(hybrid))
    assert model_graphs(str(tmp_path)) == 2
    loaded = tf.saved_model.load(str(tmp_path))
    assert [tuple(v.shape) for v in loaded.variables] == [tuple(w.shape) for w in hybrid.weights]
    x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    assert_close(loaded.signatures["logits"](x=tf.constant(x))["logits"], hybrid(x), 1e-5, "logits")
    assert_close(loaded.weights(x)["weights"], attn(x)[1][0], 1e-5, "attention")
