"""Test configuration shared by the unit tests and the notebook runs.

Every notebook is executed by nbval (``--nbval-lax``) in the ``smoke`` profile. The environment is
fixed here, at import time, before any kernel starts, so the kernels inherit it:

* ``DLCV_PROFILE=smoke``: small data, 1-2 epochs, every section still runs;
* ``DLCV_RESULTS_DIR``: a temporary folder, checked by ``test_results.py`` after the notebooks ran;
* ``DLCV_OFFLINE=1`` and a temporary ``DLCV_CACHE_DIR``: no download is tried, so the run is the same
  with or without a network, and the notebooks fall back to their synthetic stand-in data;
* ``DLCV_DATA_DIR`` and ``DLCV_WEIGHTS_DIR`` are removed, so nothing outside the repository and the
  temporary folder is read.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

_TMP = Path(tempfile.mkdtemp(prefix="dlcv-pytest-"))
RESULTS_DIR = _TMP / "results"
RESULTS_DIR.mkdir()

os.environ["DLCV_PROFILE"] = "smoke"
os.environ["DLCV_RESULTS_DIR"] = str(RESULTS_DIR)
os.environ["DLCV_CACHE_DIR"] = str(_TMP / "cache")
os.environ["DLCV_OFFLINE"] = "1"
os.environ.pop("DLCV_DATA_DIR", None)
os.environ.pop("DLCV_WEIGHTS_DIR", None)
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")

NOTEBOOKS = sorted(p.name for p in ROOT.glob("homework_*.ipynb"))

collect_ignore_glob = ["*-checkpoint.ipynb", "results/*", ".ipynb_checkpoints/*"]


def pytest_collection_modifyitems(session, config, items):
    """Run the unit tests first, the notebooks next, and the results check last.

    ``test_results.py`` inspects what the notebooks wrote, so it must come after them; it records
    which notebooks were collected in this session so that ``pytest tests/`` alone skips it.
    """

    def rank(item):
        path = Path(str(item.fspath))
        if path.suffix == ".ipynb":
            return 1
        if path.name == "test_results.py":
            return 2
        return 0

    items.sort(key=rank)
    config.dlcv_notebooks_run = {Path(str(i.fspath)).name for i in items if str(i.fspath).endswith(".ipynb")}


@pytest.fixture(scope="session")
def results_dir() -> Path:
    return RESULTS_DIR


@pytest.fixture(scope="session")
def notebooks_run(pytestconfig) -> set[str]:
    return getattr(pytestconfig, "dlcv_notebooks_run", set())
