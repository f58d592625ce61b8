"""`install()` makes `import tensorflow` fail in this process, as where TensorFlow is not installed.

Used by the subprocess scripts of tests/test_backends.py (tests/backend_run.py,
tests/backend_train_run.py) to show that the package needs no TensorFlow off
the TensorFlow backend.
"""

import importlib.abc
import importlib.machinery
import sys


class NoTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import tensorflow` (and its submodules) raises `ModuleNotFoundError`.

    `find_spec` still answers (with a loader that fails), since some libraries
    (torch._dynamo) only ask whether a module exists.
    """

    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r} (hidden by tests/no_tensorflow.py)",
                                  name=spec.name)

    def exec_module(self, module):  # never reached
        raise ModuleNotFoundError(module.__name__)


def install():
    """Hides TensorFlow from this process's imports; fails if it is imported already."""
    loaded = imported()
    if loaded:
        raise RuntimeError(f"TensorFlow is imported already: {loaded[:3]}")
    sys.meta_path.insert(0, NoTensorFlow())


def imported():
    """The TensorFlow modules this process has imported."""
    return sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
