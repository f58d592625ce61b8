"""Folders of class folders: which files are training images, and the check that each decodes, at scale.

`list_folder` finds the images of each class folder: files ending in one of
`EXTENSIONS` at any depth, except inside hidden folders (`.ipynb_checkpoints`)
and hidden files (`._photo.jpg` from macOS); what it leaves out is counted so
that `data.image_folder` can say so. File names that are not UTF-8 are kept
(Python holds them with escapes) and shown as `caf\\xe9.jpg`.

`check_files` decodes each file once with the decoder training uses, in
parallel, with progress, and remembers what decoded in a manifest keyed by
path, size, modification and change time (`manifest_path`, in the Keras cache),
so that a rerun or a resumed run decodes only new or changed files.
"""

import contextlib
import gc
import hashlib
import json
import logging
import os

# What the decoders of both pipelines read (TensorFlow's decode_image and Pillow): these files are used.
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
DECODERS = ("tensorflow", "pillow")
MANIFEST_VERSION = 1

logger = logging.getLogger("vit_keras")


@contextlib.contextmanager
def _no_gc():
    """Without the cyclic garbage collector: building a million small lists would trigger full passes over
    every object of the process (TensorFlow's included), several times slower; nothing here makes cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def shown(path):
    """A path as text that prints anywhere: bytes that are not UTF-8 as `\\xe9` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_text(name):
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a surrogate escape of a byte that is not UTF-8
        return False
    return True


class Listing:
    """What `list_folder` found.

    Attributes:
        class_names: list of str. The class folders, sorted.
        files: list of str. The image files, sorted within each class.
        labels: list of int. The class index of each file.
        counts: dict. Images per class name.
        hidden: list of str. Hidden folders and files inside class folders, not used.
        others: list of str. Files with other extensions, not used.
    """

    def __init__(self, class_names, files, labels, counts, hidden, others):
        self.class_names, self.files, self.labels = class_names, files, labels
        self.counts, self.hidden, self.others = counts, hidden, others


def list_folder(path):
    """The images of a folder with one sub-folder per class (see the module docstring).

    Raises ValueError for a class folder whose name is not UTF-8 (class names
    are stored in the model), naming it.
    """
    with _no_gc():
        return _list_folder(path)


def _list_folder(path):
    root = os.fspath(path)
    class_names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    odd = [name for name in class_names if not _is_text(name)]
    if odd:
        raise ValueError(f"Image folder {shown(root)}: class folder name(s) {', '.join(shown(n) for n in odd)} "
                         "are not UTF-8 text; rename them (class names are stored in the model).")
    files, labels, counts, hidden, others = [], [], {}, [], []
    for label, name in enumerate(class_names):
        found = []
        for folder, dirs, names in os.walk(os.path.join(root, name)):
            hidden += [os.path.join(folder, d) for d in dirs if d.startswith(".")]
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for file in names:
                full = os.path.join(folder, file)
                if file.startswith("."):
                    hidden.append(full)
                elif os.path.splitext(file)[1].lower() in EXTENSIONS:
                    found.append(full)
                else:
                    others.append(full)
        found.sort()
        files += found
        labels += [label] * len(found)
        counts[name] = len(found)
    return Listing(class_names, files, labels, counts, sorted(hidden), sorted(others))


def _cache_root():
    from vit_keras.download import cache_root

    return os.path.join(cache_root(), "checked")


def manifest_path(folder, decoder):
    """The manifest of `folder` checked with `decoder`: `~/.keras/vit_keras/checked/<hash>.json`."""
    key = f"{os.path.abspath(os.fspath(folder))}\0{decoder}".encode("utf-8", "surrogateescape")
    return os.path.join(_cache_root(), hashlib.sha256(key).hexdigest()[:24] + ".json")


def load_manifest(folder, decoder):
    """`{path relative to folder: [size, mtime_ns, ctime_ns]}` of the files that decoded before; {} if none."""
    try:
        with open(manifest_path(folder, decoder), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    ok = (isinstance(record, dict) and record.get("version") == MANIFEST_VERSION
          and record.get("folder") == os.path.abspath(os.fspath(folder)) and record.get("decoder") == decoder
          and isinstance(record.get("files"), dict))
    return record["files"] if ok else {}


def save_manifest(folder, decoder, entries):
    """Writes the manifest atomically (a temporary file and a rename); an unwritable cache is skipped."""
    from vit_keras import files

    path = manifest_path(folder, decoder)
    record = {"version": MANIFEST_VERSION, "folder": os.path.abspath(os.fspath(folder)), "decoder": decoder,
              "files": entries}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        files.atomic_write_json(record, path, indent=None, separators=(",", ":"))
    except OSError as e:
        logger.info("Image check manifest not written (%s): the next run checks every file again.", e)


def check_files(folder, paths, decoder, manifest=True, workers=None):
    """`[(path, reason)]` of the files among `paths` (inside `folder`) that `decoder` cannot decode.

    Files recorded in the manifest with the same size, modification and
    change time are not decoded again; the others are decoded in parallel
    (`workers` threads for Pillow; tf.data's for TensorFlow) under a progress
    bar. The files that decoded are recorded.

    Args:
        folder: str. The image folder (the manifest's key, and paths relative to it).
        paths: list of str. The files to check.
        decoder: str. "tensorflow" (the tf.data pipeline's) or "pillow" (`ImagePipeline`'s).
        manifest: bool. Use and update the manifest. Defaults to True.
        workers: int or None. Pillow's threads. Defaults to min(16, 2 * cores).
    """
    from vit_keras import console

    if decoder not in DECODERS:
        raise ValueError(f"Unknown decoder {decoder!r}; use one of {DECODERS}.")
    given, folder = os.fspath(folder), os.path.abspath(os.fspath(folder))
    with _no_gc():
        known = load_manifest(folder, decoder) if manifest else {}
        todo, signatures, bad = _unchecked(folder, paths, known, given)
    if paths and len(todo) < len(paths) and manifest:
        logger.info("Image folder %s: %d of %d files unchanged since they were checked; checking %d.",
                    shown(folder), len(paths) - len(todo) - len(bad), len(paths), len(todo))
    if todo:
        title = f"Checking images in {shown(folder)}"
        with console.Progress(title, len(todo), "file") as bar:
            if decoder == "tensorflow":
                failed = _check_with_tensorflow(todo, bar)
            else:
                failed = _check_with_pillow(todo, bar, workers)
        bad += failed
    if manifest and (todo or len(known) != len(signatures)):
        failed = {path for path, _ in bad}
        save_manifest(folder, decoder, {rel: sig for path, (rel, sig) in signatures.items() if path not in failed})
    order = {path: i for i, path in enumerate(paths)}
    return sorted(bad, key=lambda item: order.get(item[0], -1))


def _unchecked(folder, paths, known, given=None):
    """`(paths to decode, {path: (relative path, signature)}, [(unreadable path, reason)])`."""
    todo, signatures, bad = [], {}, []
    prefix = os.path.join(given if given is not None else folder, "")
    for path in paths:
        try:
            stat = os.stat(path)  # before decoding: a file changed meanwhile is checked again
        except OSError as e:
            bad.append((path, e.strerror or str(e)))
            continue
        signature = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
        relative = path[len(prefix):]
        if not path.startswith(prefix) or os.sep + "." in os.sep + relative:  # the rare case: normalise
            relative = os.path.relpath(os.path.abspath(path), folder)
        signatures[path] = (relative, signature)
        if known.get(relative) != signature:
            todo.append(path)
    return todo, signatures, bad


def unchecked(folder, paths, decoder):
    """The files among `paths` that `check_files` would decode: not in the manifest, or changed since."""
    given, folder = os.fspath(folder), os.path.abspath(os.fspath(folder))
    return _unchecked(folder, paths, load_manifest(folder, decoder), given)[0]


def _check_with_tensorflow(paths, bar):
    """Decodes with TensorFlow's `decode_image` (the tf.data pipeline's) in a parallel tf.data map."""
    import numpy as np
    import tensorflow as tf

    from vit_keras.data.images import decode_error

    def decode(index, file):
        image = tf.io.decode_image(tf.io.read_file(file), channels=3, expand_animations=False)
        return index, tf.shape(image)

    # Paths as bytes: a file name that is not UTF-8 is read as it is on disk.
    names = np.array([os.fsencode(p) for p in paths], dtype=object)
    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), names))
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False).ignore_errors()
    good = set()
    for indices, _ in ds.batch(256).as_numpy_iterator():  # batches: little Python per file
        good.update(indices.tolist())
        bar.update(len(good))
    return [(p, decode_error(os.fsencode(p))) for i, p in enumerate(paths) if i not in good]


def _check_with_pillow(paths, bar, workers):
    """Decodes with Pillow (the `ImagePipeline`'s decoder) in a thread pool (decoding releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from vit_keras.data.images import pillow_reason

    workers = workers or min(16, 2 * (os.cpu_count() or 1))
    bad, done = [], 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(paths), 1024):  # bounded: no million pending futures
            chunk = paths[start:start + 1024]
            for path, why in zip(chunk, pool.map(pillow_reason, chunk)):
                done += 1
                if why is not None:
                    bad.append((path, why))
                if done % 64 == 0:
                    bar.update(done)
    return bad
