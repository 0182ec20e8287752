"""The executed editions (executed/homework_N.ipynb): real runs of the current code, small, readable."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest

from conftest import NOTEBOOKS, ROOT

sys.path.insert(0, str(ROOT / "tools"))
import execute  # noqa: E402  (tools/execute.py)

EDITIONS = sorted(p.name for p in (ROOT / "executed").glob("homework_*.ipynb"))


@pytest.mark.parametrize("name", EDITIONS)
def test_edition_runs_the_current_code_on_real_data(name):
    edition = nbformat.read(ROOT / "executed" / name, as_version=4)
    current = nbformat.read(ROOT / name, as_version=4)
    assert execute.code_cells(edition) == execute.code_cells(current), (
        f"executed/{name} was run on other code than {name}: rebuild it with python3 tools/execute.py")
    assert execute.markdown_cells(edition) == execute.markdown_cells(current), (
        f"executed/{name}: its text is older than {name}'s: python3 tools/execute.py {name[9]} --prose")
    results = json.loads((ROOT / "executed" / name.replace(".ipynb", ".json")).read_text())
    assert results["data_source"] == "real" and results["profile"] == "cpu"
    assert results["notebook"] == name.removesuffix(".ipynb")
    outputs = [o for c in edition.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], f"executed/{name} holds an error"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"executed/{name} shows no figure"
    assert (ROOT / "executed" / name).stat().st_size <= execute.MAX_BYTES
    header = edition.cells[1]
    assert "executed-header" in header.metadata.get("tags", []) and f"{results['seconds']:,.0f} s" in header.source


@pytest.mark.parametrize("name", EDITIONS)
def test_readme_and_notebook_link_the_edition(name):
    assert f"executed/{name}" in (ROOT / "README.md").read_text(), f"README: link executed/{name}"
    title = nbformat.read(ROOT / name, as_version=4).cells[0].source
    assert f"executed/{name}" in title, f"{name}: the header links its executed edition"


def test_synthetic_or_missing_data_is_refused(tmp_path):
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "SYNTHETIC").write_text("test data")
    with pytest.raises(execute.ExecuteError, match="synthetic"):
        execute.check_data(tmp_path, 1)
    with pytest.raises(execute.ExecuteError, match="does not exist"):
        execute.check_data(tmp_path, 4)
    with pytest.raises(execute.ExecuteError, match="DLCV_DATA_DIR"):
        execute.check_data(None, 4)


def test_a_run_that_says_synthetic_or_differs_is_refused():
    nb = nbformat.read(ROOT / NOTEBOOKS[0], as_version=4)
    with pytest.raises(execute.ExecuteError, match="synthetic"):
        execute.finish(1, nb, {"data_source": "synthetic", "profile": "cpu"}, "", "")
    nb.cells.append(nbformat.v4.new_code_cell("print('edited after the run')"))
    with pytest.raises(execute.ExecuteError, match="differs"):
        execute.finish(1, nb, {"data_source": "real", "profile": "cpu"}, "", "")


def test_progress_lines_collapse_to_their_last_state():
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text="10%|#\r50%|####\r100%|#####\ndone\n")]
    nb.cells = [cell]
    execute.clean_outputs(nb)
    assert cell.outputs[0].text == "100%|#####\ndone\n"


def test_prose_follows_the_notebook_but_code_must_match():
    current = nbformat.read(ROOT / NOTEBOOKS[0], as_version=4)
    run = nbformat.read(ROOT / NOTEBOOKS[0], as_version=4)
    md = next(c for c in run.cells if c.cell_type == "markdown")
    md.source = "an older text"
    execute.take_prose(run, current)
    assert execute.markdown_cells(run) == execute.markdown_cells(current)
    next(c for c in run.cells if c.cell_type == "code").source += "\n# edited"
    with pytest.raises(execute.ExecuteError, match="differs"):
        execute.take_prose(run, current)


def test_a_failed_run_is_kept_with_its_log_and_the_next_notebook_still_runs(monkeypatch, tmp_path, capsys):
    """papermill fails in a cell: the notebook as far as it ran and the log stay; main() goes on and exits 1."""
    import papermill

    def failing(inp, out, **kw):
        Path(out).write_text("{partial notebook}")
        kw["stdout_file"].write("cell 7 printed this\n")
        raise RuntimeError("PapermillExecutionError in cell 7")

    monkeypatch.setattr(execute, "WORK", tmp_path / "work")
    monkeypatch.setattr(execute, "ROOT", tmp_path)
    monkeypatch.setattr(papermill, "execute_notebook", failing)
    with pytest.raises(execute.ExecuteError, match="work/homework_3/") as err:
        execute.papermill_run(3, tmp_path)
    assert "cell 7" in str(err.value)
    assert (tmp_path / "work" / "homework_3" / "run.ipynb").read_text() == "{partial notebook}"
    assert "cell 7 printed this" in (tmp_path / "work" / "homework_3" / "log.txt").read_text()
    done = []

    def run(number, *args):
        done.append(number)
        if number == 1:
            raise execute.ExecuteError("homework 1: would be 3.7 MB")
        raise ValueError("an unexpected bug")

    monkeypatch.setattr(execute, "run", run)
    assert execute.main(["1", "2", "--data", str(tmp_path)]) == 1 and done == [1, 2]
    said = capsys.readouterr().err
    assert "3.7 MB" in said and "ValueError: an unexpected bug" in said and "homework 1, homework 2" in said


def test_the_header_says_what_came_from_the_run_store():
    runs = {"a": {"loaded": True, "date": "2026-12-06 10:00", "seconds": 9.0},
            "b": {"loaded": True, "date": "2026-12-07 11:00", "seconds": 9.0},
            "c": {"loaded": False, "date": "2026-12-07 12:00", "seconds": 9.0}}
    note = execute.store_note({"runs": runs})
    assert "2 of its 3 training runs were loaded from the run store" in note
    assert "between 2026-12-06 10:00 and 2026-12-07 11:00" in note
    assert "All 1 training runs trained" in execute.store_note({"runs": {"c": runs["c"]}})
    header = execute.header_cell(5, {"seconds": 61.0, "precision": "bf16", "torch": "2.14", "runs": runs}, "d", "m",
                                 "2026-12-07")
    assert "61 s" in header.source and "2 of its 3" in header.source and "*after* finishing" in header.source
