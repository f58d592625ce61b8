"""Export folders written atomically, with a manifest that says what `overwrite` may replace."""

import contextlib
import json
import os
import shutil
import tempfile

import numpy as np

from vit_keras import files

# Written into every export folder; `overwrite` replaces only folders that hold it.
MANIFEST = "vit_keras_export.json"


def _listing(root):
    """Relative paths of the files (and links) under `root`."""
    found = []
    for folder, dirs, names in os.walk(root):
        links = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        found += [os.path.relpath(os.path.join(folder, f), root) for f in names + links]
    return sorted(found)


def _check_replaceable(final, keep=()):
    """Raises FileExistsError unless `final` is an export folder holding only what the export wrote."""
    real = os.path.realpath(final)
    for path in keep:
        kept = os.path.realpath(path)
        if kept == real or kept.startswith(real + os.sep):
            raise FileExistsError(f"{final} contains the input model {path}; refusing to replace it "
                                  "(choose another output folder).")
    if os.path.islink(final) or not os.path.isdir(final):
        raise FileExistsError(f"{final} exists and is not an export folder; refusing to replace it.")
    try:
        with open(os.path.join(final, MANIFEST)) as f:
            listed = set(json.load(f)["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise FileExistsError(
            f"{final} was not written by vit-keras export (it has no {MANIFEST}); overwrite only "
            "replaces an earlier export, so choose another output folder or remove it yourself."
        ) from None
    extra = [p for p in _listing(final) if p not in listed and p != MANIFEST]
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise FileExistsError(f"{final} holds files the export did not write ({', '.join(extra[:3])}{more}); "
                              "refusing to replace it.")


def _check_target(final, overwrite, keep=()):
    """FileExistsError if `final` exists and may not be replaced (see `_atomic_dir`)."""
    if os.path.lexists(final):
        if not overwrite:
            raise FileExistsError(f"{final} exists; pass overwrite=True (--overwrite) to replace it.")
        _check_replaceable(final, keep)


@contextlib.contextmanager
def _atomic_dir(final, overwrite, keep=()):
    """Yields a temporary folder beside `final` that replaces it only if the block succeeds.

    The folder gets a manifest of its files (`MANIFEST`) and the modes of the
    user's umask. An existing `final` is replaced only with `overwrite`, and only
    if it is an earlier export holding nothing but what that export wrote, and
    none of the paths in `keep` (the input model); otherwise FileExistsError.
    """
    _check_target(final, overwrite, keep)
    parent = os.path.dirname(os.path.abspath(final))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the folder {parent}: {e.strerror or e}") from None
    with files.lock_beside(final):  # a second export to `final` is refused while this one runs
        files.sweep(parent)  # temporaries of exports that were killed
        tmp = tempfile.mkdtemp(prefix=files.temp_prefix(), dir=parent)
        try:
            yield tmp
            written = _listing(tmp)
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump({"written_by": "vit-keras export", "files": written}, f, indent=1)
            files.follow_umask(tmp)
            _publish(tmp, final, overwrite, keep)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _publish(tmp, final, overwrite, keep):
    """Renames the finished `tmp` to `final`, replacing an earlier export only with `overwrite`."""
    parent = os.path.dirname(os.path.abspath(final))
    files.stop_if_terminated()  # a SIGTERM whose SystemExit was swallowed still stops here
    if not os.path.lexists(final):
        try:
            os.rename(tmp, final)  # fails (ENOTEMPTY) rather than replace a folder that appeared meanwhile
            return
        except OSError:
            if not os.path.lexists(final):
                raise
    if not overwrite:
        raise FileExistsError(f"{final} appeared while this export ran (another process wrote it); pass "
                              "overwrite=True (--overwrite) to replace it.")
    _check_replaceable(final, keep)  # again: it may have changed while the export ran
    trash = tempfile.mkdtemp(prefix=files.temp_prefix(), dir=parent)
    os.rename(final, os.path.join(trash, "old"))
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(os.path.join(trash, "old"), final)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def _check_name_and_version(name, version):
    if (not isinstance(name, str) or not name.strip() or name.strip() == "." or ".." in name or "\0" in name
            or any(sep and sep in name for sep in ("/", "\\", os.sep, os.altsep))):
        raise ValueError(f"Model name {name!r} must be a plain folder name "
                         "(not '.', no path separators or '..').")
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise ValueError(f"version must be a positive integer (TF Serving's version folder), got {version!r}.")
