"""Build the student editions `student/homework_N.ipynb` from the complete notebooks.

    python3 tools/build_student.py           # (re)write student/ for every notebook with exercises
    python3 tools/build_student.py --check   # exit 1 when a committed edition differs from a fresh build

The complete notebooks mark exercises exactly as nbgrader does, so a teacher can also use nbgrader:

* a solution region inside a code cell: a line ``### BEGIN SOLUTION`` and a line ``### END SOLUTION``,
  each alone on its line; the comment line just above BEGIN names the exercise (``# Exercise 1.2: the
  forward pass``). The student sees the region replaced by
  ``raise NotImplementedError("Exercise 1.2: the forward pass — …")`` at the same indentation;
* answers to the written questions in markdown cells tagged ``answer``: removed (they are the key), and
  replaced by an empty "Your answer" markdown cell for the student. For nbgrader they are manually graded
  answer cells (one point each), whose text ``nbgrader generate_assignment`` replaces by its stub.

Outputs and execution counts are cleared, and the title cell says that this is the student edition and
where the complete one is. A notebook without exercises gets no student edition.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
STUDENT_DIR = ROOT / "student"
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
LABEL = re.compile(r"^\s*#\s*(Exercise\s+\d+\.\d+:\s*\S.*?)\s*$")
YOUR_ANSWER = "**Your answer:** *(write it here)*"


class MarkerError(ValueError):
    """Solution markers that do not pair up, or a BEGIN line that does not name its exercise."""


def clear_solutions(source: str, where: str) -> tuple[str, list[str]]:
    """`source` with each solution region replaced by a stub; also returns the exercise labels."""
    out, labels, region = [], [], None
    for number, line in enumerate(source.splitlines(), 1):
        stripped = line.strip()
        if BEGIN in line or END in line:
            if stripped not in (BEGIN, END):
                raise MarkerError(f"{where}, line {number}: '{BEGIN}' and '{END}' stand alone on their lines "
                                  "(nbgrader refuses anything after them); name the exercise in the comment above")
        if stripped == BEGIN:
            if region is not None:
                raise MarkerError(f"{where}, line {number}: {BEGIN} inside the region opened on line "
                                  f"{region}; close it with {END} first")
            match = LABEL.match(out[-1]) if out else None
            if not match:
                raise MarkerError(f"{where}, line {number}: name the exercise in a comment line just above "
                                  f"{BEGIN}, e.g. '# Exercise 1.2: the forward pass'")
            label = match.group(1)
            indent = line[: len(line) - len(line.lstrip())]
            message = f"{label} — write your code here, then run the check cell below."
            out.append(f"{indent}raise NotImplementedError({message!r})")
            labels.append(label)
            region = number
        elif stripped == END:
            if region is None:
                raise MarkerError(f"{where}, line {number}: {END} without a {BEGIN}")
            region = None
        elif region is None:
            out.append(line)
    if region is not None:
        raise MarkerError(f"{where}: the solution region opened on line {region} is never closed")
    return "\n".join(out), labels


def nbgrader_metadata(nb, number: str) -> list[dict | None]:
    """nbgrader's metadata for each cell of notebook `number`: solution cells for the code holding solution
    regions (autograded answers: nbgrader stubs their regions), manually graded answer cells for the markdown
    answers tagged `answer` (nbgrader replaces their text by its stub, so the key never reaches students);
    every grade_id unique (nbgrader refuses duplicates)."""
    metas, used = [], set()
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and BEGIN in cell.source:
            _, labels = clear_solutions(cell.source, f"cell {i}")
            base = "exercise-" + re.search(r"\d+\.\d+", labels[0]).group(0).replace(".", "-")
            meta = {"grade": False, "solution": True}
        elif cell.cell_type == "markdown" and "answer" in cell.get("metadata", {}).get("tags", []):
            base = f"answer-{number}-{sum(1 for m in metas if m and m['grade']) + 1}"
            meta = {"grade": True, "solution": True, "points": 1}
        else:
            metas.append(None)
            continue
        grade_id = next(f"{base}{suffix}" for suffix in ["", *(f"-{k}" for k in range(2, 99))]
                        if f"{base}{suffix}" not in used)
        used.add(grade_id)
        metas.append(meta | {"grade_id": grade_id, "locked": False, "schema_version": 3})
    return metas


def mark_for_nbgrader(nb, number: str) -> bool:
    """Give solution and answer cells their nbgrader metadata (see nbgrader_metadata); True when one changed."""
    changed = False
    for cell, meta in zip(nb.cells, nbgrader_metadata(nb, number)):
        if meta is not None and cell.metadata.get("nbgrader") != meta:
            cell.metadata["nbgrader"] = meta
            changed = True
        elif meta is None and "nbgrader" in cell.metadata:
            del cell.metadata["nbgrader"]
            changed = True
    return changed


def has_exercises(nb) -> bool:
    return any((c.cell_type == "code" and BEGIN in c.source)
               or (c.cell_type == "markdown" and "answer" in c.get("metadata", {}).get("tags", []))
               for c in nb.cells)


def student_edition(nb, name: str):
    """(student notebook, exercise labels in order) built from the complete notebook `nb`."""
    nb = copy.deepcopy(nb)
    cells, labels = [], []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown" and "answer" in cell.get("metadata", {}).get("tags", []):
            cells.append(nbformat.v4.new_markdown_cell(YOUR_ANSWER, metadata={"tags": ["your-answer"]}))
            cells[-1].id = f"your-answer-{i}"
            continue
        if cell.cell_type == "markdown":  # links relative to the repository root, seen from student/
            cell.source = re.sub(r"\]\((?!https?:|#|\.\./)([^)]+)\)", r"](../\1)", cell.source)
        if cell.cell_type == "code":
            cell.source, found = clear_solutions(cell.source, f"{name} cell {i}")
            labels += found
            cell.outputs, cell.execution_count = [], None
        cells.append(cell)
    title = cells[0]
    if title.cell_type != "markdown" or not title.source.startswith("# "):
        raise MarkerError(f"{name}: the first cell must be the markdown title")
    head, _, rest = title.source.partition("\n")
    title.source = (f"{head} (student edition)\n\n"
                    f"> **Student edition.** The exercises are left for you: each one raises "
                    f"`NotImplementedError` until you write it, and the check cell after it tells you whether "
                    f"it works. The complete notebook with the solutions is `{name}` in the course "
                    f"repository (answers to the written questions are in it too).\n{rest}")
    nb.cells = cells
    return nb, labels


def build(check: bool = False, only=()) -> list[str]:
    """Write (or, with `check`, compare) the student editions (all, or those named in `only`)."""
    changed = []
    for path in sorted(ROOT.glob("homework_*.ipynb")):
        if only and path.stem not in {Path(n).stem for n in only}:
            continue
        nb = nbformat.read(path, as_version=4)
        if not has_exercises(nb):
            continue
        if mark_for_nbgrader(nb, path.stem.rsplit("_", 1)[-1]):
            changed.append(f"{path.name} (nbgrader metadata)")
            if not check:
                nbformat.write(nb, path)
        student, labels = student_edition(nb, path.name)
        if not labels:
            raise MarkerError(f"{path.name}: answer cells but no code exercise; a student edition needs one")
        text = nbformat.writes(student) + "\n"
        target = STUDENT_DIR / path.name
        if not target.exists() or target.read_text() != text:
            changed.append(path.name)
            if not check:
                target.parent.mkdir(exist_ok=True)
                target.write_text(text)
        print(f"{path.name}: {len(labels)} exercises ({', '.join(lab.split(':')[0] for lab in labels)})")
    return changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with student/, change nothing")
    parser.add_argument("notebooks", nargs="*", help="e.g. homework_2 (default: all)")
    args = parser.parse_args(argv)
    changed = build(check=args.check, only=args.notebooks)
    if args.check and changed:
        print(f"out of date: {', '.join(changed)}; run python3 tools/build_student.py")
        return 1
    print(f"{'differ' if args.check else 'written'}: {', '.join(changed) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
