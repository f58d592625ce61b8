"""Files written safely: atomic JSON, modes that follow the umask, output folders, `.keras` loading with clear errors."""

import json
import os
import tempfile


def umask():
    """The process umask, read without changing it where Linux tells it (no race with threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(tmp, path):
    """Renames a `mkstemp` file (created 0600) into place with the mode the umask gives new files."""
    os.chmod(tmp, 0o666 & ~umask())
    os.replace(tmp, path)


def follow_umask(root):
    """Gives `root` and all under it the modes plain open()/mkdir() give: 0666/0777 less the umask.

    `mkdtemp` makes its folder 0700, so without this a TF Serving process running
    as another user could not read an export, nor a teammate a model.
    """
    mask = umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, names in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(folder, d), 0o777 & ~mask)
        for name in names:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


def atomic_write_json(obj, path):
    """Writes `obj` as JSON through a temporary file and a rename: never half a file."""
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_keras(path):
    """A `.keras` file -> the model (a model is passed through); failures: one-line ValueError naming the path."""
    import keras

    if not isinstance(path, (str, os.PathLike)):
        return path
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"cannot load the model {path}: no such file.")
    try:
        return keras.saving.load_model(path)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one line naming the file
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ValueError(f"cannot load the model {path}: {lines[0] if lines else type(e).__name__}") from None


def output_folder(out):
    """Creates `out` if needed; a file there, or a folder that cannot be written, is a ValueError."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a folder.")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the output folder {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"the output folder {out} is not writable.")
