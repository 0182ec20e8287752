"""Fixtures and ordering shared by the unit tests and the notebook runs.

Every notebook is executed by nbval (``--nbval-lax``) in the ``smoke`` profile; the environment for that
(smoke profile, offline, temporary results and cache folders) is set by the repository's root
``conftest.py``, which pytest loads first, before any kernel starts.
"""

from __future__ import annotations

import http.server
import os
import shutil
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS_DIR = Path(os.environ["DLCV_RESULTS_DIR"])  # set by the root conftest.py

NOTEBOOKS = sorted(p.name for p in ROOT.glob("homework_*.ipynb"))

collect_ignore_glob = ["*-checkpoint.ipynb", "results/*", ".ipynb_checkpoints/*"]


def pytest_collection_modifyitems(session, config, items):
    """Run the unit tests first, the notebooks next, and the results check last.

    ``test_results.py`` and ``test_rerun.py`` use what the notebooks wrote (results, run store), so they come
    after them; it records
    which notebooks were collected in this session so that ``pytest tests/`` alone skips it.
    """

    def rank(item):
        path = Path(str(item.fspath))
        if path.suffix == ".ipynb":
            return 1
        if path.name in ("test_results.py", "test_rerun.py"):
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


# --- a file server on 127.0.0.1 for the download tests (nothing else is contacted) ----------------------------
@dataclass
class Loopback:
    """What the server serves: ``routes[path] = (body, declared Content-Length or None)``; ``hits``: paths asked."""

    url: str = ""
    routes: dict = field(default_factory=dict)
    hits: list = field(default_factory=list)


@pytest.fixture()
def loopback():
    """A threaded HTTP server on 127.0.0.1 for one test: 404 for unknown paths, a declared Content-Length
    that may differ from the body (to simulate a truncated download)."""
    state = Loopback()

    class Files(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            state.hits.append(self.path)
            body, declared = state.routes.get(self.path, (None, None))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(declared if declared is not None else len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


# --- tools the lint tests run: found on PATH or beside this Python (a venv used without activating it) ---------
def tool(name: str) -> str:
    """The path of command `name`. Missing: the test fails under CI=true (CI installs requirements-dev.txt, so a
    missing linter there is a broken install, not a reason to pass) and is skipped elsewhere, with the fix."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    message = f"{name} is not installed: pip install -r requirements-dev.txt"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: lint may not be skipped)")
    pytest.skip(message)
