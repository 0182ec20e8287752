"""Unit tests of homework 2's own definitions (its `lib` cells): blocks, schedules, augmentation, data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nbload import load_lib

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def hw():
    return load_lib("homework_2")


# ----------------------------------------------------------------------------------------------- ResNet
def _zero_residual_branch(block):
    """conv2 = 0 and bn2's bias = 0: the residual branch outputs exactly zero (eval mode, fresh stats)."""
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.bn2.bias.zero_()
    block.bn2.reset_running_stats()  # earlier forward passes in train mode moved the statistics
    return block.eval()


def test_identity_shortcut_when_shapes_match(hw):
    block = hw.BasicBlock(8, 8, stride=1)
    assert isinstance(block.shortcut, torch.nn.Identity)
    x = torch.randn(2, 8, 10, 10)
    assert block(x).shape == (2, 8, 10, 10)
    _zero_residual_branch(block)
    torch.testing.assert_close(block(x), F.relu(x))


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
    x = torch.randn(2, 8, 8, 8)
    assert torch.count_nonzero(block(x)) == 0  # without a shortcut a zero branch gives zero


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
def test_constant_and_step_schedules_by_hand(hw):
    c = hw.ConstantLR(0.4, 100)
    assert [c.lr(s) for s in (0, 50, 99)] == [0.4, 0.4, 0.4]
    s = hw.StepDecayLR(1.0, 100, milestones=(0.5, 0.75), gamma=0.1)
    expected = {0: 1.0, 49: 1.0, 50: 0.1, 74: 0.1, 75: 0.01, 99: 0.01}
    for step, lr in expected.items():
        assert s.lr(step) == pytest.approx(lr)


def test_step_schedule_matches_torch_multistep(hw):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
    ref = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[20, 30], gamma=0.1)
    ours = hw.StepDecayLR(0.3, 40)
    for step in range(40):
        assert ours.lr(step) == pytest.approx(opt.param_groups[0]["lr"]), step
        opt.step()
        ref.step()


def test_cosine_schedule_by_hand_and_against_torch(hw):
    s = hw.CosineLR(1.0, 100)
    assert s.lr(0) == pytest.approx(1.0)
    assert s.lr(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert s.lr(50) == pytest.approx(0.5)
    assert s.lr(100) == pytest.approx(0.0, abs=1e-12)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30)
    ours = hw.CosineLR(0.2, 30)
    for step in range(30):
        assert ours.lr(step) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-9), step
        opt.step()
        ref.step()


def test_one_cycle_schedule_by_hand(hw):
    s = hw.OneCycleLR(1.0, 10, warmup=0.2)  # 2 warm-up steps, then 8 steps down to zero
    expected = [0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8]
    assert [s.lr(i) for i in range(10)] == pytest.approx(expected)
    assert s.lr(10) == 0.0


def test_plateau_schedule_matches_torch(hw):
    metrics = [0.30, 0.40, 0.40, 0.4005, 0.45, 0.44, 0.43, 0.46, 0.46, 0.46, 0.46, 0.47]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.3, patience=1, threshold=1e-3,
                                                     threshold_mode="abs")
    ours = hw.PlateauLR(0.5, 100, factor=0.3, patience=1, threshold=1e-3)
    assert ours.needs_validation
    seen = []
    for m in metrics:
        ours.observe(m)
        ref.step(m)
        assert ours.lr(0) == pytest.approx(opt.param_groups[0]["lr"])
        seen.append(ours.lr(0))
    assert min(seen) < 0.5  # it did reduce at least once on this sequence


def test_schedule_registry(hw):
    assert set(hw.SCHEDULES) >= {"constant", "step", "cosine", "one_cycle", "plateau"}
    for name in hw.CONFIGS["cpu"]["schedules"]:
        assert hw.SCHEDULES[name](0.1, 50).lr(0) > 0


# ---------------------------------------------------------------------------------------- augmentation
def test_augmentation_keeps_labels_aligned(hw):
    labels = torch.arange(10).repeat(13)
    x = labels.view(-1, 1, 1, 1).float().expand(-1, 3, 32, 32).contiguous()  # each image "is" its label
    out = hw.augment_batch(x, pad=4, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert torch.equal(out.amax(dim=(1, 2, 3)), labels.float())
    assert torch.equal(out.amin(dim=(1, 2, 3)), labels.float())


def test_crop_with_offsets_matches_per_image_slicing(hw):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 12, 12, generator=g)
    dy = torch.randint(0, 5, (16,), generator=g)
    dx = torch.randint(0, 5, (16,), generator=g)
    out = hw.crop_with_offsets(x, dy, dx, 8)
    ref = torch.stack([x[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8] for i in range(16)])
    assert torch.equal(out, ref)


def test_augmentation_moves_and_flips(hw):
    n = 400
    x = torch.zeros(n, 3, 32, 32)
    x[:, :, 16, 20] = 1.0  # one bright pixel right of the centre
    out = hw.augment_batch(x, pad=2, flip=True, generator=torch.Generator().manual_seed(0))
    pos = out[:, 0].flatten(1).argmax(1)
    rows, cols = pos // 32, pos % 32
    assert out[:, 0].flatten(1).amax(1).eq(1).all()  # the pixel survives (it is far from the border)
    assert rows.min() >= 14 and rows.max() <= 18 and len(torch.unique(rows)) == 5
    flipped = cols < 16
    assert 0.35 < flipped.float().mean() < 0.65  # about half the images are mirrored
    assert torch.equal(hw.augment_batch(x, pad=0, flip=False), x)


def test_normalize_uint8(hw):
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = hw.normalize(x)
    expected = (1.0 - torch.tensor(hw.CIFAR_MEAN)) / torch.tensor(hw.CIFAR_STD)
    torch.testing.assert_close(out[0, :, 0, 0], expected)
    assert hw.normalize(x, channels_last=True).is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------------ data
def test_stratified_split_on_class_sorted_labels(hw):
    labels = torch.arange(10).repeat_interleave(100)  # sorted by class, as folders are listed
    tr, va = hw.stratified_split(labels, 0.1, seed=0)
    assert len(set(tr.tolist()) & set(va.tolist())) == 0 and len(tr) + len(va) == 1000
    assert torch.bincount(labels[va], minlength=10).tolist() == [10] * 10  # the last 100 would be one class
    assert torch.equal(va, hw.stratified_split(labels, 0.1, seed=0)[1])
    assert not torch.equal(va, hw.stratified_split(labels, 0.1, seed=1)[1])


# --------------------------------------------------------------------------------- training machinery
def test_whitening_layer_decorrelates(hw):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 3, 16, 16, generator=g)
    x = base + 0.8 * base.roll(1, dims=3) + 0.5 * base[:, :1]  # correlated pixels and channels
    conv = torch.nn.Conv2d(3, 24, 2)
    hw.init_whitening(conv, x, eps=1e-6)
    with torch.no_grad():
        z = conv(x)[:, :12].permute(1, 0, 2, 3).reshape(12, -1)
    cov = torch.cov(z.double())
    torch.testing.assert_close(cov, torch.eye(12, dtype=torch.float64), atol=0.02, rtol=0)


def test_plan_steps(hw):
    assert hw.plan_steps(1000, 100, epochs=3) == 30
    assert hw.plan_steps(1000, 100, epochs=3, seconds=5, images_per_s=1000) == 30  # capped by epochs
    assert hw.plan_steps(1000, 100, epochs=30, seconds=5, images_per_s=1000) == 50
    assert hw.plan_steps(1000, 100, epochs=30, seconds=0.1, images_per_s=10, min_steps=7) == 7
    with pytest.raises(ValueError):
        hw.plan_steps(1000, 100, epochs=3, seconds=5)


def test_suggest_lr_finds_the_minimum(hw):
    lrs = np.logspace(-3, 1, 41)
    losses = (np.log10(lrs) + 0.5) ** 2  # minimum at lr = 10**-0.5
    assert hw.suggest_lr(lrs, losses, beta=0.0, divide=1.0) == pytest.approx(10 ** -0.5)
    assert hw.suggest_lr(lrs, losses, beta=0.0, divide=3.0) == pytest.approx(10 ** -0.5 / 3)


def test_training_is_deterministic(hw):
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(64) % 10

    def run():
        torch.manual_seed(0)
        model = hw.PlainCNN((4, 8, 8))
        return hw.train_model(model, x, y, steps=3, batch_size=16, schedule=hw.CosineLR(0.1, 3), device=CPU,
                              seed=5, label_smoothing=0.1, ema_decay=0.9)["loss"]

    a, b = run(), run()
    assert a == b and all(math.isfinite(v) for v in a)


@pytest.mark.parametrize("profile", ["cpu", "full"])
def test_profile_models_take_a_training_step(hw, profile):
    cfg = hw.CONFIGS[profile]
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 3])
    builders = {
        "cnn": lambda: hw.PlainCNN(cfg["cnn_widths"]),
        "plain": lambda: hw.CifarResNet(cfg["deep_blocks"], cfg["deep_widths"], residual=False),
        "resnet": lambda: hw.CifarResNet(cfg["deep_blocks"], cfg["deep_widths"]),
        "fast": lambda: hw.FastNet(cfg["fast_widths"]),
    }
    for name, build in builders.items():
        torch.manual_seed(0)
        model = build()
        if name == "fast":
            hw.init_whitening(model.whiten, hw.normalize(x))
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        hist = hw.train_model(model, x, y, steps=1, batch_size=2, schedule=hw.SCHEDULES["one_cycle"](0.1, 1),
                              device=CPU, label_smoothing=cfg["label_smoothing"], ema_decay=cfg["ema_decay"],
                              channels_last=cfg["channels_last"], crop_pad=cfg["crop_pad"])
        after = [p.detach() for p in model.parameters() if p.requires_grad]
        assert math.isfinite(hist["loss"][0]), name
        assert any(not torch.equal(a, b) for a, b in zip(before, after)), f"{profile}/{name} did not update"
        logits = hw.predict_logits(model, x, batch_size=2, device=CPU, tta=True)
        assert logits.shape == (4, 10)
        if name != "plain":  # a deep plain net in eval mode after one step on 2 images may overflow: fine
            assert torch.isfinite(logits).all(), name


def test_configs_have_every_knob(hw):
    keys = set(hw.CONFIGS["smoke"])
    for profile in ("cpu", "full"):
        assert set(hw.CONFIGS[profile]) == keys, profile
    assert len(hw.CONFIGS["cpu"]["schedules"]) >= 4


def test_time_budget_replans_the_run(hw):
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(64) % 10
    sched = hw.CosineLR(0.1, 10_000)
    hist = hw.train_model(hw.PlainCNN((4, 4, 4)), x, y, steps=10_000, batch_size=8, schedule=sched,
                          device=CPU,
                          budget_seconds=1.0, max_steps=10_000)
    assert 6 <= hist["steps"] < 10_000  # re-planned after 5 steps (at most a few hundred fit in 1 s)
    assert sched.total_steps == hist["steps"]  # the schedule was stretched to the new length
    assert hist["lr"][-1] < 0.02  # so the cosine still ends near zero
    capped = hw.train_model(hw.PlainCNN((4, 4, 4)), x, y, steps=8, batch_size=8, schedule=hw.CosineLR(0.1, 8),
                            device=CPU, budget_seconds=60.0, max_steps=8)
    assert capped["steps"] == 8  # never beyond max_steps
