"""Fine-tuning and training with plain `model.fit`: the original recipe, resumable.

>>> from vit_keras import training
>>> metrics = training.train("vit_hybrid_tiny", "digits", "runs/demo", epochs=6)  # doctest: +SKIP
"""

import collections
import dataclasses
import json
import logging
import numbers
import os
import shutil
import sys
import tempfile
import time
import uuid

import keras
import numpy as np

from vit_keras import data as data_lib
from vit_keras import distribute, files, finetune, presets, reshape
from vit_keras.files import atomic_write_json
from vit_keras.model import build_model

logger = logging.getLogger("vit_keras")

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
OPTIMIZERS = ("sgd", "adamw")

Result = collections.namedtuple("Result", ["metrics", "model"])

# What a completed run leaves in `out` (its backup is gone by then).
FINISHED_FILES = ("model.keras", "metrics.json")


class TrainingDiverged(FloatingPointError, ValueError):
    """The loss or the weights stopped being finite numbers; nothing after that was saved."""


def atomic_save(model, path):
    """Saves a `.keras` file through a temporary file and a rename.

    The file is written by Python's `zipfile` (Keras holds the weights in
    memory first), so a full disk or a file-size limit is an `OSError` here,
    never a half-written file in place of the old one.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    files.check_room(directory, _state_bytes(model), path)
    fd, tmp = tempfile.mkstemp(suffix=".keras", dir=directory, prefix=files.temp_prefix())
    os.close(fd)
    try:
        model.save(tmp)
        files.publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _state_bytes(model):
    """Bytes of the weights and optimizer variables of `model`: about what its `.keras` file holds."""
    variables = list(model.weights)
    if getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    return sum(int(np.prod(v.shape)) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
               for v in variables)


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
    # distribute's optimizers clip the gradient summed over replicas (Keras clips each replica's part).
    if name == "sgd":
        return distribute.SGD(momentum=0.9, weight_decay=weight_decay or None, **common)
    if name == "adamw":
        return distribute.AdamW(weight_decay=weight_decay or 1e-4, **common)
    raise ValueError(f"Unknown optimizer {name!r}: use 'sgd' or 'adamw'.")


class ResumableBackup(keras.callbacks.Callback):
    """Saves weights, optimizer state and the global step every `every` steps, atomically.

    Keras's `BackupAndRestore` restarts an interrupted epoch from its first
    batch; this one records the exact step so `train` resumes mid-epoch.
    """

    def __init__(self, directory, every, settings=None):
        super().__init__()
        self.directory = directory
        self.every = every
        self.settings = settings  # what the run was made with (`run_settings`), recorded in state.json
        self.step, self.elapsed = 0, 0.0  # restored by `restore`
        self.saved = 0  # the step of the backup on disk
        self.run = uuid.uuid4().hex  # one id for a run and all its resumptions
        self.started = time.time()

    # Weights and optimizer state: a .keras archive (written through zipfile, so a full disk is a
    # clean OSError); backups of earlier versions are `state.weights.h5`, read as before.
    WEIGHTS_FILES = ("state.keras", "state.weights.h5")

    @property
    def weights_path(self):
        return os.path.join(self.directory, self.WEIGHTS_FILES[0])

    @property
    def state_path(self):
        return os.path.join(self.directory, "state.json")

    def state(self):
        """The backup's state.json as a dict, or None without a backup."""
        if not os.path.exists(self.state_path):
            return None
        try:
            with open(self.state_path) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"the backup {self.state_path} is unreadable ({e}); pass --overwrite to start "
                             "over.") from None

    def restore(self, model):
        """Loads a backup into `model` and returns `(step, elapsed seconds)`."""
        state = self.state()
        if state is None:
            return 0, 0.0
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        name = state.get("weights", self.WEIGHTS_FILES[1])  # backups without the key are .weights.h5
        model.load_weights(os.path.join(self.directory, name))
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.saved, self.run = self.step, state.get("run")
        self.started = time.time()
        return self.step, self.elapsed

    def due(self):
        """Whether the batch now ending will be backed up."""
        return (self.step + 1) % self.every == 0

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.every == 0:
            self.save()

    def save(self):
        os.makedirs(self.directory, exist_ok=True)
        atomic_save(self.model, self.weights_path)  # the weights first: a state file never points ahead
        elapsed = self.elapsed + time.time() - self.started
        state = {"step": self.step, "elapsed": elapsed, "run": self.run,
                 "weights": os.path.basename(self.weights_path), "settings": self.settings}
        atomic_write_json(state, self.state_path)
        self.saved = self.step


class BestAndLast(keras.callbacks.Callback):
    """Keeps `last.keras` and `best.keras` (by `monitor`), both written atomically."""

    def __init__(self, directory, monitor="val_top1", run=None):
        super().__init__()
        self.directory = directory
        self.monitor = monitor
        self.run = run
        self.record = os.path.join(directory, "best.json")
        self.best = None
        if os.path.exists(self.record):
            with open(self.record) as f:
                record = json.load(f)
            if record.get("run") == run:  # not a record of an earlier run in the same folder
                self.best = record["value"]

    def on_epoch_end(self, epoch, logs=None):
        atomic_save(self.model, os.path.join(self.directory, "last.keras"))
        value = (logs or {}).get(self.monitor)
        if value is not None and (self.best is None or value > self.best):
            self.best = float(value)
            atomic_save(self.model, os.path.join(self.directory, "best.keras"))
            atomic_write_json({"value": self.best, "epoch": epoch + 1, "run": self.run}, self.record)


def _have_tensorflow():
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


def _finite(model):
    """Whether every float weight and optimizer variable of `model` is a finite number."""
    variables = list(model.weights)
    if model.optimizer is not None:
        variables += list(model.optimizer.variables)
    checks = [keras.ops.all(keras.ops.isfinite(v)) for v in variables if "float" in str(v.dtype)]
    return bool(keras.ops.all(keras.ops.stack(checks))) if checks else True  # one device-to-host copy


class StopOnNaN(keras.callbacks.TerminateOnNaN):
    """Keras's `TerminateOnNaN(raise_error=True)`, raising `TrainingDiverged`, placed first.

    It also checks the weights before the backup and the epoch-end models are
    written, so that neither is ever replaced by non-finite weights.
    """

    def __init__(self, backup, learning_rate):
        super().__init__(raise_error=True)
        self.backup = backup
        self.learning_rate = learning_rate

    def on_train_batch_end(self, batch, logs=None):
        try:
            self.on_batch_end(batch, logs)
        except RuntimeError:
            raise self.error(f"the loss is {float(logs['loss'])}") from None
        if self.backup.due() and not _finite(self.model):
            raise self.error("the weights are no longer finite numbers")

    def on_epoch_end(self, epoch, logs=None):
        if not _finite(self.model):
            raise self.error("the weights are no longer finite numbers")

    def error(self, what, step=None):
        step = self.backup.step + 1 if step is None else step
        if self.backup.saved:
            kept = (f"the last backup (step {self.backup.saved}) is kept in {self.backup.directory}: "
                    "start again with the same output folder and a lower learning rate to resume "
                    "from it, or delete that folder to start over")
        else:
            kept = "no backup had been made yet"
        return TrainingDiverged(
            f"Training diverged at step {step}: {what} (learning rate {self.learning_rate:g}). "
            f"Stopped without writing model.keras; {kept}."
        )


def _check_arguments(epochs, batch_size, image_size, grad_accum, backup_every, warmup_steps,
                     learning_rate, crop_area):
    def is_int(value):
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("grad_accum", grad_accum)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if backup_every is not None and (not is_int(backup_every) or backup_every < 1):
        raise ValueError(f"backup_every must be a positive integer (steps) or None, got {backup_every!r}.")
    if warmup_steps is not None and (not is_int(warmup_steps) or warmup_steps < 0):
        raise ValueError(f"warmup_steps must be a non-negative integer or None, got {warmup_steps!r}.")
    if image_size is not None:
        data_lib.height_width(image_size)  # ValueError naming a bad size
    if not isinstance(learning_rate, numbers.Real) or not np.isfinite(learning_rate) or learning_rate < 0:
        raise ValueError(f"learning_rate must be a finite number >= 0, got {learning_rate!r}.")
    if crop_area is not None:
        try:
            lo, hi = (float(v) for v in crop_area)
        except (TypeError, ValueError):
            lo = hi = float("nan")
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_area must be a (min, max) share of the image area with "
                             f"0 < min <= max <= 1, got {crop_area!r}.")


# TrainConfig fields a resumed run may change: where and how it runs, not what it computes.
RESUME_MAY_CHANGE = ("out", "overwrite", "verbose", "backup_every", "download", "data_dir", "jit_compile",
                     "strategy", "remat")


def run_settings(config, splits):
    """What a backup records of its run: the fields that decide the steps, and the data's shape.

    A run resumes only under the same settings (`check_resume`).
    """
    settings = {}
    for field in dataclasses.fields(config):
        if field.name in RESUME_MAY_CHANGE:
            continue
        value = getattr(config, field.name)
        if field.name == "dataset" and isinstance(value, str) and os.path.isdir(value):
            value = os.path.abspath(value)  # a folder, wherever the command runs from
        if field.name == "model" and isinstance(value, str) and value.endswith(".keras"):
            value = os.path.abspath(value)
        settings[field.name] = json.loads(json.dumps(value, default=str))  # tuples as lists, as in JSON
    settings["class_names"] = list(splits.class_names)
    settings["train_images"] = int(splits.num_train)
    return settings


def check_resume(backup, settings, out, overwrite):
    """Whether to resume `backup`: True if made with `settings`; a mismatch is refused, or started over.

    A backup of an earlier version (without settings) resumes as before.
    """
    state = backup.state()
    if state is None:
        return False
    recorded = state.get("settings")
    if recorded is None:
        return True
    changed = [k for k in sorted(set(recorded) | set(settings)) if recorded.get(k) != settings.get(k)]
    if not changed:
        return True
    if overwrite:
        logger.warning("Starting over in %s (overwrite): its backup (step %d) was made with other settings "
                       "(%s).", out, state.get("step", 0), ", ".join(changed))
        shutil.rmtree(backup.directory)
        return False

    def show(value):
        text = json.dumps(value)
        return text if len(text) <= 100 else f"{text[:40]}...{text[-50:]}"

    diff = "; ".join(f"{k} {show(settings.get(k))} (backup: {show(recorded.get(k))})" for k in changed)
    raise ValueError(f"{out} holds a backup at step {state.get('step', 0)} of a run with other settings: {diff}. "
                     "Resume with the backup's settings, or pass --overwrite (overwrite=True) to start over.")


def _finished_run(out_dir):
    """The files of a completed run in `out_dir`; none where a backup is there to resume."""
    if os.path.exists(os.path.join(out_dir, "backup", "state.json")):
        return []
    return [name for name in FINISHED_FILES if os.path.exists(os.path.join(out_dir, name))]


def _num_layers(spec):
    """The encoder depth of a model spec, where known without building it (bounds `trainable=blocks:N`)."""
    if isinstance(spec, dict):
        return spec.get("num_layers")
    if isinstance(spec, presets.ViTConfig) or (isinstance(spec, str) and spec in presets.ALL_CONFIGS):
        from vit_keras import vit

        return vit.get_config(spec).num_layers
    return None  # a .keras file: checked once it is loaded


def _model_from(spec, num_classes, class_names, image_size, weights, dropout, checkpoint_prefix=None,
                input_channels=None):
    """A model to train: a `.keras` file, or through `vit.create` a name, `ViTConfig` or `build_model` arguments."""
    if isinstance(spec, str) and spec.endswith(".keras"):
        model = files.load_keras(spec)
        if model.output_shape[-1] != num_classes:
            raise ValueError(
                f"{spec} has {model.output_shape[-1]} outputs but the dataset has {num_classes} classes."
            )
        size = None if image_size is None else data_lib.height_width(image_size)
        if size not in (None, tuple(model.input_shape[1:3])) or input_channels not in (None, model.input_shape[-1]):
            model = reshape.resize(model, image_size=size, input_channels=input_channels)  # continue at that size
        _rename_classes(model, class_names, spec)
        return model
    from vit_keras import vit

    input_channels = input_channels or 3
    if isinstance(spec, dict):  # build_model arguments
        config = dict(spec, classes=num_classes, class_names=class_names,
                      image_size=image_size or spec.get("image_size", 224),
                      dropout=spec.get("dropout", presets.ViTConfig.dropout) if dropout is None else dropout)
        return build_model(**config, **({"weights": weights} if weights else {}), input_channels=input_channels)
    if isinstance(spec, str) and spec not in presets.ALL_CONFIGS and not vit.is_checkpoint_path(spec):
        known = ", ".join(sorted(presets.ALL_CONFIGS))
        raise ValueError(f"Unknown model {spec!r}; known: {known}, or a .keras file.")
    # image_size None: the published checkpoint's resolution, else 224 (as `create`).
    return vit.create(spec, weights=weights, classes=num_classes, image_size=image_size,
                      class_names=class_names, dropout=dropout, checkpoint_prefix=checkpoint_prefix,
                      input_channels=input_channels)


def _rename_classes(model, class_names, source):
    """Fine-tuning on other classes of the same count: the head takes the dataset's names (a warning says so)."""
    from vit_keras.model import class_names as model_class_names

    old = model_class_names(model)
    if old is None or list(old) == list(class_names):
        return
    logger.warning("%s was trained on other classes (%s); its head now takes the names of this dataset (%s).",
                   source, _short(old), _short(class_names))
    model.get_layer("head").class_names = [str(name) for name in class_names]


def _short(names, most=4):
    names = [str(n) for n in names]
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")


def _check_numbers(c):
    """The float fields: finite and within their meaning (a share is in [0, 1), a clip norm positive)."""
    def real(value):
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)

    checks = (
        ("weight_decay", c.weight_decay, real(c.weight_decay) and c.weight_decay >= 0, "a finite number >= 0"),
        ("clipnorm", c.clipnorm, real(c.clipnorm) and c.clipnorm > 0, "a finite number > 0"),
        ("label_smoothing", c.label_smoothing, real(c.label_smoothing) and 0 <= c.label_smoothing < 1,
         "in [0, 1)"),
        ("dropout", c.dropout, c.dropout is None or (real(c.dropout) and 0 <= c.dropout < 1), "in [0, 1)"),
        ("seed", c.seed, isinstance(c.seed, numbers.Integral) and not isinstance(c.seed, bool)
         and 0 <= c.seed < 2**32, "an integer in [0, 2**32)"),
    )
    for name, value, ok, meaning in checks:
        if not ok:
            raise ValueError(f"{name} must be {meaning}, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run takes: the arguments of `train` and of `vit-keras train`.

    `vit-keras train --flag` sets the field of the same name (`--lr` sets
    `learning_rate`). See `train` for what each field means.

    Example:
    >>> config = TrainConfig(model="vit_hybrid_tiny", image_size=64, epochs=2)
    >>> dataclasses.replace(config, epochs=3).epochs
    3
    """

    model: object = "vit_r50_b16"
    dataset: str = "digits"
    out: str = "runs/train"
    epochs: int = 10
    batch_size: int = 64
    image_size: object = None
    weights: str = None
    data_dir: str = None
    download: bool = False
    optimizer: str = "sgd"
    learning_rate: float = 0.03
    weight_decay: float = 0.0
    warmup_steps: int = None
    grad_accum: int = 1
    clipnorm: float = 1.0
    label_smoothing: float = 0.0
    dropout: float = None
    randaugment: bool = False
    mixup: bool = False
    cutmix: bool = False
    crop_area: tuple = None
    strategy: str = None
    precision: str = "float32"
    jit_compile: bool = False
    seed: int = 0
    backup_every: int = None
    overwrite: bool = False
    verbose: object = "auto"
    checkpoint_prefix: str = None  # the tower of a two-tower `weights` file ("img")
    # Fine-tuning big models (`finetune`, `reshape`): see `train`.
    remat: bool = False
    trainable: str = None
    layer_decay: float = None
    lora_rank: int = None
    lora_alpha: float = None
    input_channels: int = None


# `vit-keras demo`: a small hybrid (ResNet width 32, one unit per stage; ViT width 64, 2 layers) at 64x64.
DEMO = TrainConfig(model="vit_hybrid_tiny", dataset="digits", image_size=64, epochs=60, batch_size=32,
                   learning_rate=0.1, backup_every=20, out="runs/demo")


def train(config=None, **overrides):
    """Trains or fine-tunes a model with `model.fit` and writes everything to `out`.

    Runs on the Keras backend of the process (`KERAS_BACKEND`): TensorFlow
    feeds `tf.data`, JAX and PyTorch an `ImagePipeline` (`data.make_pipeline`)
    and need no TensorFlow, except for TFDS datasets and TensorBoard logs.

    `out` receives `model.keras` (the final model, class names in its head),
    `best.keras` and `last.keras`, `metrics.json`, `log.csv` and TensorBoard
    logs in `logs/`. A run killed at any point resumes from its last backup
    (`backup/`, every `backup_every` steps) when started again with the same
    `out`, and finishes with the same number of steps.

    Takes a `TrainConfig` and/or its fields as keywords (keywords win):
    `train(model="vit_r50_b16", dataset="cifar10", ...)`.

    Fields:
        model: str or dict. A builder name (`vit_r50_b16`), a small config
            (`vit_hybrid_tiny`), a `.keras` file, or `build_model` arguments.
        dataset: str. `digits`, a folder of class folders, or a TFDS name.
        weights: str or None. A checkpoint to start from: a preset name
            (`imagenet21k`), a path or URL of an `.npz` file. The head is
            replaced when the class count differs (and a `pre_logits` layer
            dropped, as the original's fine-tuning does).
        dropout: float or None. None keeps the model's original config
            (0.1 for `vit_r50_b16`, 0.0 for `vit_b16`, ...).
        precision: str. `float32`, `mixed_bfloat16` or `mixed_float16`.
        strategy: str or None. None, `mirrored`, `multi_worker` or `tpu`
            (`tf.distribute`); on JAX `mirrored` and `tpu` are
            `keras.distribution.DataParallel` over all local devices, and
            PyTorch takes None only.
        jit_compile: bool. Compile the train step with XLA (`torch.compile`
            on PyTorch). JAX always compiles it.
        overwrite: bool. Whether to start over in an `out` that holds a finished
            run (its `model.keras` or `metrics.json`); without it that raises
            `FileExistsError`. Its files are replaced as the new run writes
            its own; `log.csv` and `logs/` are appended to. An unfinished run (one with a backup) always resumes.
        remat: bool. Recompute each encoder block (and ResNet stage) in the
            backward pass: less memory, same gradients.
        trainable: str or None. `all`, `head` (a linear probe) or `blocks:N`
            (the last N blocks, the final norm and the head); the others get
            no optimizer slots. None: all (with `lora_rank`: the adapters and
            the head).
        layer_decay: float or None. Learning rate x decay^(L - i) for block
            i, the embeddings deepest, the head x 1 (BEiT/MAE).
        lora_rank, lora_alpha: int, float or None. LoRA adapters on the
            attention and MLP projections; `model.keras` and the exports hold
            them folded into the kernels. alpha None: the rank.
        input_channels: int or None. 1 trains a grey model (a checkpoint's
            first convolution summed over RGB; image files read as grey).
            None: the model's (3 for a new one).
        Other arguments: see `vit-keras train --help`.

    Raises:
        ValueError: a non-positive epoch count, batch size, image size or
            gradient accumulation, and other arguments or data that cannot train.
        FileExistsError: `out` holds a finished run and `overwrite` is False.
        TrainingDiverged: (a `ValueError` and `FloatingPointError`) the loss or
            the weights became NaN or infinite; neither `model.keras` nor the
            backup is written from that point.

    Returns:
        `Result(metrics, model)`: the metrics dict that is also written to
        `out/metrics.json`, and the trained model.
    """
    config = dataclasses.replace(config or TrainConfig(), **overrides)
    return _run(config)


# In `out`: held (flock) by the process training there; another one is refused.
LOCK_FILE = ".lock"


def _run(c):
    """One run of `train` for the `TrainConfig` `c`, in named steps: validate, place, data, then
    under the lock of the output folder: model, fit, finish."""
    _validate(c)
    keras.utils.set_random_seed(c.seed)
    dist, out_dir = _place(c)
    if _finished_run(out_dir) and not c.overwrite:
        raise _finished_error(c.out, out_dir)
    splits = data_lib.load(c.dataset, data_dir=c.data_dir, download=c.download)
    files.output_folder(out_dir)
    with files.FolderLock(os.path.join(out_dir, LOCK_FILE), f"the output folder {c.out}"):
        finished = _finished_run(out_dir)  # again, now that no other run writes there
        if finished and not c.overwrite:
            raise _finished_error(c.out, out_dir)
        try:
            return _fit(c, dist, out_dir, splits, finished)
        except (OSError, files.OutputError) as e:  # a full disk, a file-size limit: one line, backup kept
            state = os.path.join(out_dir, "backup", "state.json")
            kept = (f" The last backup ({state}) is kept: run again with the same settings to resume."
                    if os.path.exists(state) else "")
            error = e if isinstance(e, files.OutputError) else files.write_error(e, out_dir)
            raise files.OutputError(f"{str(error).rstrip('.')}.{kept}") from None


def _validate(c):
    """ValueError for settings that cannot train, before anything is read or written."""
    if c.precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {c.precision!r}; use one of {PRECISIONS}.")
    if c.optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {c.optimizer!r}; use one of {OPTIMIZERS}.")
    _check_arguments(c.epochs, c.batch_size, c.image_size, c.grad_accum, c.backup_every, c.warmup_steps,
                     c.learning_rate, c.crop_area)
    _check_numbers(c)
    finetune.check_arguments(c.trainable, c.layer_decay, c.lora_rank, c.lora_alpha, c.input_channels,
                             num_layers=_num_layers(c.model), image_files=True)
    if isinstance(c.model, str) and c.model.endswith(".keras"):
        given = [f"--{name.replace('_', '-')}" for name in ("weights", "dropout") if getattr(c, name) is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} cannot apply to {c.model}: a .keras model keeps its "
                             "weights and dropout (leave them out, or start from a builder name).")


def _place(c):
    """The distribution strategy and the folder this process writes to (only the chief writes to `out`)."""
    dist = distribute.get_strategy(c.strategy)
    if isinstance(dist, distribute.KerasDistribution) and c.batch_size % dist.num_replicas_in_sync:
        raise ValueError(f"batch_size {c.batch_size} is not divisible by the {dist.num_replicas_in_sync} "
                         f"replicas of strategy {c.strategy!r}.")
    out_dir = c.out if distribute.is_chief(dist) else os.path.join(c.out, f".worker-{distribute.task_id()}")
    return dist, out_dir


def _finished_error(out, out_dir):
    return FileExistsError(f"{out} holds a finished run ({', '.join(_finished_run(out_dir))}); pass "
                           "--overwrite (overwrite=True) to train again there, or choose another output folder.")


def _compiled_model(c, dist, splits, total_steps, jit_compile):
    """The model to train (`_model_from`), compiled with the recipe's optimizer, loss and metrics."""
    num_classes = len(splits.class_names)
    warmup_steps = c.warmup_steps if c.warmup_steps is not None else max(1, total_steps // 20)
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(c.precision)
    try:
        with dist.scope():
            net = _model_from(c.model, num_classes, splits.class_names, c.image_size, c.weights, c.dropout,
                              c.checkpoint_prefix, c.input_channels)
            net = finetune.prepare(net, remat=c.remat, trainable=c.trainable, lora_rank=c.lora_rank,
                                   lora_alpha=c.lora_alpha)
            opt = make_optimizer(c.optimizer, c.learning_rate, total_steps, warmup_steps, c.weight_decay,
                                 c.grad_accum, c.clipnorm)
            if c.layer_decay is not None:
                opt = finetune.layer_decay_optimizer(opt, c.layer_decay, finetune.encoder(net).num_layers)
            net.compile(
                optimizer=opt,
                loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=c.label_smoothing),
                metrics=[
                    keras.metrics.CategoricalAccuracy(name="top1"),
                    keras.metrics.TopKCategoricalAccuracy(k=min(5, num_classes), name="top5"),
                ],
                jit_compile=jit_compile,
            )
    finally:
        keras.config.set_dtype_policy(previous_policy)
    return net


def _fit(c, dist, out_dir, splits, finished):
    """Model, pipelines, `fit` (resuming a backup), test evaluation and the finished files."""
    backend = keras.backend.backend()
    jit_compile = True if backend == "jax" else c.jit_compile  # JAX without jit runs op by op
    backup = ResumableBackup(os.path.join(out_dir, "backup"), 1, run_settings(c, splits))
    check_resume(backup, backup.settings, c.out, c.overwrite)  # before any model is built
    num_classes = len(splits.class_names)
    steps_per_epoch = splits.num_train // c.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {c.batch_size} exceeds the {splits.num_train} training images.")
    total_steps = c.epochs * steps_per_epoch
    net = _compiled_model(c, dist, splits, total_steps, jit_compile)
    size = net.input_shape[1:3]
    counts = finetune.param_counts(net)
    logger.info("Training %s: %d of %d parameters trainable (%.2f%%).", net.name, counts["trainable_params"],
                counts["total_params"], 100 * counts["trainable_params"] / max(counts["total_params"], 1))
    pipe = dict(image_size=size, num_classes=num_classes, batch_size=c.batch_size, seed=c.seed)
    train_ds = data_lib.make_pipeline(
        splits.train, training=True, repeat=True, flip=splits.flip,
        crop_area=c.crop_area or splits.crop_area, randaugment=c.randaugment, mixup=c.mixup,
        cutmix=c.cutmix, **pipe,
    )
    val_ds = data_lib.make_pipeline(splits.validation, **pipe)
    test_ds = data_lib.make_pipeline(splits.test, **pipe)
    channels = net.input_shape[-1]
    train_ds, val_ds, test_ds = (reshape.channel_batches(ds, channels) for ds in (train_ds, val_ds, test_ds))

    backup.every = c.backup_every or steps_per_epoch
    resumed_from = step = backup.restore(net)[0]
    if step:
        finetune.restart_adapters(net)
        logger.warning("Resuming %s at step %d of %d.", c.out, step, total_steps)
    elif finished:
        logger.warning("Training again in %s (overwrite): its finished run's files are replaced "
                       "as this run writes its own.", c.out)
    callbacks = [
        StopOnNaN(backup, c.learning_rate),  # first: it checks before anything is written
        backup,
        BestAndLast(out_dir, run=backup.run),
        # Appended to, also under --overwrite: a rerun that fails must not have cleared the old log.
        keras.callbacks.CSVLogger(os.path.join(out_dir, "log.csv"), append=True),
    ]
    if _have_tensorflow():  # Keras's TensorBoard callback writes with tf.summary, on any backend
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(out_dir, "logs"), write_graph=False))
    else:
        logger.info("No TensorFlow: no TensorBoard logs (log.csv has the metrics).")
    epoch, done_in_epoch = divmod(step, steps_per_epoch)
    verbose = c.verbose
    if verbose == "auto":  # one line per epoch where no terminal redraws the bar
        verbose = 1 if sys.stdout.isatty() else 2
    fit = dict(validation_data=val_ds, callbacks=callbacks, verbose=verbose, shuffle=False)  # the pipeline shuffles
    with distribute.run_scope(dist):
        if done_in_epoch:  # finish the interrupted epoch, then the rest
            net.fit(train_ds, initial_epoch=epoch, epochs=epoch + 1,
                    steps_per_epoch=steps_per_epoch - done_in_epoch, **fit)
            epoch += 1
        if epoch < c.epochs:
            net.fit(train_ds, initial_epoch=epoch, epochs=c.epochs, steps_per_epoch=steps_per_epoch, **fit)
        if not _finite(net):  # e.g. a resumed run with nothing left to train
            raise StopOnNaN(backup, c.learning_rate).error("the weights are no longer finite numbers",
                                                           step=backup.step)
        results = net.evaluate(test_ds, return_dict=True, verbose=0)
    wall = backup.elapsed + time.time() - backup.started
    metrics = {
        "test_top1": float(results["top1"]),
        "test_top5": float(results["top5"]),
        "test_loss": float(results["loss"]),
        "epochs": c.epochs,
        "steps": backup.step,
        "resumed_from_step": resumed_from,
        "wall_seconds": round(wall, 2),
        "model": c.model if isinstance(c.model, str) else "custom",
        "dataset": c.dataset,
        "image_size": list(size),
        "batch_size": c.batch_size,
        "precision": c.precision,
        "strategy": c.strategy or "default",
        "backend": backend,
        "replicas": dist.num_replicas_in_sync,
        "class_names": splits.class_names,
        **counts,
    }
    atomic_save(net, os.path.join(out_dir, "model.keras"))
    atomic_write_json(metrics, os.path.join(out_dir, "metrics.json"))
    shutil.rmtree(backup.directory, ignore_errors=True)  # finished: nothing left to resume
    return Result(metrics, net)
