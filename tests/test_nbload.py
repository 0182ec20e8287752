"""The notebook loader used by every unit test: loads only `lib` cells, and fails clearly."""

from __future__ import annotations

import nbformat
import pytest

from nbload import load_lib


def _write(path, cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    nbformat.write(nb, path)
    return path


def test_loads_only_lib_cells(tmp_path):
    lib = nbformat.v4.new_code_cell("X = 41\ndef f(a):\n    return a + X", metadata={"tags": ["lib"]})
    other = nbformat.v4.new_code_cell("raise RuntimeError('a non-lib cell ran')")
    lib2 = nbformat.v4.new_code_cell("Y = f(1)", metadata={"tags": ["lib", "x"]})
    mod = load_lib(_write(tmp_path / "nb.ipynb", [lib, other, lib2]))
    assert mod.f(1) == 42 and mod.Y == 42
    assert mod.__name__ == "nb"


def test_missing_notebook_and_untagged_notebook_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such notebook"):
        load_lib(tmp_path / "absent.ipynb")
    path = _write(tmp_path / "plain.ipynb", [nbformat.v4.new_code_cell("X = 1")])
    with pytest.raises(ValueError, match="no code cell is tagged 'lib'"):
        load_lib(path)
