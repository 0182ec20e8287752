"""Build the executed editions `executed/homework_N.ipynb`: the complete notebook run in the `cpu` profile on
real data, outputs kept, with the run's results JSON beside it (`executed/homework_N.json`).

    DLCV_DATA_DIR=/path/to/data python3 tools/execute.py 1 3   # run homeworks 1 and 3 through the run store
    python3 tools/execute.py 5 --fresh --factors mlp=0.65,conv=2.04,unet=1.97   # empty the notebook's run store
                         # first: every model trains, and the run's seconds become the notebook's cpu runtime
                         # (tools/runtimes.py), after which a second run, from the store, makes the edition
    python3 tools/execute.py 4 --adopt run.ipynb --results run.json   # keep a papermill cpu run already made
    python3 tools/execute.py 1 2 3 4 5 --prose        # after editing markdown only: the editions take the new text

No run is lost: each one runs in `build/execute/homework_N/` (the executed notebook `run.ipynb`, as papermill
saves it after every cell, its results `homework_N.json` and its output `log.txt`), and stays there whatever
fails after it; a failure is reported and the next notebook still runs; the exit status says whether all
passed. Through the run store (`DLCV_CACHE_DIR/runs`), re-running after a change of prose or of one experiment
takes minutes: only what changed trains. The header under the title says the data, the machine, the precision,
the seconds, the date and how many training runs came from the store and when they were trained.
Synthetic data is refused. Progress bars are off (TQDM_DISABLE=1). tests/test_executed.py fails when an
edition's code differs from its notebook's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import sys
import traceback
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "executed"
WORK = ROOT / "build" / "execute"  # every run's notebook, results and log, kept whatever happens after the run
DATASETS = {1: "cifar10", 2: "cifar10", 3: "covid_xray", 4: "dsb2018", 5: "MNIST"}
MAX_BYTES = 3 * 1024 * 1024


class ExecuteError(RuntimeError):
    """The run cannot become an executed edition; the message says why and what to do."""


def check_data(data_dir, number: int) -> Path:
    """The dataset folder for homework `number` under `data_dir`; synthetic or missing data is refused."""
    if not data_dir:
        raise ExecuteError("set DLCV_DATA_DIR (or --data) to a folder holding the real data in the README's layout")
    folder = Path(data_dir) / DATASETS[number]
    if not folder.is_dir():
        raise ExecuteError(f"{folder} does not exist: homework {number} needs {DATASETS[number]}/ in the data folder")
    if (folder / "SYNTHETIC").exists():
        raise ExecuteError(f"{folder} holds synthetic test data; an executed edition is made from real data only")
    return folder


def describe_data(folder: Path) -> str:
    """'train 10,000 / test 2,000 images' from the folder itself (MNIST: the idx headers)."""
    counts = {}
    for split in ("train", "test"):
        if folder.name == "MNIST":
            idx = folder / "raw" / f"{'train' if split == 'train' else 't10k'}-labels-idx1-ubyte"
            counts[split] = int.from_bytes(idx.read_bytes()[4:8], "big") if idx.exists() else 0
        else:
            root = folder / split / ("images" if (folder / split / "images").is_dir() else "")
            counts[split] = sum(1 for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif"))
    return f"{folder.name}: train {counts['train']:,} / test {counts['test']:,} images"


def describe_machine(factors: str | None) -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.+)", cpuinfo)
    bf16 = "avx512_bf16" in cpuinfo or "amx_bf16" in cpuinfo
    text = (f"{model.group(1).strip() if model else platform.processor() or platform.machine()}, "
            f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores, "
            f"{'native bf16' if bf16 else 'no native bf16'}")
    return text + (f"; speed factors against the reference machine: {factors}" if factors else "")


def clean_outputs(nb) -> None:
    """Carriage-return progress lines collapsed to their last state; progress widgets dropped."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.outputs:
            if out.output_type == "stream":
                out.text = "\n".join(line.rsplit("\r", 1)[-1] for line in out.text.split("\n"))
            if "application/vnd.jupyter.widget-view+json" in out.get("data", {}):
                continue  # a progress-bar widget: GitHub cannot draw it, and its text is only the bar's first state
            kept.append(out)
        cell.outputs = kept


def store_note(results: dict) -> str:
    """How many training runs the run loaded from the run store, and when those were trained."""
    runs = results.get("runs") or {}
    loaded = sorted(arm["date"] for arm in runs.values() if arm["loaded"])
    if not runs:
        return ""
    if not loaded:
        return f" All {len(runs)} training runs trained in this run."
    span = loaded[0] if loaded[0] == loaded[-1] else f"between {loaded[0]} and {loaded[-1]}"
    return (f" {len(loaded)} of its {len(runs)} training runs were loaded from the run store (trained {span}, "
            "same code, settings and data), so it took less time than a first run; the header of the notebook "
            "gives the runtime of a run that trains everything.")


def header_cell(number: int, results: dict, data: str, machine: str, date: str):
    seconds = results["seconds"]
    text = (f"> **Executed edition** of `homework_{number}.ipynb`: the complete notebook run top to bottom, "
            f"in the `cpu` profile on real data ({data}), on {machine}, precision `{results['precision']}`, "
            f"torch {results['torch']}, in {seconds:,.0f} s ({seconds / 60:.1f} min), on {date}."
            f"{store_note(results)} Every number and figure below comes from that run; a run of yours will differ "
            f"a little. It holds the solutions: if you are doing the homework, compare with it *after* finishing. "
            f"To run it yourself, open [`homework_{number}.ipynb`](../homework_{number}.ipynb) (the student "
            "edition is in `student/`).")
    cell = nbformat.v4.new_markdown_cell(text, metadata={"tags": ["executed-header"]})
    cell.id = "executed-header"
    return cell


def code_cells(nb) -> list[str]:
    """The code an edition ran: every code cell but the one papermill injects for the parameters."""
    return [c.source for c in nb.cells
            if c.cell_type == "code" and "injected-parameters" not in c.get("metadata", {}).get("tags", [])]


def markdown_cells(nb) -> list[str]:
    return [c.source for c in nb.cells
            if c.cell_type == "markdown" and "executed-header" not in c.metadata.get("tags", [])]


def take_prose(nb, current) -> None:
    """The current notebook's markdown cells into the run, in place: prose is not an output, so an edit of the
    text after the run needs no new run. Same code and same sequence of cell kinds, or ExecuteError."""
    kinds = lambda book: [c.cell_type for c in book.cells if "executed-header" not in c.metadata.get("tags", [])
                          and "injected-parameters" not in c.metadata.get("tags", [])]
    if code_cells(nb) != code_cells(current) or kinds(nb) != kinds(current):
        raise ExecuteError("the run's code or cell order differs from the notebook's; run it again")
    prose = iter(c for c in current.cells if c.cell_type == "markdown")
    for cell in nb.cells:
        if cell.cell_type == "markdown" and "executed-header" not in cell.metadata.get("tags", []):
            cell.source = next(prose).source


def refresh_prose(number: int) -> Path:
    """Rewrite executed/homework_N.ipynb with the current notebook's prose (the outputs stay the run's)."""
    path = OUT / f"homework_{number}.ipynb"
    nb = nbformat.read(path, as_version=4)
    try:
        take_prose(nb, nbformat.read(ROOT / f"homework_{number}.ipynb", as_version=4))
    except ExecuteError as err:
        raise ExecuteError(f"homework {number}: {err}") from None
    path.write_text(nbformat.writes(nb))
    return path


def finish(number: int, nb, results: dict, data: str, machine: str) -> Path:
    """Check the run, add the header, write executed/homework_N.ipynb and .json."""
    try:  # the run must be of the current code; it takes the current prose
        take_prose(nb, nbformat.read(ROOT / f"homework_{number}.ipynb", as_version=4))
    except ExecuteError as err:
        raise ExecuteError(f"homework {number}: {err}") from None
    if results.get("data_source") != "real" or results.get("profile") != "cpu":
        raise ExecuteError(f"homework {number}: the run says data_source={results.get('data_source')!r}, "
                           f"profile={results.get('profile')!r}; an executed edition needs real data in cpu")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    if errors:
        raise ExecuteError(f"homework {number}: the run raised {errors[0].ename}: {errors[0].evalue}")
    clean_outputs(nb)
    date = datetime.date.today().isoformat()
    nb.cells.insert(1, header_cell(number, results, data, machine, date))
    OUT.mkdir(exist_ok=True)
    path = OUT / f"homework_{number}.ipynb"
    text = nbformat.writes(nb)
    if len(text.encode()) > MAX_BYTES:
        raise ExecuteError(f"{path.name} would be {len(text.encode()) / 2**20:.1f} MB (at most 3 MB): lower the "
                           f"figures' dpi or show fewer images; the run is kept in {WORK.relative_to(ROOT)}/")
    path.write_text(text)
    (OUT / f"homework_{number}.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return path


def store_folder(number: int) -> Path:
    cache = os.environ.get("DLCV_CACHE_DIR") or Path.home() / ".cache" / "dlcv"
    return Path(cache) / "runs" / f"homework_{number}"


def papermill_run(number: int, data_dir) -> tuple[Path, dict]:
    """Run the notebook into build/execute/homework_N/ (kept whatever happens); (folder, results)."""
    import papermill

    folder = WORK / f"homework_{number}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    env = {"DLCV_PROFILE": "cpu", "DLCV_RESULTS_DIR": str(folder), "DLCV_DATA_DIR": str(data_dir),
           "TQDM_DISABLE": "1", "DLCV_PRECISION": os.environ.get("DLCV_PRECISION", "auto")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        with open(folder / "log.txt", "w") as log:
            papermill.execute_notebook(str(ROOT / f"homework_{number}.ipynb"), str(folder / "run.ipynb"),
                                       parameters={"PROFILE": "cpu"}, cwd=str(ROOT), kernel_name="python3",
                                       progress_bar=False, log_output=True, stdout_file=log, stderr_file=log)
    except Exception as err:  # papermill saved the notebook up to the failing cell: it stays in `folder`
        raise ExecuteError(f"homework {number}: the run failed ({type(err).__name__}: {str(err)[-300:]}); "
                           f"the notebook, as far as it ran, and its log are in {folder.relative_to(ROOT)}/") from err
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    results_path = folder / f"homework_{number}.json"
    if not results_path.exists():
        raise ExecuteError(f"homework {number}: the run wrote no results file; see {folder.relative_to(ROOT)}/")
    return folder, json.loads(results_path.read_text())


def run(number: int, data_dir, machine: str, fresh: bool = False, factors: str | None = None) -> Path:
    """Run homework `number` in cpu (fresh: with its run store emptied first, and its runtime recorded), then
    make its edition from the run; with `fresh`, a changed runtime is written into the notebook first and the
    edition comes from a second run, through the store."""
    data = describe_data(check_data(data_dir, number))
    if fresh:
        shutil.rmtree(store_folder(number), ignore_errors=True)
    folder, results = papermill_run(number, data_dir)
    if fresh:
        sys.path.insert(0, str(ROOT / "tools"))
        import runtimes

        table = runtimes.record(runtimes.load(), results, runtimes.parse_factors(factors),
                                runtimes.describe_machine(), data)
        runtimes.save(table)
        if runtimes.apply(table, write=True):  # the notebook's RUNTIME changed: its code differs from the run's
            print(f"homework {number}: recorded its runtime ({results['seconds']:,.0f} s); running it again "
                  "through the run store for the edition")
            shutil.copytree(folder, folder.with_name(folder.name + "-fresh"), dirs_exist_ok=True)
            folder, results = papermill_run(number, data_dir)
    return finish(number, nbformat.read(folder / "run.ipynb", as_version=4), results, data, machine)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("numbers", nargs="+", type=int, choices=sorted(DATASETS))
    parser.add_argument("--data", default=os.environ.get("DLCV_DATA_DIR"), help="data folder (default $DLCV_DATA_DIR)")
    parser.add_argument("--factors", help="machine_speed.py factors, e.g. mlp=0.65,conv=2.04,unet=1.97")
    parser.add_argument("--fresh", action="store_true",
                        help="empty the notebook's run store first and record the run's seconds as its cpu runtime")
    parser.add_argument("--adopt", help="a papermill cpu run of the current notebook to keep instead of running")
    parser.add_argument("--results", help="with --adopt: that run's results JSON")
    parser.add_argument("--prose", action="store_true",
                        help="no run: give the existing editions the notebooks' current markdown (same code only)")
    args = parser.parse_args(argv)
    machine = describe_machine(args.factors)
    failed = []
    for number in args.numbers:
        try:
            if args.prose:
                path = refresh_prose(number)
            elif args.adopt:
                data = describe_data(check_data(args.data, number))
                nb = nbformat.read(args.adopt, as_version=4)
                path = finish(number, nb, json.loads(Path(args.results).read_text()), data, machine)
            else:
                path = run(number, args.data, machine, args.fresh, args.factors)
        except ExecuteError as err:
            failed.append(number)
            print(f"execute.py: {err}", file=sys.stderr)
            continue
        except Exception:  # anything else: report it, keep what ran, go on with the next notebook
            failed.append(number)
            traceback.print_exc()
            continue
        print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size / 2**20:.2f} MB)"
              + ("" if args.prose else " and its .json"))
    if failed:
        print(f"execute.py: failed: {', '.join(f'homework {n}' for n in failed)} (their runs are kept in "
              f"{WORK.relative_to(ROOT)}/)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ExecuteError as err:
        sys.exit(f"execute.py: {err}")
