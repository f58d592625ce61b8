"""Fine-tuning checks in a fresh process: `KERAS_BACKEND=jax python tests/finetune_run.py OUT [mirrored]`.

Run by tests/test_finetune.py. On any backend: remat gives the gradients of
the plain model (tiny ViT and hybrid; dropout on, with the same seeds, off PyTorch), and one LoRA step with the
layer-decay
SGD changes only the adapters and the head, and its `.keras` file opens with
plain `keras.models.load_model` as the merged model. With `mirrored` (TensorFlow,
two logical CPUs) it instead trains one short `train` run with remat, LoRA and
layer decay under `--strategy mirrored`. Writes OUT/result.json.
"""

import json
import os
import sys

import numpy as np

out = sys.argv[1]
mirrored = sys.argv[2:] == ["mirrored"]
os.makedirs(out, exist_ok=True)
if mirrored:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import vit_keras  # noqa: E402
from vit_keras import finetune, training  # noqa: E402

BACKEND = keras.backend.backend()
result = {"backend": BACKEND}

if mirrored:
    run = training.train(model="vit_tiny16", dataset="digits", image_size=32, epochs=1, batch_size=32,
                         strategy="mirrored", out=os.path.join(out, "run"), verbose=0, remat=True,
                         lora_rank=2, layer_decay=0.75)
    replicas = [[np.asarray(v) for v in getattr(var.value, "values", (var.value,))]
                for var in run.model.trainable_variables]
    result.update(run.metrics, replicas=len(replicas[0]),
                  replica_gap=max(float(np.abs(r[0] - r[-1]).max()) for r in replicas))
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f)
    sys.exit(0)

loss_fn = keras.losses.CategoricalCrossentropy(from_logits=True)
rng = np.random.default_rng(0)


def grads(model, x, y):
    """Gradients of the loss wrt the trainable variables, as NumPy, on this backend."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function
        def f(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            return tape.gradient(loss, model.trainable_variables)

        return [np.asarray(g) for g in f(x, y)]
    if BACKEND == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        frozen = [v.value for v in model.non_trainable_variables]

        def f(trainable):
            logits, _ = model.stateless_call(trainable, frozen, x, training=True)
            return loss_fn(y, logits)

        return [np.asarray(g) for g in jax.jit(jax.grad(f))(trainable)]
    loss = loss_fn(y, model(x, training=True))
    loss.backward()
    return [v.value.grad.detach().cpu().numpy() for v in model.trainable_variables]


gaps = {}
for hybrid in (False, True):
    extra = dict(resnet_layers=(1,), resnet_width_factor=0.5, patch_size=1) if hybrid else dict(patch_size=16)
    # Dropout on: the recomputed blocks must draw the masks of the forward pass (PyTorch's dropout takes
    # its global generator, so there the two models cannot be given the same masks).
    args = dict(image_size=32, num_layers=2, hidden_size=64, num_heads=4, mlp_dim=128, classes=10,
                dropout=0.0 if BACKEND == "torch" else 0.3, **extra)
    plain = vit_keras.build_model(**args)
    remat = vit_keras.build_model(**args, remat=True)
    for v in plain.weights:
        if v.path.startswith("head/"):  # the head starts at zero: no gradient would reach the body
            v.assign(rng.normal(size=v.shape).astype("float32"))
    remat.set_weights(plain.get_weights())
    for a, b in zip(plain.non_trainable_variables, remat.non_trainable_variables):
        b.assign(a.value)  # the dropout layers' seed states
    x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    y = np.eye(10, dtype="float32")[[1, 2]]
    g_plain, g_remat = grads(plain, x, y), grads(remat, x, y)
    gaps["hybrid" if hybrid else "vit"] = {
        "max_abs_diff": max(float(np.abs(a - b).max()) for a, b in zip(g_plain, g_remat)),
        "max_abs": max(float(np.abs(a).max()) for a in g_plain), "count": len(g_plain)}
result["remat"] = gaps

# One LoRA step with layer decay: only the adapters and the head move.
model = vit_keras.build_model(32, 16, 2, 64, 4, 128, classes=10, dropout=0.0)
model = finetune.prepare(model, lora_rank=2)
before = {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}
opt = finetune.layer_decay_optimizer(training.make_optimizer("sgd", 0.1, 10, 0), 0.5, 2)
model.compile(optimizer=opt, loss=loss_fn)
x = rng.uniform(-1, 1, (4, 32, 32, 3)).astype("float32")
y = np.eye(10, dtype="float32")[[0, 1, 2, 3]]
model.train_on_batch(x, y)
model.train_on_batch(x, y)  # the head starts at zero; the second step reaches the adapters
moved = sorted(v.path for v in model.weights
               if "float" in str(v.dtype) and not np.array_equal(before[v.path], keras.ops.convert_to_numpy(v)))
result["moved"] = moved
result["trainable"] = sorted(v.path for v in model.trainable_variables)
path = os.path.join(out, f"lora-{BACKEND}.keras")
model.save(path)
loaded = keras.models.load_model(path)
result["loaded_has_lora"] = finetune.has_lora(loaded)
result["loaded_vs_lora"] = float(np.abs(keras.ops.convert_to_numpy(loaded(x))
                                        - keras.ops.convert_to_numpy(model(x))).max())
with open(os.path.join(out, "result.json"), "w") as f:
    json.dump(result, f)
