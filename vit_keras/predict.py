"""Prediction helpers shared by the CLI, the visualiser and the exports: pixels -> probabilities -> top-k labels.

Pure `keras.ops`: they run on every backend, and inside the exports' TensorFlow graphs.
"""

import numpy as np
from keras import ops

from vit_keras.model import class_names as model_class_names
from vit_keras.preprocessing import preprocess_inputs

# Images per model call in whole-set helpers: bounds their memory.
BATCH_SIZE = 16


def label_names(model, class_names=None):
    """The class names to serve: given ones, those in the model's head, or "0".."C-1"."""
    names = class_names or model_class_names(model)
    classes = model.output_shape[-1]
    if names and len(names) != classes:
        raise ValueError(f"{len(names)} class names given for a model with {classes} outputs.")
    return list(names) if names else [str(i) for i in range(classes)]


def as_probabilities(model, outputs):
    """The model's outputs -> float32 probabilities, by the head's activation (softmax of logits)."""
    try:
        activation = model.get_layer("head").activation.__name__
    except ValueError:
        activation = "linear"
    outputs = ops.cast(outputs, "float32")
    return outputs if activation in ("softmax", "sigmoid") else ops.softmax(outputs, axis=-1)


def probabilities(model, pixels):
    """Pixels 0..255 -> class probabilities (softmax of logits; as-is for softmax/sigmoid heads)."""
    return as_probabilities(model, model(preprocess_inputs(pixels), training=False))


def batched_probabilities(model, images, batch_size=BATCH_SIZE):
    """Probabilities for pixels `[N, H, W, 3]`, `batch_size` images at a time -> numpy `[N, C]`."""
    images = np.asarray(images, "float32")
    parts = [ops.convert_to_numpy(as_probabilities(model, model.predict_on_batch(preprocess_inputs(
        images[i:i + batch_size])))) for i in range(0, len(images), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, model.output_shape[-1]), "float32")


def top_k(probs, names, k=5):
    """Rows of `(label, probability)`, most probable first, for probabilities `[N, C]` (numpy)."""
    probs = np.asarray(probs)
    k = min(k, probs.shape[-1])
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [[(names[c], float(row[c])) for c in idx] for row, idx in zip(probs, order)]
