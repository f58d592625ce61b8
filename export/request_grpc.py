"""gRPC request to TF Serving: python request_grpc.py image.jpg [host:port] [model].

Needs `grpcio` and `tensorflow-serving-api` on the client (not dependencies of vit_keras).
"""

import sys

import grpc
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

image, host, model = (sys.argv[1:] + ["localhost:8500", "vit-hybrid-tiny"][len(sys.argv) - 2:])[:3]
request = predict_pb2.PredictRequest()
request.model_spec.name = model
request.model_spec.signature_name = "serving_default"
request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([open(image, "rb").read()]))
stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(host))
response = stub.Predict(request, timeout=10.0)
labels = tf.make_ndarray(response.outputs["labels"])[0]
scores = tf.make_ndarray(response.outputs["scores"])[0]
for label, score in zip(labels, scores):
    print(f"{label.decode()}: {score:.3f}")
