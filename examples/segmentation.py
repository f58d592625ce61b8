"""A TransUNet-style decoder on the hybrid's multi-scale features: digit masks from scikit-learn's digits.

    python examples/segmentation.py [--model runs/demo/model.keras] [--epochs 8]

`vit_keras.features_model` gives the ResNet root (stride 2), each ResNet stage
(strides 4, 8, 16) and the encoder tokens as a grid (stride 16). The decoder
upsamples the tokens and joins the ResNet maps on the way up (a U-Net's skip
connections), then predicts one logit per pixel: is it ink? It prints the test
IoU of the ink class beside the IoU of calling every pixel ink.
"""

import argparse

import keras
import numpy as np
from sklearn.datasets import load_digits

import vit_keras


def digit_masks(size=64):
    """Digits at `size` px as pixels 0..255 (3 channels), and their ink masks."""
    digits = load_digits().images.astype("float32") / 16.0  # 8x8, 0..1
    scale = size // 8
    big = np.kron(digits, np.ones((scale, scale), "float32"))  # blocky upscale keeps masks exact
    pixels = np.repeat(big[..., None] * 255.0, 3, axis=-1)
    masks = (big > 0.25).astype("float32")[..., None]
    return pixels, masks


def segmentation_model(encoder, skips=("stage2", "stage1", "root"), width=32):
    """Encoder features -> per-pixel logits at the input's resolution."""
    features = vit_keras.features_model(encoder)
    images = keras.Input(encoder.input_shape[1:], name="image")
    f = features(images)
    x = keras.layers.Conv2D(width, 1, name="from_encoder")(f["encoder"])
    for name in skips:  # stride 16 -> 8 -> 4 -> 2
        x = keras.layers.UpSampling2D(2, interpolation="bilinear")(x)
        skip = keras.layers.Conv2D(width, 1, name=f"skip_{name}")(f[name])
        x = keras.layers.Concatenate()([x, skip])
        x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name=f"up_{name}")(x)
    x = keras.layers.UpSampling2D(2, interpolation="bilinear")(x)  # stride 1
    logits = keras.layers.Conv2D(1, 1, name="mask_logits")(x)
    return keras.Model(images, logits, name="segmenter")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a trained hybrid .keras file (default: a new vit_hybrid_tiny)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--images", type=int, default=None, help="use the first N images (default: all)")
    args = p.parse_args(argv)

    keras.utils.set_random_seed(0)
    pixels, masks = digit_masks()
    if args.images:
        pixels, masks = pixels[:args.images], masks[:args.images]
    split = int(0.8 * len(pixels))
    x = vit_keras.preprocess_inputs(pixels)
    if args.model:
        encoder = keras.saving.load_model(args.model)
    else:
        encoder = vit_keras.create("vit_hybrid_tiny", classes=10, image_size=64)
    model = segmentation_model(encoder)
    model.compile(optimizer=keras.optimizers.Adam(2e-3),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=[keras.metrics.BinaryIoU(target_class_ids=[1], threshold=0.0, name="ink_iou")])
    model.fit(x[:split], masks[:split], batch_size=32, epochs=args.epochs, verbose=2)
    result = model.evaluate(x[split:], masks[split:], return_dict=True, verbose=0)
    all_ink = float(masks[split:].mean())  # IoU of calling every pixel ink
    print(f"test ink IoU {result['ink_iou']:.3f} (every pixel ink: {all_ink:.3f})")
    return result["ink_iou"], all_ink


if __name__ == "__main__":
    main()
