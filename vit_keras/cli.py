"""The `vit-keras` command: `train`, `export`, `attention`, `demo`."""

import argparse
import json
import logging
import sys


def _integer(text, least):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < least:
        kind = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise argparse.ArgumentTypeError(f"must be {kind}, got {value}")
    return value


def _positive(text):
    return _integer(text, 1)


def _non_negative(text):
    return _integer(text, 0)


def _size(text):
    parts = text.lower().replace("x", ",").split(",")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"must be a positive size in pixels, or HEIGHTxWIDTH of them (384, 384x512), got {text!r}")
    return sizes[0] if len(sizes) == 1 else tuple(sizes)


def _area(text):
    try:
        lo, hi = (float(p) for p in text.split(","))
    except ValueError:
        lo = hi = float("nan")
    if not 0 < lo <= hi <= 1:
        raise argparse.ArgumentTypeError(
            f"must be MIN,MAX shares of the image area with 0 < MIN <= MAX <= 1 (0.05,1), got {text!r}")
    return lo, hi


def add_train_arguments(p):
    p.add_argument("--model", default="vit_r50_b16",
                   help="builder or small-config name (vit_r50_b16, vit_hybrid_tiny, ...), or a .keras file")
    p.add_argument("--dataset", default="digits",
                   help="'digits' (built in, offline), a folder of class folders, or a TFDS name")
    p.add_argument("--data-dir", default=None, help="TFDS data directory")
    p.add_argument("--download", action="store_true", help="let TFDS download and prepare the dataset")
    p.add_argument("--weights", default=None,
                   help="start from a checkpoint: imagenet21k, imagenet21k+imagenet2012, or an .npz path/URL")
    p.add_argument("--image-size", type=_size, default=None, help="resolution, e.g. 384 or 384x512")
    p.add_argument("--epochs", type=_positive, default=10)
    p.add_argument("--batch-size", type=_positive, default=64, help="global batch size")
    p.add_argument("--out", default="runs/train",
                   help="output folder (resumes if it holds a backup; a finished run needs --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="train again in an --out that holds a finished run (model.keras, metrics.json)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--lr", type=float, default=0.03, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=_non_negative, default=None, help="default: 5%% of the steps")
    p.add_argument("--grad-accum", type=_positive, default=1, help="gradient accumulation steps")
    p.add_argument("--clipnorm", type=float, default=1.0, help="global gradient-norm clip")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=None,
                   help="dropout rate (default: the original config's, e.g. 0.1 for vit_r50_b16)")
    p.add_argument("--randaugment", action="store_true")
    p.add_argument("--mixup", action="store_true")
    p.add_argument("--cutmix", action="store_true")
    p.add_argument("--crop-area", type=_area, default=None, help="random-crop area range, e.g. 0.05,1")
    p.add_argument("--strategy", choices=("default", "mirrored", "multi_worker", "tpu"), default="default")
    p.add_argument("--precision", choices=("float32", "mixed_bfloat16", "mixed_float16"), default="float32")
    p.add_argument("--jit-compile", action="store_true", help="compile the train step with XLA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backup-every", type=_positive, default=None, help="steps between backups (default: an epoch)")


def _train_kwargs(args):
    return dict(
        model=args.model, dataset=args.dataset, out=args.out, epochs=args.epochs,
        batch_size=args.batch_size, image_size=args.image_size, weights=args.weights,
        data_dir=args.data_dir, download=args.download, optimizer=args.optimizer,
        learning_rate=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        grad_accum=args.grad_accum, clipnorm=args.clipnorm, label_smoothing=args.label_smoothing,
        dropout=args.dropout, randaugment=args.randaugment, mixup=args.mixup, cutmix=args.cutmix,
        crop_area=args.crop_area, strategy=args.strategy, precision=args.precision,
        jit_compile=args.jit_compile, seed=args.seed, backup_every=args.backup_every,
        overwrite=args.overwrite,
    )


# The demo: a small hybrid (ResNet width 32, one unit per stage; ViT width 64, 2 layers) at 64x64.
DEMO = dict(model="vit_hybrid_tiny", dataset="digits", image_size=64, epochs=60, batch_size=32,
            learning_rate=0.1, backup_every=20)


def run_export(model_path, fmt, out, dataset=None, name=None, version=1, variants=None,
               overwrite=False, calibration=200, parity=400, batch_size=None):
    """Exports a `.keras` model; for TFLite prints the parity table against Keras.

    `--overwrite` replaces only an earlier export, never the folder that holds
    the model. The parity table runs `batch_size` images at a time (default
    `export.BATCH_SIZE`). Errors a user can fix are ValueError or
    FileExistsError naming the path.
    """
    from vit_keras import data, export

    if fmt == "saved_model":  # before the model is loaded
        export._check_name_and_version(name or "model", version)
    model = _load_model(model_path)
    keep = [model_path] if isinstance(model_path, str) else []
    try:
        if fmt == "saved_model":
            path = export.export_saved_model(model, out, name=name or model.name, version=version,
                                             overwrite=overwrite, keep=keep)
            print(f"SavedModel -> {path}")
            return path
        dataset = dataset or _recorded_dataset(model_path)
        if dataset is None:
            raise ValueError("TFLite export needs --dataset for calibration and the parity check.")
        splits = data.load(dataset)
        size = model.input_shape[1:3]
        calib, _ = data.pixels(splits.train, size, calibration)
        held_out, _ = data.pixels(splits.test, size, parity)
        files = export.export_tflite(model, out, variants=variants or export.TFLITE_VARIANTS,
                                     representative_images=calib, overwrite=overwrite, keep=keep)
        del calib
        rows = export.parity_table(model, files, held_out, batch_size=batch_size or export.BATCH_SIZE)
    except FileExistsError:
        raise
    except OSError as e:
        raise ValueError(f"{e.filename or out}: {e.strerror or e}") from None
    print(f"TFLite parity against Keras on {len(held_out)} held-out {dataset} images:")
    print(export.format_parity(rows))
    return rows


def _plain_name(text):
    """argparse type of --name: a folder name, not a path."""
    from vit_keras import export

    try:
        export._check_name_and_version(text, 1)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _one_line(error):
    """The first line of an exception's message (TensorFlow's carry node traces after it)."""
    import tensorflow as tf

    text = error.message if isinstance(error, tf.errors.OpError) else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _load_model(model_path):
    """A `.keras` file -> the model; a model is passed through. Failures: ValueError naming the path."""
    import keras
    import tensorflow as tf

    if not isinstance(model_path, str):
        return model_path
    try:
        return keras.saving.load_model(model_path)
    except (OSError, tf.errors.OpError, ValueError) as e:
        raise ValueError(f"cannot load the model {model_path}: {_one_line(e)}") from None


def _recorded_dataset(model_path):
    import os

    if not isinstance(model_path, str):
        return None
    metrics = os.path.join(os.path.dirname(os.path.abspath(model_path)), "metrics.json")
    if os.path.exists(metrics):
        try:
            with open(metrics) as f:
                return json.load(f).get("dataset")
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"{metrics}: unreadable ({_one_line(e)}); pass --dataset") from None
    return None


def _output_folder(out):
    """Creates `out` if needed; a file there, or a folder that cannot be written, is a ValueError."""
    import os

    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a folder.")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the output folder {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"the output folder {out} is not writable.")


def attention_targets(images, out):
    """One PNG path per input: `<stem>_attention.png`, numbered (`<stem>_2_attention.png`, ...)
    where inputs share a file name, and never the path of an input."""
    import os

    inputs = {os.path.realpath(p) for p in images if "://" not in p}
    used, targets = set(), []
    for path in images:
        stem = os.path.splitext(os.path.basename(path.rstrip("/")))[0] or "image"
        target, i = os.path.join(out, f"{stem}_attention.png"), 2
        while target in used or os.path.realpath(target) in inputs:
            target, i = os.path.join(out, f"{stem}_{i}_attention.png"), i + 1
        used.add(target)
        targets.append(target)
    return targets


def run_attention(model_path, images, out, head_fusion="mean", discard_ratio=0.0):
    """Writes one PNG per image: the image, the rollout heat map, the top predictions.

    Inputs with the same file name get numbered PNGs (said in the output line).
    A missing or unreadable image, an undecodable one, or an `out` that is a
    file or cannot be written is a ValueError naming the path.
    """
    import os

    import numpy as np
    import tensorflow as tf

    from vit_keras import export, visualize
    from vit_keras.model import attention_model
    from vit_keras.vit import preprocess_inputs

    model = _load_model(model_path)
    attn = attention_model(model)  # built once: one forward pass gives logits and weights
    names = export.label_names(model)
    height, width = model.input_shape[1:3]
    _output_folder(out)
    targets = attention_targets(images, out)
    written = []
    for path, target in zip(images, targets):
        try:
            if tf.io.gfile.isdir(path):
                raise ValueError(f"{path}: is a folder, not an image file")
            raw = tf.io.read_file(path)
        except (OSError, tf.errors.OpError) as e:
            raise ValueError(f"{path}: cannot read the image: {_one_line(e)}") from None
        try:
            pixels = export.decode_images(raw[None], (height, width))
        except tf.errors.InvalidArgumentError as e:
            lines = [line.strip() for line in e.message.splitlines() if line.strip()]
            reason = next((line for line in lines if "image_bytes:" in line), lines[-1])
            raise ValueError(f"{path}: {reason}") from None
        outputs, weights = attn(preprocess_inputs(pixels), training=False)
        heat = visualize.heatmap_from_weights(model, weights, head_fusion, discard_ratio)[0]
        probs = np.asarray(export.as_probabilities(model, outputs))[0]
        top = [(names[i], float(probs[i])) for i in np.argsort(-probs)[:3]]
        try:
            visualize.save_overlay(np.asarray(pixels[0]).astype("uint8"), heat, target, predictions=top)
        except OSError as e:
            raise ValueError(f"cannot write {target}: {e.strerror or e}") from None
        written.append(target)
        stem = os.path.splitext(os.path.basename(path.rstrip("/")))[0] or "image"
        renamed = "" if os.path.basename(target) == f"{stem}_attention.png" else \
            "  (numbered: another input has the same file name)"
        print(f"{path}: {top[0][0]} ({top[0][1]:.1%}) -> {target}{renamed}")
    return written


def run_evaluate(args):
    """`vit-keras evaluate`: prints the result as JSON (and writes it with --json)."""
    from vit_keras import evaluate, files

    result = evaluate.evaluate(args.model, args.dataset, weights=args.weights, image_size=args.image_size,
                               split=args.split, batch_size=args.batch_size, data_dir=args.data_dir,
                               download=args.download)
    if args.json:
        files.atomic_write_json(result, args.json)
    print(json.dumps(result))
    return result


def _print_metrics(metrics, out):
    print(f"test top-1 {metrics['test_top1']:.4f}  top-5 {metrics['test_top5']:.4f}  "
          f"steps {metrics['steps']}  wall {metrics['wall_seconds']:.0f} s  -> {out}/model.keras")


# Exports are TensorFlow graphs and attention maps decode images with TensorFlow: under another
# backend these commands run again in a process of their own under the TensorFlow backend
# (a .keras file loads on any backend).
TF_COMMANDS = ("export", "attention")


def _tensorflow_backend():
    import keras

    return keras.backend.backend() == "tensorflow"


def _in_tensorflow_process(argv):
    """Runs `vit-keras ARGV` in a new process under the TensorFlow backend; returns its exit code."""
    import os
    import subprocess

    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    return subprocess.call([sys.executable, "-m", "vit_keras.cli", *argv], env=env)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="vit-keras", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train_p = sub.add_parser("train", help="train or fine-tune with model.fit")
    add_train_arguments(train_p)
    export_p = sub.add_parser("export", help="SavedModel for TF Serving, or TFLite files for phones")
    export_p.add_argument("--model", required=True, help="a .keras file")
    export_p.add_argument("--format", choices=("saved_model", "tflite"), required=True)
    export_p.add_argument("--out", required=True, help="SavedModel: OUT/<name>/<version>/; TFLite: OUT/<variant>.tflite")
    export_p.add_argument("--name", type=_plain_name, default=None,
                          help="SavedModel model name, a plain folder name (default: the model's)")
    export_p.add_argument("--version", type=_positive, default=1, help="SavedModel version, a positive integer")
    export_p.add_argument("--variants", nargs="+", default=None,
                          help="TFLite variants: float32 float16 dynamic_int8 int8 (default: all)")
    export_p.add_argument("--dataset", default=None,
                          help="TFLite calibration and parity data (default: the dataset in metrics.json beside the model)")
    export_p.add_argument("--overwrite", action="store_true",
                          help="replace an earlier export (only a folder the export wrote, never the model's)")
    export_p.add_argument("--batch-size", type=_positive, default=None,
                          help="images per Keras call and interpreter run in the TFLite parity table (default 16)")
    attn_p = sub.add_parser("attention", help="PNG heat maps of where the model attends")
    attn_p.add_argument("images", nargs="+")
    attn_p.add_argument("--model", required=True, help="a .keras file")
    attn_p.add_argument("--out", required=True)
    attn_p.add_argument("--head-fusion", choices=("mean", "max", "min"), default="mean")
    attn_p.add_argument("--discard-ratio", type=float, default=0.0)
    eval_p = sub.add_parser("evaluate", help="top-1/top-5 with the original evaluation preprocessing")
    eval_p.add_argument("--model", required=True, help="a builder name (vit_r50_b16, ...) or a .keras file")
    eval_p.add_argument("--weights", default=None,
                        help="for a builder: a published name (imagenet21k+imagenet2012, augreg_in21k_ft_in1k, "
                             "...) or an .npz path/URL (default: the builder's)")
    eval_p.add_argument("--dataset", required=True,
                        help="'digits', a folder of class folders, or a TFDS name (e.g. imagenet2012)")
    eval_p.add_argument("--split", choices=("test", "validation", "train"), default="test")
    eval_p.add_argument("--image-size", type=_size, default=None,
                        help="for a builder: resolution (default: the checkpoint's)")
    eval_p.add_argument("--batch-size", type=_positive, default=32)
    eval_p.add_argument("--data-dir", default=None, help="TFDS data directory")
    eval_p.add_argument("--download", action="store_true", help="let TFDS download and prepare the dataset")
    eval_p.add_argument("--json", default=None, help="also write the result to this JSON file")
    demo_p = sub.add_parser("demo", help="train a small hybrid ViT on the built-in digits (2-core CPU)")
    demo_p.add_argument("--out", default="runs/demo")
    demo_p.add_argument("--epochs", type=int, default=DEMO["epochs"])
    args = parser.parse_args(argv)
    if args.command in TF_COMMANDS and not _tensorflow_backend():
        return _in_tensorflow_process(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)

    from vit_keras import training

    try:
        if args.command == "train":
            _print_metrics(training.train(**_train_kwargs(args)).metrics, args.out)
        elif args.command == "export":
            run_export(args.model, args.format, args.out, args.dataset, args.name, args.version,
                       args.variants, args.overwrite, batch_size=args.batch_size)
        elif args.command == "evaluate":
            run_evaluate(args)
        elif args.command == "attention":
            run_attention(args.model, args.images, args.out, args.head_fusion, args.discard_ratio)
        else:
            demo(args.out, args.epochs)
    except (ValueError, FileExistsError, ConnectionError) as e:  # ConnectionError: a failed download
        print(f"vit-keras: error: {e}", file=sys.stderr)
        return 2
    return 0


def demo(out, epochs=DEMO["epochs"]):
    """Train on digits, export (SavedModel + TFLite with parity table), draw attention maps."""
    import os

    import numpy as np
    import PIL.Image

    from vit_keras import data, training

    # The demo's folder is its own: a second demo replaces the first (an interrupted one resumes).
    metrics = training.train(**dict(DEMO, out=out, epochs=epochs, overwrite=True)).metrics
    _print_metrics(metrics, out)
    model_path = os.path.join(out, "model.keras")
    images, _ = data.pixels(data.load("digits").test, 64, 3)
    files = []
    for i, image in enumerate(images):
        files.append(os.path.join(out, f"digit_{i}.png"))
        PIL.Image.fromarray(np.asarray(image)).save(files[-1])
    if _tensorflow_backend():
        run_export(model_path, "saved_model", os.path.join(out, "export"), overwrite=True)
        run_export(model_path, "tflite", os.path.join(out, "tflite"), dataset="digits", overwrite=True)
        run_attention(model_path, files, os.path.join(out, "attention"))
        return metrics
    for argv in (
        ["export", "--model", model_path, "--format", "saved_model", "--out", os.path.join(out, "export"),
         "--overwrite"],
        ["export", "--model", model_path, "--format", "tflite", "--out", os.path.join(out, "tflite"),
         "--dataset", "digits", "--overwrite"],
        ["attention", *files, "--model", model_path, "--out", os.path.join(out, "attention")],
    ):
        if _in_tensorflow_process(argv):
            raise ValueError(f"vit-keras {argv[0]} failed under the TensorFlow backend (see above).")
    return metrics


if __name__ == "__main__":
    sys.exit(main())
