"""Hygiene of the committed notebooks: clean, tagged, parameterisable, linted, self-contained."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from conftest import NOTEBOOKS, ROOT, tool
from nbload import cells_with_tag, load_lib

pytestmark = pytest.mark.skipif(not NOTEBOOKS, reason="no homework notebook written yet")


def _read(name):
    return nbformat.read(ROOT / name, as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_valid_and_committed_without_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{name}: cells {dirty} carry outputs or execution counts; clear them before committing"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{name}: kernelspec must be python3"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_starts_with_title_then_parameters_cell(name):
    nb = _read(name)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.lstrip().startswith("# "), (
        f"{name}: the first cell must be the markdown title"
    )
    tagged = cells_with_tag(nb, "parameters")
    assert len(tagged) == 1, f"{name}: exactly one code cell must be tagged 'parameters', found {len(tagged)}"
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert first_code is tagged[0], f"{name}: the parameters cell must be the first code cell"
    scope: dict = {}
    exec(tagged[0].source, scope)
    assert "PROFILE" in scope and scope["PROFILE"] is None, (
        f"{name}: the parameters cell must set PROFILE = None (the environment decides by default)"
    )


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_papermill_can_set_the_profile(name):
    """`papermill -p PROFILE smoke` injects its cell right after ours and wins."""
    pytest.importorskip("papermill")
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    nb = parameterize_notebook(load_notebook_node(str(ROOT / name)), {"PROFILE": "cpu"})
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "injected-parameters" in code[1].metadata.get("tags", []), f"{name}: papermill injected elsewhere"
    scope: dict = {}
    exec(code[0].source, scope)
    exec(code[1].source, scope)
    assert scope["PROFILE"] == "cpu"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_lib_cells_are_definitions_only(name):
    """Cells tagged `lib` must be importable by the tests without running anything heavy."""
    nb = _read(name)
    cells = cells_with_tag(nb, "lib")
    assert cells, f"{name}: tag the cells holding its definitions 'lib' so tests can load them"
    allowed = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)
    for cell in cells:
        for node in ast.parse(cell.source).body:
            docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            assert isinstance(node, allowed) or docstring, (
                f"{name}: a lib cell holds a top-level {type(node).__name__} at line {node.lineno}; "
                "lib cells only define things (imports, constants, functions, classes)"
            )
    module = load_lib(name)
    assert module.NOTEBOOK == name.removesuffix(".ipynb")
    assert set(module.CONFIGS) == {"smoke", "cpu", "full"}, f"{name}: CONFIGS needs smoke, cpu and full"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_self_contained(name):
    """A notebook must run as the only file present: no developer-only data folder, no local modules."""
    text = (ROOT / name).read_text()
    dev_data = "/".join(["..", "shared"])  # the developers' data slices, absent from a user's clone
    assert dev_data not in text, f"{name}: names {dev_data}, which a user's clone does not have"
    nb = _read(name)
    local = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if p.is_dir()}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(cell.source)
        except SyntaxError:
            continue  # cells with IPython magics; nbval runs them
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for mod in names:
                    assert mod.split(".")[0] not in local - {"tests"} or mod.split(".")[0] == "", (
                        f"{name}: imports {mod}, a file of this repository; notebooks are self-contained"
                    )


def test_lint():
    """ruff over tests/ and tools/ and, through nbqa, over the notebooks (install requirements-dev.txt)."""
    out = subprocess.run([tool("ruff"), "check", "conftest.py", "tests", "tools"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run([tool("nbqa"), "ruff", *NOTEBOOKS], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PATH": f"{Path(tool('ruff')).parent}{os.pathsep}{os.environ['PATH']}"})
    assert out.returncode == 0, out.stdout + out.stderr


def test_lint_cannot_pass_by_skipping_in_ci(monkeypatch):
    """Under CI=true a missing linter fails the test (a skip would let unlinted code land)."""
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        tool("ruff")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="pip install -r requirements-dev.txt"):
        tool("actionlint")


# --- reading order (contract v2): the topic within three screens, plumbing collapsed ------------------------
MAX_CELL_LINES = 60
SCREEN = 50  # lines a reader sees at once, about
SCREENS_OF_SETUP = 3 * SCREEN  # three screens


def _tags(cell):
    return cell.get("metadata", {}).get("tags", [])


def _setup_section(nb):
    """The cells tagged `setup`: they must follow the parameters cell without a gap."""
    start = next(i for i, c in enumerate(nb.cells) if "parameters" in _tags(c)) + 1
    end = start
    while end < len(nb.cells) and "setup" in _tags(nb.cells[end]):
        end += 1
    return start, end


def _collapsed(cell) -> bool:
    meta = cell.get("metadata", {})
    return (meta.get("jupyter", {}).get("source_hidden") is True and meta.get("cellView") == "form"
            and cell.source.startswith("# @title "))


MAX_COLLAPSED_LINES = 100  # a collapsed cell is not read in the flow; v4 wraps setup at 100 characters


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_no_code_cell_is_longer_than_a_screen(name):
    """A visible code cell fits a screen (60 lines); a collapsed one, wrapped at 100 characters, 100 lines."""
    long = {i: len(c.source.splitlines()) for i, c in enumerate(_read(name).cells) if c.cell_type == "code"
            and len(c.source.splitlines()) > (MAX_COLLAPSED_LINES if _collapsed(c) else MAX_CELL_LINES)}
    assert not long, (f"{name}: code cells {long} (index: lines) are over {MAX_CELL_LINES} lines "
                      f"({MAX_COLLAPSED_LINES} if collapsed); split them")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_setup_is_collapsed_and_the_topic_starts_within_three_screens(name):
    nb = _read(name)
    start, end = _setup_section(nb)
    assert end > start, f"{name}: tag the setup cells (heading, helpers, run setup) 'setup', right after parameters"
    heading = nb.cells[start]
    assert heading.cell_type == "markdown" and heading.source.startswith("## "), (
        f"{name}: the setup section opens with a '## ' heading")
    assert re.search(r"need not|no need", heading.source, re.I), (
        f"{name}: the setup heading says that these cells need not be read")
    tagged = [i for i, c in enumerate(nb.cells) if "setup" in _tags(c) or "shared" in _tags(c)]
    assert all(start <= i < end for i in tagged), f"{name}: setup/shared cells {tagged} lie outside {start}..{end}"
    for i in range(start, end):
        cell = nb.cells[i]
        if cell.cell_type == "code" and ("lib" in _tags(cell) or "packages" in _tags(cell)):
            assert _collapsed(cell), (f"{name} cell {i}: collapse it (metadata jupyter.source_hidden, "
                                      "cellView 'form', first line '# @title …')")
    visible = 0
    for cell in nb.cells[:end]:
        visible += 1 if cell.cell_type == "code" and _collapsed(cell) else len(cell.source.splitlines()) + 1
    assert visible <= SCREENS_OF_SETUP, (
        f"{name}: {visible} visible lines before the topic starts (at most {SCREENS_OF_SETUP}, three screens)")


FIRST_TRAINING_WITHIN = {"homework_1.ipynb": ("## The data", 4), "homework_2.ipynb": ("## 1. ", 4),  # v4 issues
                         "homework_3.ipynb": ("## 1. The data", 5)}
TRAINS = (".backward()", "run_recipe(", ").fit(")  # a cell that trains a model: its own loop, or a library's fit


def _shown_lines(cell) -> int:
    """Lines a reader scrolls past: the source, then text outputs, and about 15 lines per figure."""
    lines = len(cell.source.splitlines()) + 1
    for out in cell.get("outputs", []):
        text = out.get("text") or out.get("data", {}).get("text/plain", "")
        lines += 15 if "image/png" in out.get("data", {}) else len("".join(text).splitlines())
    return lines


@pytest.mark.parametrize("name", sorted(FIRST_TRAINING_WITHIN))
def test_first_training_output_within_its_screens(name):
    """In the executed edition, from the issue's heading to the first cell that trains and prints."""
    nb = nbformat.read(ROOT / "executed" / name, as_version=4)
    heading, screens = FIRST_TRAINING_WITHIN[name]
    start = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.startswith(heading))
    lines = 0
    for cell in nb.cells[start:]:
        lines += _shown_lines(cell)
        if cell.cell_type == "code" and any(marker in cell.source for marker in TRAINS):
            assert cell.get("outputs"), f"{name}: the first training cell shows no output"
            break
    assert lines <= screens * SCREEN, (
        f"{name}: {lines} lines ({lines / SCREEN:.1f} screens) from {heading!r} to the first training output; "
        f"at most {screens} screens")


# --- packages: what a notebook imports is checked at its top and listed in requirements.txt ----------------
def _third_party_imports(nb) -> set[str]:
    found = set()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    # IPython is the kernel every notebook runs in (ipykernel needs it), not a package a notebook could lack
    return {m for m in found if m not in sys.stdlib_module_names and m != "IPython"}


def _requirement_names() -> set[str]:
    names = set()
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(re.split(r"[<>=!~\[; ]", line)[0].lower())
    return names


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_packages_checked_first_and_listed_in_requirements(name):
    nb = _read(name)
    cells = [c for c in nb.cells if "packages" in _tags(c)]
    assert len(cells) == 1, f"{name}: one code cell tagged 'packages' checks the imports before they fail"
    first_shared = next(i for i, c in enumerate(nb.cells) if "shared" in _tags(c))
    assert nb.cells.index(cells[0]) < first_shared, f"{name}: check packages before the shared helpers import them"
    scope: dict = {}
    exec(compile(ast.parse(cells[0].source), name, "exec"), scope)  # passes here: everything is installed
    needs = scope["NEEDS"]
    imported = _third_party_imports(nb)
    assert imported <= set(needs), f"{name}: imports {sorted(imported - set(needs))} that NEEDS does not check"
    missing = {pip.lower() for pip in needs.values()} - _requirement_names()
    assert not missing, f"requirements.txt lacks {sorted(missing)}, which {name} needs"


def test_packages_cell_names_the_install_command(monkeypatch):
    """With a package missing, the cell stops with the one-line command that installs it."""
    import importlib.util

    cell = next(c for c in _read(NOTEBOOKS[0]).cells if "packages" in _tags(c))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "tqdm" else real(m, *a))
    with pytest.raises(ModuleNotFoundError, match=r"%pip install tqdm"):
        exec(cell.source, {})


# --- (v4) the size of the machinery, in non-whitespace characters (wrapping is free, packing gains nothing) ------
MAX_SHARED_CHARS = 10_500
MAX_SETUP_CHARS = 24_000
MAX_SETUP_LINE = 100


def _machinery(nb) -> tuple[list, list]:
    """(shared cells, setup cells): setup = every code cell collapsed or tagged `setup`, the shared ones too."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    shared = [c for c in code if "shared" in _tags(c)]
    setup = [c for c in code if "setup" in _tags(c) or c.get("metadata", {}).get("jupyter", {}).get("source_hidden")]
    return shared, setup


def non_whitespace(cells) -> int:
    return sum(len(re.sub(r"\s", "", c.source)) for c in cells)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_machinery_stays_small(name, capsys):
    shared, setup = _machinery(_read(name))
    lines = [line for c in setup for line in c.source.splitlines()]
    long = [line for line in lines if len(line) > MAX_SETUP_LINE]
    with capsys.disabled():
        print(f"\n{name}: shared {non_whitespace(shared):,} / {MAX_SHARED_CHARS:,}, collapsed setup "
              f"{non_whitespace(setup):,} / {MAX_SETUP_CHARS:,} non-whitespace characters; {len(long)} of "
              f"{len(lines)} setup lines over {MAX_SETUP_LINE} characters")
    assert non_whitespace(shared) <= MAX_SHARED_CHARS, f"{name}: the shared cells hold {non_whitespace(shared):,}"
    assert non_whitespace(setup) <= MAX_SETUP_CHARS, f"{name}: collapsed or setup cells: {non_whitespace(setup):,}"
    assert not long, f"{name}: setup lines over {MAX_SETUP_LINE} characters, e.g. {long[0]!r}"


def test_the_size_measure_ignores_wrapping():
    one = nbformat.v4.new_code_cell("x = f(a, b, c)  # why")
    wrapped = nbformat.v4.new_code_cell("x = f(\n    a,\n    b,\n    c\n)  # why")
    assert non_whitespace([one]) == non_whitespace([wrapped]) == len("x=f(a,b,c)#why")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_no_synthetic_data_or_home_made_downloads_in_the_notebook(name):
    """Synthetic stand-ins are test data (tests/synthetic.py); downloads use the libraries' own tools."""
    defined = set()
    for cell in _read(name).cells:
        if cell.cell_type == "code":
            defined |= {n.name for n in ast.walk(ast.parse(cell.source))
                        if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    offenders = {n for n in defined if re.search(r"synthetic|atomic_write|download_file|urlopen", n, re.I)}
    assert not offenders, f"{name} defines {sorted(offenders)}"
    text = "\n".join(c.source for c in _read(name).cells if c.cell_type == "code")
    assert "urllib.request" not in text, f"{name}: download with torchvision, torch.hub or kagglehub"
