"""Every code block of README.md runs: Python blocks as doctests, command lines through the real parsers.

The Python blocks run top to bottom in one namespace from the repository root, as
a reader would paste them. The one download they make (R50+ViT-B/16's ImageNet-21k
file) is served from the cache, seeded with a random checkpoint of the published
file's keys and shapes: the code path is the real one (cache lookup, `.npz` checks,
loading, position-embedding resize, new head), only the network is not.
"""

import dataclasses
import doctest
import os
import pathlib
import re
import shlex

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = [(m.group(1), m.group(2), README[:m.start()].count("\n") + 2)
          for m in re.finditer(r"```(\w*)\n(.*?)```", README, re.S)]


def seed_checkpoint(model, weights):
    """Writes a random checkpoint with the published file's keys and shapes where the download cache looks."""
    import vit_keras
    from vit_keras import checkpoint, download, presets

    preset = presets.find_preset(model, weights)
    config = dataclasses.replace(vit_keras.get_config(model), representation_size=768)  # the 2020 i21k files have it
    shapes = {k: tuple(v.shape) for k, (v, _) in checkpoint.checkpoint_variables(
        vit_keras.create(config, classes=preset.classes, image_size=preset.resolution)).items()}
    rng = np.random.default_rng(0)
    arrays = {k: (np.ones(s, "float32") if k.endswith("scale") else
                  rng.normal(0, 0.02, s).astype("float32")) for k, s in shapes.items()}
    path = download.cache_path(preset.url)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, **arrays)
    return path


def test_python_blocks_run_as_doctests(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.chdir(ROOT)
    seed_checkpoint("vit_r50_b16", "imagenet21k")
    python = [(code, line) for lang, code, line in BLOCKS if lang == "python"]
    assert len(python) >= 3
    globs = {}
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for code, line in python:
        test = parser.get_doctest(code, globs, f"README.md:{line}", str(ROOT / "README.md"), line)
        assert test.examples, f"README.md:{line}: a python block without examples"
        runner.run(test, clear_globs=False)
        globs = test.globs  # a DocTest runs on a copy: carry the names on to the next block
    assert runner.failures == 0, f"{runner.failures} README example(s) failed (see the output above)"


def _commands(lang):
    """The command lines of the shell blocks, continuation lines joined, comments dropped."""
    lines = []
    for kind, code, line in BLOCKS:
        if kind != lang:
            continue
        for command in re.sub(r"\\\n\s*", " ", code).splitlines():
            command = command.split("  #")[0].split(" # ")[0].strip()
            if command and not command.startswith("#"):
                lines.append((command, line))
    return lines


def test_command_lines_parse():
    """Every `vit-keras` line parses with the real parser; `make` targets and scripts exist."""
    from vit_keras import cli

    commands = _commands("bash")
    seen = set()
    for command, line in commands:
        words = shlex.split(command)
        if words[0] == "vit-keras":
            try:
                args = cli.parser().parse_args(words[1:])
            except SystemExit:
                pytest.fail(f"README.md:{line}: {command!r} does not parse")
            seen.add(args.command)
        elif words[0] == "make":
            makefile = (ROOT / "Makefile").read_text()
            assert re.search(rf"^{re.escape(words[1])}:", makefile, re.M), f"README.md:{line}: no make target"
            seen.add("make")
        elif words[0] == "python":
            assert (ROOT / words[1]).is_file(), f"README.md:{line}: no script {words[1]}"
            seen.add("python")
        elif words[:2] == ["pip", "install"]:
            extras = re.findall(r"\[([\w,]+)\]", command)
            config = (ROOT / "setup.cfg").read_text()
            for extra in ",".join(extras).split(","):
                assert re.search(rf"^{extra} =", config, re.M), f"README.md:{line}: no extra {extra!r}"
            seen.add("pip")
    assert {"train", "export", "make", "pip"} <= seen, seen
