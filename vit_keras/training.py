"""Fine-tuning and training with plain `model.fit`: the original recipe, resumable.

>>> from vit_keras import training
>>> metrics = training.train("vit_hybrid_tiny", "digits", "runs/demo", epochs=6)  # doctest: +SKIP
"""

import argparse
import collections
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import textwrap
import time
import uuid

import keras
import numpy as np

from vit_keras import data as data_lib
from vit_keras import distribute, files, finetune, loader, options, presets, reshape, sizes
from vit_keras.files import atomic_write_json

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
    with files.atomic_file(path, ".keras", files.temp_prefix()) as tmp:
        model.save(tmp)


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


def _model_from(spec, num_classes, class_names, image_size, weights, dropout, checkpoint_prefix=None,
                input_channels=None):
    """A model to train: `loader.load_model`, then a `.keras` file fitted to the dataset (`_fit_to_data`)."""
    model = loader.load_model(spec, weights=weights, classes=num_classes, image_size=image_size,
                              class_names=class_names, dropout=dropout, checkpoint_prefix=checkpoint_prefix,
                              input_channels=input_channels)
    if loader.kind(spec) == "keras":
        model = _fit_to_data(model, spec, num_classes, class_names, image_size, input_channels)
    return model


def _fit_to_data(model, source, num_classes, class_names, image_size, input_channels):
    """A trained model continued on a dataset: the same class count, the size asked for, the dataset's names."""
    if model.output_shape[-1] != num_classes:
        raise ValueError(f"{source} has {model.output_shape[-1]} outputs but the dataset has {num_classes} classes.")
    size = None if image_size is None else sizes.height_width(image_size)
    if size not in (None, tuple(model.input_shape[1:3])) or input_channels not in (None, model.input_shape[-1]):
        model = reshape.resize(model, image_size=size, input_channels=input_channels)  # continue at that size
    _rename_classes(model, class_names, source)
    return model


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


def _parse_area(text):
    """`--crop-area` text: MIN,MAX."""
    try:
        lo, hi = (float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be MIN,MAX shares of the image area (0.05,1), got {text!r}") from None
    return lo, hi


def _parse_verbose(text):
    """`--fit-verbose` text: auto, 0, 1 or 2."""
    return text if text == "auto" else options.parse_int(text)


def _is_area(value):
    lo, hi = (float(v) for v in value)
    return 0 < lo <= hi <= 1


def _check_model(name, value):
    """A model `loader` knows; a `.keras` file that is there (read once the data are loaded)."""
    loader.check(value)


_positive = options.positive_int
_real = options.is_finite


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run takes: the arguments of `train` and the flags of `vit-keras train`.

    Each field is written once, here: its flag (`--batch-size` sets
    `batch_size`, `--lr` sets `learning_rate`), default, help text and check
    come from it (`vit_keras.options`), so `vit-keras train` and
    `train(TrainConfig(...))` refuse a bad value with the same one-line
    ValueError (`validate`).

    Example:
    >>> config = TrainConfig(model="vit_hybrid_tiny", image_size=64, epochs=2)
    >>> dataclasses.replace(config, epochs=3).epochs
    3
    """

    model: object = options.option(
        "vit_r50_b16", "a model name (vit_r50_b16, the small vit_hybrid_tiny, ...), a .keras file to continue "
        "from, or a checkpoint file or folder that names its architecture; from Python also build_model "
        "arguments (a dict) or a ViTConfig", parse=str, check=_check_model)
    dataset: str = options.option("digits", "'digits' (built in, offline), a folder of class folders, or a TFDS "
                                  "name")
    out: str = options.option("runs/train", "output folder (resumes if it holds a backup; a finished run needs "
                              "--overwrite)")
    epochs: int = options.option(10, "passes over the training split", check=_positive)
    batch_size: int = options.option(64, "global batch size", check=_positive)
    image_size: object = options.option(
        None, "resolution, e.g. 384 or 384x512 (from Python 384 or (384, 512)); default: the checkpoint's, else "
        "224", parse=options.parse_size,
        check=options.satisfies("a positive integer or a (height, width) pair of them", sizes.is_size))
    weights: str = options.option(
        None, f"a checkpoint to start from: a published name ({', '.join(presets.WEIGHT_NAMES)}), an .npz path "
        "or URL, a timm model.safetensors, a transformers or Orbax folder; the head is replaced when the class "
        "count differs (and a pre_logits layer dropped, as the original's fine-tuning does)")
    data_dir: str = options.option(None, "TFDS data directory")
    download: bool = options.option(False, "let TFDS download and prepare the dataset")
    optimizer: str = options.option("sgd", "sgd (momentum 0.9, the original recipe) or adamw",
                                    choices=OPTIMIZERS)
    learning_rate: float = options.option(
        0.03, "peak learning rate (linear warm-up, then cosine decay)", flag="--lr", aliases=("--learning-rate",),
        check=options.satisfies("a finite number >= 0", lambda v: _real(v) and v >= 0))
    weight_decay: float = options.option(0.0, "weight decay (adamw: 1e-4 where 0)",
                                         check=options.satisfies("a finite number >= 0",
                                                                 lambda v: _real(v) and v >= 0))
    warmup_steps: int = options.option(None, "steps of linear warm-up; default: 5% of the steps",
                                       check=options.non_negative_int)
    grad_accum: int = options.option(1, "gradient accumulation steps", check=_positive)
    clipnorm: float = options.option(1.0, "global gradient-norm clip",
                                     check=options.satisfies("a finite number > 0", lambda v: _real(v) and v > 0))
    label_smoothing: float = options.option(0.0, "label smoothing of the cross-entropy",
                                            check=options.satisfies("in [0, 1)",
                                                                    lambda v: _real(v) and 0 <= v < 1))
    dropout: float = options.option(
        None, "dropout rate; default: the model's original config's (0.1 for vit_r50_b16, 0.0 for vit_b16, ...)",
        check=options.satisfies("in [0, 1)", lambda v: _real(v) and 0 <= v < 1))
    randaugment: bool = options.option(False, "RandAugment on the training images")
    mixup: bool = options.option(False, "mixup of training batches")
    cutmix: bool = options.option(False, "CutMix of training batches")
    crop_area: tuple = options.option(
        None, "random-crop area range, e.g. 0.05,1 (from Python (0.05, 1.0)); default: the dataset's",
        parse=_parse_area,
        check=options.satisfies("a (min, max) share of the image area with 0 < min <= max <= 1", _is_area))
    strategy: str = options.option(
        "default", "default (one device), mirrored, multi_worker or tpu (tf.distribute); on JAX mirrored and tpu "
        "are keras.distribution.DataParallel over all local devices; PyTorch takes default only",
        choices=distribute.STRATEGIES)
    precision: str = options.option("float32", "float32, mixed_bfloat16 or mixed_float16", choices=PRECISIONS)
    jit_compile: bool = options.option(False, "compile the train step with XLA (torch.compile on PyTorch); JAX "
                                       "always compiles it")
    seed: int = options.option(0, "random seed (initialisation, data order, augmentation)",
                               check=options.satisfies("an integer in [0, 2**32)",
                                                       lambda v: options.is_int(v) and 0 <= v < 2**32))
    backup_every: int = options.option(None, "steps between backups; default: an epoch", check=_positive)
    overwrite: bool = options.option(
        False, "train again in an --out that holds a finished run (model.keras, metrics.json): its files are "
        "replaced as the new run writes its own, log.csv and logs/ appended to; without it that is a "
        "FileExistsError. An unfinished run (one with a backup) always resumes")
    verbose: object = options.option(
        "auto", "model.fit's output: 0 none, 1 a progress bar, 2 a line per epoch; auto: 1 on a terminal, else 2",
        flag="--fit-verbose", parse=_parse_verbose, choices=("auto", 0, 1, 2))
    checkpoint_prefix: str = options.option(None, "the tower of a two-tower --weights file (SigLIP/LiT: img)")
    # Fine-tuning big models (`finetune`, `reshape`); checked together by `finetune.check_arguments`.
    remat: bool = options.option(False, "recompute each encoder block (and ResNet stage) in the backward pass: "
                                 "less memory, same gradients")
    trainable: str = options.option(
        None, "all | head (a linear probe) | blocks:N (the last N blocks, the final norm and the head); the others "
        "get no optimizer slots. Default: all (with --lora-rank: the adapters and the head)")
    layer_decay: float = options.option(
        None, "layer-wise learning-rate decay in (0, 1], e.g. 0.75: the learning rate x decay^(L - i) for block "
        "i, the embeddings deepest, the head x 1 (BEiT/MAE)")
    lora_rank: int = options.option(
        None, "LoRA adapters of this rank on the attention and MLP layers (with the head, all that trains); "
        "model.keras and the exports hold them folded into the kernels")
    lora_alpha: float = options.option(None, "LoRA scale numerator; default: the rank")
    input_channels: int = options.option(
        None, "1: grey images (a checkpoint's first convolution summed over RGB; image files read as grey); "
        "default: the model's (3 for a new one)")

    def __post_init__(self):
        if self.strategy is None:  # the spelling of "default" before 0.3
            object.__setattr__(self, "strategy", "default")


if TrainConfig.__doc__:  # None under python -OO
    TrainConfig.__doc__ += "\n" + textwrap.indent(options.fields_doc(TrainConfig), "    ") + "\n"


def validate(config):
    """ValueError (one line) for a `TrainConfig` that cannot train, before anything is read or written.

    Each field's own check (`options.check`: the same for `vit-keras train`'s
    flags), then the checks of fields together.
    """
    options.check(config)
    c = config
    finetune.check_arguments(c.trainable, c.layer_decay, c.lora_rank, c.lora_alpha, c.input_channels,
                             num_layers=loader.num_layers(c.model), image_files=True)
    if loader.kind(c.model) == "keras":
        given = [f"--{name.replace('_', '-')}" for name in ("weights", "dropout") if getattr(c, name) is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} cannot apply to {c.model}: a .keras model keeps its "
                             "weights and dropout (leave them out, or start from a builder name).")


# `vit-keras demo`: a small hybrid (ResNet width 32, one unit per stage; ViT width 64, 2 layers) at 64x64, a backup
# per epoch. (40 epochs reach the same test top-1, but the int8 file of that model is further from float32, which
# the demo shows: 99.7 % top-1 agreement and max |dp| 0.30 against 100 % and 0.077.)
DEMO = TrainConfig(model="vit_hybrid_tiny", dataset="digits", image_size=64, epochs=60, batch_size=32,
                   learning_rate=0.1, out="runs/demo")


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
    `train(model="vit_r50_b16", dataset="cifar10", ...)`. The fields are
    listed in `TrainConfig`'s docstring and by `vit-keras train --help`.

    The run, in steps (each a function of the config and what the steps before
    it made): `validate`, `_place` (strategy and folder), `_data` (dataset
    and step counts), then under the lock of the output folder `_model`,
    `_compile`, `_fit` (resuming a backup) and `_finish` (test metrics,
    `model.keras`, `metrics.json`).

    Raises:
        ValueError: a field that cannot be (`validate`), and data that cannot
            train.
        FileExistsError: `out` holds a finished run and `overwrite` is False.
        TrainingDiverged: (a `ValueError` and `FloatingPointError`) the loss or
            the weights became NaN or infinite; neither `model.keras` nor the
            backup is written from that point.

    Returns:
        `Result(metrics, model)`: the metrics dict that is also written to
        `out/metrics.json`, and the trained model.
    """
    c = dataclasses.replace(config or TrainConfig(), **overrides)
    validate(c)
    run = _place(c)
    _data(c, run)
    with _writing(c, run):
        _model(c, run)
        _compile(c, run)
        _fit(c, run)
        return _finish(c, run)


# In `out`: held (flock) by the process training there; another one is refused.
LOCK_FILE = ".lock"


@dataclasses.dataclass
class _Run:
    """What the steps of one `train` run hand on to the next; each step fills its part."""

    dist: object = None  # _place: the strategy (tf.distribute) or `distribute.KerasDistribution`
    out_dir: str = None  # _place: `out` on the chief, a folder of its own on another worker
    splits: object = None  # _data
    steps_per_epoch: int = None  # _data
    total_steps: int = None  # _data
    finished: list = None  # _writing: the files of a finished run in `out_dir` (replaced under overwrite)
    backup: ResumableBackup = None  # _writing
    net: keras.Model = None  # _model
    counts: dict = None  # _model: trainable and total parameters
    test_ds: object = None  # _fit: the test batches, for _finish
    resumed_from: int = 0  # _fit


def _place(c):
    """The seed, the distribution strategy and the folder this process writes to (only the chief writes to `out`)."""
    keras.utils.set_random_seed(c.seed)
    dist = distribute.get_strategy(c.strategy)
    if isinstance(dist, distribute.KerasDistribution) and c.batch_size % dist.num_replicas_in_sync:
        raise ValueError(f"batch_size {c.batch_size} is not divisible by the {dist.num_replicas_in_sync} "
                         f"replicas of strategy {c.strategy!r}.")
    out_dir = c.out if distribute.is_chief(dist) else os.path.join(c.out, f".worker-{distribute.task_id()}")
    if _finished_run(out_dir) and not c.overwrite:
        raise _finished_error(c.out, out_dir)
    return _Run(dist=dist, out_dir=out_dir)


def _data(c, run):
    """The dataset's splits and the step counts (nothing is written yet)."""
    run.splits = data_lib.load(c.dataset, data_dir=c.data_dir, download=c.download)
    run.steps_per_epoch = run.splits.num_train // c.batch_size
    if run.steps_per_epoch < 1:
        raise ValueError(f"batch_size {c.batch_size} exceeds the {run.splits.num_train} training images.")
    run.total_steps = c.epochs * run.steps_per_epoch


@contextlib.contextmanager
def _writing(c, run):
    """The output folder, locked; the backup to resume checked against the settings; write errors in one line."""
    files.output_folder(run.out_dir)
    with files.FolderLock(os.path.join(run.out_dir, LOCK_FILE), f"the output folder {c.out}"):
        run.finished = _finished_run(run.out_dir)  # again, now that no other run writes there
        if run.finished and not c.overwrite:
            raise _finished_error(c.out, run.out_dir)
        try:
            run.backup = ResumableBackup(os.path.join(run.out_dir, "backup"), 1, run_settings(c, run.splits))
            check_resume(run.backup, run.backup.settings, c.out, c.overwrite)  # before any model is built
            yield run
        except (OSError, files.OutputError) as e:  # a full disk, a file-size limit: one line, backup kept
            state = os.path.join(run.out_dir, "backup", "state.json")
            kept = (f" The last backup ({state}) is kept: run again with the same settings to resume."
                    if os.path.exists(state) else "")
            error = e if isinstance(e, files.OutputError) else files.write_error(e, run.out_dir)
            raise files.OutputError(f"{str(error).rstrip('.')}.{kept}") from None


def _finished_error(out, out_dir):
    return FileExistsError(f"{out} holds a finished run ({', '.join(_finished_run(out_dir))}); pass "
                           "--overwrite (overwrite=True) to train again there, or choose another output folder.")


@contextlib.contextmanager
def _building(c, run):
    """Variables are made in the run's precision and under its strategy."""
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(c.precision)
    try:
        with run.dist.scope():
            yield
    finally:
        keras.config.set_dtype_policy(previous_policy)


def _model(c, run):
    """The model to train (`_model_from`), prepared for fine-tuning (remat, trainable, LoRA)."""
    with _building(c, run):
        net = _model_from(c.model, len(run.splits.class_names), run.splits.class_names, c.image_size, c.weights,
                          c.dropout, c.checkpoint_prefix, c.input_channels)
        run.net = finetune.prepare(net, remat=c.remat, trainable=c.trainable, lora_rank=c.lora_rank,
                                   lora_alpha=c.lora_alpha)
    run.counts = counts = finetune.param_counts(run.net)
    logger.info("Training %s: %d of %d parameters trainable (%.2f%%).", run.net.name, counts["trainable_params"],
                counts["total_params"], 100 * counts["trainable_params"] / max(counts["total_params"], 1))


def _compile(c, run):
    """The recipe's optimizer (`make_optimizer`, layer decay), loss and metrics."""
    num_classes = len(run.splits.class_names)
    warmup_steps = c.warmup_steps if c.warmup_steps is not None else max(1, run.total_steps // 20)
    jit_compile = True if keras.backend.backend() == "jax" else c.jit_compile  # JAX without jit runs op by op
    with _building(c, run):
        opt = make_optimizer(c.optimizer, c.learning_rate, run.total_steps, warmup_steps, c.weight_decay,
                             c.grad_accum, c.clipnorm)
        if c.layer_decay is not None:
            opt = finetune.layer_decay_optimizer(opt, c.layer_decay, finetune.encoder(run.net).num_layers)
        run.net.compile(
            optimizer=opt,
            loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=c.label_smoothing),
            metrics=[
                keras.metrics.CategoricalAccuracy(name="top1"),
                keras.metrics.TopKCategoricalAccuracy(k=min(5, num_classes), name="top5"),
            ],
            jit_compile=jit_compile,
        )


def _pipelines(c, run):
    """Train, validation and test batches at the model's size and channel count."""
    splits = run.splits
    pipe = dict(image_size=run.net.input_shape[1:3], num_classes=len(splits.class_names), batch_size=c.batch_size,
                seed=c.seed)
    train_ds = data_lib.make_pipeline(
        splits.train, training=True, repeat=True, flip=splits.flip,
        crop_area=c.crop_area or splits.crop_area, randaugment=c.randaugment, mixup=c.mixup,
        cutmix=c.cutmix, **pipe,
    )
    val_ds = data_lib.make_pipeline(splits.validation, **pipe)
    test_ds = data_lib.make_pipeline(splits.test, **pipe)
    channels = run.net.input_shape[-1]
    return tuple(reshape.channel_batches(ds, channels) for ds in (train_ds, val_ds, test_ds))


def _callbacks(c, run):
    callbacks = [
        StopOnNaN(run.backup, c.learning_rate),  # first: it checks before anything is written
        run.backup,
        BestAndLast(run.out_dir, run=run.backup.run),
        # Appended to, also under --overwrite: a rerun that fails must not have cleared the old log.
        keras.callbacks.CSVLogger(os.path.join(run.out_dir, "log.csv"), append=True),
    ]
    if _have_tensorflow():  # Keras's TensorBoard callback writes with tf.summary, on any backend
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(run.out_dir, "logs"), write_graph=False))
    else:
        logger.info("No TensorFlow: no TensorBoard logs (log.csv has the metrics).")
    return callbacks


def _fit(c, run):
    """`model.fit` to the last step, resuming the backup where there is one; the test split kept for `_finish`."""
    train_ds, val_ds, run.test_ds = _pipelines(c, run)
    backup, net, steps_per_epoch = run.backup, run.net, run.steps_per_epoch
    backup.every = c.backup_every or steps_per_epoch
    run.resumed_from = step = backup.restore(net)[0]
    if step:
        finetune.restart_adapters(net)
        logger.warning("Resuming %s at step %d of %d.", c.out, step, run.total_steps)
    elif run.finished:
        logger.warning("Training again in %s (overwrite): its finished run's files are replaced "
                       "as this run writes its own.", c.out)
    epoch, done_in_epoch = divmod(step, steps_per_epoch)
    verbose = c.verbose
    if verbose == "auto":  # one line per epoch where no terminal redraws the bar
        verbose = 1 if sys.stdout.isatty() else 2
    fit = dict(validation_data=val_ds, callbacks=_callbacks(c, run), verbose=verbose,
               shuffle=False)  # the pipeline shuffles
    with distribute.run_scope(run.dist):
        if done_in_epoch:  # finish the interrupted epoch, then the rest
            net.fit(train_ds, initial_epoch=epoch, epochs=epoch + 1,
                    steps_per_epoch=steps_per_epoch - done_in_epoch, **fit)
            epoch += 1
        if epoch < c.epochs:
            net.fit(train_ds, initial_epoch=epoch, epochs=c.epochs, steps_per_epoch=steps_per_epoch, **fit)
        if not _finite(net):  # e.g. a resumed run with nothing left to train
            raise StopOnNaN(backup, c.learning_rate).error("the weights are no longer finite numbers",
                                                           step=backup.step)


def _finish(c, run):
    """Test metrics, then `model.keras` and `metrics.json`; the backup goes (nothing is left to resume)."""
    net, backup = run.net, run.backup
    with distribute.run_scope(run.dist):
        results = net.evaluate(run.test_ds, return_dict=True, verbose=0)
    wall = backup.elapsed + time.time() - backup.started
    metrics = {
        "test_top1": float(results["top1"]),
        "test_top5": float(results["top5"]),
        "test_loss": float(results["loss"]),
        "epochs": c.epochs,
        "steps": backup.step,
        "resumed_from_step": run.resumed_from,
        "wall_seconds": round(wall, 2),
        "model": c.model if isinstance(c.model, str) else "custom",
        "dataset": c.dataset,
        "image_size": list(net.input_shape[1:3]),
        "batch_size": c.batch_size,
        "precision": c.precision,
        "strategy": c.strategy,
        "backend": keras.backend.backend(),
        "replicas": run.dist.num_replicas_in_sync,
        "class_names": run.splits.class_names,
        **run.counts,
    }
    atomic_save(net, os.path.join(run.out_dir, "model.keras"))
    atomic_write_json(metrics, os.path.join(run.out_dir, "metrics.json"))
    shutil.rmtree(backup.directory, ignore_errors=True)  # finished: nothing left to resume
    return Result(metrics, net)

