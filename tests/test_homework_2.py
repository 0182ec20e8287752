"""Unit tests of homework 2's own definitions (its `lib` cells): exercises and their checks, blocks, schedules,
augmentation, statistics, the noise rule, the training loop and the data pipelines."""

from __future__ import annotations

import inspect
import math

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
@pytest.mark.parametrize("size,kernel,stride,padding", [(32, 3, 1, 1), (32, 3, 2, 1), (17, 5, 3, 2), (8, 1, 1, 0)])
def test_conv_output_size_matches_torch(hw, size, kernel, stride, padding):
    conv = torch.nn.Conv2d(2, 4, kernel, stride=stride, padding=padding)
    assert hw.conv_output_size(size, kernel, stride, padding) == conv(torch.zeros(1, 2, size, size)).shape[-1]


def test_conv_parameters_match_torch(hw):
    for c_in, c_out, k, bias in [(3, 16, 3, True), (64, 128, 3, False), (5, 7, 1, True)]:
        conv = torch.nn.Conv2d(c_in, c_out, k, bias=bias)
        assert hw.conv_parameters(c_in, c_out, k, bias) == sum(p.numel() for p in conv.parameters())


def test_check_conv_arithmetic_passes_the_solution(hw, capsys):
    hw.check_conv_arithmetic(hw.conv_output_size, hw.conv_parameters)
    assert "✓ Exercise 2.1" in capsys.readouterr().out


@pytest.mark.parametrize("size_fn,param_fn,hint", [
    (lambda n, k, s=1, p=0: (n + 2 * p - k) // s, None, r"first position of the filter counts too"),  # no +1
    (lambda n, k, s=1, p=0: (n + p - k) // s + 1, None, r"padding is added on both sides"),          # pad once
    (lambda n, k, s=1, p=0: round((n + 2 * p - k) / s) + 1, None, r"floor division"),               # rounds up
    (None, lambda ci, co, k, bias=True: co * k * k + (co if bias else 0), r"every input channel"),   # no c_in
    (None, lambda ci, co, k, bias=True: co * ci * k * k, r"one bias per output channel"),            # no bias
])
def test_check_conv_arithmetic_rejects_wrong_answers(hw, size_fn, param_fn, hint):
    with pytest.raises(AssertionError, match=hint):
        hw.check_conv_arithmetic(size_fn or hw.conv_output_size, param_fn or hw.conv_parameters)


# ------------------------------------------------------------------------------ Exercise 2.2: the random crop
def test_crop_with_offsets_matches_per_image_slicing(hw):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 12, 12, generator=g)
    dy, dx = torch.randint(0, 5, (16,), generator=g), torch.randint(0, 5, (16,), generator=g)
    ref = torch.stack([x[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8] for i in range(16)])
    assert torch.equal(hw.crop_with_offsets(x, dy, dx, 8), ref)


def test_check_random_crop_passes_the_solution(hw, capsys):
    hw.check_random_crop(hw.crop_with_offsets)
    assert "✓ Exercise 2.2" in capsys.readouterr().out


def _loop_crop(shift_rows=0, swap=False, first_only=False, channels_last=False):
    def crop(x, dy, dx, size):
        if swap:
            dy, dx = dx, dy
        if first_only:
            dy, dx = dy[:1].expand(len(x)), dx[:1].expand(len(x))
        out = torch.stack([x[i, :, dy[i] + shift_rows:dy[i] + shift_rows + size, dx[i]:dx[i] + size]
                           for i in range(len(x))])
        return out.permute(0, 2, 3, 1) if channels_last else out
    return crop


@pytest.mark.parametrize("wrong,hint", [
    (_loop_crop(swap=True), r"rows \(dimension 2\) go with dy"),
    (_loop_crop(first_only=True), r"own offsets dy\[i\]"),
    (_loop_crop(shift_rows=1), r"offsets start at 0"),
    (_loop_crop(channels_last=True), r"permute the channels back"),
])
def test_check_random_crop_rejects_wrong_crops(hw, wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        hw.check_random_crop(wrong)


# ------------------------------------------------------------------------------ Exercise 2.3: warm-up + cosine
def test_warmup_cosine_against_torch_sequential(hw):
    """torch's SequentialLR(LinearLR, CosineAnnealingLR) is the independent reference, over a whole run."""
    peak, total, warm = 0.3, 40, 6
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    S = torch.optim.lr_scheduler
    ref = S.SequentialLR(opt, [S.LinearLR(opt, 1 / warm, 1.0, total_iters=warm - 1),
                               S.CosineAnnealingLR(opt, T_max=total - warm)], milestones=[warm])
    for step in range(total):
        assert hw.warmup_cosine_lr(step, total, peak, warm) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-9)
        opt.step()
        ref.step()


def test_check_warmup_cosine_passes_the_solution(hw, capsys):
    hw.check_warmup_cosine(hw.warmup_cosine_lr)
    assert "✓ Exercise 2.3" in capsys.readouterr().out


def _cos(peak, t):
    return peak * 0.5 * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize("wrong,hint", [
    (lambda s, T, p, w: p * s / w if s < w else _cos(p, (s - w) / (T - w)), r"step 0 already trains"),
    (lambda s, T, p, w: p * (s + 1) / (w + 1) if s < w else _cos(p, (s - w) / (T - w)),
     r"peak·\(step\+1\)/warmup_steps"),
    (lambda s, T, p, w: p * (s + 1) / w if s <= w else _cos(p, (s - w) / (T - w)), r"starts at the peak"),
    (lambda s, T, p, w: p * (s + 1) / w if s < w else _cos(p, s / T), r"t counts from the end of the warm-up"),
    (lambda s, T, p, w: p * (s + 1) / w if s < w else p * 0.5 * math.cos(math.pi * (s - w) / (T - w)),
     r"starts at the peak"),
    (lambda s, T, p, w: (s + 1) / w if s < w else _cos(1.0, (s - w) / (T - w)), r"use the arguments"),
])
def test_check_warmup_cosine_rejects_wrong_schedules(hw, wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        hw.check_warmup_cosine(wrong)


# ------------------------------------------------------------------------------ Exercise 2.4: BasicBlock.forward
def _zero_residual_branch(block):
    """conv2 = 0 and bn2's bias = 0: the residual branch outputs exactly zero (eval mode, fresh stats)."""
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.bn2.bias.zero_()
    block.bn2.reset_running_stats()
    return block.eval()


def test_identity_shortcut_when_shapes_match(hw):
    block = hw.BasicBlock(8, 8, stride=1)
    assert isinstance(block.shortcut, torch.nn.Identity)
    x = torch.randn(2, 8, 10, 10)
    assert block(x).shape == (2, 8, 10, 10)
    torch.testing.assert_close(_zero_residual_branch(block)(x), F.relu(x))


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


def test_plain_block_has_no_shortcut(hw):
    block = _zero_residual_branch(hw.BasicBlock(8, 16, stride=2, residual=False))
    assert torch.count_nonzero(block(torch.randn(2, 8, 8, 8))) == 0  # without a shortcut a zero branch gives zero


def test_check_basic_block_passes_the_solution(hw, capsys):
    hw.check_basic_block(hw.BasicBlock)
    assert "✓ Exercise 2.4" in capsys.readouterr().out


def _block_with(forward):
    def make(hw):
        return type("WrongBlock", (hw.BasicBlock,), {"forward": forward})
    return make


def _branch(self, x):
    return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


@pytest.mark.parametrize("forward,hint", [
    (lambda self, x: F.relu(_branch(self, x)) + (self.shortcut(x) if self.residual else 0), r"ReLU comes after"),
    (lambda self, x: F.relu(_branch(self, x)), r"add self.shortcut\(x\)"),
    (lambda self, x: _branch(self, x) + (self.shortcut(x) if self.residual else 0), r"finish with a ReLU"),
    (lambda self, x: F.relu(_branch(self, x) + self.shortcut(x)), r"plain block \(residual=False\) has no shortcut"),
    (lambda self, x: F.relu(_branch(self, x) + self.shortcut(_branch(self, x))), r"takes the block's input x"),
])
def test_check_basic_block_rejects_wrong_forwards(hw, forward, hint):
    with pytest.raises(AssertionError, match=hint):
        hw.check_basic_block(_block_with(forward)(hw))


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


# ------------------------------------------------------------------------------------------- schedules
def _lrs(hw, name, total, peak=0.4, warmup=0.2, metrics=()):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    sched = hw.make_scheduler(name, opt, total, warmup)
    seen = []
    for step in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step(metrics[step]) if metrics else sched.step()
    return seen


def test_schedules_by_hand(hw):
    assert _lrs(hw, "constant", 5) == pytest.approx([0.4] * 5)
    assert _lrs(hw, "step", 8, peak=1.0) == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])  # x0.1 at 50%, 75%
    warm = _lrs(hw, "warmup_cosine", 10, peak=1.0, warmup=0.2)  # 2 warm-up steps, then half a cosine over 8
    assert warm == pytest.approx([0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])
    assert _lrs(hw, lambda s: 2.0 ** s, 4, peak=0.1) == pytest.approx([0.1, 0.2, 0.4, 0.8])
    with pytest.raises(ValueError, match="unknown schedule"):
        _lrs(hw, "cosine-ish", 3)


def test_plateau_is_torchs_reduce_on_plateau(hw):
    metrics = [0.30, 0.40, 0.40, 0.4005, 0.45, 0.44, 0.43, 0.46]
    seen = _lrs(hw, "plateau", len(metrics), peak=0.5, metrics=metrics)
    # stalls (no gain above 0.001) at checks 3 and 4 → the third check after the best cuts ×0.3; again at 6, 7
    assert seen == pytest.approx([0.5, 0.5, 0.5, 0.5, 0.15, 0.15, 0.15, 0.045])


# ------------------------------------------------------------------------------------------------ data
def test_stratified_split_on_class_sorted_labels(hw):
    labels = torch.arange(10).repeat_interleave(100)  # sorted by class, as folders are listed
    tr, va = hw.stratified_split(labels, 100, seed=0)
    assert len(set(tr.tolist()) & set(va.tolist())) == 0 and len(tr) + len(va) == 1000
    assert torch.bincount(labels[va], minlength=10).tolist() == [10] * 10  # the last 100 would be one class
    assert torch.equal(va, hw.stratified_split(labels, 100, seed=0)[1])
    assert not torch.equal(va, hw.stratified_split(labels, 100, seed=1)[1])


def test_preview_indices_are_random_members_of_each_class(hw):
    labels = np.repeat(np.arange(10), 50)  # class-sorted: the first 8 of a class are always the same files
    picks = hw.preview_indices(labels, 8, seed=0)
    assert sorted(picks) == list(range(10))
    for c, idx in picks.items():
        assert len(idx) == 8 and (labels[idx] == c).all()
    assert any(not np.array_equal(idx, np.arange(50 * c, 50 * c + 8)) for c, idx in picks.items())
    assert all(np.array_equal(a, b) for a, b in zip(picks.values(), hw.preview_indices(labels, 8, 0).values()))


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
    speeds = hw.dataloader_speed(ds, batch_size=4, device=CPU, workers=0, rounds=2)
    assert len(speeds) == 2 and all(s > 0 for s in speeds)
    assert len(hw.device_pipeline_speed(x, stats=STATS, batch_size=4, batches=2, pad=2, rounds=3)) == 3


# ---------------------------------------------------------------------------------------- noise rule
def test_paired_gap_by_hand_and_against_scipy(hw):
    from scipy import stats

    a, b = torch.tensor([1, 1, 0, 0, 1]).bool(), torch.tensor([0, 1, 0, 1, 0]).bool()
    diff, se = hw.paired_gap(a, b)  # d = [1, 0, 0, -1, 1]: mean 0.2, sample std sqrt(0.7)
    assert diff == pytest.approx(0.2) and se == pytest.approx(math.sqrt(0.7 / 5))
    g = np.random.default_rng(0)
    a, b = g.random(400) < 0.7, g.random(400) < 0.6
    diff, se = hw.paired_gap(torch.from_numpy(a), torch.from_numpy(b))
    assert diff / se == pytest.approx(stats.ttest_rel(a.astype(float), b.astype(float)).statistic)


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
    assert not hw.beats("A", b, "B", clear)[0]  # worse never beats


# --------------------------------------------------------------------------------- training machinery
def test_whitening_layer_decorrelates(hw):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 3, 16, 16, generator=g)
    x = base + 0.8 * base.roll(1, dims=3) + 0.5 * base[:, :1]  # correlated pixels and channels
    conv = torch.nn.Conv2d(3, 24, 2)
    hw.init_whitening(conv, x, eps=1e-6)
    with torch.no_grad():
        z = conv(x)[:, :12].permute(1, 0, 2, 3).reshape(12, -1)
    torch.testing.assert_close(torch.cov(z.double()), torch.eye(12, dtype=torch.float64), atol=0.02, rtol=0)


def test_budgets_are_steps_never_seconds(hw):
    """Contract v2: no run is sized or stopped by a clock."""
    params = inspect.signature(hw.train_model).parameters
    assert not {"seconds", "budget_seconds", "max_seconds"} & set(params)
    for profile, cfg in hw.CONFIGS.items():
        assert not any("second" in key for key in cfg), profile
        assert isinstance(cfg["compare_steps"], int) and isinstance(cfg["final_steps"], int)
    x, y = _data(40)
    hist = hw.train_model(hw.PlainCNN((4, 4, 4)), x, y, steps=7, batch_size=16, peak_lr=0.1, schedule="warmup_cosine",
                          stats=STATS, device=CPU, warmup=0.3)
    assert hist["steps"] == len(hist["loss"]) == len(hist["lr"]) == 7  # exactly the steps asked, over 3 epochs
    assert hist["lr"] == pytest.approx([hw.warmup_cosine_lr(s, 7, 0.1, 2) for s in range(7)])


def test_plateau_needs_validation(hw):
    x, y = _data(16)
    with pytest.raises(ValueError, match="needs validation"):
        hw.train_model(hw.PlainCNN((4, 4, 4)), x, y, steps=2, batch_size=8, peak_lr=0.1, schedule="plateau",
                       stats=STATS, device=CPU)


def test_range_test_grows_exponentially_and_stops_on_divergence(hw):
    x, y = _data(64)
    torch.manual_seed(0)
    rt = hw.lr_range_test(lambda: hw.MLP((16,)), x, y, steps=30, lr_min=1e-3, lr_max=1e4, batch_size=16,
                          stats=STATS, device=CPU)
    ratios = rt["lrs"][1:] / rt["lrs"][:-1]
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
    """The cpu profile's recipe (bf16 autocast and channels_last as chosen on this CPU), tiny sizes, run twice."""
    cfg = hw.CONFIGS["cpu"]
    x, y = _data(96)
    amp = torch.bfloat16 if hw.cpu_native_bf16() else None

    def run():
        torch.manual_seed(0)
        model = hw.build_model("cnn", dict(cfg, cnn_widths=(4, 8, 8)))
        hist = hw.train_model(model, x[:64], y[:64], steps=3, batch_size=16, peak_lr=0.2, schedule="warmup_cosine",
                              stats=STATS, device=CPU, x_val=x[64:], y_val=y[64:], evals=1, seed=cfg["seed"],
                              label_smoothing=cfg["label_smoothing"], crop_pad=cfg["crop_pad"],
                              weight_decay=cfg["weight_decay"], warmup=cfg["warmup"], amp_dtype=amp,
                              channels_last=True)
        return hist["loss"], hist["val_acc"], hw.correct(model, x[64:], y[64:], stats=STATS, batch_size=8,
                                                         device=CPU, amp_dtype=amp, tta=True)

    (la, va, ca), (lb, vb, cb) = run(), run()
    assert la == lb and va == vb and torch.equal(ca, cb) and all(math.isfinite(v) for v in la)


def test_a_bf16_training_step_on_cpu(hw):
    x, y = _data(8)
    model = hw.build_model("fast", hw.CONFIGS["smoke"], hw.normalize(x, STATS))
    before = model.groups[0].conv1.weight.detach().clone()
    hist = hw.train_model(model, x, y, steps=1, batch_size=8, peak_lr=0.5, schedule="constant", stats=STATS,
                          device=CPU, amp_dtype=torch.bfloat16, channels_last=True)
    assert math.isfinite(hist["loss"][0]) and not torch.equal(before, model.groups[0].conv1.weight)
    assert hw.predict_logits(model, x, stats=STATS, batch_size=4, device=CPU, amp_dtype=torch.bfloat16).dtype == \
        torch.float32  # metrics are computed in fp32 whatever the training precision


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
        logits = hw.predict_logits(model, x, stats=STATS, batch_size=2, device=CPU, tta=True)
        assert logits.shape == (4, 10), kind
    assert hw.build_model("plain_deep", cfg).depth == hw.build_model("resnet_deep", cfg).depth > \
        hw.build_model("plain_shallow", cfg).depth


def test_configs_have_every_knob(hw):
    keys = set(hw.CONFIGS["smoke"])
    for profile in ("cpu", "full"):
        assert set(hw.CONFIGS[profile]) == keys, profile
    for cfg in hw.CONFIGS.values():
        assert {"constant", "warmup_cosine"} <= set(cfg["schedules"])  # the schedule lesson compares these two
        assert cfg["deep_blocks"] > cfg["shallow_blocks"]
