"""The `vit-keras` command: `train`, `evaluate`, `export`, `attention`, `demo`.

It parses and prints; the work is done by library functions (`training.train`,
`evaluate.evaluate`, `serving.export`, `visualize.attention_files`), whose
constants give the choices and whose ValueErrors become one-line errors.
"""

import argparse
import dataclasses
import json
import logging
import sys

from vit_keras import console, data, distribute, files, presets, serving, training, visualize
from vit_keras.serving.folders import _check_name_and_version


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


def _plain_name(text):
    """argparse type of --name: a folder name, not a path."""
    try:
        _check_name_and_version(text, 1)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_train_arguments(p):
    """The `TrainConfig` fields as flags: `--batch-size` sets `batch_size`, `--lr` sets `learning_rate`."""
    d = training.TrainConfig()
    p.add_argument("--model", default=d.model,
                   help="builder or small-config name (vit_r50_b16, vit_hybrid_tiny, ...), or a .keras file")
    p.add_argument("--dataset", default=d.dataset,
                   help="'digits' (built in, offline), a folder of class folders, or a TFDS name")
    p.add_argument("--data-dir", default=d.data_dir, help="TFDS data directory")
    p.add_argument("--download", action="store_true", help="let TFDS download and prepare the dataset")
    p.add_argument("--weights", default=d.weights,
                   help=f"start from a checkpoint: {', '.join(presets.WEIGHT_NAMES)}, an .npz path/URL, a timm "
                        "model.safetensors, a transformers or Orbax folder")
    p.add_argument("--image-size", type=_size, default=d.image_size,
                   help="resolution, e.g. 384 or 384x512 (default: the checkpoint's, else 224)")
    p.add_argument("--epochs", type=_positive, default=d.epochs)
    p.add_argument("--batch-size", type=_positive, default=d.batch_size, help="global batch size")
    p.add_argument("--out", default=d.out,
                   help="output folder (resumes if it holds a backup; a finished run needs --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="train again in an --out that holds a finished run (model.keras, metrics.json)")
    p.add_argument("--optimizer", choices=training.OPTIMIZERS, default=d.optimizer)
    p.add_argument("--lr", dest="learning_rate", type=float, default=d.learning_rate, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=_non_negative, default=d.warmup_steps, help="default: 5%% of the steps")
    p.add_argument("--grad-accum", type=_positive, default=d.grad_accum, help="gradient accumulation steps")
    p.add_argument("--clipnorm", type=float, default=d.clipnorm, help="global gradient-norm clip")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--dropout", type=float, default=d.dropout,
                   help="dropout rate (default: the original config's, e.g. 0.1 for vit_r50_b16)")
    p.add_argument("--randaugment", action="store_true")
    p.add_argument("--mixup", action="store_true")
    p.add_argument("--cutmix", action="store_true")
    p.add_argument("--crop-area", type=_area, default=d.crop_area, help="random-crop area range, e.g. 0.05,1")
    p.add_argument("--strategy", choices=distribute.STRATEGIES, default="default")
    p.add_argument("--precision", choices=training.PRECISIONS, default=d.precision)
    p.add_argument("--jit-compile", action="store_true", help="compile the train step with XLA")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--backup-every", type=_positive, default=d.backup_every,
                   help="steps between backups (default: an epoch)")
    p.add_argument("--checkpoint-prefix", default=d.checkpoint_prefix,
                   help="the tower of a two-tower --weights file (SigLIP/LiT: img)")
    # Fine-tuning big models (vit_keras.finetune, vit_keras.reshape).
    p.add_argument("--remat", action="store_true", help="recompute each block in the backward pass (less memory)")
    p.add_argument("--trainable", default=d.trainable,
                   help="all | head (linear probe) | blocks:N (last N blocks + norm + head); default all")
    p.add_argument("--layer-decay", type=float, default=d.layer_decay,
                   help="layer-wise learning-rate decay in (0, 1], e.g. 0.75")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank,
                   help="LoRA adapters of this rank on the attention and MLP layers (with the head, all that trains)")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA scale numerator (default: the rank)")
    p.add_argument("--input-channels", type=int, default=d.input_channels,
                   help="1: grey images (the first convolution summed over RGB); default: the model's (3)")


def train_config(args):
    """The `TrainConfig` of parsed `vit-keras train` arguments."""
    fields = {f.name for f in dataclasses.fields(training.TrainConfig)}
    return training.TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})


def _print_metrics(metrics, out):
    print(f"test top-1 {metrics['test_top1']:.4f}  top-5 {metrics['test_top5']:.4f}  "
          f"steps {metrics['steps']}  wall {metrics['wall_seconds']:.0f} s  -> {out}/model.keras")


def run_export(model, fmt, out, **options):
    """`serving.export`, then what it wrote (and the TFLite parity table) printed."""
    result = serving.export(model, fmt, out, **options)
    if fmt == "tflite":
        print(f"TFLite parity against Keras on {result['count']} held-out {result['dataset']} images:")
        print(serving.tflite.format_parity(result["rows"]))
        return result["rows"]
    print(f"{'SavedModel' if fmt == 'saved_model' else 'ONNX'} -> {result['path']}")
    return result["path"]


def run_attention(model, images, out, head_fusion="mean", discard_ratio=0.0):
    """`visualize.attention_files`, one printed line per image."""
    written = visualize.attention_files(model, images, out, head_fusion, discard_ratio)
    for item in written:
        label, p = item.top[0]
        note = "  (numbered: another input has the same file name)" if item.numbered else ""
        print(f"{item.image}: {label} ({p:.1%}) -> {item.png}{note}")
    return [item.png for item in written]


def run_evaluate(args):
    """`vit-keras evaluate`: prints the result as JSON (and writes it with --json)."""
    from vit_keras import evaluate

    evaluate.check_json_path(args.json)  # before the evaluation, not after it
    result = evaluate.evaluate(args.model, args.dataset, weights=args.weights, image_size=args.image_size,
                               split=args.split, batch_size=args.batch_size, data_dir=args.data_dir,
                               download=args.download, label_map=args.label_map,
                               checkpoint_prefix=args.checkpoint_prefix)
    print(json.dumps(result), flush=True)  # first: a failed write below loses nothing
    if args.json:
        try:
            files.atomic_write_json(result, args.json)
        except OSError as e:
            raise files.write_error(e, args.json) from None
    return result


# Exports are TensorFlow graphs: under another backend `export` runs again in a process of its
# own under the TensorFlow backend (a .keras file loads on any backend).
TF_COMMANDS = ("export",)


def _tensorflow_backend():
    import keras

    return keras.backend.backend() == "tensorflow"


def _in_tensorflow_process(argv):
    """Runs `vit-keras ARGV` in a new process under the TensorFlow backend; returns its exit code."""
    import os
    import subprocess

    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    return subprocess.call([sys.executable, "-m", "vit_keras.cli", *argv], env=env)


def parser():
    """The `vit-keras` argument parser."""
    p = argparse.ArgumentParser(prog="vit-keras", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    p.add_argument("--verbose", dest="show_tensorflow_logs", action="store_true",  # not TrainConfig.verbose
                   help="show TensorFlow's own log lines too (also when you set TF_CPP_MIN_LOG_LEVEL yourself)")
    sub = p.add_subparsers(dest="command", required=True)
    add_train_arguments(sub.add_parser("train", help="train or fine-tune with model.fit"))
    export_p = sub.add_parser("export", help="SavedModel for TF Serving, TFLite files for phones, ONNX")
    export_p.add_argument("--model", required=True, help="a .keras file")
    export_p.add_argument("--format", choices=serving.FORMATS, required=True)
    export_p.add_argument("--out", required=True,
                          help="SavedModel: OUT/<name>/<version>/; TFLite: OUT/<variant>.tflite; ONNX: OUT/model.onnx")
    export_p.add_argument("--name", type=_plain_name, default=None,
                          help="SavedModel model name, a plain folder name (default: the model's)")
    export_p.add_argument("--version", type=_positive, default=1, help="SavedModel version, a positive integer")
    export_p.add_argument("--variants", nargs="+", choices=serving.TFLITE_VARIANTS, default=None,
                          help="TFLite variants (default: all)")
    export_p.add_argument("--dataset", default=None,
                          help="TFLite calibration and parity data (default: the dataset in metrics.json beside "
                               "the model)")
    export_p.add_argument("--overwrite", action="store_true",
                          help="replace an earlier export (only a folder the export wrote, never the model's)")
    export_p.add_argument("--strict-int8", action="store_true",
                          help="int8.tflite with every op in int8, for integer-only accelerators (default: "
                               "convolutions "
                               "and dense layers in int8, the rest float32: faster on CPU)")
    export_p.add_argument("--batch-size", type=_positive, default=None,
                          help="images per Keras call and interpreter run in the TFLite parity table (default 16)")
    export_p.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                          help="saved_model: bfloat16 weights and compute (fast with AVX512_BF16/AMX); onnx: bfloat16 "
                               "weights, float32 compute; float32 outputs either way (tflite: float32 only)")
    attn_p = sub.add_parser("attention", help="PNG heat maps of where the model attends")
    attn_p.add_argument("images", nargs="+")
    attn_p.add_argument("--model", required=True, help="a .keras file")
    attn_p.add_argument("--out", required=True)
    attn_p.add_argument("--head-fusion", choices=visualize.HEAD_FUSIONS, default="mean")
    attn_p.add_argument("--discard-ratio", type=float, default=0.0)
    eval_p = sub.add_parser("evaluate", help="top-1/top-5 with the original evaluation preprocessing")
    eval_p.add_argument("--model", required=True, help="a builder name (vit_r50_b16, ...), a .keras file, or a "
                        "checkpoint that names its architecture (.npz, transformers or Orbax folder)")
    eval_p.add_argument("--weights", default=None,
                        help=f"for a builder: a published name ({', '.join(presets.WEIGHT_NAMES)}), an .npz "
                             "path/URL, a timm model.safetensors, a transformers or Orbax folder (default: the "
                             "builder's)")
    eval_p.add_argument("--dataset", required=True,
                        help="'digits', a folder of class folders, or a TFDS name (e.g. imagenet2012)")
    eval_p.add_argument("--split", choices=data.SPLITS, default="test")
    eval_p.add_argument("--image-size", type=_size, default=None,
                        help="for a builder: resolution (default: the checkpoint's)")
    eval_p.add_argument("--batch-size", type=_positive, default=32)
    eval_p.add_argument("--data-dir", default=None, help="TFDS data directory")
    eval_p.add_argument("--download", action="store_true", help="let TFDS download and prepare the dataset")
    eval_p.add_argument("--json", default=None, help="also write the result to this JSON file")
    eval_p.add_argument("--label-map", choices=("names", "position"), default="names",
                        help="names: the model's class names must be the dataset's; position: class i is class i")
    eval_p.add_argument("--checkpoint-prefix", default=None,
                        help="the tower of a two-tower checkpoint (SigLIP/LiT: img)")
    demo_p = sub.add_parser("demo", help="train a small hybrid ViT on the built-in digits (2-core CPU)")
    demo_p.add_argument("--out", default=training.DEMO.out)
    demo_p.add_argument("--epochs", type=_positive, default=training.DEMO.epochs)
    return p


def _version():
    from vit_keras import __version__

    return __version__


def main(argv=None):
    args = parser().parse_args(argv)
    if args.command in TF_COMMANDS and not _tensorflow_backend():
        return _in_tensorflow_process(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)
    files.raise_on_sigterm()  # SIGTERM unwinds: temporary files and folders are removed on the way out
    if console.is_quiet():  # set before TensorFlow was imported (vit_keras/__init__.py)
        console.quiet_loggers()
    try:
        if args.command == "train":
            _print_metrics(training.train(train_config(args)).metrics, args.out)
        elif args.command == "export":
            run_export(args.model, args.format, args.out, dataset=args.dataset, name=args.name,
                       version=args.version, variants=args.variants, overwrite=args.overwrite,
                       batch_size=args.batch_size, strict_int8=args.strict_int8, precision=args.precision)
        elif args.command == "evaluate":
            run_evaluate(args)
        elif args.command == "attention":
            run_attention(args.model, args.images, args.out, args.head_fusion, args.discard_ratio)
        else:
            demo(args.out, args.epochs)
    except (ValueError, FileExistsError, ConnectionError, ImportError) as e:  # a failed download; a missing extra
        print(f"vit-keras: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print("vit-keras: error: out of memory; use a smaller --batch-size or --image-size.", file=sys.stderr)
        return 2
    return 0


def demo(out=training.DEMO.out, epochs=training.DEMO.epochs):
    """Train on digits, export (SavedModel + TFLite with parity table), draw attention maps."""
    import os

    import numpy as np
    import PIL.Image

    # The demo's folder is its own: a second demo replaces the first (an interrupted one resumes).
    metrics = training.train(training.DEMO, out=out, epochs=epochs, overwrite=True).metrics
    _print_metrics(metrics, out)
    model_path = os.path.join(out, "model.keras")
    images, _ = data.pixels(data.load("digits").test, 64, 3)
    files = []
    for i, image in enumerate(images):
        files.append(os.path.join(out, f"digit_{i}.png"))
        PIL.Image.fromarray(np.asarray(image)).save(files[-1])
    exports = (["--format", "saved_model", "--out", os.path.join(out, "export")],
               ["--format", "tflite", "--out", os.path.join(out, "tflite"), "--dataset", "digits"])
    for argv in exports:
        if _tensorflow_backend():
            run_export(model_path, argv[1], argv[3], dataset="digits", overwrite=True)
        elif _in_tensorflow_process(["export", "--model", model_path, *argv, "--overwrite"]):
            raise ValueError(f"vit-keras export {argv[1]} failed under the TensorFlow backend (see above).")
    run_attention(model_path, files, os.path.join(out, "attention"))
    return metrics


if __name__ == "__main__":
    sys.exit(main())
