"""Load a notebook's own definitions (its code cells tagged ``lib``) without running the notebook.

The notebooks are the single source of truth: the tests import what the notebook defines by
executing only the cells tagged ``lib`` into a fresh module. A ``lib`` cell holds imports,
constants, functions and classes; it never touches data, trains or plots at import time.
"""

from __future__ import annotations

import linecache
import types
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent


def cells_with_tag(nb, tag: str):
    """The code cells of ``nb`` carrying ``tag`` in their metadata, in notebook order."""
    return [
        c for c in nb.cells if c.cell_type == "code" and tag in c.get("metadata", {}).get("tags", [])
    ]


def load_lib(notebook: str | Path, tag: str = "lib") -> types.ModuleType:
    """Execute the ``tag``-tagged cells of ``notebook`` into a new module and return it.

    ``notebook`` is a path, or a bare name such as ``"homework_1"`` looked up at the repository root.
    """
    path = Path(notebook)
    if not path.suffix:
        path = ROOT / f"{path.name}.ipynb"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such notebook")
    nb = nbformat.read(path, as_version=4)
    cells = cells_with_tag(nb, tag)
    if not cells:
        raise ValueError(f"{path.name}: no code cell is tagged {tag!r}; tag its definitions to test them")
    module = types.ModuleType(path.stem)
    module.__file__ = str(path)
    for i, cell in enumerate(cells):
        filename = f"{path.name}[{tag} cell {i}]"
        # as IPython does for a cell: inspect.getsource (the run store keys code by it) reads the text here
        linecache.cache[filename] = (len(cell.source), None, cell.source.splitlines(True), filename)
        exec(compile(cell.source, filename, "exec"), module.__dict__)  # noqa: S102 - our own notebook
    return module
