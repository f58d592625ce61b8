"""The image-folder check at scale (issue 26): a first run, a rerun, a rerun after changes.

Generates a folder of small JPEGs once (default 100,000 under /tmp; never in the
repository), then times `vit_keras.data.image_folder` (listing, and the check
that each file decodes, with the manifest of `vit_keras.image_check`) with an
empty cache, again with the manifest, and after 100 files are rewritten and 100
added; `--before` also times the check as it was before the manifest (every
file decoded on every run, `data.undecodable` / `data.undecodable_by_pillow`).

    python benchmarks/folder_check.py                      # TensorFlow's decoder (the tf.data pipeline's)
    python benchmarks/folder_check.py --decoder pillow     # Pillow's (the JAX/PyTorch pipeline's)
"""

import argparse
import io
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def jpeg(rng, size):
    import PIL.Image

    base = np.linspace(0, 255, size, dtype="float32")
    pixels = (base[:, None, None] * rng.uniform(0.2, 1.0, 3) + base[None, :, None] * rng.uniform(0, 0.5, 3))
    pixels = np.clip(pixels + rng.normal(0, 12, (size, size, 3)), 0, 255).astype("uint8")
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def pool(size):
    """256 distinct JPEGs (the same every time), written round-robin."""
    rng = np.random.default_rng(0)
    return [jpeg(rng, size) for _ in range(256)]


def generate(folder, count, classes, size):
    """`count` JPEGs of `size`x`size` in `classes` class folders (kept for later runs)."""
    marker = os.path.join(folder, f".complete-{count}-{classes}-{size}")
    if os.path.exists(marker):
        return
    shutil.rmtree(folder, ignore_errors=True)
    blobs = pool(size)
    for c in range(classes):
        os.makedirs(os.path.join(folder, f"class_{c:03d}"))
    for i in range(count):
        with open(os.path.join(folder, f"class_{i % classes:03d}", f"{i:07d}.jpg"), "wb") as f:
            f.write(blobs[i % len(blobs)])
    open(marker, "w").close()


def change(folder, rng, size, n=100):
    """Rewrites `n` files (new content, new size) and adds `n` new ones."""
    classes = sorted(d for d in os.listdir(folder) if not d.startswith("."))
    for i in range(n):
        cls = os.path.join(folder, classes[i % len(classes)])
        name = sorted(os.listdir(cls))[i // len(classes)]
        with open(os.path.join(cls, name), "wb") as f:
            f.write(jpeg(rng, size + 8))
        with open(os.path.join(cls, f"new_{i:04d}.jpg"), "wb") as f:
            f.write(jpeg(rng, size))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "vit_keras_folder_check"))
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--decoder", choices=("tensorflow", "pillow"), default="tensorflow")
    p.add_argument("--before", action="store_true", help="also time the check without the manifest")
    args = p.parse_args()

    start = time.perf_counter()
    generate(args.folder, args.count, args.classes, args.size)
    generated = time.perf_counter() - start
    os.environ["KERAS_HOME"] = tempfile.mkdtemp(prefix="folder_check_keras_")  # an empty cache: a first run
    from vit_keras import data, image_check

    tf_data = args.decoder == "tensorflow"
    if tf_data:
        import tensorflow as tf  # noqa: F401 (imported before the clock starts)
    files = image_check.list_folder(args.folder).files
    size_mb = sum(os.path.getsize(f) for f in files[:1000]) / min(len(files), 1000) * len(files) / 2**20
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f} at start; "
          f"the machine is shared, timings are noisy)")
    print(f"Folder: {len(files):,} JPEGs of {args.size}x{args.size} ({size_mb:.0f} MB), {args.classes} classes, "
          f"decoder {args.decoder}; generated in {generated:.0f} s")

    rows = []

    def timed(name, fn):
        t = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t
        rows.append((name, seconds))
        print(f"{name:<44} {seconds:8.1f} s   {seconds / len(files) * 1e3:6.3f} ms/file", flush=True)

    if args.before:
        old = data.undecodable if tf_data else data.undecodable_by_pillow
        timed("before: decode every file (every run)", lambda: old(files))
    timed("first run: list + check, empty manifest", lambda: data.image_folder(args.folder, tf_data=tf_data))
    timed("rerun: list + manifest, nothing changed", lambda: data.image_folder(args.folder, tf_data=tf_data))
    change(args.folder, np.random.default_rng(1), args.size)
    timed("rerun after 100 changed + 100 new files", lambda: data.image_folder(args.folder, tf_data=tf_data))
    first = dict(rows)["first run: list + check, empty manifest"]
    print(f"rerun / first run: {dict(rows)['rerun: list + manifest, nothing changed'] / first:.3f}")
    shutil.rmtree(os.environ["KERAS_HOME"], ignore_errors=True)
    # Undo the changes so that the next run starts from the same folder.
    blobs = pool(args.size)
    for folder, _, names in os.walk(args.folder):
        for name in names:
            path = os.path.join(folder, name)
            if name.startswith("new_"):
                os.remove(path)
            elif name.endswith(".jpg"):
                original = blobs[int(name[:-4]) % len(blobs)]
                if os.path.getsize(path) != len(original):
                    with open(path, "wb") as f:
                        f.write(original)


if __name__ == "__main__":
    main()
