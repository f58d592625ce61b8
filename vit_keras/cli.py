"""The `vit-keras` command: `train`, `demo`."""

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
DEMO = dict(model="vit_hybrid_tiny", dataset="digits", image_size=64, epochs=40, batch_size=32,
            learning_rate=0.1, backup_every=20)


def _print_metrics(metrics, out):
    print(f"test top-1 {metrics['test_top1']:.4f}  top-5 {metrics['test_top5']:.4f}  "
          f"steps {metrics['steps']}  wall {metrics['wall_seconds']:.0f} s  -> {out}/model.keras")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="vit-keras", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train_p = sub.add_parser("train", help="train or fine-tune with model.fit")
    add_train_arguments(train_p)
    demo_p = sub.add_parser("demo", help="train a small hybrid ViT on the built-in digits (2-core CPU)")
    demo_p.add_argument("--out", default="runs/demo")
    demo_p.add_argument("--epochs", type=int, default=DEMO["epochs"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)

    from vit_keras import training

    try:
        if args.command == "train":
            metrics = training.train(**_train_kwargs(args)).metrics
        else:
            metrics = training.train(**dict(DEMO, out=args.out, epochs=args.epochs)).metrics
    except ValueError as e:
        print(f"vit-keras: error: {e}", file=sys.stderr)
        return 2
    _print_metrics(metrics, args.out)
    if args.command == "demo":
        print(json.dumps({k: v for k, v in metrics.items() if k != "class_names"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
