"""Fine-tuning the digits demo model on a shifted task: full, --trainable head, --layer-decay, --lora-rank.

    python benchmarks/finetune_digits.py [--out runs/finetune_digits] [--pretrain-epochs 20] [--epochs 5]

1. Pretrains the demo model (`training.DEMO`: the small hybrid at 64x64) on
   the built-in digits, fewer epochs than `vit-keras demo`.
2. Writes the shifted task: the same digits rotated by 90 degrees, as a folder
   of grey PNG files (one folder per class).
3. Evaluates the pretrained model on it as it is, then fine-tunes it there
   with `vit-keras train`'s options (crop area 0.5-1 as the demo's digits):
   all weights, `--trainable head`,
   `--trainable blocks:1`, `--layer-decay 0.75`, `--lora-rank 4` (at the
   recipe's learning rate and at 0.1, as the head), and trains the same
   model from scratch for comparison; prints test top-1 and the
   share of weights each trains.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))


def write_rotated_digits(root):
    """The digits (32x32 grey) rotated 90 degrees counter-clockwise, one PNG per image, a folder per class."""
    import PIL.Image
    from sklearn.datasets import load_digits

    if os.path.exists(os.path.join(root, "9")):
        return root
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = os.path.join(root, str(label))
        os.makedirs(folder, exist_ok=True)
        pixels = np.rot90(image * (255.0 / 16.0)).clip(0, 255).astype("uint8")
        PIL.Image.fromarray(pixels, "L").resize((32, 32), PIL.Image.BILINEAR).save(
            os.path.join(folder, f"{i:04d}.png"))
    return root


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/finetune_digits")
    p.add_argument("--pretrain-epochs", type=int, default=20)
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args()
    from vit_keras import evaluate, training

    pretrained = os.path.join(args.out, "pretrained")
    if not os.path.exists(os.path.join(pretrained, "model.keras")):
        start = time.time()
        m = training.train(training.DEMO, out=pretrained, epochs=args.pretrain_epochs, verbose=0,
                           backup_every=None).metrics
        print(f"pretrained on digits: test top-1 {m['test_top1']:.4f} ({time.time() - start:.0f} s)")
    task = write_rotated_digits(os.path.join(args.out, "rotated_digits"))
    model_path = os.path.join(pretrained, "model.keras")
    as_is = evaluate.evaluate(model_path, task, split="test", verbose=0)
    rows = [("pretrained, not fine-tuned", as_is["top1"], 0, None, 0.0)]
    runs = [
        ("full fine-tune", dict()),
        ("--trainable head", dict(trainable="head", learning_rate=0.1)),
        ("--trainable blocks:1", dict(trainable="blocks:1")),
        ("--layer-decay 0.75", dict(layer_decay=0.75)),
        ("--lora-rank 4", dict(lora_rank=4)),
        ("from scratch (same epochs)", dict(model="vit_hybrid_tiny")),
        ("--lora-rank 4 --lr 0.1", dict(lora_rank=4, learning_rate=0.1)),
        ("--trainable blocks:1 --lr 0.1", dict(trainable="blocks:1", learning_rate=0.1)),
    ]
    for name, options in runs:
        config = dict(model=model_path, dataset=task, image_size=64, epochs=args.epochs, batch_size=32,
                      learning_rate=0.03, verbose=0, crop_area=(0.5, 1.0),
                      out=os.path.join(args.out, name.strip("-").split()[0] + "_" + str(len(rows))))
        config.update(options)
        done = os.path.join(config["out"], "metrics.json")
        if os.path.exists(done):  # finished in an earlier run of this script
            with open(done) as f:
                m = json.load(f)
        else:
            m = training.train(**config).metrics
        rows.append((name, m["test_top1"], m["trainable_params"], m["total_params"], m["wall_seconds"]))
        print(json.dumps({"run": name, "top1": m["test_top1"], "trainable": m["trainable_params"],
                          "total": m["total_params"]}), flush=True)
    print(f"\nShifted task: digits rotated 90 degrees (grey PNG folder, {args.epochs} epochs, batch 32, "
          f"lr 0.03 (head 0.1), SGD recipe, crops of 50-100 % of the area as the digits demo; image folders are "
          "flipped at random, so the model also sees mirrored rotated digits)")
    print("| run | test top-1 | trained weights | wall (s) |")
    print("|---|---|---|---|")
    for name, top1, trained, total, wall in rows:
        share = "" if total is None else f"{trained:,} of {total:,} ({100 * trained / total:.1f}%)"
        print(f"| {name} | {top1:.4f} | {share} | {wall:.0f} |")


if __name__ == "__main__":
    main()
