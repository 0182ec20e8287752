"""One measured runtime per notebook and profile, quoted the same everywhere.

`tools/runtimes.json` is the source: for each notebook and profile, one measured run (seconds, date, the machine,
its `machine_speed.py` factor for the notebook's kind of model, the data) or nothing. This script writes it into

* each notebook's `RUNTIME` constant (in its configuration cell): what the run's first printed line says;
* each notebook's header paragraph that starts with `**Runtime**`;
* the README's runtime table, between `<!-- runtimes -->` and `<!-- /runtimes -->`.

    python3 tools/runtimes.py                      # write them from tools/runtimes.json
    python3 tools/runtimes.py --check              # exit 1 when one differs (a test does the same)
    python3 tools/runtimes.py --record results/homework_5.json --factors mlp=0.65,conv=2.04,unet=1.97 \\
        --data "MNIST slice, 10,000 / 2,000 images"   # record a fresh run (nothing loaded from the run store)

A figure comes only from a fresh run: a results file with `runs_loaded` > 0 is refused, since loading trained
models from the store makes a run faster than a student's first run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tools" / "runtimes.json"
KIND = {1: "mlp", 2: "conv", 3: "conv", 4: "unet", 5: "mlp"}  # the model kind machine_speed.py times for each
PROFILES = ("smoke", "cpu", "full")
README_BEGIN, README_END = "<!-- runtimes -->", "<!-- /runtimes -->"


class NotAFigure(ValueError):
    """A results file that cannot be a runtime figure; the message says why."""


def short(entry: dict | None, profile: str) -> str:
    """The text a run prints as its expected runtime, and the header quotes."""
    if not entry:
        return "not measured yet"
    seconds, where = entry["seconds"], f"{entry['machine']}, {entry['date']}"
    if profile == "cpu" and entry.get("factor"):
        minutes = seconds / entry["factor"] / 60
        return f"≈ {minutes:.0f} reference min ({seconds:,.0f} s on {where})"
    if seconds < 120:  # the notebook's own clock starts after its imports (smoke: DESIGN's "after imports")
        return f"≈ {seconds:.0f} s after imports ({where})"
    return f"≈ {seconds / 60:.0f} min ({where})"


def runtime_block(entries: dict) -> str:
    body = "".join(f'    "{p}": "{short(entries.get(p), p)}",\n' for p in PROFILES)
    if max(map(len, body.splitlines())) > 100:
        raise SystemExit(f"a RUNTIME line is over 100 characters; shorten the machine's name:\n{body}")
    return f"RUNTIME = {{  # measured fresh runs (tools/runtimes.py)\n{body}}}"


def header_line(entries: dict) -> str:
    data = (entries.get("cpu") or {}).get("data")
    parts = " · ".join(f"`{p}` {short(entries.get(p), p)}" + (f" on {data}" if p == "cpu" and data else "")
                       for p in PROFILES)
    return (f"**Runtime** (measured runs that trained every model): {parts}. Reference minutes are minutes on "
            "the course's reference machine (2 CPU cores with native bf16); the README says how to convert your "
            "machine's. A run whose trained models are in the run store (see the README) takes a fraction of that.")


def readme_table(data: dict) -> str:
    rows = ["| notebook | `smoke` | `cpu` | `full` | data of the `cpu` run |", "|---|---|---|---|---|"]
    for name in sorted(data):
        entries = data[name]
        rows.append(f"| {name} | " + " | ".join(short(entries.get(p), p) for p in PROFILES)
                    + f" | {(entries.get('cpu') or {}).get('data', '–')} |")
    return "\n".join(rows)


def apply(data: dict, write: bool) -> list[str]:
    """Bring the notebooks and the README in line with `data`; return what differed."""
    stale = []
    for name, entries in sorted(data.items()):
        path = ROOT / f"{name}.ipynb"
        nb = nbformat.read(path, as_version=4)
        before = nbformat.writes(nb)
        config = [c for c in nb.cells if c.cell_type == "code" and re.search(r"^RUNTIME = \{", c.source, re.M)]
        if len(config) != 1:
            raise SystemExit(f"{name}: expected one code cell with a `RUNTIME = {{` block, found {len(config)}")
        block, line = runtime_block(entries), header_line(entries)
        config[0].source = re.sub(r"^RUNTIME = \{.*?^\}", lambda m, block=block: block, config[0].source, count=1,
                                  flags=re.M | re.S)
        title = nb.cells[0]
        if not re.search(r"^\*\*Runtime\*\*.*?(?=\n\n|\Z)", title.source, re.M | re.S):
            raise SystemExit(f"{name}: its first cell has no paragraph starting with **Runtime**")
        title.source = re.sub(r"^\*\*Runtime\*\*.*?(?=\n\n|\Z)", lambda m, line=line: line, title.source, count=1,
                              flags=re.M | re.S)
        if nbformat.writes(nb) != before:
            stale.append(path.name)
            if write:
                nbformat.write(nb, path)
    readme = (ROOT / "README.md").read_text()
    if README_BEGIN not in readme or README_END not in readme:
        raise SystemExit(f"README.md: the runtime table goes between {README_BEGIN} and {README_END}")
    head, rest = readme.split(README_BEGIN, 1)
    new = f"{head}{README_BEGIN}\n{readme_table(data)}\n{README_END}{rest.split(README_END, 1)[1]}"
    if new != readme:
        stale.append("README.md")
        if write:
            (ROOT / "README.md").write_text(new)
    return stale


def record(data: dict, results: dict, factors: dict, machine: str, data_text: str) -> dict:
    """`data` with the fresh run `results` (a notebook's results JSON) as its figure for that profile."""
    if results.get("runs_loaded", 1) != 0:
        raise NotAFigure(f"{results.get('notebook')}: {results.get('runs_loaded')} training runs were loaded "
                            "from the run store; a runtime figure needs a run that trained everything "
                            "(DLCV_RUNS=off or an empty store)")
    if results.get("data_source") != "real":
        raise NotAFigure("a runtime figure comes from a run on real data")
    number = int(results["notebook"].rsplit("_", 1)[1])
    entry = {"seconds": round(float(results["seconds"]), 1), "date": datetime.date.today().isoformat(),
             "machine": machine, "factor": factors.get(KIND[number]), "kind": KIND[number],
             "precision": results["precision"], "torch": results["torch"], "data": data_text}
    data.setdefault(results["notebook"], {})[results["profile"]] = entry
    return data


def describe_machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.+)", cpuinfo)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    name = re.sub(r"\((R|TM)\)|CPU|Processor|Intel|AMD|@.*", "", model.group(1) if model else "CPU").split()
    bf16 = "native bf16" if ("avx512_bf16" in cpuinfo or "amx_bf16" in cpuinfo) else "no native bf16"
    return f"{cores}-core {name[0] if name else 'CPU'}, {bf16}"


def parse_factors(text: str | None) -> dict:
    """"mlp=0.65,conv=2.04,unet=1.97" → {"mlp": 0.65, ...} (machine_speed.py's factors)."""
    if not text:
        return {}
    pairs = [part.split("=") for part in text.replace(" ", "").split(",") if part]
    if any(len(p) != 2 or p[0] not in ("mlp", "conv", "unet") for p in pairs):
        raise SystemExit(f"--factors {text!r}: write mlp=F,conv=F,unet=F with machine_speed.py's factors")
    return {k: float(v) for k, v in pairs}


def load() -> dict:
    return json.loads(SOURCE.read_text())


def save(data: dict) -> None:
    SOURCE.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report what differs; change nothing")
    parser.add_argument("--record", nargs="+", metavar="RESULTS_JSON", help="fresh runs' results files to record")
    parser.add_argument("--factors", help="machine_speed.py factors, e.g. mlp=0.65,conv=2.04,unet=1.97")
    parser.add_argument("--machine", default=None, help="the machine, as the header should name it")
    parser.add_argument("--data", default="", help="the data of the run, e.g. 'MNIST slice, 10,000 / 2,000'")
    args = parser.parse_args(argv)
    data = load()
    if args.record:
        factors, machine = parse_factors(args.factors), args.machine or describe_machine()
        for path in args.record:
            data = record(data, json.loads(Path(path).read_text()), factors, machine, args.data)
        save(data)
    stale = apply(data, write=not args.check)
    print(f"{'differ from' if args.check else 'updated from'} tools/runtimes.json: {', '.join(stale) or '-'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except NotAFigure as err:
        sys.exit(f"runtimes.py: {err}")
