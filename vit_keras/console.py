"""What the `vit-keras` commands print: the project's own lines, and progress with counts.

TensorFlow and the libraries under it write to the process's stderr from C++:
TensorFlow's and absl's logging (`I0000 ... port.cc:153] oneDNN custom
operations are on`, `WARNING: All log messages before absl::InitializeLog()
...`), the TFLite converter's MLIR passes (`reader.cc:83] Reading SavedModel
from: ...`, `fully_quantize: 0, ...`) and LiteRT (`INFO: Created TensorFlow
Lite XNNPACK delegate for CPU.`). Some of those lines come before any level is
read, so a log level alone does not hide them.

`configure` (called by `vit_keras/__init__.py` in a `vit-keras` process,
before TensorFlow is imported) turns that off: it sets
`TF_CPP_MIN_LOG_LEVEL=2` and `GLOG_minloglevel=2`, imports TensorFlow with
the process's stdout and stderr redirected to a temporary file, and later
`native_output` does the same around each conversion (what the converter
wrote is shown if it fails). Python's `tensorflow`, `absl` and `tf2onnx`
loggers are kept to warnings. `vit-keras --verbose`, or a
`TF_CPP_MIN_LOG_LEVEL` the user set, leaves all of it as TensorFlow prints it.
Error lines (`E0000 ...`) that TensorFlow writes while silenced become one
line of ours.

`Progress` shows progress with counts, rate and time left: a
`keras.utils.Progbar` redrawn in place on a terminal, a few lines per phase in a
log (a file or a pipe). It writes to stderr, so that stdout keeps the results.
`VIT_KERAS_PROGRESS=0` turns it off.
"""

import contextlib
import io
import os
import re
import sys
import tempfile
import time

# The decision of the first `vit-keras` process ("quiet" or "verbose"), inherited by the process
# that `vit-keras export` starts under the TensorFlow backend: its TF_CPP_MIN_LOG_LEVEL is ours.
MODE_VARIABLE = "VIT_KERAS_LOGS"
PROGRESS_VARIABLE = "VIT_KERAS_PROGRESS"
# What quiet mode sets where the user has not: TensorFlow's C++ logging (and glog, which some
# native libraries use) without INFO and WARNING lines; gRPC (distributed runs) errors only.
QUIET_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "2", "GLOG_minloglevel": "2", "GRPC_VERBOSITY": "ERROR"}
# Python loggers that repeat TensorFlow's internals at INFO ("Assets written to: /tmp/...").
QUIET_LOGGERS = ("tensorflow", "absl", "tf2onnx", "h5py")

_state = {"quiet": False, "capturing": False, "display": None}


def is_quiet():
    """Whether this process silences TensorFlow's own output (a `vit-keras` command without --verbose)."""
    return _state["quiet"]


def invoked_as_command(argv=None, orig_argv=None):
    """Whether this process is the `vit-keras` command (the console script or `python -m vit_keras.cli`)."""
    argv = sys.argv if argv is None else argv
    orig_argv = getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv
    if argv and os.path.basename(str(argv[0])) in ("vit-keras", "vit-keras.exe"):
        return True
    return any(a == "-m" and b == "vit_keras.cli" for a, b in zip(orig_argv, orig_argv[1:]))


def command_words(argv):
    """`(verbose, command)` of `vit-keras` arguments: `--verbose` before the command, and the command."""
    options, command = [], None
    for word in argv:
        if not word.startswith("-"):
            command = word
            break
        options.append(word)
    return "--verbose" in options, command


def configure(verbose=False, command=None):
    """Silences TensorFlow's own output in this process unless `verbose` or the user set TF_CPP_MIN_LOG_LEVEL.

    Call it before TensorFlow is imported: the environment variables are read
    once, at import. Imports TensorFlow (with its import-time lines captured)
    when the command will use it. Returns whether the process is quiet.
    """
    mode = os.environ.get(MODE_VARIABLE)
    if verbose:
        mode = "verbose"
    elif mode not in ("quiet", "verbose"):
        mode = "verbose" if "TF_CPP_MIN_LOG_LEVEL" in os.environ else "quiet"
    os.environ[MODE_VARIABLE] = mode
    _state["quiet"] = mode == "quiet"
    if not _state["quiet"]:
        return False
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    quiet_loggers()
    if _uses_tensorflow(command):
        import_tensorflow()
    return True


def quiet_loggers():
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR if name == "absl" else logging.WARNING)


def _keras_backend():
    """The Keras backend this process will run, read as Keras reads it (without importing Keras)."""
    import json

    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            return json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def _uses_tensorflow(command):
    import importlib.util

    if "tensorflow" in sys.modules:
        return False
    try:
        if importlib.util.find_spec("tensorflow") is None:
            return False
    except (ImportError, ValueError):
        return False
    # Off the TensorFlow backend `export` runs in a TensorFlow process of its own and `attention`
    # needs no TensorFlow; `train` (TensorBoard), `evaluate` and `demo` import it on any backend.
    return _keras_backend() == "tensorflow" or command in ("train", "evaluate", "demo")


def import_tensorflow():
    """Imports TensorFlow with what it writes while loading (absl, oneDNN, CUDA lines) captured.

    The one thing among those lines a user must know becomes a line of ours:
    a CUDA build of TensorFlow that finds no GPU runs on the CPU.
    """
    with native_output("importing TensorFlow"):
        try:
            import tensorflow as tf
        except ImportError:
            return  # the command says so where it needs it
        try:
            no_gpu = tf.test.is_built_with_cuda() and not tf.config.list_physical_devices("GPU")
        except Exception:  # an odd build: no advice rather than a failed command
            no_gpu = False
    if no_gpu:
        say("vit-keras: TensorFlow was built for CUDA but finds no GPU; running on the CPU "
            "(vit-keras --verbose shows TensorFlow's reasons).")


@contextlib.contextmanager
def native_output(what):
    """Runs the block with the process's stdout and stderr (file descriptors 1 and 2) captured, when quiet.

    What C++ code writes there is kept: shown in full if the block raises,
    else reduced to one line per error line (`E0000 ...`, `ERROR: ...`).
    `Progress` bars and `say` still reach the user. Outside quiet mode, or
    nested, it does nothing.
    """
    if not _state["quiet"] or _state["capturing"]:
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        _flush(stream)
    try:
        saved = {fd: os.dup(fd) for fd in (1, 2)}
    except OSError:  # no such descriptors (an embedded interpreter): nothing to capture
        yield
        return
    sink = tempfile.TemporaryFile()
    display = os.fdopen(os.dup(saved[2]), "w", buffering=1, encoding="utf-8", errors="replace")
    _state.update(capturing=True, display=display)
    failed = False
    try:
        for fd in (1, 2):
            os.dup2(sink.fileno(), fd)
        yield
    except BaseException:
        failed = True
        raise
    finally:
        for stream in (sys.stdout, sys.stderr):
            _flush(stream)
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        _state.update(capturing=False, display=None)
        display.close()
        sink.seek(0)
        text = sink.read().decode("utf-8", "replace")
        sink.close()
        if failed and text.strip():
            say(f"vit-keras: what TensorFlow wrote while {what}:\n{text.rstrip()}")
        elif not failed:
            for line in error_lines(text):
                say(f"vit-keras: TensorFlow reported an error while {what}: {line}")


def _flush(stream):
    try:
        stream.flush()
    except (OSError, ValueError, AttributeError):
        pass


# absl/TensorFlow C++ log lines: severity letter, MMDD, time, thread, file:line] message.
_LOG_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ [^\]]+\] ?(.*)$")


def error_lines(text):
    """The messages of the error and fatal lines in captured TensorFlow output, once each."""
    found = []
    for line in text.splitlines():
        match = _LOG_LINE.match(line.strip())
        if match and match.group(1) in "EF":
            message = match.group(2).strip()
        elif line.startswith(("ERROR:", "FATAL:")):
            message = line.split(":", 1)[1].strip()
        else:
            continue
        if message and message not in found:
            found.append(message)
    return found


def display_stream():
    """Where our progress and messages go: stderr (the user's, also while `native_output` captures it)."""
    return _state["display"] or sys.stderr


def say(line):
    """Prints one of our lines to stderr (reaches the user while `native_output` captures)."""
    stream = display_stream()
    stream.write(line + "\n")
    _flush(stream)


def progress_enabled():
    return os.environ.get(PROGRESS_VARIABLE, "1").strip().lower() not in ("0", "false", "no", "off")


class _Titled(io.TextIOBase):
    """Progbar's output, with the phase's title at the start of each (re)drawn line."""

    def __init__(self, title):
        self.title = title

    def write(self, text):  # to where our lines go now (also while `native_output` captures)
        display_stream().write(text.replace("\r", f"\r{self.title()}: "))
        return len(text)

    def flush(self):
        _flush(display_stream())


class Progress:
    """Progress with counts of one phase of work: `done/total unit`, rate and time left.

    On a terminal it is a `keras.utils.Progbar` redrawn in place, titled; in a
    log (stderr not a terminal) it prints a line when a quarter of the work is
    done (at most one per `log_every` seconds) and one at the end, so a phase
    gives a few lines however many steps it has.

    Args:
        title: str. What is being done ("Checking images in data/").
        total: int. Steps in the phase.
        unit: str. What a step is ("file", "image"); shown as counts of it.
            Defaults to "step".
        enabled: bool. False shows nothing. Defaults to True (unless
            `VIT_KERAS_PROGRESS=0`).
        log_every: float. Least seconds between two log lines before the
            last. Defaults to 5.

    Example:
    >>> with Progress("Copying", 3, "file", enabled=False) as bar:
    ...     for i in range(3):
    ...         bar.update(i + 1)
    >>> bar.current
    3
    """

    def __init__(self, title, total, unit="step", enabled=True, log_every=5.0):
        self.title = title
        self.total = max(int(total), 0)
        self.unit = unit
        self.note = None
        self.current = 0
        self.log_every = log_every
        self.enabled = enabled and progress_enabled() and self.total > 0
        self.started = time.monotonic()
        self._logged_at = self.started
        self._quarter = 0
        self._bar = None
        self._finished = False
        if not self.enabled:
            return
        stream = display_stream()
        try:
            self.terminal = stream.isatty()
        except (AttributeError, ValueError, OSError):
            self.terminal = False
        if self.terminal:
            import keras

            self._stream = _Titled(self._heading)
            with contextlib.redirect_stdout(self._stream):
                self._bar = keras.utils.Progbar(self.total, unit_name=unit)
            self._draw([])

    def _heading(self):
        return f"{self.title} ({self.note})" if self.note else self.title

    def _draw(self, values):
        with contextlib.redirect_stdout(self._stream):
            self._bar.update(self.current, values=values, finalize=self.current >= self.total)

    def update(self, current, note=None, values=None):
        """Sets the count of steps done (and what is being done now, `note`; metrics `values` as Progbar's)."""
        if note is not None:
            self.note = note
        self.current = min(int(current), self.total) if self.total else int(current)
        if not self.enabled or self._finished:
            return
        if self.terminal:
            self._draw(values or [])
            self._finished = self.current >= self.total
            return
        now = time.monotonic()
        quarter = 4 * self.current // self.total
        if self.current >= self.total:
            self._finished = True
            elapsed = now - self.started
            rate = f" ({self._rate(self.current, elapsed)})" if elapsed >= 0.05 else ""
            say(f"{self.title}: {self.current:,}/{self.total:,} {self._units(self.total)} in "
                f"{_duration(elapsed)}{rate}{self._values(values)}")
        elif quarter > self._quarter and now - self._logged_at >= self.log_every:
            self._quarter, self._logged_at = quarter, now
            elapsed = now - self.started
            left = elapsed / self.current * (self.total - self.current)
            note = f" ({self.note})" if self.note else ""
            say(f"{self.title}{note}: {self.current:,}/{self.total:,} {self._units(self.total)}, "
                f"{_duration(elapsed)}, {self._rate(self.current, elapsed)}, about {_duration(left)} left"
                f"{self._values(values)}")

    def add(self, steps=1, note=None, values=None):
        """Counts `steps` more steps done."""
        self.update(self.current + steps, note=note, values=values)

    def finish(self):
        """Marks the phase complete (its last line in a log)."""
        if not self._finished:
            self.update(self.total)

    def _units(self, count):
        return self.unit if count == 1 else self.unit + "s"

    def _rate(self, count, seconds):
        per_second = count / max(seconds, 1e-9)
        if per_second >= 1:
            return f"{per_second:,.1f} {self._units(2)}/s"
        return f"{seconds / max(count, 1):.1f} s/{self.unit}"

    @staticmethod
    def _values(values):
        return "".join(f" - {name}: {value:.4f}" for name, value in values or [])

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is None:
            self.finish()
        elif self.enabled and self.terminal and not self._finished:
            say("")  # leave the interrupted bar's line
        return False


def _duration(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds // 60 % 60:02d} min"
