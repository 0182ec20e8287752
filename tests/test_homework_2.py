"""Unit tests of homework 2's own definitions (its `lib` cells): exercises and their checks, blocks, schedules,
augmentation, statistics, the noise rule, the training loop and the data pipelines."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nbload import load_lib

CPU = torch.device("cpu")
STATS = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def hw():
    return load_lib("homework_2")


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % 10


# ------------------------------------------------------------------------------ Exercise 2.1: conv arithmetic
def test_check_conv_arithmetic_passes_the_solution(hw, capsys):
    hw.check_conv_arithmetic(hw.conv_output_size, hw.conv_parameters)
    assert "✓ Exercise 2.1" in capsys.readouterr().out


@pytest.mark.parametrize("size_fn,param_fn,hint", [
    (lambda n, k, s=1, p=0: (n + 2 * p - k) // s, None, r"first position counts too"),  # no +1
    (lambda n, k, s=1, p=0: (n + p - k) // s + 1, None, r"padding is added on both sides"),  # pad once
    (lambda n, k, s=1, p=0: round((n + 2 * p - k) / s) + 1, None, r"round down"),  # rounds half-way cases
    (lambda n, k, s=1, p=0: (n - k) // s + 1, None, r"keep every stride-th position"),  # no padding: generic hint
    (None, lambda ci, co, k, bias=True: co * k * k + (co if bias else 0), r"every input channel"),   # no c_in
    (None, lambda ci, co, k, bias=True: co * ci * k * k, r"one bias per output channel"),            # no bias
])
def test_check_conv_arithmetic_rejects_wrong_answers(hw, size_fn, param_fn, hint):
    with pytest.raises(AssertionError, match=hint):
        hw.check_conv_arithmetic(size_fn or hw.conv_output_size, param_fn or hw.conv_parameters)


# ------------------------------------------------------------------------------ Exercise 2.2: the random crop
def test_check_random_crop_passes_the_solution(hw, capsys):
    hw.check_random_crop(hw.crop_with_offsets)
    assert "✓ Exercise 2.2" in capsys.readouterr().out


def _loop_crop(shrink=0, swap=False, first_only=False, channels_last=False):
    def crop(x, dy, dx, size):
        if swap:
            dy, dx = dx, dy
        if first_only:
            dy, dx = dy[:1].expand(len(x)), dx[:1].expand(len(x))
        out = torch.stack([x[i, :, dy[i]:dy[i] + size - shrink, dx[i]:dx[i] + size - shrink]
                           for i in range(len(x))])
        return out.permute(0, 2, 3, 1) if channels_last else out
    return crop


@pytest.mark.parametrize("wrong,hint", [
    (_loop_crop(swap=True), r"rows \(dimension 2\) go with dy"),
    (_loop_crop(first_only=True), r"its own offsets"),
    (_loop_crop(shrink=1), r"not \(16, 3, 10, 10\)"),  # one row and column short
    (_loop_crop(channels_last=True), r"permute the channels back"),
])
def test_check_random_crop_rejects_wrong_crops(hw, wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        hw.check_random_crop(wrong)


# ------------------------------------------------------------------------------ Exercise 2.5: warm-up + cosine
def test_check_warmup_cosine_passes_the_solution(hw, capsys):
    hw.check_warmup_cosine(hw.warmup_cosine_lr)
    assert "✓ Exercise 2.5" in capsys.readouterr().out


def _cos(peak, t):
    return peak * 0.5 * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize("wrong,hint", [
    (lambda s, T, p, w: p * s / w if s < w else _cos(p, (s - w) / (T - w)), r"step 0 already trains"),
    (lambda s, T, p, w: p * (s + 1) / (w + 1) if s < w else _cos(p, (s - w) / (T - w)),
     r"equal increments"),
    (lambda s, T, p, w: p * (s + 1) / w if s <= w else _cos(p, (s - w) / (T - w)), r"starts at the peak"),
    (lambda s, T, p, w: p * (s + 1) / w if s < w else _cos(p, s / T), r"counts from the end of the warm-up"),
    (lambda s, T, p, w: p * (s + 1) / w if s < w else p * 0.5 * math.cos(math.pi * (s - w) / (T - w)),
     r"starts at the peak"),
    (lambda s, T, p, w: (s + 1) / w if s < w else _cos(1.0, (s - w) / (T - w)), r"use the arguments"),
])
def test_check_warmup_cosine_rejects_wrong_schedules(hw, wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        hw.check_warmup_cosine(wrong)


# ------------------------------------------------------------------------------ Exercise 2.4: the residual block
def _zero_residual_branch(block):
    """conv2 = 0 and bn2's bias = 0: the residual branch outputs exactly zero (eval mode, fresh stats)."""
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.bn2.bias.zero_()
    block.bn2.reset_running_stats()
    return block.eval()


@pytest.mark.parametrize("c_in,c_out,stride", [(8, 16, 2), (8, 16, 1), (8, 8, 2)])
def test_projection_shortcut_by_hand(hw, c_in, c_out, stride):
    torch.manual_seed(0)
    block = hw.BasicBlock(c_in, c_out, stride=stride)
    conv, bn = block.shortcut[0], block.shortcut[1]
    assert conv.kernel_size == (1, 1) and conv.stride == (stride, stride)
    with torch.no_grad():  # non-trivial BN statistics, so the hand computation is not a no-op
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    _zero_residual_branch(block)
    x = torch.randn(3, c_in, 12, 12)
    z = F.conv2d(x, conv.weight, stride=stride)
    shape = (1, -1, 1, 1)
    z = (z - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
    expected = F.relu(z * bn.weight.view(shape) + bn.bias.view(shape))
    out = block(x)
    assert out.shape == (3, c_out, 12 // stride, 12 // stride)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_check_basic_block_passes_the_solution(hw, capsys):
    hw.check_basic_block(hw.BasicBlock)
    assert "✓ Exercise 2.4" in capsys.readouterr().out


def _block_with(forward):
    def make(hw):
        return type("WrongBlock", (hw.BasicBlock,), {"forward": forward})
    return make


def _branch(self, x):
    return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


DIFFERS = r"differs from torchvision's BasicBlock"


@pytest.mark.parametrize("forward,hint", [
    (lambda self, x: F.relu(_branch(self, x)) + (self.shortcut(x) if self.residual else 0), DIFFERS),
    (lambda self, x: F.relu(_branch(self, x)), DIFFERS),  # no shortcut
    (lambda self, x: _branch(self, x) + (self.shortcut(x) if self.residual else 0), DIFFERS),  # no last ReLU
    (lambda self, x: F.relu(_branch(self, x) + self.shortcut(x)), r"residual=False\): the output differs"),
    (lambda self, x: F.relu(_branch(self, x) + self.shortcut(_branch(self, x))), DIFFERS),
])
def test_check_basic_block_rejects_wrong_forwards(hw, forward, hint):
    with pytest.raises(AssertionError, match=hint):
        hw.check_basic_block(_block_with(forward)(hw))


def _block_with_shortcut(make_shortcut):
    def make(hw):
        class WrongBlock(hw.BasicBlock):
            def __init__(self, c_in, c_out, stride=1, residual=True):
                super().__init__(c_in, c_out, stride, residual)
                self.shortcut = make_shortcut(c_in, c_out, stride, residual)
        return WrongBlock
    return make


def _projection(c_in, c_out, stride=1, bias=False):
    return torch.nn.Sequential(torch.nn.Conv2d(c_in, c_out, 1, stride=stride, bias=bias), torch.nn.BatchNorm2d(c_out))


class _Zeros(torch.nn.Module):
    def __init__(self, c_out, stride):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(1))  # a "weight" that cannot carry x
        self.c_out, self.stride = c_out, stride

    def forward(self, x):
        return self.scale * x[:, :1, ::self.stride, ::self.stride].expand(-1, self.c_out, -1, -1)


@pytest.mark.parametrize("make_shortcut,hint", [
    (lambda ci, co, s, r: torch.nn.Identity(), r"the shortcut gives \(2, 8, 8, 8\), the branch"),  # never projects
    (lambda ci, co, s, r: _projection(ci, co) if ci != co else torch.nn.Identity(), r"the shortcut gives"),  # stride
    (lambda ci, co, s, r: _projection(ci, co, s), r"changes an input it could pass on unchanged"),  # always projects
    (lambda ci, co, s, r: torch.nn.Sequential(), r"has no weights to learn|the shortcut gives"),  # nothing learnable
    (lambda ci, co, s, r: _Zeros(co, s) if (ci, s) != (co, 1) else torch.nn.Identity(), r"drops the input"),
])
def test_check_basic_block_rejects_wrong_shortcuts(hw, make_shortcut, hint):
    with pytest.raises(AssertionError, match=hint):
        hw.check_basic_block(_block_with_shortcut(make_shortcut)(hw))


@pytest.mark.parametrize("make_shortcut", [
    lambda ci, co, s, r: _projection(ci, co, s, bias=True) if (ci, s) != (co, 1) else torch.nn.Identity(),
    lambda ci, co, s, r: torch.nn.Conv2d(ci, co, 1, stride=s) if (ci, s) != (co, 1) else torch.nn.Identity(),
    lambda ci, co, s, r: torch.nn.Sequential(torch.nn.Conv2d(ci, co, 3, stride=s, padding=1, bias=False),
                                             torch.nn.BatchNorm2d(co)) if (ci, s) != (co, 1) else torch.nn.Identity(),
])
def test_check_basic_block_accepts_any_learnable_projection(hw, make_shortcut, capsys):
    """The task box asks for a learnable map to the branch's shape, not for given layers: other designs pass."""
    hw.check_basic_block(_block_with_shortcut(make_shortcut)(hw))
    assert "✓ Exercise 2.4" in capsys.readouterr().out


# ------------------------------------------------------------------------------ Exercise 2.3: the prediction
def test_check_prediction_reports_the_run_and_rejects_no_prediction(hw, capsys):
    good, bad = torch.ones(400, dtype=torch.bool), torch.zeros(400, dtype=torch.bool)
    good[:30] = False
    hw.check_prediction("shallow", good, bad)
    assert "this run: shallow" in capsys.readouterr().out
    hw.check_prediction("deep", good, bad)  # a wrong prediction is reported, not an error
    assert "not what you predicted" in capsys.readouterr().out
    hw.check_prediction("neither", good, good)
    assert "as you predicted" in capsys.readouterr().out
    for wrong in (None, "higher", "Shallow"):
        with pytest.raises(AssertionError, match="set it to one of"):
            hw.check_prediction(wrong, good, bad)


@pytest.mark.parametrize("blocks", [1, 3])
def test_cifar_resnet_depth_and_shapes(hw, blocks):
    net = hw.CifarResNet(blocks, (4, 8, 16))
    convs3 = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert net.depth == 6 * blocks + 2 == len(convs3) + 1  # 3x3 convs + the linear head
    projections = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)]
    assert len(projections) == 2  # only where stages change width and resolution
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    plain = hw.CifarResNet(blocks, (4, 8, 16), residual=False)
    assert not any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) for m in plain.modules())


def test_multiply_adds_by_hand(hw):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, stride=2, padding=1,
                                                                                  groups=2),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10))
    assert hw.multiply_adds(net, CPU) == 4 * 32 * 32 * 27 + 4 * 16 * 16 * 2 * 9 + 10 * 4


# ------------------------------------------------------------------------------------------- schedules
def _lrs(hw, name, total, peak=0.4, warmup=0.2):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    sched = hw.make_scheduler(name, opt, total, warmup)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def test_schedules_by_hand_all_after_the_same_warm_up(hw):
    # 8 steps, warm-up 0.2 → 2 warm-up steps at 0.5 and 1.0 of the peak, then each schedule's own shape
    assert _lrs(hw, "constant", 8, peak=1.0) == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1])
    assert _lrs(hw, "step", 8, peak=1.0) == pytest.approx([0.5, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])  # ×0.1 at 50%, 75%
    warm = _lrs(hw, "warmup_cosine", 10, peak=1.0, warmup=0.2)  # 2 warm-up steps, then half a cosine over 8
    assert warm == pytest.approx([0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])
    assert _lrs(hw, "plateau", 8, peak=1.0) == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1])  # nothing reported
    assert _lrs(hw, lambda s: 2.0 ** s, 4, peak=0.1) == pytest.approx([0.1, 0.2, 0.4, 0.8])  # a function: no warm-up
    with pytest.raises(ValueError, match="unknown schedule"):
        _lrs(hw, "cosine-ish", 3)


def test_plateau_factor_matches_torchs_reduce_on_plateau(hw):
    metrics = [0.30, 0.40, 0.40, 0.4005, 0.45, 0.44, 0.43, 0.46, 0.4601, 0.4602]
    ours, opt = hw.PlateauFactor(patience=1), torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    torch_plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.3, patience=1,
                                                               threshold=1e-3, threshold_mode="abs")
    for m in metrics:
        ours.report(m)
        torch_plateau.step(m)
        assert ours.factor == pytest.approx(opt.param_groups[0]["lr"])
    assert ours.factor == pytest.approx(0.3 ** 3)  # cut after checks 4, 7 and 10, worked out by hand


def test_plateau_schedule_cuts_the_rate_when_told(hw):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = hw.make_scheduler("plateau", opt, 10, 0.2)
    seen = []
    for step in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        if step in (2, 3, 4):
            sched.plateau.report(0.5)  # a best, then two stalled checks: more than patience 1 → ×0.3
    assert seen == pytest.approx([0.5, 1, 1, 1, 1, 1, 0.3, 0.3, 0.3, 0.3])


# ------------------------------------------------------------------------------------------------ data
def test_stratified_split_on_class_sorted_labels(hw):
    labels = torch.arange(10).repeat_interleave(100)  # sorted by class, as folders are listed
    tr, va = hw.stratified_split(labels, 100, seed=0)
    assert len(set(tr.tolist()) & set(va.tolist())) == 0 and len(tr) + len(va) == 1000
    assert torch.bincount(labels[va], minlength=10).tolist() == [10] * 10  # the last 100 would be one class
    assert torch.equal(va, hw.stratified_split(labels, 100, seed=0)[1])
    assert not torch.equal(va, hw.stratified_split(labels, 100, seed=1)[1])


def test_channel_stats_match_numpy(hw):
    x, _ = _data(50)
    mean, std = hw.channel_stats(x, chunk=7)  # chunks of 7 do not divide 50: the sums must still add up
    ref = x.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(std, ref.std(axis=(0, 2, 3)), rtol=1e-8)


def test_normalize_uses_the_given_statistics(hw):
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = hw.normalize(x, ((0.2, 0.4, 0.6), (0.5, 0.25, 0.1)))
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([1.6, 2.4, 4.0]))
    assert hw.normalize(x, STATS, channels_last=True).is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------- augmentation
def test_augmentation_keeps_labels_aligned(hw):
    labels = torch.arange(10).repeat(13)
    x = labels.view(-1, 1, 1, 1).float().expand(-1, 3, 32, 32).contiguous()  # each image "is" its label
    out = hw.augment_batch(x, pad=4, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert torch.equal(out.amax(dim=(1, 2, 3)), labels.float()) and torch.equal(out.amin(dim=(1, 2, 3)), labels.float())


def test_augmentation_moves_and_flips(hw):
    x = torch.zeros(400, 3, 32, 32)
    x[:, :, 16, 20] = 1.0  # one bright pixel right of the centre
    out = hw.augment_batch(x, pad=2, flip=True, generator=torch.Generator().manual_seed(0))
    pos = out[:, 0].flatten(1).argmax(1)
    rows, cols = pos // 32, pos % 32
    assert out[:, 0].flatten(1).amax(1).eq(1).all()  # the pixel survives (it is far from the border)
    assert rows.min() >= 14 and rows.max() <= 18 and len(torch.unique(rows)) == 5
    assert 0.35 < (cols < 16).float().mean() < 0.65  # about half the images are mirrored
    assert torch.equal(hw.augment_batch(x, pad=0, flip=False), x)


def test_cutout_blanks_one_square_per_image(hw):
    x = torch.ones(300, 3, 32, 32)
    out = hw.augment_batch(x, pad=0, flip=False, generator=torch.Generator().manual_seed(0), cutout=8)
    holes = out[:, 0] == 0
    assert torch.equal(holes, (out == 0).all(1))  # the same pixels in every channel
    for hole in holes:
        rows, cols = hole.any(1).nonzero().squeeze(1), hole.any(0).nonzero().squeeze(1)
        assert 1 <= len(rows) <= 8 and 1 <= len(cols) <= 8
        assert hole.sum() == len(rows) * len(cols)  # one solid rectangle (a square clipped at the border)
        assert (rows.diff() == 1).all() and (cols.diff() == 1).all()
    sizes = holes.sum((1, 2))
    assert (sizes == 64).float().mean() > 0.5 and sizes.min() < 64  # mostly whole squares, some clipped
    centres = holes.float().flatten(1).argmax(1)
    assert len(torch.unique(centres)) > 100  # every image has its own square


def test_tta_views_by_hand(hw):
    x = torch.randn(2, 3, 8, 8)
    assert len(hw.tta_views(x, 0)) == 1 and len(hw.tta_views(x, 1)) == 2
    views = hw.tta_views(x, 2)
    assert len(views) == 6
    torch.testing.assert_close(views[1], x.flip(3))
    torch.testing.assert_close(views[2][..., 1:, 1:], x[..., :-1, :-1])  # shifted down-right by one pixel
    torch.testing.assert_close(views[4][..., :-1, :-1], x[..., 1:, 1:])  # shifted up-left
    torch.testing.assert_close(views[5], views[4].flip(3))
    xu, _ = _data(6)
    net = hw.PlainCNN((4, 4, 4)).eval()
    by_hand = torch.stack([net(v) for v in hw.tta_views(hw.normalize(xu, STATS), 2)]).mean(0)
    torch.testing.assert_close(hw.predict_logits(net, xu, stats=STATS, batch_size=4, device=CPU, tta=2), by_hand,
                               atol=1e-5, rtol=1e-5)


def test_dataloader_baseline_produces_the_same_standardised_images(hw):
    """Both pipelines of section 4a give the same images: torchvision's Normalize == our normalize."""
    x, y = _data(8)
    ds = hw.NaiveCifarDataset(x, y, pad=0, stats=STATS)
    ours = hw.normalize(x, STATS)
    for i in range(8):
        img, label = ds[i]
        assert label == int(y[i])
        assert torch.allclose(img, ours[i], atol=1e-5) or torch.allclose(img, ours[i].flip(2), atol=1e-5)


def test_loader_workers_follow_the_cpus_this_process_may_use(hw, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5}, raising=False)  # a 2-CPU quota on a big host
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert hw.loader_workers() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert hw.loader_workers(cap=8) == 8
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows: every core
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert hw.loader_workers() == 3


def test_dataloader_keeps_the_default_start_method(hw, monkeypatch):
    """No forced fork: under spawn (macOS, Windows) a notebook's dataset class cannot reach the workers,
    so the loader runs in the main process instead of failing; under fork the workers are used."""
    import multiprocessing

    x, y = _data(8)
    ds = hw.NaiveCifarDataset(x, y, pad=2, stats=STATS)
    made = []
    real_loader = torch.utils.data.DataLoader
    monkeypatch.setattr(torch.utils.data, "DataLoader", lambda *a, **k: made.append(k) or real_loader(*a, **k))
    monkeypatch.setattr(type(ds), "__module__", "__main__")  # as when defined in a notebook
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: "spawn")
    speeds, workers = hw.dataloader_speed(ds, batch_size=4, device=CPU, workers=2, rounds=1)
    assert workers == 0 and made[-1]["num_workers"] == 0 and len(speeds) == 1
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: "fork")
    _, workers = hw.dataloader_speed(ds, batch_size=4, device=CPU, workers=1, rounds=1)
    assert workers == 1 and made[-1]["num_workers"] == 1
    assert all("multiprocessing_context" not in k for k in made)


# ---------------------------------------------------------------------------------------- noise rule
def test_beats_uses_two_standard_errors(hw):
    n = 1000
    b = torch.zeros(n, dtype=torch.bool)
    clear, close = b.clone(), b.clone()
    clear[:100] = True  # +0.10, SE ≈ 0.0095
    close[:5] = True    # +0.005, SE ≈ 0.0022 → 2 SE ≈ 0.0045 < 0.005: still beats
    assert hw.beats("A", clear, "B", b)[0] and hw.beats("A", close, "B", b)[0]
    close[:3] = False   # +0.002 with 2 SE ≈ 0.0028: within noise
    holds, evidence = hw.beats("A", close, "B", b)
    assert not holds and "A 0.002 vs B 0.000" in evidence and "2 SE = 0.003" in evidence
    assert not hw.beats("A", b, "B", clear)[0]  # worse never beats, however clear the difference


# --------------------------------------------------------------------------------- training machinery
class DeviceTensor(torch.Tensor):
    """Stands for a tensor on a device without float64 (Apple's MPS): any float64 result raises; `.cpu()`
    gives a plain tensor, as a copy to the CPU would."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to_cpu = func is torch.Tensor.to and any(str(a) == "cpu" for a in (*args[1:], *kwargs.values()))
        if func is torch.Tensor.cpu or to_cpu:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs).clone()
        out = super().__torch_function__(func, types, args, kwargs)
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, DeviceTensor) and t.dtype == torch.float64:
                raise AssertionError(f"float64 on the device ({getattr(func, '__name__', func)})")
        return out


def test_device_tensor_catches_float64(hw):
    x = torch.randn(4, 3).as_subclass(DeviceTensor)
    with pytest.raises(AssertionError, match="float64 on the device"):
        x.double()
    with pytest.raises(AssertionError, match="float64 on the device"):
        torch.cov(x.T.to(torch.float64))
    assert x.cpu().double().dtype == torch.float64 and type(x.cpu()) is torch.Tensor


def test_statistics_never_use_float64_on_the_device(hw):
    """channel_stats and init_whitening on a device tensor compute their float64 statistics on a CPU copy."""
    x, _ = _data(20)
    mean, std = hw.channel_stats(x.as_subclass(DeviceTensor), chunk=7)
    np.testing.assert_allclose(mean, hw.channel_stats(x)[0], rtol=1e-12)
    xn = hw.normalize(x, STATS)
    conv = torch.nn.Conv2d(3, 24, 2)
    hw.init_whitening(conv, xn.as_subclass(DeviceTensor))
    ref = torch.nn.Conv2d(3, 24, 2)
    hw.init_whitening(ref, xn)
    torch.testing.assert_close(conv.weight.as_subclass(torch.Tensor), ref.weight, rtol=0, atol=0)


def test_whitening_layer_decorrelates(hw):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 3, 16, 16, generator=g)
    x = base + 0.8 * base.roll(1, dims=3) + 0.5 * base[:, :1]  # correlated pixels and channels
    conv = torch.nn.Conv2d(3, 24, 2)
    hw.init_whitening(conv, x, eps=1e-6)
    with torch.no_grad():
        z = conv(x)[:, :12].permute(1, 0, 2, 3).reshape(12, -1)
    torch.testing.assert_close(torch.cov(z.double()), torch.eye(12, dtype=torch.float64), atol=0.02, rtol=0)


def test_whitening_is_frozen_and_the_ablation_learns_the_first_layer(hw):
    x, _ = _data(16)
    cfg = hw.CONFIGS["smoke"]
    whitened, learned = hw.build_model("fast", cfg, hw.normalize(x, STATS)), hw.build_model("fast", cfg)
    assert not whitened.whiten.weight.requires_grad and learned.whiten.weight.requires_grad
    assert not torch.equal(whitened.whiten.weight, learned.whiten.weight)


def test_train_model_takes_exactly_the_steps_on_the_schedule(hw):
    x, y = _data(40)
    hist = hw.train_model(hw.PlainCNN((4, 4, 4)), x, y, steps=7, batch_size=16, peak_lr=0.1, schedule="warmup_cosine",
                          stats=STATS, device=CPU, warmup=0.3)
    assert hist["steps"] == len(hist["loss"]) == len(hist["lr"]) == 7  # exactly the steps asked, over 3 epochs
    assert hist["lr"] == pytest.approx([hw.warmup_cosine_lr(s, 7, 0.1, 2) for s in range(7)])
    assert hist["skipped"] == 0


def test_fp16_overflow_skips_the_step_and_holds_the_schedule(hw, monkeypatch):
    """The T4 path on a CPU: fp16 autocast + gradient scaler. Inputs of ±inf (a zero std) overflow every step:
    the scaler skips them, the weights stay, and the schedule does not advance."""
    monkeypatch.setenv("DLCV_PRECISION", "fp16")
    precision = hw.choose_precision(CPU, hw.CPU_BF16_GAINS)
    assert precision["name"] == "fp16"
    x, y = _data(32)
    torch.manual_seed(0)
    model = hw.PlainCNN((4, 4, 4))
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    overflow = (STATS[0], (0.0, 0.0, 0.0))
    hist = hw.train_model(model, x, y, steps=3, batch_size=16, peak_lr=0.1, schedule="warmup_cosine",
                          stats=overflow, device=CPU, precision=precision, warmup=0.5)
    assert hist["skipped"] == 3
    assert hist["lr"] == pytest.approx([0.05] * 3)  # without the skips: 0.05, 0.1, then the cosine
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())
    hist = hw.train_model(model, x, y, steps=4, batch_size=16, peak_lr=0.1, schedule="constant", stats=STATS,
                          device=CPU, precision=precision)  # finite data: fp16 steps are taken and the loss is finite
    assert hist["skipped"] < 4 and all(math.isfinite(v) for v in hist["loss"])
    assert any(not torch.equal(p, before[k]) for k, p in model.named_parameters())


def test_plateau_needs_validation(hw):
    x, y = _data(16)
    with pytest.raises(ValueError, match="needs validation"):
        hw.train_model(hw.PlainCNN((4, 4, 4)), x, y, steps=2, batch_size=8, peak_lr=0.1, schedule="plateau",
                       stats=STATS, device=CPU)


def test_range_test_grows_exponentially_and_stops_on_divergence(hw):
    x, y = _data(64)
    torch.manual_seed(0)
    rt = hw.lr_range_test(hw.MLP((16,)), x, y, steps=30, lr_min=1e-3, lr_max=1e4, batch_size=16,
                          stats=STATS, device=CPU)
    ratios = np.asarray(rt["lrs"][1:]) / np.asarray(rt["lrs"][:-1])
    np.testing.assert_allclose(ratios, (1e7) ** (1 / 29), rtol=1e-9)
    assert len(rt["lrs"]) < 30  # a rate of 10^4 blows the loss up: the test stopped early
    last = rt["losses"][-1]
    assert not math.isfinite(last) or last > 4 * np.nanmin(rt["losses"][:-1])
    assert rt["suggestion"] == pytest.approx(hw.suggest_lr(rt["lrs"], rt["losses"]))


def test_suggest_lr_is_the_smoothed_minimum_divided_by_three(hw):
    lrs = np.logspace(-3, 1, 41)
    losses = (np.log10(lrs) + 0.5) ** 2  # minimum at lr = 10**-0.5
    assert hw.suggest_lr(lrs, losses, beta=0.0, divide=1.0) == pytest.approx(10 ** -0.5)
    assert hw.suggest_lr(lrs, losses, beta=0.0) == pytest.approx(10 ** -0.5 / 3)  # the default rule
    noisy = losses.copy()
    noisy[5] = -1.0  # one lucky batch early on: smoothing (beta 0.7) must not pick it
    assert hw.suggest_lr(lrs, noisy) > lrs[10]
    assert hw.suggest_lr(lrs, np.r_[losses[:25], np.nan, losses[26:]]) <= lrs[24] / 3  # stops at the first NaN


def test_training_is_deterministic_with_the_cpu_recipe(hw):
    """The cpu profile's recipe (the precision this CPU gets, channels_last), tiny sizes, run twice."""
    cfg = hw.CONFIGS["cpu"]
    x, y = _data(96)
    precision = hw.choose_precision(CPU, hw.CPU_BF16_GAINS)

    def run():
        torch.manual_seed(0)
        model = hw.build_model("cnn", dict(cfg, cnn_widths=(4, 8, 8)))
        hist = hw.train_model(model, x[:64], y[:64], steps=3, batch_size=16, peak_lr=0.2, schedule="warmup_cosine",
                              stats=STATS, device=CPU, x_val=x[64:], y_val=y[64:], evals=1, seed=cfg["seed"],
                              label_smoothing=cfg["label_smoothing"], crop_pad=cfg["crop_pad"],
                              weight_decay=cfg["weight_decay"], warmup=cfg["warmup"], precision=precision,
                              channels_last=True)
        return hist["loss"], hist["val_acc"], hw.correct(model, x[64:], y[64:], stats=STATS, batch_size=8,
                                                         device=CPU, tta=2)

    (la, va, ca), (lb, vb, cb) = run(), run()
    assert la == lb and va == vb and torch.equal(ca, cb) and all(math.isfinite(v) for v in la)


def test_a_bf16_training_step_on_cpu_and_fp32_metrics(hw, monkeypatch):
    monkeypatch.setenv("DLCV_PRECISION", "bf16")
    x, y = _data(8)
    model = hw.build_model("fast", hw.CONFIGS["smoke"], hw.normalize(x, STATS))
    before = model.groups[0].conv1.weight.detach().clone()
    hist = hw.train_model(model, x, y, steps=1, batch_size=8, peak_lr=0.5, schedule="constant", stats=STATS,
                          device=CPU, precision=hw.choose_precision(CPU, False), channels_last=True)
    assert math.isfinite(hist["loss"][0]) and not torch.equal(before, model.groups[0].conv1.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # even inside someone else's autocast region ...
        logits = hw.predict_logits(model, x, stats=STATS, batch_size=4, device=CPU)
    assert logits.dtype == torch.float32  # ... the reported scores come out in fp32


@pytest.mark.parametrize("profile", ["cpu", "full"])
def test_profile_models_take_a_training_step(hw, profile):
    cfg = hw.CONFIGS[profile]
    x, y = _data(4)
    for kind in ("mlp", "cnn", "plain_shallow", "plain_deep", "resnet_deep", "fast"):
        torch.manual_seed(0)
        model = hw.build_model(kind, cfg, hw.normalize(x, STATS))
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        hist = hw.train_model(model, x, y, steps=1, batch_size=2, peak_lr=0.05, schedule="warmup_cosine",
                              stats=STATS, device=CPU, label_smoothing=cfg["label_smoothing"],
                              crop_pad=cfg["crop_pad"], channels_last=True)
        after = [p.detach() for p in model.parameters() if p.requires_grad]
        assert math.isfinite(hist["loss"][0]), kind
        assert any(not torch.equal(a, b) for a, b in zip(before, after)), f"{profile}/{kind} did not update"
        logits = hw.predict_logits(model, x, stats=STATS, batch_size=2, device=CPU, tta=2)
        assert logits.shape == (4, 10), kind
    assert hw.build_model("plain_deep", cfg).depth == hw.build_model("resnet_deep", cfg).depth > \
        hw.build_model("plain_shallow", cfg).depth
