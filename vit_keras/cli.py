"""The `vit-keras` command: `train`, `export`, `attention`, `demo`."""

import argparse
import json
import logging
import sys


def _size(text):
    parts = [int(p) for p in text.replace("x", ",").split(",")]
    return parts[0] if len(parts) == 1 else tuple(parts)


def _area(text):
    lo, hi = (float(p) for p in text.split(","))
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
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="global batch size")
    p.add_argument("--out", default="runs/train", help="output folder (resumes if it holds a backup)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--lr", type=float, default=0.03, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--clipnorm", type=float, default=1.0, help="global gradient-norm clip")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--randaugment", action="store_true")
    p.add_argument("--mixup", action="store_true")
    p.add_argument("--cutmix", action="store_true")
    p.add_argument("--crop-area", type=_area, default=None, help="random-crop area range, e.g. 0.05,1")
    p.add_argument("--strategy", choices=("default", "mirrored", "multi_worker", "tpu"), default="default")
    p.add_argument("--precision", choices=("float32", "mixed_bfloat16", "mixed_float16"), default="float32")
    p.add_argument("--jit-compile", action="store_true", help="compile the train step with XLA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backup-every", type=int, default=None, help="steps between backups (default: an epoch)")


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
    )


# The demo: a small hybrid (ResNet width 32, one unit per stage; ViT width 64, 2 layers) at 64x64.
DEMO = dict(model="vit_hybrid_tiny", dataset="digits", image_size=64, epochs=60, batch_size=32,
            learning_rate=0.1, backup_every=20)


def run_export(model_path, fmt, out, dataset=None, name=None, version=1, variants=None,
               overwrite=False, calibration=200, parity=400):
    """Exports a `.keras` model; for TFLite prints the parity table against Keras."""
    import keras

    from vit_keras import data, export

    model = keras.saving.load_model(model_path)
    if fmt == "saved_model":
        path = export.export_saved_model(model, out, name=name or model.name, version=version,
                                         overwrite=overwrite)
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
                                 representative_images=calib, overwrite=overwrite)
    rows = export.parity_table(model, files, held_out)
    print(f"TFLite parity against Keras on {len(held_out)} held-out {dataset} images:")
    print(export.format_parity(rows))
    return rows


def _recorded_dataset(model_path):
    import os

    metrics = os.path.join(os.path.dirname(os.path.abspath(model_path)), "metrics.json")
    if os.path.exists(metrics):
        with open(metrics) as f:
            return json.load(f).get("dataset")
    return None


def run_attention(model_path, images, out, head_fusion="mean", discard_ratio=0.0):
    """Writes one PNG per image: the image, the rollout heat map, the top predictions."""
    import os

    import keras
    import numpy as np
    import tensorflow as tf

    from vit_keras import export, visualize
    from vit_keras.model import attention_model
    from vit_keras.vit import preprocess_inputs

    model = keras.saving.load_model(model_path) if isinstance(model_path, str) else model_path
    attn = attention_model(model)  # built once: one forward pass gives logits and weights
    names = export.label_names(model)
    height, width = model.input_shape[1:3]
    os.makedirs(out, exist_ok=True)
    written = []
    for path in images:
        raw = tf.io.read_file(path)
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
        target = os.path.join(out, os.path.splitext(os.path.basename(path))[0] + "_attention.png")
        visualize.save_overlay(np.asarray(pixels[0]).astype("uint8"), heat, target, predictions=top)
        written.append(target)
        print(f"{path}: {top[0][0]} ({top[0][1]:.1%}) -> {target}")
    return written


def _print_metrics(metrics, out):
    print(f"test top-1 {metrics['test_top1']:.4f}  top-5 {metrics['test_top5']:.4f}  "
          f"steps {metrics['steps']}  wall {metrics['wall_seconds']:.0f} s  -> {out}/model.keras")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="vit-keras", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train_p = sub.add_parser("train", help="train or fine-tune with model.fit")
    add_train_arguments(train_p)
    export_p = sub.add_parser("export", help="SavedModel for TF Serving, or TFLite files for phones")
    export_p.add_argument("--model", required=True, help="a .keras file")
    export_p.add_argument("--format", choices=("saved_model", "tflite"), required=True)
    export_p.add_argument("--out", required=True, help="SavedModel: OUT/<name>/<version>/; TFLite: OUT/<variant>.tflite")
    export_p.add_argument("--name", default=None, help="SavedModel model name (default: the model's)")
    export_p.add_argument("--version", type=int, default=1)
    export_p.add_argument("--variants", nargs="+", default=None,
                          help="TFLite variants: float32 float16 dynamic_int8 int8 (default: all)")
    export_p.add_argument("--dataset", default=None,
                          help="TFLite calibration and parity data (default: the dataset in metrics.json beside the model)")
    export_p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    attn_p = sub.add_parser("attention", help="PNG heat maps of where the model attends")
    attn_p.add_argument("images", nargs="+")
    attn_p.add_argument("--model", required=True, help="a .keras file")
    attn_p.add_argument("--out", required=True)
    attn_p.add_argument("--head-fusion", choices=("mean", "max", "min"), default="mean")
    attn_p.add_argument("--discard-ratio", type=float, default=0.0)
    demo_p = sub.add_parser("demo", help="train a small hybrid ViT on the built-in digits (2-core CPU)")
    demo_p.add_argument("--out", default="runs/demo")
    demo_p.add_argument("--epochs", type=int, default=DEMO["epochs"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)

    from vit_keras import training

    try:
        if args.command == "train":
            _print_metrics(training.train(**_train_kwargs(args)).metrics, args.out)
        elif args.command == "export":
            run_export(args.model, args.format, args.out, args.dataset, args.name, args.version,
                       args.variants, args.overwrite)
        elif args.command == "attention":
            run_attention(args.model, args.images, args.out, args.head_fusion, args.discard_ratio)
        else:
            demo(args.out, args.epochs)
    except (ValueError, FileExistsError) as e:
        print(f"vit-keras: error: {e}", file=sys.stderr)
        return 2
    return 0


def demo(out, epochs=DEMO["epochs"]):
    """Train on digits, export (SavedModel + TFLite with parity table), draw attention maps."""
    import os

    import numpy as np
    import PIL.Image

    from vit_keras import data, training

    metrics = training.train(**dict(DEMO, out=out, epochs=epochs)).metrics
    _print_metrics(metrics, out)
    model_path = os.path.join(out, "model.keras")
    run_export(model_path, "saved_model", os.path.join(out, "export"), overwrite=True)
    run_export(model_path, "tflite", os.path.join(out, "tflite"), dataset="digits", overwrite=True)
    images, _ = data.pixels(data.load("digits").test, 64, 3)
    files = []
    for i, image in enumerate(images):
        files.append(os.path.join(out, f"digit_{i}.png"))
        PIL.Image.fromarray(np.asarray(image)).save(files[-1])
    run_attention(model_path, files, os.path.join(out, "attention"))
    return metrics


if __name__ == "__main__":
    sys.exit(main())
