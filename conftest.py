"""The test environment, fixed before anything else runs (pytest loads this file for every run in the
repository, also `python3 -m pytest homework_3.ipynb` alone, and before any notebook kernel starts, so
the kernels inherit it):

* ``DLCV_PROFILE=smoke``: small data, short runs, every section still runs;
* ``DLCV_RESULTS_DIR``: a temporary folder, checked by ``tests/test_results.py`` after the notebooks ran;
* ``DLCV_OFFLINE=1`` and a temporary ``DLCV_CACHE_DIR``: no download is tried, so the run is the same
  with or without a network, and the notebooks fall back to their synthetic stand-in data;
* ``DLCV_DATA_DIR``, ``DLCV_WEIGHTS_DIR``, ``DLCV_PRECISION`` and ``DLCV_THREADS`` are removed, so nothing
  outside the repository and the temporary folder is read and the notebooks decide as they would for a user.

The fixtures and the test ordering live in tests/conftest.py.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_TMP = Path(tempfile.mkdtemp(prefix="dlcv-pytest-"))
(_TMP / "results").mkdir()

os.environ["DLCV_PROFILE"] = "smoke"
os.environ["DLCV_RESULTS_DIR"] = str(_TMP / "results")
os.environ["DLCV_CACHE_DIR"] = str(_TMP / "cache")
os.environ["DLCV_OFFLINE"] = "1"
for _name in ("DLCV_DATA_DIR", "DLCV_WEIGHTS_DIR", "DLCV_PRECISION", "DLCV_THREADS"):
    os.environ.pop(_name, None)
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
