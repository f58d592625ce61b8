"""TF Serving's warm-up file (`assets.extra/tf_serving_warmup_requests`), written without tensorflow-serving-api."""

import os

import tensorflow as tf


def _varint(n):
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _message_field(number, payload):
    """One length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def warmup_request(model_name, image_bytes, signature="serving_default"):
    """A serialized `tensorflow.serving.PredictionLog` holding one PredictRequest.

    tensorflow-serving-api would pull a second, full TensorFlow, so the few
    wrapper messages are written by hand from their field numbers:
    PredictionLog.predict_log = 6, PredictLog.request = 1, PredictRequest
    {model_spec = 1, inputs = 2 (map<string, TensorProto>)}, ModelSpec {name = 1,
    signature_name = 3}; the TensorProto itself comes from TensorFlow.
    """
    tensor = tf.make_tensor_proto(list(image_bytes), dtype=tf.string).SerializeToString()
    spec = _message_field(1, model_name.encode()) + _message_field(3, signature.encode())
    inputs = _message_field(1, b"image_bytes") + _message_field(2, tensor)
    request = _message_field(1, spec) + _message_field(2, inputs)
    return _message_field(6, _message_field(1, request))


def write_warmup(directory, model_name, image_size):
    # A mid-grey PNG of the model's size: it exercises decoding, resizing and the model.
    png = tf.io.encode_png(tf.fill((*image_size, 3), tf.constant(128, tf.uint8))).numpy()
    path = os.path.join(directory, "tf_serving_warmup_requests")
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(warmup_request(model_name, [png]))
    return path
