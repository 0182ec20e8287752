"""After the smoke runs: each notebook run again from the run store trains nothing and prints the same numbers.

Runs after the notebooks (see conftest): nbval's smoke run of each notebook filled the store in the session's
temporary DLCV_CACHE_DIR; this second run shares that store and writes its results to another folder. A
notebook not executed in this session (``pytest tests/``) is skipped.
"""

from __future__ import annotations

import json

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import NOTEBOOKS, ROOT


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_a_second_run_loads_every_training_run_and_gives_the_same_results(name, results_dir, notebooks_run,
                                                                         monkeypatch, tmp_path):
    if name not in notebooks_run:
        pytest.skip(f"{name} was not executed in this session (run a bare `pytest`)")
    stem = name.removesuffix(".ipynb")
    first = json.loads((results_dir / f"{stem}.json").read_text())
    monkeypatch.setenv("DLCV_RESULTS_DIR", str(tmp_path))
    nb = nbformat.read(ROOT / name, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    second = json.loads((tmp_path / f"{stem}.json").read_text())
    # the first run trained what no earlier run of this session had (a student edition stops at its first
    # exercise, after training what comes before it); the second trains nothing
    assert first["runs_trained"] > 0, "the first run trained nothing"
    assert second["runs_trained"] == 0, f"trained again: {[k for k, a in second['runs'].items() if not a['loaded']]}"
    assert second["runs_loaded"] == first["runs_loaded"] + first["runs_trained"]
    assert second["runs"].keys() == first["runs"].keys()
    differ = sorted(k for k in first["metrics"] if first["metrics"][k] != second["metrics"].get(k))
    assert not differ, f"{name}: metrics {differ} differ between the fresh run and the run from the store"
    assert second["lessons"] == first["lessons"]
    said = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"training runs: {second['runs_loaded']} loaded from the store, 0 trained" in said
