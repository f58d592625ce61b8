"""Files written safely: every atomic write (`atomic_file`), umask modes, output folders and their locks, and
export folders that appear only complete (`atomic_dir`), with a manifest that says what `overwrite` may replace.
(`.keras` files are read by `vit_keras.loader`; `load_keras` is kept here as its alias.)
"""

import contextlib
import json
import os
import shutil
import tempfile

from vit_keras.sizes import is_int


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
    stop_if_terminated()
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


@contextlib.contextmanager
def atomic_file(path, suffix="", prefix=".tmp-"):
    """A temporary file beside `path` to write, renamed onto `path` (`publish`) when the block succeeds.

    Never half a file at `path`: on any error the temporary file is removed
    and `path` is as it was.

    Example:
    >>> path = os.path.join(tempfile.mkdtemp(), "a.txt")
    >>> with atomic_file(path, ".txt") as tmp:
    ...     _ = open(tmp, "w").write("done")
    >>> open(path).read()
    'done'
    """
    fd, tmp = tempfile.mkstemp(suffix=suffix, dir=os.path.dirname(os.path.abspath(path)), prefix=prefix)
    os.close(fd)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(obj, path, **dump_args):
    """Writes `obj` as JSON (`json.dump` arguments; indent 2 unless given) through `atomic_file`."""
    with atomic_file(path, ".json") as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, **{"indent": 2, **dump_args})


def load_keras(path):
    """A `.keras` file -> the model (a model is passed through); failures: one-line ValueError naming the path.

    `loader.load_model(path, files_only=True)`: the one loader of models.
    """
    from vit_keras import loader

    return loader.load_model(path, files_only=True)


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


class FolderInUse(ValueError):
    """Another process holds the lock of an output folder."""


class FolderLock:
    """An exclusive, non-blocking `flock` on an output folder, held while a command writes there.

    The lock file is `lock_path`; it is removed on release (while still
    locked, and a process that locked a file already removed tries again, so
    two processes never both hold "the" lock). The kernel releases the lock
    when the process ends, also on SIGKILL, so a killed run never blocks the
    next one (its empty lock file stays until then). The process holding it
    may take it again (nested); another process gets `FolderInUse`.

    Args:
        lock_path: str. The lock file to create (its folder must exist).
        what: str. What is locked, for the error message.

    Example:
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with FolderLock(os.path.join(folder, ".lock"), folder) as lock:
    ...     open(lock.lock_path).read() == str(os.getpid())  # the holder, for the error others get
    True
    >>> os.listdir(folder)
    []
    """

    _held = {}  # lock file -> [fd, count]: a process may take its own lock again (nested exports)

    def __init__(self, lock_path, what):
        self.lock_path = os.path.abspath(lock_path)
        self.what = what
        self.fd = None

    def acquire(self):
        held = FolderLock._held.get(self.lock_path)
        if held is not None:
            held[1] += 1
            self.fd = held[0]
            return self
        while self.fd is None:
            self.fd = self._try_lock()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        FolderLock._held[self.lock_path] = [self.fd, 1]
        return self

    def _try_lock(self):
        """The locked descriptor of the file now at `lock_path`, or None if it was removed meanwhile."""
        import fcntl

        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
        except OSError as e:
            raise ValueError(f"cannot use {self.what}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise FolderInUse(f"{self.what} is in use by another vit-keras process (pid {owner}); wait for "
                              "it to finish or choose another folder.") from None
        try:
            same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its holder removed it between our open and our lock: take the new one
            os.close(fd)
            return None
        return fd

    def release(self):
        if self.fd is None:
            return
        held = FolderLock._held[self.lock_path]
        held[1] -= 1
        if not held[1]:
            del FolderLock._held[self.lock_path]
            with contextlib.suppress(OSError):
                os.remove(self.lock_path)  # still locked: nobody holds the path's next file yet
            os.close(self.fd)  # closing the descriptor releases the flock
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def lock_beside(path, what=None):
    """A `FolderLock` for an output `path` that we replace as a whole: `.<name>.lock` in its parent."""
    parent, name = os.path.split(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the folder {parent}: {e.strerror or e}") from None
    return FolderLock(os.path.join(parent, f".{name}.lock"), what or path)


# Temporary folders and files of ours carry the pid of the process that made them, so that a
# later run can remove those of processes that died (SIGKILL, power loss) and nothing else.
TEMP_PREFIX = ".tmp-vit_keras-"


def temp_prefix(prefix=TEMP_PREFIX):
    """`prefix` + this process's pid + '-': the start of a `mkdtemp`/`mkstemp` name that `sweep` recognises."""
    return f"{prefix}{os.getpid()}-"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep(folder, prefix=TEMP_PREFIX):
    """Removes the temporaries of ours in `folder` whose process is gone; returns their paths.

    Only names `prefix<pid>-...` count, and only where no process `<pid>` runs.
    """
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)
        removed.append(path)
    return removed


def raise_on_sigterm():
    """Turns SIGTERM into `SystemExit(143)` in the main thread, so `finally` blocks remove temporaries.

    Returns the previous handler (None off the main thread, where nothing changes).
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        _TERMINATED.append(signum)
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, handler)


_TERMINATED = []  # the signals `raise_on_sigterm` received


def stop_if_terminated():
    """SystemExit(143) if SIGTERM came: called before a file or folder is published.

    The handler's SystemExit can be swallowed where the signal lands inside a
    callback run by C++ code (TensorFlow's converter); this makes sure nothing
    is published after it anyway.
    """
    if _TERMINATED:
        raise SystemExit(128 + _TERMINATED[0])


class OutputError(ValueError):
    """A file could not be written (full disk, file-size limit, read-only folder); nothing was replaced."""


def check_room(folder, nbytes, path):
    """OutputError unless `nbytes` fit on the disk of `folder` and under this process's file-size limit.

    Checked before writing, so that a library that writes in place (h5py)
    never meets a full disk halfway through a file.
    """
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and nbytes > limit:
        raise OutputError(f"cannot write {path}: it needs about {nbytes / 1e6:.1f} MB, above this process's "
                          f"file-size limit of {limit / 1e6:.1f} MB (ulimit -f).")
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < nbytes + (1 << 20):
        raise OutputError(f"cannot write {path}: it needs about {nbytes / 1e6:.1f} MB and its disk has "
                          f"{free / 1e6:.1f} MB free.")


def write_error(error, path=None):
    """An `OutputError` from an `OSError` of a write: one line naming the file and the reason."""
    where = getattr(error, "filename", None) or path or "a file"
    return OutputError(f"cannot write {where}: {getattr(error, 'strerror', None) or error}.")


# ----------------------------------------------------------------------------- export folders

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


def check_target(final, overwrite, keep=()):
    """FileExistsError if the export folder `final` exists and may not be replaced (see `atomic_dir`).

    Exporters call it before their slow part, so that a refusal comes first.
    """
    if os.path.lexists(final):
        if not overwrite:
            raise FileExistsError(f"{final} exists; pass overwrite=True (--overwrite) to replace it.")
        _check_replaceable(final, keep)


@contextlib.contextmanager
def atomic_dir(final, overwrite, keep=()):
    """Yields a temporary folder beside `final` that replaces it only if the block succeeds.

    The folder gets a manifest of its files (`MANIFEST`) and the modes of the
    user's umask. An existing `final` is replaced only with `overwrite`, and only
    if it is an earlier export holding nothing but what that export wrote, and
    none of the paths in `keep` (the input model); otherwise FileExistsError.
    A second export to `final` is refused while this one runs (`lock_beside`).

    Example:
    >>> out = os.path.join(tempfile.mkdtemp(), "export")
    >>> with atomic_dir(out, overwrite=False) as tmp:
    ...     open(os.path.join(tmp, "model.bin"), "w").close()
    >>> sorted(os.listdir(out))
    ['model.bin', 'vit_keras_export.json']
    """
    check_target(final, overwrite, keep)
    parent = os.path.dirname(os.path.abspath(final))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the folder {parent}: {e.strerror or e}") from None
    with lock_beside(final):
        sweep(parent)  # temporaries of exports that were killed
        tmp = tempfile.mkdtemp(prefix=temp_prefix(), dir=parent)
        try:
            yield tmp
            written = _listing(tmp)
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump({"written_by": "vit-keras export", "files": written}, f, indent=1)
            follow_umask(tmp)
            publish_folder(tmp, final, overwrite, keep)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def publish_folder(tmp, final, overwrite, keep=()):
    """Renames the finished folder `tmp` to `final` (the folder twin of `publish`).

    An earlier export at `final` is replaced only with `overwrite` (checked
    again here: it may have changed while the export ran); a folder that
    appeared meanwhile is FileExistsError without it.
    """
    parent = os.path.dirname(os.path.abspath(final))
    stop_if_terminated()  # a SIGTERM whose SystemExit was swallowed still stops here
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
    _check_replaceable(final, keep)
    trash = tempfile.mkdtemp(prefix=temp_prefix(), dir=parent)
    os.rename(final, os.path.join(trash, "old"))
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(os.path.join(trash, "old"), final)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def check_name_and_version(name, version):
    """ValueError unless `name` is a plain folder name and `version` a positive integer (TF Serving's layout)."""
    if (not isinstance(name, str) or not name.strip() or name.strip() == "." or ".." in name or "\0" in name
            or any(sep and sep in name for sep in ("/", "\\", os.sep, os.altsep))):
        raise ValueError(f"Model name {name!r} must be a plain folder name "
                         "(not '.', no path separators or '..').")
    if not is_int(version) or version < 1:
        raise ValueError(f"version must be a positive integer (TF Serving's version folder), got {version!r}.")
