"""The documentation works: the example notebook runs, and the reference pages match the code."""

import os

import nbformat
import pytest
from conftest import REPO, run_dir_of
from nbclient import NotebookClient

NOTEBOOK = REPO / "examples" / "grokking_tour.ipynb"


def test_example_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_example_notebook_runs_top_to_bottom_on_a_run(trained_grid, monkeypatch):
    """Executed as a researcher would (a real Jupyter kernel), on a tiny trained run."""
    run = run_dir_of(trained_grid["workdir"], 7, 0)
    monkeypatch.setenv("GROKPIPE_RUN", str(run))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    client.execute(env={**os.environ, "MPLBACKEND": "module://matplotlib_inline.backend_inline"})
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "tiny_p7_seed0: p = 7, operation add, 3 checkpoints (9 .. 29)" in text
    assert "epoch 29: train accuracy" in text
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 4  # curves, Fourier norms, progress measures, attention pattern
    if not (run / "artifacts" / "progress_measures.csv").exists():
        pytest.fail("the workflow wrote no progress measures for the notebook to read")
