"""Every notebook under notebooks/ executes top to bottom (on CPU at the notebooks' small default sizes)."""

from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient", reason='install the "notebooks" extra (CI does, through "dev")')
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    # The notebook shows usage on a real model; interpreting the kernels through 30 layers would take many minutes,
    # and they are tested against the reference elsewhere, so its CPU run takes the PyTorch reference path.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("QUICKSTART_CONTEXT_LENGTHS", "256")
    monkeypatch.setenv("QUICKSTART_PPL_TOKENS", "512")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
