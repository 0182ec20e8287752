"""The T4 path on a CPU: one notebook run whole in `smoke` with DLCV_PRECISION=fp16 (fp16 autocast and a
gradient scaler), as Kaggle's T4 runs every notebook. The other notebooks' training steps go through the same
shared `optimizer_step`; each notebook's own tests drive its training step through fp16 with a forced overflow.
"""

from __future__ import annotations

import json

import nbformat
from nbclient import NotebookClient

from conftest import ROOT

FP16_NOTEBOOK = "homework_5.ipynb"  # the shortest smoke run; the shared step is the same in all five


def test_a_whole_notebook_runs_on_the_fp16_path(monkeypatch, tmp_path):
    monkeypatch.setenv("DLCV_PRECISION", "fp16")
    monkeypatch.setenv("DLCV_RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv("DLCV_CACHE_DIR", str(tmp_path / "cache"))  # its own run store: fp16 runs are other runs
    nb = nbformat.read(ROOT / FP16_NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    results = json.loads((tmp_path / FP16_NOTEBOOK.replace(".ipynb", ".json")).read_text())
    assert results["precision"] == "fp16" and results["profile"] == "smoke"
    assert results["runs_trained"] > 0 and results["runs_loaded"] == 0
    first_line = next(o.text for c in nb.cells if c.cell_type == "code" for o in c.outputs
                      if o.output_type == "stream" and "precision=" in o.text)
    assert "precision=fp16 (forced by DLCV_PRECISION)" in first_line
