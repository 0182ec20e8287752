"""Build the executed editions `executed/homework_N.ipynb`: the complete notebook run once in the `cpu`
profile on real data, outputs kept, with the run's results JSON beside it (`executed/homework_N.json`).

    DLCV_DATA_DIR=/path/to/data python3 tools/execute.py 1 3       # run homeworks 1 and 3 (papermill)
    python3 tools/execute.py 4 --adopt run.ipynb --results run.json   # keep a papermill `cpu` run already made
                                                                     # of the current notebook
    python3 tools/execute.py 1 2 3 4 5 --prose        # after editing markdown only: the editions take the new text

Synthetic data is refused (a dataset folder holding a file named SYNTHETIC, or a results file that says
so). Progress bars are switched off (TQDM_DISABLE=1) so the saved outputs hold results, not progress lines.
A header cell under the title says which data (the folder's image counts), the machine, the precision,
the seconds and the date. tests/test_executed.py fails when an edition's code differs from its notebook.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "executed"
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


def header_cell(number: int, results: dict, data: str, machine: str, date: str):
    seconds = results["seconds"]
    text = (f"> **Executed edition** of `homework_{number}.ipynb`: the complete notebook run once, top to bottom, "
            f"in the `cpu` profile on real data ({data}), on {machine}, precision `{results['precision']}`, "
            f"torch {results['torch']}, in {seconds:,.0f} s ({seconds / 60:.1f} min), on {date}. Every number "
            "and figure below comes from that run; a run of yours will differ a little. To run it yourself, open "
            f"[`homework_{number}.ipynb`](../homework_{number}.ipynb) (the student edition is in `student/`).")
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
                           "figures' dpi or show fewer images")
    path.write_text(text)
    (OUT / f"homework_{number}.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return path


def run(number: int, data_dir, machine: str) -> Path:
    import papermill

    data = describe_data(check_data(data_dir, number))
    with tempfile.TemporaryDirectory(prefix="dlcv-execute-") as tmp:
        env = {"DLCV_PROFILE": "cpu", "DLCV_RESULTS_DIR": tmp, "DLCV_DATA_DIR": str(data_dir),
               "TQDM_DISABLE": "1", "DLCV_PRECISION": os.environ.get("DLCV_PRECISION", "auto")}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the kernel inherits this process's environment
        try:
            out = Path(tmp) / "run.ipynb"
            try:
                papermill.execute_notebook(str(ROOT / f"homework_{number}.ipynb"), str(out),
                                           parameters={"PROFILE": "cpu"}, cwd=str(ROOT), kernel_name="python3",
                                           progress_bar=False)
            except Exception:  # keep the failed run to read: the temporary folder goes with this block
                kept = Path(tempfile.gettempdir()) / f"dlcv-failed-homework_{number}.ipynb"
                if out.exists():
                    kept.write_bytes(out.read_bytes())
                    print(f"the failed run, with its outputs, is kept in {kept}", file=sys.stderr)
                raise
            results = json.loads((Path(tmp) / f"homework_{number}.json").read_text())
            nb = nbformat.read(out, as_version=4)
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return finish(number, nb, results, data, machine)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("numbers", nargs="+", type=int, choices=sorted(DATASETS))
    parser.add_argument("--data", default=os.environ.get("DLCV_DATA_DIR"), help="data folder (default $DLCV_DATA_DIR)")
    parser.add_argument("--factors", help="machine_speed.py factors to state in the header, e.g. 'mlp 1.16'")
    parser.add_argument("--adopt", help="a papermill cpu run of the current notebook to keep instead of running")
    parser.add_argument("--results", help="with --adopt: that run's results JSON")
    parser.add_argument("--prose", action="store_true",
                        help="no run: give the existing editions the notebooks' current markdown (same code only)")
    args = parser.parse_args(argv)
    machine = describe_machine(args.factors)
    for number in args.numbers:
        if args.prose:
            path = refresh_prose(number)
        elif args.adopt:
            data = describe_data(check_data(args.data, number))
            nb = nbformat.read(args.adopt, as_version=4)
            path = finish(number, nb, json.loads(Path(args.results).read_text()), data, machine)
        else:
            path = run(number, args.data, machine)
        print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size / 2**20:.2f} MB)"
              + ("" if args.prose else " and its .json"))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ExecuteError as err:
        sys.exit(f"execute.py: {err}")
