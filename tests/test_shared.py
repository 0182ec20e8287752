"""The shared setup helpers (the cells tagged `shared`, identical in all five notebooks).

They are tested once, as loaded from the first notebook; `test_shared_cells_are_identical` proves that
the other notebooks hold the very same text.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from conftest import NOTEBOOKS, ROOT
from nbload import cells_with_tag, load_lib

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sh():
    return load_lib(NOTEBOOKS[0], tag="shared")


def test_shared_cells_are_identical():
    """Same text in every notebook of a group, and the same as its file in tools/ (tools/sync_shared.py)."""
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    import sync_shared

    assert set(sync_shared.GROUPS["shared"][1]) == set(NOTEBOOKS)
    for tag, (source, names) in sync_shared.GROUPS.items():
        canonical = sync_shared.shared_sources(source)
        for name in names:
            cells = cells_with_tag(nbformat.read(ROOT / name, as_version=4), tag)
            assert [c.source for c in cells] == canonical, f"{name} ({tag}): run python3 tools/sync_shared.py"


# --- the device rule -------------------------------------------------------------------------------------
WHEEL = ["sm_75", "sm_80", "sm_86", "sm_90"]


@pytest.mark.parametrize("capability, archs, usable", [
    ((8, 9), WHEEL, True),                       # L4 / RTX 40xx: sm_86 kernels run on sm_89
    ((7, 5), WHEEL, True),                       # T4: exact match
    ((12, 0), WHEEL + ["sm_100", "sm_120"], True),  # RTX 50xx, listed as sm_120
    ((6, 0), WHEEL, False),                      # P100: nothing of major 6, no PTX
    ((6, 0), ["compute_50"], True),              # a PTX-only build: JIT-compiled for any newer card
    ((8, 0), ["compute_86"], False),             # PTX newer than the card cannot run
    ((9, 0), ["sm_90a"], False),                 # arch-specific kernels are not counted
    ((8, 6), ["sm_89"], False),                  # a newer minor's kernels do not run on an older card
    ((10, 0), ["sm_90", "sm_120"], False),       # another major is not binary compatible
])
def test_cuda_arch_rule(sh, capability, archs, usable):
    assert sh.cuda_arch_usable(capability, archs) is usable


def _fake_cuda(monkeypatch, capability, archs, name="NVIDIA Fake"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(archs))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("capability, name", [((8, 9), "NVIDIA L4"), ((7, 5), "Tesla T4"),
                                              ((12, 0), "NVIDIA GeForce RTX 5090")])
def test_pick_device_accepts_cards_the_build_runs(sh, monkeypatch, capability, name):
    _fake_cuda(monkeypatch, capability, WHEEL + ["sm_100", "sm_120"], name)
    assert sh.pick_device().type == "cuda"


def test_pick_device_skips_a_p100_and_says_how_to_fix_it(sh, monkeypatch, capsys):
    _fake_cuda(monkeypatch, (6, 0), WHEEL, "Tesla P100-PCIE-16GB")
    assert sh.pick_device().type == "cpu"
    said = capsys.readouterr().out
    assert "Tesla P100-PCIE-16GB (sm_60)" in said and "sm_75, sm_80, sm_86, sm_90" in said
    assert "T4 or L4" in said and "torch wheel built for this card" in said


def test_pick_device_with_a_ptx_only_build(sh, monkeypatch):
    _fake_cuda(monkeypatch, (6, 0), ["compute_60"])
    assert sh.pick_device().type == "cuda"
    _fake_cuda(monkeypatch, (6, 0), ["compute_70"])
    assert sh.pick_device().type == "cpu"


def test_profile_resolution(sh, monkeypatch):
    monkeypatch.delenv("DLCV_PROFILE", raising=False)
    assert sh.resolve_profile(None, CPU) == "cpu"
    assert sh.resolve_profile(None, torch.device("cuda")) == "full"
    monkeypatch.setenv("DLCV_PROFILE", "smoke")
    assert sh.resolve_profile(None, CPU) == "smoke" and sh.resolve_profile("full", CPU) == "full"
    with pytest.raises(ValueError, match="'huge'.*smoke, cpu, full"):
        sh.resolve_profile("huge", CPU)


# --- precision ---------------------------------------------------------------------------------------------
AMD_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
INTEL_AMX = "flags\t\t: fpu avx512f amx_bf16 amx_tile\n"
OLD_X86 = "flags\t\t: fpu sse2 avx2 avx512f avx512bw\n"  # AVX-512 without BF16
ARM_BF16 = "Features\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize("text, native", [(AMD_BF16, True), (INTEL_AMX, True), (OLD_X86, False),
                                          (ARM_BF16, True), ("flags\t: fpu sse2\n", False)])
def test_cpu_native_bf16_from_the_cpu_flags(sh, text, native):
    assert sh.cpu_native_bf16(text) is native


def _tiny_conv():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 8 * 8, 10))


def _loss(out):
    return out.float().square().mean()


def test_precision_decision_on_simulated_cpus(sh, monkeypatch):
    monkeypatch.delenv("DLCV_PRECISION", raising=False)
    batch = torch.randn(4, 3, 8, 8)
    no_bf16 = sh.choose_precision(CPU, _tiny_conv, batch, _loss, native_bf16=False)
    assert no_bf16["name"] == "fp32" and no_bf16["amp_dtype"] is None and "without native bf16" in no_bf16["reason"]
    speeds = iter([1.0, 0.4, 1.0])  # fp32, bf16, fp32 again: bf16 2.5× faster
    monkeypatch.setattr(sh, "time_train_step", lambda *a, **k: next(speeds))
    fast = sh.choose_precision(CPU, _tiny_conv, batch, _loss, channels_last=True, native_bf16=True)
    assert fast["name"] == "bf16" and fast["amp_dtype"] is torch.bfloat16 and not fast["scaler"]
    assert fast["channels_last"] and "2.5×" in fast["reason"]
    speeds = iter([1.0, 0.95, 1.1])  # native bf16 but no real gain: stay in fp32
    slow = sh.choose_precision(CPU, _tiny_conv, batch, _loss, native_bf16=True)
    assert slow["name"] == "fp32" and "1.05×" in slow["reason"]
    monkeypatch.setenv("DLCV_PRECISION", "fp32")
    assert sh.choose_precision(CPU, _tiny_conv, batch, _loss, native_bf16=True)["name"] == "fp32"
    monkeypatch.setenv("DLCV_PRECISION", "fp64")
    with pytest.raises(ValueError, match="DLCV_PRECISION='fp64'"):
        sh.choose_precision(CPU)


def test_precision_on_simulated_gpus(sh, monkeypatch):
    monkeypatch.delenv("DLCV_PRECISION", raising=False)
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    t4 = sh.choose_precision(cuda)
    assert (t4["name"], t4["amp_dtype"], t4["scaler"]) == ("fp16", torch.float16, True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 9))
    l4 = sh.choose_precision(cuda)
    assert (l4["name"], l4["amp_dtype"], l4["scaler"]) == ("bf16", torch.bfloat16, False)
    assert sh.choose_precision(torch.device("mps"))["name"] == "fp32"


def test_a_bf16_training_step_on_the_cpu(sh):
    """Autocast bf16 on the CPU: the step runs, the weights change, and they stay fp32."""
    torch.manual_seed(0)
    model = _tiny_conv().to(memory_format=torch.channels_last)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    seconds = sh.time_train_step(model, x, _loss, torch.bfloat16, rounds=1)
    assert seconds > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_threads_from_the_environment(sh, monkeypatch):
    default = torch.get_num_threads()
    try:
        monkeypatch.delenv("DLCV_THREADS", raising=False)
        assert sh.set_threads() == default
        monkeypatch.setenv("DLCV_THREADS", "1")
        assert sh.set_threads() == 1 == torch.get_num_threads()
        monkeypatch.setenv("DLCV_THREADS", "two")
        with pytest.raises(ValueError, match="DLCV_THREADS='two'"):
            sh.set_threads()
    finally:
        torch.set_num_threads(default)


# --- lessons and results ----------------------------------------------------------------------------------
def test_lessons_are_printed_and_recorded(sh, capsys):
    lessons: dict = {}
    sh.record_lesson(lessons, "cnn_beats_mlp", 0.71 > 0.55 + 2 * 0.007, "CNN 0.71 vs MLP 0.55 (SE 0.007)")
    sh.record_lesson(lessons, "skips_help", False, "IoU 0.80 vs 0.81 (SE 0.01)")
    sh.record_lesson(lessons, "pretrained_beats_scratch", None, "no weights", unavailable="offline")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("✓ cnn_beats_mlp") and out[1].startswith("✗ skips_help")
    assert out[2].startswith("– pretrained_beats_scratch") and "offline" in out[2]
    assert lessons["cnn_beats_mlp"] == {"holds": True, "evidence": "CNN 0.71 vs MLP 0.55 (SE 0.007)"}
    assert lessons["skips_help"]["holds"] is False
    assert lessons["pretrained_beats_scratch"] == {"holds": None, "evidence": "no weights", "unavailable": "offline"}
    with pytest.raises(ValueError, match="evidence"):
        sh.record_lesson(lessons, "x", True, "")


def test_accuracy_standard_error(sh):
    assert sh.accuracy_se(0.5, 100) == pytest.approx(0.05)       # sqrt(0.25 / 100)
    assert sh.accuracy_se(0.9, 10_000) == pytest.approx(0.003)


def test_save_results_is_complete_atomic_and_finite(sh, tmp_path):
    precision = {"name": "bf16"}
    metrics = {"acc": np.float32(0.5), "per_class": np.array([0.25, 0.75]), "t": torch.tensor(2.0), "c": (1, 2)}
    path = sh.save_results(tmp_path, "homework_9", "smoke", CPU, precision, "synthetic", 12.34, metrics,
                           {"a": {"holds": True, "evidence": "1 > 0"}})
    data = json.loads(path.read_text())
    assert data["precision"] == "bf16" and data["seconds"] == 12.3 and data["lessons"]["a"]["holds"] is True
    assert data["metrics"] == {"acc": 0.5, "per_class": [0.25, 0.75], "t": 2.0, "c": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["homework_9.json"]  # no temporary file left
    with pytest.raises(ValueError, match=r"metrics\.bad\[1\] is nan"):
        sh.save_results(tmp_path, "homework_8", "smoke", CPU, precision, "real", 1.0, {"bad": [1.0, float("nan")]},
                        {})
    assert not (tmp_path / "homework_8.json").exists()


def test_atomic_write_leaves_nothing_when_writing_fails(sh, tmp_path):
    def broken(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        sh.atomic_write(tmp_path / "cache.npz", broken)
    assert list(tmp_path.iterdir()) == []


# --- random samples -----------------------------------------------------------------------------------------
def test_sample_indices_on_a_class_sorted_folder(sh):
    labels = np.repeat(np.arange(10), 400)  # 4,000 items sorted by class, as folders list them
    idx = sh.sample_indices(len(labels), 1000, seed=0, labels=labels)
    assert len(idx) == 1000 and len(np.unique(idx)) == 1000 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx], minlength=10).tolist() == [100] * 10  # a first-1000 pick: 3 classes
    assert not np.array_equal(idx, np.arange(1000))
    assert np.array_equal(idx, sh.sample_indices(len(labels), 1000, seed=0, labels=labels))
    assert not np.array_equal(idx, sh.sample_indices(len(labels), 1000, seed=1, labels=labels))
    uneven = np.array([0] * 70 + [1] * 20 + [2] * 10)
    counts = np.bincount(uneven[sh.sample_indices(100, 10, 0, uneven)], minlength=3)
    assert counts.tolist() == [7, 2, 1]
    plain = sh.sample_indices(50, 5, seed=3)
    assert len(plain) == 5 and plain.max() < 50 and not np.array_equal(plain, np.arange(5))
    assert len(sh.sample_indices(5, 50, seed=3)) == 5  # asking for more than there is gives all


def test_data_error_lists_what_was_tried_and_only_the_given_fixes(sh):
    err = sh.data_error("DSB2018", ["DLCV_DATA_DIR: not set", "download: HTTP 404"], ["turn the internet on"])
    text = str(err)
    assert isinstance(err, sh.DataNotFoundError)
    assert "DLCV_DATA_DIR: not set" in text and "HTTP 404" in text and "1. turn the internet on" in text
    assert "kaggle" not in text.lower() and "2." not in text


# --- downloads, against a server on 127.0.0.1 ---------------------------------------------------------------
@pytest.fixture()
def server(loopback):
    return loopback.url, loopback.routes


def _zip_bytes(tmp_path) -> bytes:
    path = tmp_path / "made.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("data/train/a.txt", "hello" * 100)
    return path.read_bytes()


def _check_zip(path: Path) -> None:
    with zipfile.ZipFile(path) as zf:
        bad = zf.testzip()
        if bad:
            raise ValueError(f"{bad} is corrupt")


def test_download_complete_file_is_kept_and_reused(sh, server, tmp_path):
    url, routes = server
    routes["/d.zip"] = (_zip_bytes(tmp_path), None)
    dest = tmp_path / "cache" / "d.zip"
    assert sh.download_file(f"{url}/d.zip", dest, check=_check_zip) == dest
    assert zipfile.ZipFile(dest).read("data/train/a.txt") == b"hello" * 100
    routes.clear()  # the server forgets it: a second call must not need the network
    assert sh.download_file(f"{url}/d.zip", dest, check=_check_zip) == dest
    assert sorted(p.name for p in dest.parent.iterdir()) == ["d.zip"]


def test_download_truncated_or_corrupt_is_refused_and_leaves_nothing(sh, server, tmp_path):
    url, routes = server
    good = _zip_bytes(tmp_path)
    routes["/cut.zip"] = (good[: len(good) // 2], len(good))    # the connection drops half-way
    routes["/bad.zip"] = (b"PK\x03\x04 this is not a zip" * 10, None)  # complete, but garbage
    cache = tmp_path / "cache"
    for name in ("cut.zip", "bad.zip"):
        with pytest.raises(sh.DownloadError, match=name):
            sh.download_file(f"{url}/{name}", cache / name, check=_check_zip)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_download_404_is_an_error_naming_the_url(sh, server, tmp_path):
    url, _ = server
    with pytest.raises(sh.DownloadError, match=r"missing\.zip.*404"):
        sh.download_file(f"{url}/missing.zip", tmp_path / "missing.zip")
    assert list(tmp_path.iterdir()) == []


def test_a_broken_cached_file_is_replaced(sh, server, tmp_path, capsys):
    url, routes = server
    routes["/d.zip"] = (_zip_bytes(tmp_path), None)
    dest = tmp_path / "d.zip"
    dest.write_bytes(b"left behind by an old version")
    sh.download_file(f"{url}/d.zip", dest, check=_check_zip)
    assert "is broken" in capsys.readouterr().out
    _check_zip(dest)


# --- exercise checks ----------------------------------------------------------------------------------------
def test_expect_raises_with_the_exercise_and_the_hint(sh, capsys):
    sh.expect(True, "Exercise 1.1: f", "never shown", "never shown")
    sh.passed("Exercise 1.1: f", "shape and values")
    assert capsys.readouterr().out == "✓ Exercise 1.1: f: shape and values\n"
    with pytest.raises(AssertionError, match=r"(?s)✗ Exercise 1.1: f: wrong shape.*Hint: flatten first"):
        sh.expect(False, "Exercise 1.1: f", "wrong shape", "flatten first")
