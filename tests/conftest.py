"""Shared helpers: the Flax reference fixtures and tiny models built from their configs."""

import json
import os
import pathlib
import tempfile

# Downloads in tests land in a throw-away Keras home (read once, at keras import).
os.environ.setdefault("KERAS_HOME", tempfile.mkdtemp(prefix="vit_keras_home_"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "vit_jax"

# Scripts that tests run in subprocesses; importing them (--doctest-modules) would run them.
collect_ignore = ["backend_run.py", "backend_train_run.py", "distributed_run.py", "finetune_run.py", "recipe_run.py",
                  "trained_files_run.py",
                  "upstream_multi_worker.py"]
# The fixtures' generator scripts run timm, transformers or Orbax in venvs of their own.
collect_ignore_glob = ["fixtures/*/generate.py"]
CASES = ["tiny_vit", "tiny_r50", "tiny_r50_posemb", "tiny_vit_gap", "tiny_rti"]

# Modules that train, export, start processes or build full-size models: `make check` (the fast
# lane, `-m "not slow"`) leaves them to `make test`.
SLOW_MODULES = {
    "test_backends", "test_bad_inputs_training", "test_distributed", "test_evaluate", "test_export",
    "test_full_size", "test_hostile_serving_round2", "test_hostile_training_round2", "test_notebooks", "test_onnx",
    "test_published", "test_readme", "test_tflite", "test_trained_files", "test_training", "test_visualize",
}


# `make test` runs the suite in two processes (pytest-xdist): each module is one unit of work, so its
# module-scoped fixtures (trained models, exports) are made once, and the modules that use the session's demo
# training (`demo_run`, ~3.5 minutes) are one unit together, so it trains once. (xdist's own `loadgroup` does not
# group under pytest 9: it renames node ids, which pytest 9 ignores.)
DEMO_MODULES = {"test_bfloat16", "test_export", "test_visualize"}
DEMO_EPOCHS = 40
LONG_FAST_MODULES = {"test_finetune", "test_console", "test_features"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        stem = item.path.stem
        if stem in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        if "demo_run" in getattr(item, "fixturenames", ()) and stem not in DEMO_MODULES:
            raise pytest.UsageError(f"{item.nodeid} uses demo_run: add {stem} to DEMO_MODULES in tests/conftest.py")
    # The longest units of work first, the many short modules last, so the two processes end together: the demo
    # unit, the slow modules, the fast lane's longest (30-130 s each), then the rest (a stable sort: each module's
    # tests keep their order).
    items.sort(key=lambda item: (item.path.stem not in DEMO_MODULES, item.path.stem not in SLOW_MODULES,
                                 item.path.stem not in LONG_FAST_MODULES))


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # keep the order above (xdist would sort units by their test count)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            path = nodeid.split("::", 1)[0]
            return "demo" if pathlib.Path(path).stem in DEMO_MODULES else path

    return ByModule(config, log)


class Case:
    """One reference case: its config, params path, inputs and expected outputs."""

    def __init__(self, name):
        self.name = name
        self.dir = FIXTURES / name
        self.meta = json.loads((self.dir / "meta.json").read_text())
        self.params = self.dir / "params.npz"
        self.images = np.load(self.dir / "inputs.npz")["images"]
        with np.load(self.dir / "expected.npz") as e:
            self.expected = {k: e[k] for k in e.files}
        size = self.meta["image_size_eval"]
        self.image_size = size if isinstance(size, int) else tuple(size)

    def config(self, **overrides):
        """`build_model` arguments of this case's original config."""
        c = self.meta["vit_jax_model_config"]
        t = c["transformer"]
        resnet = c.get("resnet")
        args = dict(
            image_size=self.image_size,
            patch_size=c["patches"]["size"][0],
            num_layers=t["num_layers"],
            hidden_size=c["hidden_size"],
            num_heads=t["num_heads"],
            mlp_dim=t["mlp_dim"],
            classes=self.meta["num_classes"],
            dropout=0.0,
            representation_size=c["representation_size"],
            resnet_layers=resnet and tuple(resnet["num_layers"]),
            resnet_width_factor=resnet["width_factor"] if resnet else 1,
            classifier=c.get("classifier", "token"),
        )
        args.update(overrides)
        return args

    def model(self, **overrides):
        import vit_keras

        return vit_keras.build_model(weights=str(self.params), **self.config(**overrides))


@pytest.fixture(scope="session", params=list(CASES))
def case(request):
    return Case(request.param)


def _case_fixture(name):
    return pytest.fixture(scope="session", name=name)(lambda: Case(name))


tiny_vit = _case_fixture("tiny_vit")
tiny_r50 = _case_fixture("tiny_r50")
tiny_vit_gap = _case_fixture("tiny_vit_gap")
tiny_rti = _case_fixture("tiny_rti")


def assert_close(actual, expected, atol, what=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = float(np.abs(actual - expected).max())
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol:.3g}"


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The README's demo training (small hybrid on digits), run once per test session: 40 of its 60 epochs, which
    reach the same 98.6 % test top-1 in two thirds of the time (`benchmarks/RESULTS.md`, "The demo on JAX")."""
    from vit_keras import training

    out = tmp_path_factory.mktemp("demo")
    result = training.train(training.DEMO, out=str(out), epochs=DEMO_EPOCHS, verbose=0)
    return out, result
