"""The package's shape: modules import only what sits above them; `import vit_keras` needs no TensorFlow."""

import ast
import os
import pathlib
import re
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).parents[1]
PACKAGE = ROOT / "vit_keras"

# Name -> config -> model -> (train | evaluate | serve): each module may import (at module
# level) only modules of earlier levels. Functions import later ones lazily where they must.
LEVELS = [
    {"preprocessing", "presets", "files", "download", "console", "sizes", "options", "precision"},
    {"layers", "optimizers"},
    {"checkpoint", "sources"},
    {"model", "utils", "reshape"},
    {"vit", "features", "predict", "loader"},
    {"data", "distribute", "visualize", "image_check", "finetune"},
    {"training", "evaluate", "serving"},
    {"export", "cli"},
]


def _level(module):
    top = module.split(".")[0]
    return next(i for i, names in enumerate(LEVELS) if top in names)


def _module_imports(path, package="vit_keras"):
    """The modules of `package` a file imports at module level (not inside functions)."""
    depth = package.count(".") + 1
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package):
            parts = node.module.split(".")[depth:]
            found |= {parts[0]} if parts else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[depth] for a in node.names if a.name.startswith(package + ".")}
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


def _readme_layout():
    """The modules in the order the README's "Layout" lists them."""
    block = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("```")[1]
    return re.findall(r"^vit_keras/(\w+)", block, re.M)


def test_the_readme_layout_lists_every_module_below_what_it_imports():
    """The README says a module imports only the ones above it in its list: a newcomer reads it top down."""
    order = _readme_layout()
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert set(order) == {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"} | packages
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = path.relative_to(PACKAGE).with_suffix("").parts[0]
        if own != "__init__":
            wrong += [f"{own} imports {name}" for name in _module_imports(path) - {own}
                      if order.index(name) > order.index(own)]
    assert not wrong, wrong


# Inside the `data` package: images (helpers) -> datasets (sources) -> numpy_pipeline -> pipeline.
DATA_LEVELS = ["images", "datasets", "numpy_pipeline", "pipeline"]


def _data_imports(path):
    """The `vit_keras.data` submodules a file imports at module level."""
    return _module_imports(path, "vit_keras.data")


def test_data_modules_import_only_the_ones_before_them():
    modules = {p.stem for p in (PACKAGE / "data").glob("*.py")} - {"__init__"}
    assert modules == set(DATA_LEVELS)
    wrong = [f"data/{name}.py imports data.{other}" for name in DATA_LEVELS
             for other in _data_imports(PACKAGE / "data" / f"{name}.py")
             if DATA_LEVELS.index(other) >= DATA_LEVELS.index(name)]
    assert not wrong, wrong


def _private_uses_of_data(path):
    """`data._x` attribute uses and `from vit_keras.data... import _x` in a file."""
    tree = ast.parse(path.read_text())
    aliases, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "vit_keras":
                aliases |= {a.asname or a.name for a in node.names if a.name == "data"}
            elif node.module.startswith("vit_keras.data"):
                aliases |= {a.asname or a.name for a in node.names if a.name in DATA_LEVELS}
                found += [f"imports {a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name.startswith("vit_keras.data") and a.asname}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            value = node.value
            if isinstance(value, ast.Name) and value.id in aliases or (
                    isinstance(value, ast.Attribute) and value.attr == "data"
                    and isinstance(value.value, ast.Name) and value.value.id == "vit_keras"):
                found.append(f"uses {node.attr}")
    return found


def test_no_module_reaches_into_the_privates_of_data():
    """Other modules use `vit_keras.data`'s public names only (`evaluate` used `data._decode`)."""
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name != "data":
            wrong += [f"{path.relative_to(PACKAGE)} {use}" for use in _private_uses_of_data(path)]
    assert not wrong, wrong


def test_the_layering_check_sees_a_reach_into_data(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from vit_keras import data as data_lib\nfrom vit_keras.data.images import _tf\n"
                   "def f(x):\n    from vit_keras import data\n    return data._decode(x), data_lib._tf()\n")
    assert sorted(_private_uses_of_data(bad)) == ["imports _tf", "uses _decode", "uses _tf"]


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
