"""File modes for atomically written outputs: what plain open()/mkdir() would have given."""

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
