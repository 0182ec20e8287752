"""One source for runtimes: tools/runtimes.json → each notebook's RUNTIME (its first printed line), its header's
**Runtime** paragraph and the README's table; a figure only from a run that trained everything."""

from __future__ import annotations

import re
import sys

import nbformat
import pytest

from conftest import NOTEBOOKS, ROOT
from nbload import load_lib

sys.path.insert(0, str(ROOT / "tools"))
import runtimes  # noqa: E402  (tools/runtimes.py)


def test_notebooks_and_readme_quote_the_recorded_runtimes():
    assert runtimes.apply(runtimes.load(), write=False) == [], "run python3 tools/runtimes.py"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_first_printed_line_and_the_header_say_the_same(name):
    module = load_lib(name)
    entries = runtimes.load().get(name.removesuffix(".ipynb"), {})
    assert set(module.RUNTIME) == {"smoke", "cpu", "full"}
    title = nbformat.read(ROOT / name, as_version=4).cells[0].source
    for profile in ("smoke", "cpu", "full"):
        assert module.RUNTIME[profile] == runtimes.short(entries.get(profile), profile)
        assert f"`{profile}` {module.RUNTIME[profile]}" in title
    text = "\n".join(c.source for c in nbformat.read(ROOT / name, as_version=4).cells if c.cell_type == "code")
    assert re.search(r"describe_run\([^)]*RUNTIME\[PROFILE\]", text), f"{name}: the first line prints RUNTIME"
    assert "runtime=" not in text, f"{name}: a second runtime text beside RUNTIME"


def test_reference_minutes_hand_worked():
    entry = {"seconds": 1108.0, "date": "2026-12-02", "machine": "2-core Xeon", "factor": 0.9}
    assert runtimes.short(entry, "cpu") == "≈ 21 reference min (1,108 s on 2-core Xeon, 2026-12-02)"  # 20.5 min
    assert runtimes.short(entry | {"seconds": 41.6}, "smoke") == "≈ 42 s after imports (2-core Xeon, 2026-12-02)"
    assert runtimes.short(None, "full") == "not measured yet"


def test_only_a_fresh_run_on_real_data_is_a_figure():
    fresh = {"notebook": "homework_5", "profile": "cpu", "seconds": 458.04, "runs_loaded": 0, "runs_trained": 8,
             "data_source": "real", "precision": "bf16", "torch": "2.14.1"}
    data = runtimes.record({}, fresh, {"mlp": 0.65}, "2-core Xeon", "MNIST slice")
    assert data["homework_5"]["cpu"]["seconds"] == 458.0 and data["homework_5"]["cpu"]["factor"] == 0.65
    with pytest.raises(runtimes.NotAFigure, match="loaded from the run store"):
        runtimes.record({}, fresh | {"runs_loaded": 3}, {}, "m", "d")
    with pytest.raises(runtimes.NotAFigure, match="real data"):
        runtimes.record({}, fresh | {"data_source": "synthetic"}, {}, "m", "d")
    with pytest.raises(SystemExit, match="mlp=F"):
        runtimes.parse_factors("mlp 0.65")
