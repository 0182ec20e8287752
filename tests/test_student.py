"""The student editions: built from the complete notebooks, current, and stopping at their first exercise."""

from __future__ import annotations

import sys

import nbformat
import pytest

from conftest import NOTEBOOKS, ROOT

sys.path.insert(0, str(ROOT / "tools"))
import build_student as bs  # noqa: E402

WITH_EXERCISES = [n for n in NOTEBOOKS if bs.has_exercises(nbformat.read(ROOT / n, as_version=4))]


def test_clear_solutions_replaces_each_region_at_its_indentation():
    src = ("def f(x):\n    y = 1\n    # Exercise 1.2: f adds\n    ### BEGIN SOLUTION\n    return x + y\n"
           "    ### END SOLUTION\n\n# Exercise 1.3: top level\n### BEGIN SOLUTION\nz = f(1)\n### END SOLUTION\n"
           "print(z)")
    out, labels = bs.clear_solutions(src, "cell")
    assert labels == ["Exercise 1.2: f adds", "Exercise 1.3: top level"]
    assert "return x + y" not in out and "z = f(1)" not in out and "SOLUTION" not in out
    lines = out.splitlines()
    assert lines[:3] == ["def f(x):", "    y = 1", "    # Exercise 1.2: f adds"]
    assert lines[3].startswith("    raise NotImplementedError('Exercise 1.2: f adds")
    assert lines[-2].startswith("raise NotImplementedError('Exercise 1.3: top level") and lines[-1] == "print(z)"
    scope: dict = {}
    exec(compile("\n".join(lines[:4]), "stub", "exec"), scope)  # the stub still parses and raises
    with pytest.raises(NotImplementedError, match="Exercise 1.2: f adds"):
        scope["f"](1)


@pytest.mark.parametrize("src, problem", [
    ("# Exercise 1.1: a\n### BEGIN SOLUTION\nx = 1\n", "never closed"),
    ("x = 1\n### END SOLUTION\n", "without a"),
    ("x = 2\n### BEGIN SOLUTION\nx = 1\n### END SOLUTION\n", "name the exercise"),
    ("### BEGIN SOLUTION Exercise 1.1: a\nx = 1\n### END SOLUTION\n", "alone on their lines"),
    ("# Exercise 1.1: a\n### BEGIN SOLUTION\n# Exercise 1.2: b\n### BEGIN SOLUTION\n### END SOLUTION\n", "inside"),
])
def test_markers_that_do_not_pair_up_are_refused(src, problem):
    with pytest.raises(bs.MarkerError, match=problem):
        bs.clear_solutions(src, "cell 3")


def test_answer_cells_become_empty_answer_cells_title_rewritten_outputs_cleared():
    nb = nbformat.v4.new_notebook()
    code = nbformat.v4.new_code_cell("# Exercise 9.1: x\n### BEGIN SOLUTION\nx = 1\n### END SOLUTION",
                                     outputs=[nbformat.v4.new_output("stream", text="1")], execution_count=3)
    nb.cells = [nbformat.v4.new_markdown_cell("# Homework 9 — T\n\ntext"), code,
                nbformat.v4.new_markdown_cell("**Q1** Why?"),
                nbformat.v4.new_markdown_cell("Because.", metadata={"tags": ["answer"]})]
    student, labels = bs.student_edition(nb, "homework_9.ipynb")
    assert labels == ["Exercise 9.1: x"]
    assert [c.source for c in student.cells if c.cell_type == "markdown"][1:] == ["**Q1** Why?", bs.YOUR_ANSWER]
    assert student.cells[0].source.startswith("# Homework 9 — T (student edition)")
    assert "homework_9.ipynb" in student.cells[0].source
    assert student.cells[1].outputs == [] and student.cells[1].execution_count is None
    assert nb.cells[1].outputs, "the complete notebook itself is left untouched"


@pytest.mark.parametrize("name", WITH_EXERCISES)
def test_nbgrader_clears_the_same_regions(name):
    """nbgrader's own ClearSolutions accepts the complete notebook (markers, solution-cell metadata) and
    removes exactly what our build removes: no solution line survives in either, the same cells are stubbed."""
    ClearSolutions = pytest.importorskip("nbgrader.preprocessors").ClearSolutions
    nb = nbformat.read(ROOT / name, as_version=4)
    cleared, _ = ClearSolutions().preprocess(nbformat.from_dict(nb), {})
    ours, _ = bs.student_edition(nb, name)
    ours_code = [c.source for c in ours.cells if c.cell_type == "code"]
    theirs_code = [c.source for c in cleared.cells if c.cell_type == "code"]
    assert len(ours_code) == len(theirs_code)
    for mine, theirs, full in zip(ours_code, theirs_code, [c.source for c in nb.cells if c.cell_type == "code"]):
        assert ("NotImplementedError(" in mine and "BEGIN SOLUTION" in full) == ("YOUR CODE HERE" in theirs)
        assert [x for x in mine.splitlines() if "NotImplementedError" not in x] == [
            x for x in theirs.splitlines() if "NotImplementedError" not in x and x.strip() != "# YOUR CODE HERE"]


def test_student_editions_are_current():
    """A committed edition equals a fresh build; no edition without a complete notebook behind it."""
    assert bs.build(check=True) == [], "run python3 tools/build_student.py and commit student/"
    committed = sorted(p.name for p in (ROOT / "student").glob("*.ipynb")) if (ROOT / "student").is_dir() else []
    assert committed == WITH_EXERCISES


@pytest.mark.parametrize("name", WITH_EXERCISES)
def test_student_edition_holds_no_solution(name):
    nb = nbformat.read(ROOT / "student" / name, as_version=4)
    for i, cell in enumerate(nb.cells):
        assert "answer" not in cell.get("metadata", {}).get("tags", []), f"student/{name} cell {i} is an answer"
        assert bs.BEGIN not in cell.source and bs.END not in cell.source, f"student/{name} cell {i}: marker"
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None


@pytest.mark.parametrize("name", WITH_EXERCISES)
def test_student_edition_stops_at_its_first_exercise(name):
    """Run top to bottom in `smoke`: every cell before the first exercise runs; it stops there, with its name."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    _, labels = bs.student_edition(nbformat.read(ROOT / name, as_version=4), name)
    nb = nbformat.read(ROOT / "student" / name, as_version=4)
    first = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "NotImplementedError(" in c.source
                 and labels[0] in c.source)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    with pytest.raises(CellExecutionError) as err:
        client.execute()
    assert err.value.ename == "NotImplementedError", f"student/{name} stopped on {err.value.ename} instead"
    assert labels[0] in err.value.evalue, f"student/{name} stopped with {err.value.evalue!r}, not {labels[0]!r}"
    failed = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code"
                  and any(o.get("output_type") == "error" for o in c.get("outputs", [])))
    assert failed >= first, f"student/{name} failed in cell {failed}, before its first exercise (cell {first})"
