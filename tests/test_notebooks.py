"""Every notebook runs from top to bottom (with small settings) and is stored without outputs."""

import json
import pathlib

import nbclient
import nbformat
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "finetune", "export"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    raw = json.loads(path.read_text())
    assert all(not c.get("outputs") and not c.get("execution_count") for c in raw["cells"] if c["cell_type"] == "code")
    monkeypatch.setenv("VIT_KERAS_NOTEBOOK_EPOCHS", "1")
    monkeypatch.setenv("VIT_KERAS_NOTEBOOK_OUT", str(tmp_path))
    book = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(book, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in book.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
