"""The shared setup helpers (the cells tagged `shared`, identical in all five notebooks).

They are tested once, as loaded from the first notebook; `test_shared_cells_are_identical` proves that
the other notebooks hold the very same text. References are independent of the helpers: scipy's t-tests
for the noise rule, torch's own GradScaler bookkeeping and a hand-computed SGD update for the step.
"""

from __future__ import annotations

import json

import nbformat
import numpy as np
import pytest
import torch
from scipy import stats

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
def _fake_cuda(monkeypatch, kernel_error=None, name="NVIDIA Fake"):
    """A CUDA card that torch reports; `kernel_error`: what its first kernel launch raises (P100 on new wheels)."""
    real_ones = torch.ones

    def ones(*args, device=None, **kw):
        if device == "cuda" and kernel_error:
            raise RuntimeError(kernel_error)
        return real_ones(*args, **kw)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch, "ones", ones)


def test_pick_device_takes_a_card_that_runs_a_kernel(sh, monkeypatch):
    _fake_cuda(monkeypatch, name="Tesla T4")
    assert sh.pick_device().type == "cuda"


def test_pick_device_skips_a_card_without_kernels_and_says_how_to_fix_it(sh, monkeypatch, capsys):
    _fake_cuda(monkeypatch, "CUDA error: no kernel image is available for execution on the device",
               "Tesla P100-PCIE-16GB")
    assert sh.pick_device().type == "cpu"
    said = capsys.readouterr().out
    assert "Tesla P100-PCIE-16GB" in said and "no kernel image" in said and "T4" in said


def test_pick_device_mps_then_cpu(sh, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert sh.pick_device().type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert sh.pick_device().type == "cpu"


def test_profile_resolution(sh, monkeypatch):
    monkeypatch.delenv("DLCV_PROFILE", raising=False)
    assert sh.resolve_profile(None, CPU) == "cpu"
    assert sh.resolve_profile(None, torch.device("cuda")) == "full"
    assert sh.resolve_profile(None, torch.device("mps")) == "full"
    monkeypatch.setenv("DLCV_PROFILE", "smoke")
    assert sh.resolve_profile(None, CPU) == "smoke" and sh.resolve_profile("full", CPU) == "full"
    with pytest.raises(ValueError, match="'huge'.*smoke, cpu or full"):
        sh.resolve_profile("huge", CPU)


# --- precision: a fixed rule, no timing ---------------------------------------------------------------------
AMD_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
INTEL_AMX = "flags\t\t: fpu avx512f amx_bf16 amx_tile\n"
OLD_X86 = "flags\t\t: fpu sse2 avx2 avx512f avx512bw\n"  # AVX-512 without BF16
ARM_BF16 = "Features\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize("text, native", [(AMD_BF16, True), (INTEL_AMX, True), (OLD_X86, False),
                                          (ARM_BF16, True), ("flags\t: fpu sse2\n", False), ("", False)])
def test_cpu_native_bf16_from_the_cpu_flags(sh, text, native):
    assert sh.cpu_native_bf16(text) is native


@pytest.mark.parametrize("device, capability, native, gains, expected", [
    ("cpu", None, True, True, "bf16"),     # reference machine, a model measured faster in bf16
    ("cpu", None, True, False, "fp32"),    # native bf16, but the model gains nothing (e.g. a small MLP)
    ("cpu", None, False, True, "fp32"),    # no AVX512-BF16: emulated bf16 would be slower
    ("cuda", (7, 5), None, False, "fp16"),  # T4: fp16 with a gradient scaler
    ("cuda", (8, 9), None, False, "bf16"),  # L4 and newer
    ("mps", None, None, True, "fp32"),     # Apple: fp32
])
def test_precision_rule(sh, monkeypatch, device, capability, native, gains, expected):
    monkeypatch.delenv("DLCV_PRECISION", raising=False)
    if capability:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    p = sh.choose_precision(torch.device(device), gains, native_bf16=native)
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert (p["name"], p["amp_dtype"], p["device_type"]) == (expected, dtypes[expected], device)
    assert p == sh.choose_precision(torch.device(device), gains, native_bf16=native)  # no timing: always the same


@pytest.mark.parametrize("forced", ["fp32", "bf16", "fp16"])
def test_precision_forced_by_the_environment(sh, monkeypatch, forced):
    monkeypatch.setenv("DLCV_PRECISION", forced)
    p = sh.choose_precision(CPU, cpu_bf16_gains=False, native_bf16=False)
    assert p["name"] == forced and "DLCV_PRECISION" in p["reason"]
    monkeypatch.setenv("DLCV_PRECISION", "fp64")
    with pytest.raises(ValueError, match="DLCV_PRECISION='fp64'"):
        sh.choose_precision(CPU, True)


def _model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 8 * 8, 10))
    return model, torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))


def test_fp32_step_is_plain_sgd(sh):
    """Without autocast the step is w ← w − lr·∇w, computed here by hand from autograd's gradients."""
    model, x, y = _model_and_batch()
    p = sh.choose_precision(CPU, False, native_bf16=False)
    grads = torch.autograd.grad(F_cross_entropy(model(x), y), list(model.parameters()))
    expected = [w.detach() - 0.1 * g for w, g in zip(model.parameters(), grads)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sh.autocast(p):
        loss = F_cross_entropy(model(x), y)
    assert sh.optimizer_step(loss, opt, sh.make_scaler(p)) is True
    for w, e in zip(model.parameters(), expected):
        torch.testing.assert_close(w.detach(), e)


def F_cross_entropy(out, y):  # noqa: N802 - torch.nn.functional's name, kept readable
    return torch.nn.functional.cross_entropy(out.float(), y)


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_step_on_the_cpu(sh, monkeypatch, name, dtype):
    """The T4 path (fp16 + scaler) and bf16 run on a CPU: activations in low precision, weights stay fp32."""
    monkeypatch.setenv("DLCV_PRECISION", name)
    p = sh.choose_precision(CPU, True)
    model, x, y = _model_and_batch()
    model = model.to(memory_format=torch.channels_last)
    before = [w.detach().clone() for w in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = sh.make_scaler(p)
    assert scaler.is_enabled() is (name == "fp16")
    with sh.autocast(p):
        out = model(x.contiguous(memory_format=torch.channels_last))
        assert out.dtype == dtype
        loss = F_cross_entropy(out, y)
    assert sh.optimizer_step(loss, opt, scaler)
    assert all(w.dtype == torch.float32 for w in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_skipped_fp16_step_leaves_weights_and_schedule_alone(sh, monkeypatch):
    """An overflow (inf loss): torch's scaler skips the update and lowers its scale; the scheduler stays put."""
    monkeypatch.setenv("DLCV_PRECISION", "fp16")
    p = sh.choose_precision(CPU, True)
    model, x, y = _model_and_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    scaler = sh.make_scaler(p)
    with sh.autocast(p):
        loss = F_cross_entropy(model(x), y)
    assert sh.optimizer_step(loss, opt, scaler, sched) and sched.last_epoch == 1
    before, scale = [w.detach().clone() for w in model.parameters()], scaler.get_scale()
    with sh.autocast(p):
        loss = F_cross_entropy(model(x), y) * float("inf")
    assert sh.optimizer_step(loss, opt, scaler, sched) is False
    assert sched.last_epoch == 1 and opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert scaler.get_scale() == scale * scaler.get_backoff_factor()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# --- the noise rule, against scipy's t statistics -------------------------------------------------------------
def test_paired_noise_rule_matches_scipy(sh):
    rng = np.random.default_rng(0)
    a = (rng.random(400) < 0.62).astype(float)  # per-item correctness of two models on the same items
    b = np.where(rng.random(400) < 0.8, a, 1 - a)
    diff, se, counts = sh.beyond_noise(a, b, paired=True)
    t = stats.ttest_rel(a, b).statistic
    assert diff == pytest.approx(a.mean() - b.mean()) and se == pytest.approx(diff / t)
    assert counts is bool(abs(t) > 2)


def test_unpaired_noise_rule_matches_welch(sh):
    rng = np.random.default_rng(1)
    a, b = rng.normal(30.0, 2.0, 60), rng.normal(29.0, 3.0, 45)  # e.g. per-image PSNRs of two test sets
    diff, se, counts = sh.beyond_noise(a, b, paired=False)
    t = stats.ttest_ind(a, b, equal_var=False).statistic
    assert se == pytest.approx(diff / t) and counts is bool(abs(t) > 2)


def test_noise_rule_hand_worked_and_bad_input(sh):
    # differences 1, 0, 1, 0: mean 0.5, sample sd 0.577, SE 0.289 → 0.5 < 2 SE: not beyond noise
    diff, se, counts = sh.beyond_noise([1, 1, 1, 1], [0, 1, 0, 1], paired=True)
    assert (diff, round(se, 3), counts) == (0.5, 0.289, False)
    assert sh.beyond_noise([1] * 50, [0] * 50, paired=True)[2] is True  # SE 0: any difference counts
    with pytest.raises(ValueError, match="paired alike: \\(3,\\), \\(2,\\)"):
        sh.beyond_noise([1, 0, 1], [1, 0], paired=True)
    with pytest.raises(ValueError, match="≥ 2"):
        sh.beyond_noise([1], [0], paired=False)


# --- lessons and results ----------------------------------------------------------------------------------
def test_lessons_are_printed_and_recorded(sh, capsys):
    lessons: dict = {}
    sh.record_lesson(lessons, "cnn_beats_mlp", True, "CNN 0.71 vs MLP 0.55 (difference 0.16, SE 0.02)")
    sh.record_lesson(lessons, "skips_help", False, "IoU 0.80 vs 0.81 (SE 0.01)")
    sh.record_lesson(lessons, "pretrained_beats_scratch", None, "no weights", unavailable="offline")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("✓ cnn_beats_mlp") and out[1].startswith("✗ skips_help")
    assert out[2].startswith("– pretrained_beats_scratch") and "offline" in out[2]
    assert lessons["skips_help"]["holds"] is False and lessons["pretrained_beats_scratch"]["holds"] is None
    assert lessons["pretrained_beats_scratch"]["unavailable"] == "offline"


class _Store:  # what save_results reads of a RunStore
    folder, arms = None, {"a": {"loaded": True, "date": "2026-12-07 10:00", "seconds": 3.0},
                          "b": {"loaded": False, "date": "2026-12-07 11:00", "seconds": 5.0}}


def test_save_results_converts_values_and_refuses_nan(sh, tmp_path, capsys):
    folders = {"results": tmp_path / "results"}
    metrics = {"acc": np.float32(0.5), "per_class": np.array([0.25, 0.75]), "t": torch.tensor(2.0), "c": (1, 2)}
    path = sh.save_results(folders, "homework_9", "smoke", CPU, {"name": "bf16"}, "synthetic", 12.34, metrics,
                           {"a": {"holds": True, "evidence": "1 > 0"}}, _Store())
    data = json.loads(path.read_text())
    assert data["precision"] == "bf16" and data["seconds"] == 12.3 and data["lessons"]["a"]["holds"] is True
    assert data["metrics"] == {"acc": 0.5, "per_class": [0.25, 0.75], "t": 2.0, "c": [1, 2]}
    assert (data["runs_loaded"], data["runs_trained"]) == (1, 1) and data["runs"] == _Store.arms
    assert "1 loaded from the store, 1 trained" in capsys.readouterr().out
    with pytest.raises(ValueError, match="JSON compliant"):
        sh.save_results(folders, "homework_8", "smoke", CPU, {"name": "fp32"}, "real", 1.0,
                        {"bad": [1.0, float("nan")]}, {}, _Store())
    assert not (tmp_path / "results" / "homework_8.json").exists()


def test_run_folders_cache_is_the_same_everywhere(sh, monkeypatch, tmp_path):
    for name in ("DLCV_CACHE_DIR", "DLCV_DATA_DIR", "DLCV_OFFLINE", "DLCV_RESULTS_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    f = sh.run_folders()
    assert f["cache"] == tmp_path / ".cache" / "dlcv" and f["data"] is None and f["offline"] is False


# --- finding the data -----------------------------------------------------------------------------------------
def _locate(path):
    return path if (path / "train").is_dir() else None


def _dataset(root, synthetic=False):
    (root / "train").mkdir(parents=True)
    if synthetic:
        (root / "SYNTHETIC").write_text("test data")
    return root


def _folders(tmp_path, data=None, offline=False):
    return {"data": data, "cache": tmp_path / "cache", "offline": offline}


def test_find_data_resolution_order(sh, tmp_path):
    kaggle = tmp_path / "kaggle"
    _dataset(kaggle / "someone" / "xray-dataset" / "v2")  # three folders deep, as Kaggle mounts datasets
    _dataset(tmp_path / "cache" / "xray")
    data = tmp_path / "data"
    _dataset(data / "xray", synthetic=True)
    calls = []
    download = lambda cache: calls.append(cache)  # noqa: E731
    found = sh.find_data("xray", _locate, _folders(tmp_path, data), [], download, kaggle_root=kaggle)
    assert found == (data / "xray", f"DLCV_DATA_DIR ({data / 'xray'})", "synthetic")
    path, origin, source = sh.find_data("xray", _locate, _folders(tmp_path), [], download, kaggle_root=kaggle)
    assert path == kaggle / "someone" / "xray-dataset" / "v2" and origin == f"Kaggle input ({path})"
    assert source == "real"
    path, origin, _ = sh.find_data("xray", _locate, _folders(tmp_path), [], download, kaggle_root=tmp_path / "no")
    assert path == tmp_path / "cache" / "xray" and origin == f"download cache ({path})" and calls == []


def test_find_data_downloads_into_the_cache_unless_offline(sh, tmp_path):
    calls = []

    def download(cache):
        calls.append(cache)
        return _dataset(cache / "unpacked")

    with pytest.raises(sh.DataNotFoundError, match="DLCV_OFFLINE"):
        sh.find_data("xray", _locate, _folders(tmp_path, offline=True), [], download, kaggle_root=tmp_path / "no")
    assert calls == []
    path, origin, source = sh.find_data("xray", _locate, _folders(tmp_path), [], download, kaggle_root=tmp_path / "no")
    assert calls == [tmp_path / "cache" / "xray"] and path == tmp_path / "cache" / "xray" / "unpacked"
    assert origin == f"download ({path})" and source == "real"


def test_find_data_error_lists_what_was_tried_and_the_fixes(sh, tmp_path):
    def offline(cache):
        raise OSError("Temporary failure in name resolution")

    data = tmp_path / "data"
    (data / "xray").mkdir(parents=True)  # there, but not in the layout
    with pytest.raises(sh.DataNotFoundError) as err:
        sh.find_data("xray", _locate, _folders(tmp_path, data), ["turn the internet on", "set DLCV_DATA_DIR"],
                      offline, kaggle_root=tmp_path / "no")
    text = str(err.value)
    assert f"$DLCV_DATA_DIR/xray ({data})" in text and f"Kaggle inputs under {tmp_path / 'no'}" in text
    assert f"the cache {tmp_path / 'cache' / 'xray'}" in text
    assert "OSError: Temporary failure in name resolution" in text
    assert "1. turn the internet on" in text and "2. set DLCV_DATA_DIR" in text
    with pytest.raises(sh.DataNotFoundError, match="not in the expected layout"):
        sh.find_data("xray", _locate, _folders(tmp_path), [], lambda cache: tmp_path, kaggle_root=tmp_path / "no")


# --- random samples -----------------------------------------------------------------------------------------
def test_sample_indices_on_a_class_sorted_folder(sh):
    labels = np.repeat(np.arange(10), 400)  # 4,000 items sorted by class, as folders list them
    idx = sh.sample_indices(len(labels), 1000, seed=0, labels=labels)
    assert len(idx) == 1000 and len(np.unique(idx)) == 1000 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx], minlength=10).tolist() == [100] * 10  # a first-1000 pick: 3 classes
    assert np.array_equal(idx, sh.sample_indices(len(labels), 1000, seed=0, labels=labels))
    assert not np.array_equal(idx, sh.sample_indices(len(labels), 1000, seed=1, labels=labels))
    uneven = np.array([0] * 70 + [1] * 20 + [2] * 10)
    assert np.bincount(uneven[sh.sample_indices(100, 10, 0, uneven)], minlength=3).tolist() == [7, 2, 1]
    plain = sh.sample_indices(50, 5, seed=3)
    assert len(plain) == 5 and plain.max() < 50 and not np.array_equal(plain, np.arange(5))
    assert len(sh.sample_indices(5, 50, seed=3)) == 5  # asking for more than there is gives all


# --- exercise checks ----------------------------------------------------------------------------------------
def test_expect_raises_with_the_exercise_and_the_hint(sh, capsys):
    sh.expect(True, "Exercise 1.1: f", "never shown", "never shown")
    sh.passed("Exercise 1.1: f", "shape and values")
    assert capsys.readouterr().out == "✓ Exercise 1.1: f: shape and values\n"
    with pytest.raises(AssertionError, match=r"(?s)✗ Exercise 1.1: f: wrong shape.*Hint: flatten first"):
        sh.expect(False, "Exercise 1.1: f", "wrong shape", "flatten first")


# --- resumable runs: the run store ----------------------------------------------------------------------------
NOTEBOOK_CODE = '''
import torch
import torch.nn as nn


def act(x):
    return torch.relu(x)


class Wide(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.hidden, self.out = nn.Linear(3, width), nn.Linear(width, 1)

    def forward(self, x):
        return self.out(act(self.hidden(x)))


def fit(model, x, y, steps, lr):
    """SGD on a noisy copy of x: the noise comes from the global generator, as a notebook's batches do."""
    opt, losses = torch.optim.SGD(model.parameters(), lr=lr), []
    for _ in range(steps):
        loss = ((model(x + 0.1 * torch.randn_like(x)).squeeze(1) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "last": torch.tensor(losses[-1]), "pair": (1, "a")}


def run_arms(store, x, y, steps_b=4):
    """Two arms, as a notebook runs them: "wide" reaches act() through Wide.forward; "linear" does not."""
    out = {"wide": store.train_or_load("wide", lambda: Wide(8), lambda m: fit(m, x, y, 5, 0.1),
                                       steps=5, lr=0.1, data=(x, y)),
           "linear": store.train_or_load("linear", lambda: nn.Sequential(nn.Linear(3, 1)),
                                         lambda m: fit(m, x, y, steps_b, 0.1), steps=steps_b, lr=0.1, data=(x, y))}
    return out | {"after": torch.rand(3)}  # what the notebook draws next
'''


def _notebook(code: str, version: int):
    """A module whose functions have source text, as a notebook kernel's do (IPython keeps cells in linecache)."""
    import linecache
    import types

    filename = f"<notebook cell, version {version}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    module = types.ModuleType(f"notebook_v{version}")
    exec(compile(code, filename, "exec"), module.__dict__)
    return module


def _arms(sh, nb, store, x, y, steps_b=4):
    return nb.run_arms(store, x, y, steps_b)


def _store(sh, tmp_path, switch=None, seed=0):
    return sh.RunStore({"cache": tmp_path}, "homework_9", "smoke", seed, CPU, {"name": "fp32"}, switch)


@pytest.fixture()
def xy():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, generator=g)
    return x, x @ torch.tensor([1.0, -2.0, 0.5])


def _same(a, b):
    (ma, ha), (mb, hb) = a, b
    assert ha.keys() == hb.keys()
    assert ha["losses"] == hb["losses"] and torch.equal(ha["last"], hb["last"]) and ha["pair"] == hb["pair"]
    assert all(torch.equal(p, q) for p, q in zip(ma.state_dict().values(), mb.state_dict().values()))


def test_a_second_run_loads_every_arm_with_the_same_weights_history_and_random_draws(sh, tmp_path, xy, capsys):
    nb = _notebook(NOTEBOOK_CODE, 1)
    first = _arms(sh, nb, store := _store(sh, tmp_path), *xy)
    assert [a["loaded"] for a in store.arms.values()] == [False, False]
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "runs" / "homework_9").glob("*.pt")) == ["linear", "wide"]
    second = _arms(sh, nb, store := _store(sh, tmp_path), *xy)
    assert [a["loaded"] for a in store.arms.values()] == [True, True]
    assert "wide: loaded (trained" in capsys.readouterr().out
    for name in ("wide", "linear"):
        _same(first[name], second[name])
        assert not second[name][0].training  # returned in eval mode, loaded or trained
    assert torch.equal(first["after"], second["after"])  # loading draws the same numbers afterwards
    assert first["wide"][1]["losses"][0] > first["wide"][1]["losses"][-1]  # it did train


def test_an_arm_trained_beside_a_loaded_one_gets_the_numbers_of_a_fresh_run(sh, tmp_path, xy):
    """Each arm seeds itself from the notebook's seed and its name: loading one arm changes no other."""
    nb = _notebook(NOTEBOOK_CODE, 1)
    fresh = _arms(sh, nb, _store(sh, tmp_path), *xy)
    for path in (tmp_path / "runs" / "homework_9").glob("linear-*.pt"):
        path.unlink()
    mixed = _arms(sh, nb, store := _store(sh, tmp_path), *xy)
    assert {n: a["loaded"] for n, a in store.arms.items()} == {"wide": True, "linear": False}
    _same(fresh["linear"], mixed["linear"])
    other_seed = _arms(sh, nb, _store(sh, tmp_path / "elsewhere", seed=1), *xy)
    assert other_seed["wide"][1]["losses"] != fresh["wide"][1]["losses"]  # the seed is in the key and the draws


def test_a_changed_function_or_setting_retrains_exactly_the_arms_that_use_it(sh, tmp_path, xy):
    _arms(sh, _notebook(NOTEBOOK_CODE, 1), _store(sh, tmp_path), *xy)
    edited = _notebook(NOTEBOOK_CODE.replace("return torch.relu(x)", "return torch.nn.functional.gelu(x)"), 2)
    _arms(sh, edited, store := _store(sh, tmp_path), *xy)  # act() is reached from Wide.forward only
    assert {n: a["loaded"] for n, a in store.arms.items()} == {"wide": False, "linear": True}
    _arms(sh, edited, store := _store(sh, tmp_path), *xy, steps_b=5)  # one setting of one arm
    assert {n: a["loaded"] for n, a in store.arms.items()} == {"wide": True, "linear": False}
    x, y = xy
    _arms(sh, edited, store := _store(sh, tmp_path), x, y + 1)  # other data: both
    assert {n: a["loaded"] for n, a in store.arms.items()} == {"wide": False, "linear": False}
    assert len(list((tmp_path / "runs" / "homework_9").glob("*.pt"))) == 2, "a retrained arm replaces its old run"


def test_the_key_holds_the_initial_weights_and_the_runs_context(sh, tmp_path, xy):
    nb = _notebook(NOTEBOOK_CODE, 1)
    store = _store(sh, tmp_path)
    store.train_or_load("wide", lambda: nb.Wide(8), lambda m: nb.fit(m, *xy, 2, 0.1))
    store.train_or_load("wide", lambda: nb.Wide(9), lambda m: nb.fit(m, *xy, 2, 0.1))  # another architecture
    other = sh.RunStore({"cache": tmp_path}, "homework_9", "smoke", 0, CPU, {"name": "bf16"})  # another precision
    other.train_or_load("wide", lambda: nb.Wide(9), lambda m: nb.fit(m, *xy, 2, 0.1))
    same = _store(sh, tmp_path)
    same.train_or_load("wide", lambda: nb.Wide(9), lambda m: nb.fit(m, *xy, 2, 0.1))
    assert [s.arms["wide"]["loaded"] for s in (store, other, same)] == [False, False, False]
    assert sh.fingerprint(torch.zeros(3)) != sh.fingerprint(torch.zeros(4))
    assert sh.fingerprint(np.arange(5)) != sh.fingerprint(np.arange(5) + 1)
    assert sh.fingerprint({"lr": 0.1}) != sh.fingerprint({"lr": 0.10000001})


def test_a_corrupt_or_truncated_entry_is_trained_again_with_a_note(sh, tmp_path, xy, capsys):
    nb = _notebook(NOTEBOOK_CODE, 1)
    first = _arms(sh, nb, _store(sh, tmp_path), *xy)
    (path,) = (tmp_path / "runs" / "homework_9").glob("wide-*.pt")
    path.write_bytes(path.read_bytes()[:100])
    again = _arms(sh, nb, store := _store(sh, tmp_path), *xy)
    assert {n: a["loaded"] for n, a in store.arms.items()} == {"wide": False, "linear": True}
    assert "wide: unreadable" in capsys.readouterr().out
    _same(first["wide"], again["wide"])
    assert _arms(sh, nb, store := _store(sh, tmp_path), *xy) and store.arms["wide"]["loaded"]  # stored again


def test_runs_off_trains_every_time_and_keeps_nothing(sh, tmp_path, xy, monkeypatch):
    nb = _notebook(NOTEBOOK_CODE, 1)
    for switch in ("off", None):
        monkeypatch.setenv("DLCV_RUNS", "off")
        store = _store(sh, tmp_path, switch)
        _arms(sh, nb, store, *xy)
        _arms(sh, nb, store, *xy)
        assert store.folder is None and not any(a["loaded"] for a in store.arms.values())
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ValueError, match="RUNS or \\$DLCV_RUNS is 'of'"):
        _store(sh, tmp_path, "of")


def test_a_history_the_store_cannot_reload_fails_at_once(sh, tmp_path):
    """numpy arrays cannot be loaded with weights_only=True: the first (fresh) run already says so."""
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global"):
        _store(sh, tmp_path).train_or_load("numpy", lambda: None, lambda m: {"scores": np.zeros(3)})


def test_code_of_follows_names_through_classes_lambdas_and_helpers(sh):
    nb = _notebook(NOTEBOOK_CODE, 1)
    text = sh.code_of(nb.Wide)  # a class: its methods, and what they call
    assert "def act(x)" in text and "def forward(self, x)" in text and "def fit(" not in text
    text = sh.code_of(nb.run_arms)  # a function: its lambdas, the classes and functions they name
    assert all(f"def {name}(" in text for name in ("run_arms", "act", "fit", "forward"))
    assert "in_features" not in text  # torch's nn.Linear is not the notebook's: torch's version is in the key
