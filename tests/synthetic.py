"""Synthetic stand-ins for the four datasets, written in their real layouts (DESIGN: "Layouts").

They are test data only: the root ``conftest.py`` writes them into a temporary ``DLCV_DATA_DIR`` before
any notebook kernel starts, so CI (offline, no real data) runs every notebook in ``smoke``. Each dataset
folder gets a file named ``SYNTHETIC``; the notebooks' shared data finder then reports
``data_source: synthetic`` and the executed-edition build refuses such data. The images are learnable
(a class or an object is visible) but say nothing about the real data.

One module per dataset, each with ``write(data_dir) -> Path`` (the dataset's folder under ``data_dir``).
"""

from __future__ import annotations

from pathlib import Path

import synth_cifar10
import synth_covid_xray
import synth_dsb2018
import synth_mnist

WRITERS = {"cifar10": synth_cifar10.write, "covid_xray": synth_covid_xray.write, "dsb2018": synth_dsb2018.write,
           "MNIST": synth_mnist.write}


def write_all(data_dir) -> Path:
    """Write every dataset under `data_dir` (each marked SYNTHETIC); return `data_dir`."""
    data_dir = Path(data_dir)
    for name, write in WRITERS.items():
        folder = write(data_dir)
        assert folder == data_dir / name, f"{name}: the writer must fill {data_dir / name}, not {folder}"
        (folder / "SYNTHETIC").write_text("synthetic test data written by tests/synthetic.py, not the real dataset\n")
    return data_dir
