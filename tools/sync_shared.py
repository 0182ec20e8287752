"""Copy the shared setup helpers from tools/ into the homework notebooks.

Some code must be textually identical in several notebooks, and each notebook must run as the only file
present, so it cannot be imported from a module. Two groups are kept in one place each:

* `tools/shared_cells.py` → the cells tagged `shared` in all five notebooks (device, precision, results…);
* `tools/cifar10_cells.py` → the cells tagged `cifar10` in homeworks 1 and 2 (one CIFAR-10 loader and
  download cache for both).

Edit those files, then run

    python3 tools/sync_shared.py            # rewrite the notebooks' cells tagged `shared`
    python3 tools/sync_shared.py --check    # exit 1 if a notebook differs (the tests do the same)

Each `# %%` block becomes one code cell tagged lib/<group>/setup, collapsed in
JupyterLab and Notebook 7 (`jupyter.source_hidden`) and shown as a form in Colab (`cellView: form` and
its first line `# @title ...`). The cells replace the notebook's current shared cells in place.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tools" / "shared_cells.py"
GROUPS = {  # tag: (source file, notebooks that hold the group)
    "shared": (SOURCE, [f"homework_{n}.ipynb" for n in range(1, 6)]),
    "cifar10": (ROOT / "tools" / "cifar10_cells.py", ["homework_1.ipynb", "homework_2.ipynb"]),
}


def shared_sources(path: Path = SOURCE) -> list[str]:
    """The code of each `# %%` block of `path`, stripped of surrounding blank lines."""
    blocks, current = [], None
    for line in path.read_text().splitlines():
        if line.startswith("# %%"):
            if current is not None:
                blocks.append("\n".join(current).strip("\n"))
            current = []
        elif current is not None:
            current.append(line)
    if current is not None:
        blocks.append("\n".join(current).strip("\n"))
    return blocks


def collapsed_code_cell(source: str, cell_id: str, tags) -> nbformat.NotebookNode:
    """A code cell that JupyterLab, Notebook 7 and Colab show collapsed (its `# @title` line only)."""
    if not source.startswith("# @title "):
        raise ValueError(f"cell {cell_id}: a collapsed cell starts with '# @title <what it holds>'")
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": list(tags), "cellView": "form",
                                                        "jupyter": {"source_hidden": True}})
    cell.id = cell_id
    return cell


def synced(nb: nbformat.NotebookNode, sources: list[str], tag: str = "shared") -> nbformat.NotebookNode:
    """`nb` with its cells tagged `tag` replaced, in place, by one cell per source."""
    positions = [i for i, c in enumerate(nb.cells) if tag in c.get("metadata", {}).get("tags", [])]
    if not positions:
        raise ValueError(f"no cell is tagged {tag!r}: tag the cell the {tag} helpers should replace")
    new = [collapsed_code_cell(src, f"{tag}-{k + 1}", ["lib", tag, "setup"]) for k, src in enumerate(sources)]
    keep = [c for i, c in enumerate(nb.cells) if i not in positions]
    at = positions[0]
    nb.cells = keep[:at] + new + keep[at:]
    return nb


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report notebooks that differ; change nothing")
    parser.add_argument("notebooks", nargs="*", help="e.g. homework_2 (default: all)")
    args = parser.parse_args(argv)
    only = {Path(n).stem for n in args.notebooks}
    stale = []
    for tag, (source, names) in GROUPS.items():
        sources = shared_sources(source)
        for name in names:
            if only and Path(name).stem not in only:
                continue
            path = ROOT / name
            nb = nbformat.read(path, as_version=4)
            before = nbformat.writes(nb)
            after = nbformat.writes(synced(nb, sources, tag))
            if before != after:
                stale.append(f"{name} ({tag})")
                if not args.check:
                    nbformat.write(nbformat.reads(after, as_version=4), path)
    verb = "differ from" if args.check else "updated from"
    print(f"{len(stale)} notebook group(s) {verb} tools/: {', '.join(stale) or '-'}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
