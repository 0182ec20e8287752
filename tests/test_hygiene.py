"""Hygiene of the committed notebooks: clean, tagged, parameterisable, linted, self-contained."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys

import nbformat
import pytest
from conftest import NOTEBOOKS, ROOT
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
    """ruff over tests/ and, through nbqa, over the notebooks (install requirements-dev.txt)."""
    if shutil.which("ruff") is None:
        pytest.skip("ruff is not installed: pip install -r requirements-dev.txt")
    cmd = [sys.executable, "-m", "ruff", "check", "tests"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    if shutil.which("nbqa") is None:
        pytest.skip("nbqa is not installed: pip install -r requirements-dev.txt")
    out = subprocess.run(["nbqa", "ruff", *NOTEBOOKS], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
