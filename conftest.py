"""The test environment, fixed before anything else runs (pytest loads this file for every run in the
repository, also `python3 -m pytest homework_3.ipynb` alone, and before any notebook kernel starts, so
the kernels inherit it):

* ``DLCV_PROFILE=smoke``: small data, short runs, every section still runs;
* ``DLCV_DATA_DIR``: a temporary folder into which ``tests/synthetic.py`` writes small synthetic stand-ins
  of all four datasets in their real layouts (each marked with a ``SYNTHETIC`` file, so the notebooks
  report ``data_source: synthetic``). The notebooks themselves contain no synthetic data;
* ``DLCV_RESULTS_DIR``: a temporary folder, checked by ``tests/test_results.py`` after the notebooks ran;
* ``DLCV_OFFLINE=1`` and a temporary ``DLCV_CACHE_DIR``: no download is tried;
* ``DLCV_PRECISION`` is removed, so the notebooks decide precision as they would for a user.

The temporary folder is removed when the test session ends. Fixtures and test ordering: tests/conftest.py.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

_TMP = Path(tempfile.mkdtemp(prefix="dlcv-pytest-"))
(_TMP / "results").mkdir()

os.environ["DLCV_PROFILE"] = "smoke"
os.environ["DLCV_RESULTS_DIR"] = str(_TMP / "results")
os.environ["DLCV_CACHE_DIR"] = str(_TMP / "cache")
os.environ["DLCV_DATA_DIR"] = str(_TMP / "data")
os.environ["DLCV_OFFLINE"] = "1"
os.environ.pop("DLCV_PRECISION", None)
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))
import synthetic  # noqa: E402  (tests/synthetic.py, importable only after the path is set)

synthetic.write_all(_TMP / "data")


def pytest_unconfigure(config):
    """Remove the temporary data, results and cache when the session ends (also after a failure)."""
    shutil.rmtree(_TMP, ignore_errors=True)
