"""Fine-tuning and training with plain `model.fit`: the original recipe, resumable.

>>> from vit_keras import training
>>> metrics = training.train("vit_hybrid_tiny", "digits", "runs/demo", epochs=6)  # doctest: +SKIP
"""

import collections
import json
import logging
import os
import shutil
import sys
import tempfile
import time

import keras

from vit_keras import data as data_lib
from vit_keras import distribute, presets
from vit_keras.model import build_model

logger = logging.getLogger("vit_keras")

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")

Result = collections.namedtuple("Result", ["metrics", "model"])


def atomic_save(model, path):
    """Saves a `.keras` file through a temporary file and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".keras", dir=directory, prefix=".tmp-")
    os.close(fd)
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(obj, path):
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def make_optimizer(name, learning_rate, total_steps, warmup_steps, weight_decay=0.0,
                   grad_accum=1, clipnorm=1.0):
    """The original fine-tuning recipe: linear warm-up, cosine decay, global-norm clipping."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=max(total_steps - warmup_steps, 1),
        warmup_target=learning_rate,
        warmup_steps=warmup_steps,
    )
    common = dict(
        learning_rate=schedule,
        global_clipnorm=clipnorm,
        gradient_accumulation_steps=grad_accum if grad_accum > 1 else None,
    )
    if name == "sgd":
        return keras.optimizers.SGD(momentum=0.9, weight_decay=weight_decay or None, **common)
    if name == "adamw":
        return keras.optimizers.AdamW(weight_decay=weight_decay or 1e-4, **common)
    raise ValueError(f"Unknown optimizer {name!r}: use 'sgd' or 'adamw'.")


class ResumableBackup(keras.callbacks.Callback):
    """Saves weights, optimizer state and the global step every `every` steps, atomically.

    Keras's `BackupAndRestore` restarts an interrupted epoch from its first
    batch; this one records the exact step so `train` resumes mid-epoch.
    """

    def __init__(self, directory, every):
        super().__init__()
        self.directory = directory
        self.every = every
        self.step, self.elapsed = 0, 0.0  # restored by `restore`
        self.started = time.time()

    @property
    def weights_path(self):
        return os.path.join(self.directory, "state.weights.h5")

    @property
    def state_path(self):
        return os.path.join(self.directory, "state.json")

    def restore(self, model):
        """Loads a backup into `model` and returns `(step, elapsed seconds)`."""
        if not os.path.exists(self.state_path):
            return 0, 0.0
        with open(self.state_path) as f:
            state = json.load(f)
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(self.weights_path)
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.started = time.time()
        return self.step, self.elapsed

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.every == 0:
            self.save()

    def save(self):
        os.makedirs(self.directory, exist_ok=True)
        tmp = os.path.join(self.directory, ".tmp.weights.h5")
        self.model.save_weights(tmp, overwrite=True)
        os.replace(tmp, self.weights_path)  # the weights first: a state file never points ahead
        elapsed = self.elapsed + time.time() - self.started
        atomic_write_json({"step": self.step, "elapsed": elapsed}, self.state_path)


class BestAndLast(keras.callbacks.Callback):
    """Keeps `last.keras` and `best.keras` (by `monitor`), both written atomically."""

    def __init__(self, directory, monitor="val_top1"):
        super().__init__()
        self.directory = directory
        self.monitor = monitor
        self.record = os.path.join(directory, "best.json")
        self.best = None
        if os.path.exists(self.record):
            with open(self.record) as f:
                self.best = json.load(f)["value"]

    def on_epoch_end(self, epoch, logs=None):
        atomic_save(self.model, os.path.join(self.directory, "last.keras"))
        value = (logs or {}).get(self.monitor)
        if value is not None and (self.best is None or value > self.best):
            self.best = float(value)
            atomic_save(self.model, os.path.join(self.directory, "best.keras"))
            atomic_write_json({"value": self.best, "epoch": epoch + 1}, self.record)


def _model_from(spec, num_classes, class_names, image_size, weights, dropout):
    """A builder or small-config name, a `.keras` file, or a dict of `build_model` arguments."""
    if isinstance(spec, str) and spec.endswith(".keras"):
        model = keras.saving.load_model(spec)
        if model.output_shape[-1] != num_classes:
            raise ValueError(
                f"{spec} has {model.output_shape[-1]} outputs but the dataset has {num_classes} classes."
            )
        return model
    if isinstance(spec, str):
        config = presets.ALL_CONFIGS.get(spec)
        if config is None:
            known = ", ".join(sorted(presets.ALL_CONFIGS))
            raise ValueError(f"Unknown model {spec!r}; known: {known}, or a .keras file.")
        config = dict(config, name=spec.replace("_", "-"))
        if weights in presets.WEIGHT_NAMES:
            from vit_keras import checkpoint

            weights = checkpoint.resolve(weights, model=spec)
    else:
        config = dict(spec)
    config["image_size"] = image_size or config.get("image_size", 224)
    config.update(classes=num_classes, class_names=class_names, dropout=dropout)
    if weights:
        config["weights"] = weights
    return build_model(**config)


def train(
    model="vit_r50_b16",
    dataset="digits",
    out="runs/train",
    epochs=10,
    batch_size=64,
    image_size=None,
    weights=None,
    data_dir=None,
    download=False,
    optimizer="sgd",
    learning_rate=0.03,
    weight_decay=0.0,
    warmup_steps=None,
    grad_accum=1,
    clipnorm=1.0,
    label_smoothing=0.0,
    dropout=0.0,
    randaugment=False,
    mixup=False,
    cutmix=False,
    crop_area=None,
    strategy=None,
    precision="float32",
    jit_compile=False,
    seed=0,
    backup_every=None,
    verbose="auto",
):
    """Trains or fine-tunes a model with `model.fit` and writes everything to `out`.

    `out` receives `model.keras` (the final model, class names in its head),
    `best.keras` and `last.keras`, `metrics.json`, `log.csv` and TensorBoard
    logs in `logs/`. A run killed at any point resumes from its last backup
    (`backup/`, every `backup_every` steps) when started again with the same
    `out`, and finishes with the same number of steps.

    Args:
        model: str or dict. A builder name (`vit_r50_b16`), a small config
            (`vit_hybrid_tiny`), a `.keras` file, or `build_model` arguments.
        dataset: str. `digits`, a folder of class folders, or a TFDS name.
        weights: str or None. A checkpoint to start from: a preset name
            (`imagenet21k`), a path or URL of an `.npz` file. The head is
            replaced when the class count differs.
        precision: str. `float32`, `mixed_bfloat16` or `mixed_float16`.
        strategy: str or None. None, `mirrored`, `multi_worker` or `tpu`.
        Other arguments: see `vit-keras train --help`.

    Returns:
        `Result(metrics, model)`: the metrics dict that is also written to
        `out/metrics.json`, and the trained model.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; use one of {PRECISIONS}.")
    keras.utils.set_random_seed(seed)
    dist = distribute.get_strategy(strategy)
    is_chief = distribute.is_chief(dist)
    # Only the chief writes to `out`; other workers write to a scratch folder.
    out_dir = out if is_chief else os.path.join(out, f".worker-{distribute.task_id()}")
    os.makedirs(out_dir, exist_ok=True)
    splits = data_lib.load(dataset, data_dir=data_dir, download=download)
    num_classes = len(splits.class_names)
    steps_per_epoch = splits.num_train // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} exceeds the {splits.num_train} training images.")
    total_steps = epochs * steps_per_epoch
    warmup_steps = warmup_steps if warmup_steps is not None else max(1, total_steps // 20)

    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        with dist.scope():
            net = _model_from(model, num_classes, splits.class_names, image_size, weights, dropout)
            net.compile(
                optimizer=make_optimizer(optimizer, learning_rate, total_steps, warmup_steps,
                                         weight_decay, grad_accum, clipnorm),
                loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=label_smoothing),
                metrics=[
                    keras.metrics.CategoricalAccuracy(name="top1"),
                    keras.metrics.TopKCategoricalAccuracy(k=min(5, num_classes), name="top5"),
                ],
                jit_compile=jit_compile,
            )
    finally:
        keras.config.set_dtype_policy(previous_policy)
    size = net.input_shape[1:3]
    pipe = dict(image_size=size, num_classes=num_classes, batch_size=batch_size, seed=seed)
    train_ds = data_lib.make_pipeline(
        splits.train, training=True, repeat=True, flip=splits.flip,
        crop_area=crop_area or splits.crop_area, randaugment=randaugment, mixup=mixup,
        cutmix=cutmix, **pipe,
    )
    val_ds = data_lib.make_pipeline(splits.validation, **pipe)
    test_ds = data_lib.make_pipeline(splits.test, **pipe)

    backup = ResumableBackup(os.path.join(out_dir, "backup"), backup_every or steps_per_epoch)
    resumed_from = step = backup.restore(net)[0]
    if step:
        logger.warning("Resuming %s at step %d of %d.", out, step, total_steps)
    callbacks = [
        backup,
        BestAndLast(out_dir),
        keras.callbacks.CSVLogger(os.path.join(out_dir, "log.csv"), append=True),
        keras.callbacks.TensorBoard(os.path.join(out_dir, "logs"), write_graph=False),
    ]
    epoch, done_in_epoch = divmod(step, steps_per_epoch)
    if verbose == "auto":  # one line per epoch where no terminal redraws the bar
        verbose = 1 if sys.stdout.isatty() else 2
    fit = dict(validation_data=val_ds, callbacks=callbacks, verbose=verbose, shuffle=False)  # tf.data shuffles
    if done_in_epoch:  # finish the interrupted epoch, then the rest
        net.fit(train_ds, initial_epoch=epoch, epochs=epoch + 1,
                steps_per_epoch=steps_per_epoch - done_in_epoch, **fit)
        epoch += 1
    if epoch < epochs:
        net.fit(train_ds, initial_epoch=epoch, epochs=epochs, steps_per_epoch=steps_per_epoch, **fit)
    results = net.evaluate(test_ds, return_dict=True, verbose=0)
    wall = backup.elapsed + time.time() - backup.started
    metrics = {
        "test_top1": float(results["top1"]),
        "test_top5": float(results["top5"]),
        "test_loss": float(results["loss"]),
        "epochs": epochs,
        "steps": backup.step,
        "resumed_from_step": resumed_from,
        "wall_seconds": round(wall, 2),
        "model": model if isinstance(model, str) else "custom",
        "dataset": dataset,
        "image_size": list(size),
        "batch_size": batch_size,
        "precision": precision,
        "strategy": strategy or "default",
        "replicas": dist.num_replicas_in_sync,
        "class_names": splits.class_names,
    }
    atomic_save(net, os.path.join(out_dir, "model.keras"))
    atomic_write_json(metrics, os.path.join(out_dir, "metrics.json"))
    shutil.rmtree(backup.directory, ignore_errors=True)  # finished: nothing left to resume
    return Result(metrics, net)
