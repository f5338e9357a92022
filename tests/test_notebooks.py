"""Every notebook in notebooks/ is stored without outputs and executes without error on the zoo, each in a fresh
kernel running this interpreter (this venv)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
KERNEL = "interp-tests"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory, monkeypatch_module):
    """A kernelspec named KERNEL that starts ipykernel with sys.executable, first on JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "interp tests", "language": "python"}))
    monkeypatch_module.setenv("JUPYTER_PATH", str(root))
    return KERNEL


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_notebooks_exist_and_are_stored_without_outputs():
    import nbformat

    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "tuco", "circuits", "intruders", "shift", "lid", "weights",
                                         "diffing"}
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        nbformat.validate(book)
        code = [c for c in book.cells if c.cell_type == "code"]
        assert code and all(not c.outputs and c.execution_count is None for c in code), path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, kernel, zoo_built, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=600, kernel_name=kernel, resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert any(o.output_type == "display_data" and "image/png" in o.data
               for c in book.cells if c.cell_type == "code" for o in c.outputs), f"{path.name} shows no figure"
