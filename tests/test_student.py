"""The student editions: built from the complete notebooks, current, and stopping at their first exercise."""

from __future__ import annotations

import copy
import importlib
import os
import shutil
import subprocess
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


def _nbgrader(name: str):
    """nbgrader's module `name`; in CI (CI=true) a missing nbgrader fails instead of skipping."""
    if os.environ.get("CI", "").lower() == "true":
        return importlib.import_module(name)
    return pytest.importorskip(name)


def _key(nb):
    """What must not reach a student: each answer cell's text, and per code cell the lines inside its solution
    regions that do not also stand outside them (a `return x` may legitimately appear twice)."""
    answers = [c.source for c in nb.cells if "answer" in c.get("metadata", {}).get("tags", [])]
    solutions = {}
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and bs.BEGIN in cell.source:
            kept = {line.strip() for line in bs.clear_solutions(cell.source, f"cell {i}")[0].splitlines()}
            inside, region = set(), False
            for line in cell.source.splitlines():
                region = (region or line.strip() == bs.BEGIN) and line.strip() != bs.END
                if region and line.strip() not in (bs.BEGIN, "") and not line.strip().startswith("#"):
                    inside.add(line.strip())
            solutions[i] = inside - kept
            assert solutions[i], f"cell {i}: a solution region without a line of its own"
    return answers, solutions


def _released_without_key(nb, released, where: str) -> None:
    answers, solutions = _key(nb)
    assert answers, f"{where}: no answer cell to check"
    text = "\n".join(c.source for c in released.cells)
    leaked = [a[:60] for a in answers if a.strip() in text]
    assert not leaked, f"{where}: model answers left in the released notebook: {leaked}"
    assert len(released.cells) == len(nb.cells), f"{where}: cells added or removed"
    for i, lines in solutions.items():
        left = [line for line in released.cells[i].source.splitlines() if line.strip() in lines]
        assert not left, f"{where}, cell {i}: solution code left: {left}"


@pytest.mark.parametrize("name", WITH_EXERCISES)
def test_nbgrader_validates_and_clears_every_solution_and_answer(name):
    """nbgrader's own metadata validator, CheckCellMetadata and ClearSolutions accept the complete notebook
    (unique grade ids, solution and manually graded answer cells) and leave neither solution code nor a model
    answer; the code cells they stub are the ones our student edition stubs."""
    fmt, pre = _nbgrader("nbgrader.nbgraderformat"), _nbgrader("nbgrader.preprocessors")
    nb = nbformat.read(ROOT / name, as_version=4)
    fmt.MetadataValidator().validate_nb(copy.deepcopy(nb))
    checked, _ = pre.CheckCellMetadata().preprocess(copy.deepcopy(nb), {})
    cleared, _ = pre.ClearSolutions().preprocess(checked, {"language": "python"})
    _released_without_key(nb, cleared, name)
    ours, _ = bs.student_edition(nb, name)
    for mine, theirs, full in zip([c.source for c in ours.cells], [c.source for c in cleared.cells],
                                  [c.source for c in nb.cells]):
        assert ("NotImplementedError(" in mine and bs.BEGIN in full) == ("YOUR CODE HERE" in theirs)


def test_nbgrader_generate_assignment_releases_all_five_without_the_key(tmp_path):
    """The command a teacher runs, on the five complete notebooks as they are in the repository."""
    _nbgrader("nbgrader")
    source = tmp_path / "source" / "dlcv"
    source.mkdir(parents=True)
    for name in WITH_EXERCISES:
        shutil.copy(ROOT / name, source / name)
    (tmp_path / "nbgrader_config.py").write_text('c = get_config()\nc.CourseDirectory.course_id = "dlcv"\n')
    out = subprocess.run([sys.executable, "-m", "nbgrader", "generate_assignment", "dlcv", "--force"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for name in WITH_EXERCISES:
        released = nbformat.read(tmp_path / "release" / "dlcv" / name, as_version=4)
        _released_without_key(nbformat.read(ROOT / name, as_version=4), released, f"release/{name}")


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
def test_student_edition_links_resolve_from_its_folder(name):
    """A relative link in student/N.ipynb points to a file that exists, seen from student/."""
    import re

    nb = nbformat.read(ROOT / "student" / name, as_version=4)
    targets = [t for c in nb.cells if c.cell_type == "markdown"
               for t in re.findall(r"\]\(([^)#]+)\)", c.source) if not t.startswith(("http:", "https:"))]
    missing = [t for t in targets if not (ROOT / "student" / t).resolve().exists()]
    assert targets and not missing, f"student/{name}: links {missing} do not resolve from student/"


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
