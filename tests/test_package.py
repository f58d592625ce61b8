"""The package's shape: modules import only what sits above them; `import vit_keras` needs no TensorFlow."""

import ast
import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).parents[1]
PACKAGE = ROOT / "vit_keras"

# Name -> config -> model -> (train | evaluate | serve): each module may import (at module
# level) only modules of earlier levels. Functions import later ones lazily where they must.
LEVELS = [
    {"preprocessing", "presets", "files", "download", "console", "precision"},
    {"layers", "optimizers"},
    {"checkpoint", "sources"},
    {"model", "utils", "reshape"},
    {"vit", "features", "predict"},
    {"data", "distribute", "visualize", "image_check", "finetune"},
    {"training", "evaluate", "serving"},
    {"export", "cli"},
]


def _level(module):
    top = module.split(".")[0]
    return next(i for i, names in enumerate(LEVELS) if top in names)


def _module_imports(path):
    """The vit_keras modules a file imports at module level (not inside functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vit_keras"):
            parts = node.module.split(".")[1:]
            found |= {parts[0]} if parts else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("vit_keras.")}
    return found


def test_no_module_imports_one_below_it():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        if rel.parts == ("__init__",):
            continue
        own = rel.parts[0]
        for name in _module_imports(path) - {own}:
            if _level(name) > _level(own):
                wrong.append(f"{'/'.join(rel.parts)} imports {name}")
    assert not wrong, wrong


def test_import_without_tensorflow_exposes_the_submodules():
    """On JAX with TensorFlow hidden: the package, its lazy submodules and a small model work."""
    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, "tests")
        import no_tensorflow
        no_tensorflow.install()
        import vit_keras
        for name in ("training", "visualize", "data", "serving", "predict", "features", "cli"):
            getattr(vit_keras, name)
        model = vit_keras.create("vit_tiny16", classes=3, image_size=32)
        feats = vit_keras.features_model(model)(vit_keras.preprocess_inputs(__import__("numpy").zeros((1, 32, 32, 3))))
        assert tuple(feats["encoder"].shape) == (1, 2, 2, 64)
        assert not no_tensorflow.imported()
        print("ok")
    """)
    env = dict(os.environ, KERAS_BACKEND="jax")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
