"""Unit tests of homework_4's own definitions: U-Net, metrics, instances, denoising, data path, exercise checks.

Every test compares the notebook's code with something independent of it: scikit-learn / scikit-image /
scipy references, hand-worked cases, brute force, or a behaviour (what skips change, what a download
leaves in the cache).
"""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sklearn.metrics import f1_score, jaccard_score

from nbload import load_lib

CPU = torch.device("cpu")
FP32 = dict(name="fp32", amp_dtype=None, scaler=False, channels_last=True)
BF16 = dict(name="bf16", amp_dtype=torch.bfloat16, scaler=False, channels_last=True)


@pytest.fixture(scope="module")
def hw():
    return load_lib("homework_4")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine extra threads only wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def disk(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


# ---------------------------------------------------------------- U-Net


@pytest.mark.parametrize("hw_size", [(64, 64), (37, 53), (100, 7), (17, 129), (1, 1), (250, 333)])
@pytest.mark.parametrize("skips", [True, False])
def test_unet_output_size_equals_input_size(hw, hw_size, skips):
    net = hw.UNet(out_ch=2, depth=4, width=4, skips=skips).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, *hw_size))
    assert out.shape == (2, 2, *hw_size)


@pytest.mark.parametrize("hw_size", [(64, 64), (37, 53), (5, 3), (130, 67)])
def test_unshuffled_unet_output_size(hw, hw_size):
    net = hw.UNet(depth=3, width=4, unshuffle=2, residual=True).eval()
    with torch.no_grad():
        torch.nn.init.normal_(net.head.weight)  # make the correction non-zero so its shape matters
        out = net(torch.rand(1, 1, *hw_size))
    assert out.shape == (1, 1, *hw_size)


@pytest.mark.parametrize("unshuffle", [1, 2])
def test_residual_unet_is_the_identity_as_built(hw, unshuffle):
    """No re-zeroing here: the constructor itself must make the untrained denoiser return its input."""
    torch.manual_seed(0)
    net = hw.UNet(depth=2, width=4, residual=True, unshuffle=unshuffle).eval()
    x = torch.rand(2, 1, 30, 41)
    with torch.no_grad():
        assert torch.equal(net(x), x)
    net.train()  # batch statistics change the features, not the zero head
    with torch.no_grad():
        assert torch.equal(net(x), x)
    with pytest.raises(ValueError, match="in_ch == out_ch"):
        hw.UNet(in_ch=1, out_ch=2, residual=True)


def test_residual_unet_with_shortcut_starts_as_scipys_gaussian_filter(hw):
    rng = np.random.default_rng(1)
    image = rng.random((40, 52)).astype(np.float32)
    net = hw.UNet(depth=2, width=4, residual=True, shortcut_sigma=1.4).eval()
    with torch.no_grad():
        out = net(torch.from_numpy(image)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(out, ndimage.gaussian_filter(image.astype(np.float64), 1.4), atol=1e-5)


@pytest.mark.parametrize("sigma", [0.7, 1.2, 2.5])
def test_gaussian_shortcut_matches_scipy(hw, sigma):
    """Away from the border it must be the same filter; with scipy's 'reflect' padding, everywhere."""
    rng = np.random.default_rng(0)
    image = rng.random((2, 1, 45, 38)).astype(np.float32)
    ours = hw.blur_fp32(torch.from_numpy(image), hw.gaussian_kernel(sigma)).numpy()
    for b in range(2):
        ref = ndimage.gaussian_filter(image[b, 0].astype(np.float64), sigma)
        r = int(4 * sigma + 0.5)
        np.testing.assert_allclose(ours[b, 0][r:-r, r:-r], ref[r:-r, r:-r], atol=1e-6)
        np.testing.assert_allclose(ours[b, 0], ref, atol=1e-6)
    assert ours.dtype == np.float32


def test_gaussian_shortcut_stays_fp32_under_bf16_autocast(hw):
    x = torch.rand(1, 1, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = hw.blur_fp32(x, hw.gaussian_kernel(1.2))
    assert y.dtype == torch.float32
    np.testing.assert_allclose(y[0, 0].numpy(), ndimage.gaussian_filter(x[0, 0].double().numpy(), 1.2), atol=1e-6)


def test_noskip_decoder_has_fewer_inputs(hw):
    assert hw.n_params(hw.UNet(depth=3, width=8, skips=False)) < hw.n_params(hw.UNet(depth=3, width=8))


def _fit_identity(hw, skips, steps=60):
    """Train a small U-Net to copy random-noise images; returns the final MSE on fresh noise."""
    torch.manual_seed(0)
    net = hw.UNet(depth=2, width=8, skips=skips)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.rand(8, 1, 32, 32, generator=g)
        loss = torch.nn.functional.mse_loss(net(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        x = torch.rand(8, 1, 32, 32, generator=g)
        return torch.nn.functional.mse_loss(net(x), x).item()


def test_skips_carry_full_resolution_detail(hw):
    """What skips change, by behaviour: pixel-level detail (here: random noise to copy) reaches the output
    through the skips; through the pooled bottleneck alone it cannot (4 pixels share one max)."""
    with_skips, without = _fit_identity(hw, True), _fit_identity(hw, False)
    noise_variance = 1 / 12  # predicting the mean 0.5 everywhere
    assert with_skips < 0.2 * without, (with_skips, without)
    assert without > 0.3 * noise_variance, without


# ---------------------------------------------------------------- the receptive field (exercise 4.1)


def test_receptive_fields_by_hand_and_by_measurement(hw):
    assert hw.encoder_receptive_fields(4) == [5, 14, 32, 68, 140]
    assert hw.measured_receptive_fields(4) == [5, 14, 32, 68, 140]
    assert hw.encoder_receptive_fields(2, convs=1) == [3, 8, 18]


def test_check_receptive_fields_passes_the_solution_and_fails_wrong_ones(hw, capsys):
    hw.check_receptive_fields(hw.encoder_receptive_fields)
    assert "✓ Exercise 4.1" in capsys.readouterr().out

    def no_jump(depth):  # every 3×3 conv adds 2 pixels, whatever the resolution
        return [1 + 4 * (level + 1) + level for level in range(depth + 1)]

    def pool_ignored(depth):  # the jump doubles, but the pooling window itself adds nothing
        rf, jump, out = 1, 1, []
        for level in range(depth + 1):
            if level > 0:
                jump *= 2
            rf += 4 * jump
            out.append(rf)
        return out

    def bottleneck_missing(depth):
        return hw.encoder_receptive_fields(depth)[:-1]

    for wrong, hint in [(no_jump, "jump"), (pool_ignored, "pool adds"), (bottleneck_missing, "bottleneck")]:
        with pytest.raises(AssertionError, match=f"(?s)Exercise 4.1.*Hint:.*{hint}"):
            hw.check_receptive_fields(wrong)


# ---------------------------------------------------------------- losses and the Dice exercise (4.2)


def test_losses(hw):
    target = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]]]])
    perfect = (target * 2 - 1) * 50
    assert hw.dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    assert hw.seg_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    assert hw.dice_loss(-perfect, target).item() > 0.6
    bce = torch.nn.functional.binary_cross_entropy_with_logits(torch.zeros_like(target), target)
    dice = (hw.dice_loss(torch.zeros(1, 2, 2), target[:, 0]) + hw.dice_loss(torch.zeros(1, 2, 2), target[:, 1])) / 2
    assert hw.seg_loss(torch.zeros_like(target), target).item() == pytest.approx((bce + dice).item())


def test_check_dice_loss_passes_the_solution_and_fails_wrong_ones(hw, capsys):
    hw.check_dice_loss(hw.dice_loss)
    assert "✓ Exercise 4.2" in capsys.readouterr().out

    def no_sigmoid(logits, target, eps=1.0):
        inter = (logits * target).sum()
        return 1 - (2 * inter + eps) / (logits.sum() + target.sum() + eps)

    def no_two(logits, target, eps=1.0):
        p = torch.sigmoid(logits)
        return 1 - ((p * target).sum() + eps) / (p.sum() + target.sum() + eps)

    def detached(logits, target, eps=1.0):
        p = torch.sigmoid(logits).detach()
        return 1 - (2 * (p * target).sum() + eps) / (p.sum() + target.sum() + eps)

    def per_image(logits, target, eps=1.0):
        p = torch.sigmoid(logits)
        dims = tuple(range(1, p.dim()))
        dice = (2 * (p * target).sum(dims) + eps) / (p.sum(dims) + target.sum(dims) + eps)
        return 1 - dice.mean()

    for wrong, hint in [(no_sigmoid, "sigmoid"), (no_two, "2·Σ"), (detached, "no .detach"),
                        (per_image, "every element")]:
        with pytest.raises(AssertionError, match=f"(?s)Exercise 4.2.*Hint:.*{hint}"):
            hw.check_dice_loss(wrong)


# ---------------------------------------------------------------- pixel metrics


def test_iou_dice_hand_worked(hw):
    pred = np.zeros((4, 4), bool)
    truth = np.zeros((4, 4), bool)
    pred[0, :3] = True   # 3 pixels
    truth[0, 1:] = True  # 3 pixels, overlap 2
    counts = hw.pixel_counts(pred, truth)
    assert list(counts) == [2, 4, 3, 3]
    iou, dice = hw.iou_dice_from_counts(counts)
    assert iou == pytest.approx(2 / 4)
    assert dice == pytest.approx(4 / 6)


def test_pooled_iou_dice_match_sklearn(hw):
    rng = np.random.default_rng(1)
    preds = [rng.random((20, 30)) > 0.6, rng.random((15, 15)) > 0.3]
    truths = [rng.random((20, 30)) > 0.5, rng.random((15, 15)) > 0.5]
    counts = sum(hw.pixel_counts(p, t) for p, t in zip(preds, truths))
    iou, dice = hw.iou_dice_from_counts(counts)
    flat_p = np.concatenate([p.ravel() for p in preds])
    flat_t = np.concatenate([t.ravel() for t in truths])
    assert iou == pytest.approx(jaccard_score(flat_t, flat_p))
    assert dice == pytest.approx(f1_score(flat_t, flat_p))


def test_empty_masks_score_one(hw):
    z = np.zeros((5, 5), bool)
    assert hw.iou_dice_from_counts(hw.pixel_counts(z, z)) == (1.0, 1.0)


def test_bootstrap_and_paired_standard_errors(hw):
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1.0, 400), rng.normal(0.0, 1.0, 400)
    assert hw.paired_se(a, b) == pytest.approx(np.std(a - b, ddof=1) / 20)
    # a ratio of sums over n equal-weight items: the bootstrap SE approaches the SE of the mean difference
    ones = np.ones(400)
    se = hw.bootstrap_ratio_diff_se(a, ones, b, ones, n_boot=2000, seed=0)
    assert se == pytest.approx(np.std(a - b) / 20, rel=0.1)
    assert hw.bootstrap_ratio_diff_se(a, ones, a, ones, 100, 0) == 0.0


# ---------------------------------------------------------------- instances, matching, the IoU exercise (4.3)


def test_iou_matrix_against_brute_force(hw):
    rng = np.random.default_rng(3)
    for _ in range(5):
        truth = rng.integers(0, 4, size=(12, 12))
        pred = rng.integers(0, 5, size=(12, 12)) * 7  # label values need not be 1..n
        iou, pid, tid = hw.iou_matrix(pred, truth)
        assert list(pid) == sorted(set(pred[pred > 0].ravel())) and list(tid) == sorted(set(truth[truth > 0].ravel()))
        for i, a in enumerate(pid):
            for j, b in enumerate(tid):
                assert iou[i, j] == pytest.approx(jaccard_score((truth == b).ravel(), (pred == a).ravel()))


def test_ap_hand_worked(hw):
    truth = np.zeros((10, 10), int)
    truth[0:4, 0:4] = 1     # 16 px
    truth[6:10, 6:10] = 2   # 16 px
    pred = np.zeros((10, 10), int)
    pred[0:4, 0:3] = 5      # 12 px inside object 1: IoU 12/16 = 0.75 → TP
    pred[6:10, 8:10] = 7    # 8 px inside object 2: IoU 8/16 = 0.5, not > 0.5 → FP and FN
    pred[0:2, 7:9] = 9      # 4 px on background → FP
    tp, fp, fn = hw.match_counts(pred, truth)
    assert (tp, fp, fn) == (1, 2, 1)
    assert hw.ap_from_counts(tp, fp, fn) == pytest.approx(1 / 4)
    assert hw.mean_ap([pred, truth], [truth, truth]) == pytest.approx((1 / 4 + 1) / 2)
    assert list(hw.matched_ids(pred, truth)) == [5]


def test_ap_label_values_do_not_matter_and_empty_cases(hw):
    truth = np.zeros((8, 8), int)
    truth[1:4, 1:4] = 3
    assert hw.ap_from_counts(*hw.match_counts(truth * 10, truth)) == 1.0
    empty = np.zeros((8, 8), int)
    assert hw.match_counts(empty, truth) == (0, 0, 1)
    assert hw.match_counts(truth, empty) == (0, 1, 0)
    assert hw.ap_from_counts(*hw.match_counts(empty, empty)) == 1.0
    full = np.ones((8, 8), int)  # no background at all in one image
    assert hw.match_counts(full, full) == (1, 0, 0)
    assert len(hw.matched_ids(empty, truth)) == 0


def test_match_counts_against_brute_force(hw):
    rng = np.random.default_rng(3)
    for _ in range(5):
        truth = rng.integers(0, 4, size=(12, 12))
        pred = rng.integers(0, 5, size=(12, 12))
        tp = 0
        for a in range(1, 5):
            for b in range(1, 4):
                pa, tb = pred == a, truth == b
                if pa.any() and tb.any() and (pa & tb).sum() / (pa | tb).sum() > 0.5:
                    tp += 1
        n_p, n_t = len(np.unique(pred[pred > 0])), len(np.unique(truth[truth > 0]))
        assert hw.match_counts(pred, truth) == (tp, n_p - tp, n_t - tp)


def test_check_iou_matrix_passes_the_solution_and_fails_wrong_ones(hw, capsys):
    hw.check_iou_matrix(hw.iou_matrix)
    assert "✓ Exercise 4.3" in capsys.readouterr().out

    def relabel(pred, true):
        pred_ids, p = np.unique(pred, return_inverse=True)
        true_ids, t = np.unique(true, return_inverse=True)
        p, t = p.ravel(), t.ravel()
        inter = np.bincount(p * len(true_ids) + t, minlength=len(pred_ids) * len(true_ids))
        return inter.reshape(len(pred_ids), len(true_ids)), pred_ids, true_ids

    def finish(iou, pred_ids, true_ids):
        return iou[pred_ids > 0][:, true_ids > 0], pred_ids[pred_ids > 0], true_ids[true_ids > 0]

    def union_without_minus(pred, true):
        inter, pid, tid = relabel(pred, true)
        return finish(inter / (inter.sum(1)[:, None] + inter.sum(0)[None, :]), pid, tid)

    def axes_swapped(pred, true):
        inter, pid, tid = relabel(pred, true)
        return finish(inter / (inter.sum(0)[:, None] + inter.sum(1)[None, :] - inter), pid, tid)

    def intersection_only(pred, true):
        inter, pid, tid = relabel(pred, true)
        return finish(inter.astype(float), pid, tid)

    for wrong, hint in [(union_without_minus, "− intersection"), (axes_swapped, "inter has shape|row sum"),
                        (intersection_only, "union")]:
        with pytest.raises(AssertionError, match=f"(?s)Exercise 4.3.*Hint:.*({hint})"):
            hw.check_iou_matrix(wrong)


def test_overlay_colours_agree_with_match_counts(hw):
    truth = np.zeros((40, 40), int)
    truth[2:12, 2:12] = 1
    truth[20:30, 20:30] = 2
    truth[2:10, 25:35] = 3
    pred = np.zeros((40, 40), int)
    pred[2:12, 3:12] = 4     # IoU 0.9 with 1 → green
    pred[20:30, 20:24] = 6   # IoU 0.4 with 2 → red
    pred[32:38, 2:8] = 8     # on background → red
    pred[2:10, 25:35] = 9    # identical to 3 → green
    image = np.full((40, 40), 0.5, np.float32)
    rgb = hw.outline_overlay(image, truth, pred)
    green = np.all(np.isclose(rgb, (0.1, 1.0, 0.1)), axis=-1)
    red = np.all(np.isclose(rgb, (1.0, 0.15, 0.15)), axis=-1)
    tp, fp, fn = hw.match_counts(pred, truth)
    assert (tp, fp, fn) == (2, 2, 1)
    assert len(np.unique(pred[green])) == tp and set(np.unique(pred[green])) == {4, 9}
    assert len(np.unique(pred[red])) == fp and set(np.unique(pred[red])) == {6, 8}
    assert not (green & red).any() and (pred[green | red] > 0).all()


def test_seg_targets_separate_touching_nuclei(hw):
    shape = (40, 60)
    mask = np.zeros(shape, np.int32)
    mask[disk(shape, 20, 20, 9)] = 1
    mask[disk(shape, 20, 36, 9) & (mask == 0)] = 2   # touches nucleus 1
    fg, interior = hw.seg_targets(mask, boundary_px=2)
    assert np.array_equal(fg > 0, mask > 0)
    assert ((interior > 0) <= (fg > 0)).all()
    assert ndimage.label(fg)[1] == 1 and ndimage.label(interior)[1] == 2  # one blob, two interiors
    ring = (fg > 0) & (interior == 0)
    # the ring is 2 px wide inside each outline: the distance to the outside of its own nucleus is ≤ 2
    for lab in (1, 2):
        dist = ndimage.distance_transform_cdt(mask == lab, metric="taxicab")
        assert (dist[ring & (mask == lab)] <= 2).all() and (dist[(interior > 0) & (mask == lab)] > 2).all()


def test_touching_blobs_merge_in_components_split_by_watershed(hw):
    shape = (40, 60)
    touching = disk(shape, 20, 20, 9) | disk(shape, 20, 36, 9)   # overlap: one connected blob
    separate = disk(shape, 10, 10, 6) | disk(shape, 28, 45, 8)
    ws = hw.label_watershed(touching, h=2.0)
    assert len(np.unique(ws[ws > 0])) == 2
    ws_sep = hw.label_watershed(separate, h=2.0)
    assert len(np.unique(ws_sep[ws_sep > 0])) == 2
    assert np.array_equal(ws > 0, touching)  # every foreground pixel keeps a label, background stays 0


def test_watershed_keeps_tiny_blobs(hw):
    b = np.zeros((10, 10), bool)
    b[2, 2] = True
    b[7:9, 7:9] = True
    lab = hw.label_watershed(b, h=3.0)
    assert len(np.unique(lab[lab > 0])) == 2


def test_instances_from_interior_seeds(hw):
    shape = (40, 60)
    mask = np.zeros(shape, np.int32)
    mask[disk(shape, 20, 20, 9)] = 1
    mask[disk(shape, 20, 36, 9) & (mask == 0)] = 2
    mask[disk(shape, 5, 52, 2)] = 3  # a tiny nucleus: all boundary, no interior
    fg, interior = hw.seg_targets(mask, boundary_px=2)
    prob = np.stack([fg, interior])
    comp = hw.to_instances(prob, "components")
    seeded = hw.to_instances(prob, "interior")
    assert len(np.unique(comp[comp > 0])) == 2            # the touching pair merges
    assert len(np.unique(seeded[seeded > 0])) == 3        # seeds split it; the seedless blob stays
    assert hw.match_counts(seeded, mask) == (3, 0, 0)
    assert np.array_equal(seeded > 0, fg > 0)
    no_tiny = hw.to_instances(prob, "interior", min_size=20)
    assert hw.match_counts(no_tiny, mask) == (2, 0, 1)
    with pytest.raises(ValueError, match="unknown instance method"):
        hw.to_instances(prob, "magic")


def test_sharpness_counts_prefer_a_sharp_map(hw):
    shape = (40, 40)
    mask = disk(shape, 20, 20, 10).astype(int)
    sharp = hw.sharpness_counts(mask.astype(np.float32), mask)
    blurred = hw.sharpness_counts(ndimage.gaussian_filter(mask.astype(np.float32), 3), mask)
    assert sharp[0] / sharp[1] > blurred[0] / blurred[1]
    assert sharp[2] == 0 and blurred[2] > 0 and sharp[3] == blurred[3] == 1600


# ---------------------------------------------------------------- denoising: PSNR (exercise 4.4), SSIM, filters


def test_psnr_matches_skimage(hw):
    rng = np.random.default_rng(0)
    clean = rng.random((32, 48)).astype(np.float32)
    noisy = hw.add_noise(clean, 0.1, seed=5)
    reference = peak_signal_noise_ratio(clean, noisy, data_range=1.0)
    assert hw.psnr(clean, noisy) == pytest.approx(reference, rel=1e-6)
    assert hw.psnr(clean, noisy) == pytest.approx(20.0, abs=0.5)
    assert np.array_equal(noisy, hw.add_noise(clean, 0.1, seed=5))


def test_check_psnr_passes_the_solution_and_fails_wrong_ones(hw, capsys):
    hw.check_psnr(hw.psnr)
    assert "✓ Exercise 4.4" in capsys.readouterr().out

    def rmse_with_ten(clean, est, data_range=1.0):
        err = np.asarray(clean, np.float64) - np.asarray(est, np.float64)
        return float(10 * np.log10(data_range / np.sqrt(np.mean(err ** 2))))

    def no_float(clean, est, data_range=1.0):  # uint8 differences wrap around
        return float(10 * np.log10(data_range ** 2 / np.mean((clean - est) ** 2)))

    def range_ignored(clean, est, data_range=1.0):
        err = np.asarray(clean, np.float64) - np.asarray(est, np.float64)
        return float(10 * np.log10(1.0 / np.mean(err ** 2)))

    for wrong in (rmse_with_ten, no_float, range_ignored):
        with pytest.raises(AssertionError, match="(?s)Exercise 4.4.*Hint:.*MSE in float64"):
            hw.check_psnr(wrong)


def test_ssim_is_the_uniform_7x7_window_worked_by_hand(hw):
    """The notebook's SSIM (scikit-image default) on cases worked out from the formula of Wang et al."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    a, b = np.full((16, 16), 0.5, np.float32), np.full((16, 16), 0.4, np.float32)
    _, ssim = hw.denoise_scores([a], [b])
    assert ssim[0] == pytest.approx((2 * 0.5 * 0.4 + c1) / (0.5 ** 2 + 0.4 ** 2 + c1), rel=1e-6)
    # a 7×7 image holds exactly one full 7×7 window (the one at the centre); sample (co)variances
    rng = np.random.default_rng(0)
    x, y = rng.random((7, 7)), rng.random((7, 7))
    mx, my = x.mean(), y.mean()
    vx, vy, cxy = x.var(ddof=1), y.var(ddof=1), ((x - mx) * (y - my)).sum() / 48
    by_hand = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    _, ssim = hw.denoise_scores([x.astype(np.float32)], [y.astype(np.float32)])
    assert ssim[0] == pytest.approx(by_hand, rel=1e-5)
    gaussian = structural_similarity(x, y, data_range=1.0, gaussian_weights=True, sigma=1.5, win_size=7)
    assert abs(ssim[0] - gaussian) > 1e-4  # the Gaussian-window SSIM is another number


def test_classical_denoisers_improve_psnr(hw):
    clean = ndimage.gaussian_filter(disk((64, 64), 32, 32, 16).astype(np.float32) * 0.8, 1.0)
    noisy = hw.add_noise(clean, 0.1, seed=3)
    for est in (hw.gaussian_denoise(noisy, 1.0), hw.nlm_denoise(noisy, 0.8 * 0.1, 0.1)):
        assert est.min() >= 0.0 and est.max() <= 1.0
        assert hw.psnr(clean, est) > hw.psnr(clean, noisy) + 8


def test_noisy_input_psnr_is_minus_20_log10_sigma(hw):
    """The relation tests/test_results.py checks on every smoke run: unclipped Gaussian noise of std σ."""
    clean = np.random.default_rng(0).random((200, 300)).astype(np.float32)
    for sigma in (0.05, 0.1, 0.2):
        assert hw.psnr(clean, hw.add_noise(clean, sigma, 1)) == pytest.approx(-20 * np.log10(sigma), abs=0.05)


def test_denoise_samplers(hw):
    pool = hw.CropPool([[np.full((16, 16), 0.5, np.float32)]], 16, CPU)
    noisy, clean = hw.denoise_sampler(pool, 4, 0.1, 0)(0)
    assert torch.equal(clean, torch.full((4, 1, 16, 16), 0.5))
    assert abs(float((noisy - clean).std()) - 0.1) < 0.02
    a, b = hw.denoise_sampler(pool, 4, 0.1, 0, noise2noise=True)(0)
    assert a.shape == b.shape == (4, 1, 16, 16)
    assert abs(float(np.corrcoef((a - 0.5).ravel(), (b - 0.5).ravel())[0, 1])) < 0.1  # independent noise
    assert abs(float((b - 0.5).std()) - 0.1) < 0.02


# ---------------------------------------------------------------- data path


def write_pair(root, split, name, image, mask):
    for k in ("images", "masks"):
        (root / split / k).mkdir(parents=True, exist_ok=True)
    if image is not None:
        tifffile.imwrite(root / split / "images" / name, image, compression="zlib")
    if mask is not None:
        tifffile.imwrite(root / split / "masks" / name, mask, compression="zlib")


def good_image(shape=(32, 40)):
    rng = np.random.default_rng(0)
    return (rng.random(shape) * 255).astype(np.uint8)


def test_load_split_reads_and_normalises(hw, tmp_path):
    mask = np.zeros((32, 40), np.uint16)
    mask[5:10, 5:10] = 1
    write_pair(tmp_path, "train", "a.tif", good_image(), mask)
    rgb = np.repeat(good_image((20, 24))[..., None], 3, axis=-1)
    write_pair(tmp_path, "train", "b.tif", rgb, np.zeros((20, 24), np.uint16))
    data = hw.load_split(tmp_path, "train")
    assert [r["name"] for r in data] == ["a.tif", "b.tif"]
    for r in data:
        assert r["image"].dtype == np.float32 and r["image"].min() >= 0 and r["image"].max() <= 1
        assert r["image"].shape == r["mask"].shape
    assert data[0]["mask"].max() == 1


@pytest.mark.parametrize("case, message", [
    ("orphan mask", "Mask.*without image.*orphan.tif"),
    ("orphan image", "without mask.*lonely.tif"),
    ("size mismatch", "Size mismatch for a.tif"),
    ("unreadable", "Cannot read TIFF .*broken.tif"),
    ("3-D mask", "a.tif: a mask must be a 2-D label image"),
])
def test_bad_files_are_named(hw, tmp_path, case, message):
    write_pair(tmp_path, "train", "a.tif", good_image(), np.zeros((32, 40), np.uint16))
    if case == "orphan mask":
        write_pair(tmp_path, "train", "orphan.tif", None, np.zeros((32, 40), np.uint16))
    elif case == "orphan image":
        write_pair(tmp_path, "train", "lonely.tif", good_image(), None)
    elif case == "size mismatch":
        write_pair(tmp_path, "train", "a.tif", good_image((32, 40)), np.zeros((32, 41), np.uint16))
    elif case == "unreadable":
        (tmp_path / "train" / "images" / "broken.tif").write_bytes(b"this is not a tiff")
        write_pair(tmp_path, "train", "broken.tif", None, np.zeros((32, 40), np.uint16))
    else:
        write_pair(tmp_path, "train", "a.tif", good_image(), np.zeros((2, 32, 40), np.uint16))
    with pytest.raises(hw.DataLayoutError, match=message):
        hw.load_split(tmp_path, "train")


def test_missing_or_empty_folders(hw, tmp_path):
    (tmp_path / "train" / "images").mkdir(parents=True)
    with pytest.raises(hw.DataLayoutError, match="masks"):
        hw.load_split(tmp_path, "train")
    (tmp_path / "train" / "masks").mkdir()
    with pytest.raises(hw.DataLayoutError, match="no .tif"):
        hw.load_split(tmp_path, "train")


def test_subset_is_random_and_keeps_the_size_mix_on_a_size_sorted_folder(hw, tmp_path, monkeypatch):
    """Names sorted so that the first 30 are 24×24 and the last 10 are 40×32: the first 8 would be one size."""
    for i in range(40):
        shape = (24, 24) if i < 30 else (40, 32)
        write_pair(tmp_path, "train", f"{i:03d}.tif", good_image(shape), np.zeros(shape, np.uint16))
    decoded = []
    real_read = hw.read_tiff
    monkeypatch.setattr(hw, "read_tiff", lambda p: decoded.append(p.name) or real_read(p))
    data = hw.load_split(tmp_path, "train", n=8, seed=1)
    names = [r["name"] for r in data]
    assert len(names) == 8 and names != [f"{i:03d}.tif" for i in range(8)]
    assert sum(r["image"].shape == (40, 32) for r in data) == 2  # 25 % of the sample from the 25 % stratum
    assert sorted(set(decoded)) == sorted(names)  # only the sampled files are decoded
    assert names == [r["name"] for r in hw.load_split(tmp_path, "train", n=8, seed=1)]
    assert names != [r["name"] for r in hw.load_split(tmp_path, "train", n=8, seed=2)]
    assert len(hw.load_split(tmp_path, "train", n=None)) == 40


def test_find_data_order_and_errors(hw, tmp_path, monkeypatch):
    monkeypatch.delenv("DLCV_DATA_DIR", raising=False)
    with pytest.raises(hw.DataNotFoundError, match="(?s)DLCV_DATA_DIR: not set.*DLCV_OFFLINE=1.*1. allow") as err:
        hw.find_data("cpu", tmp_path / "cache", offline=True)
    text = str(err.value)
    assert "dsb2018.zip" in text and "kaggle.com" not in text.lower() and "torchvision" not in text
    assert "CIFAR" not in text and "kagglehub" not in text and "\n  4. " not in text  # only its three fixes
    root, origin, source = hw.find_data("smoke", tmp_path / "cache", offline=True, seed=0, n_synthetic=(2, 1))
    assert source == "synthetic" and hw.is_dsb_root(root)
    data = hw.load_split(root, "train")
    assert len(data) == 2 and all(r["mask"].max() >= 5 for r in data)
    assert tifffile.imread(root / "train" / "masks" / data[0]["name"]).dtype == np.uint16
    monkeypatch.setenv("DLCV_DATA_DIR", str(root.parent))
    assert hw.find_data("cpu", tmp_path / "cache", offline=True) == (root, f"DLCV_DATA_DIR ({root})", "real")


# --- the StarDist zip, served from 127.0.0.1 ------------------------------------------------------------------
@pytest.fixture()
def server(loopback):
    return loopback.url, loopback.routes, loopback.hits


def _dsb_zip(hw, tmp_path, layout=True) -> bytes:
    """A tiny dsb2018.zip in the StarDist layout (dsb2018/{train,test}/{images,masks}/*.tif)."""
    src = tmp_path / "src" / "dsb2018"
    hw.make_synthetic_dsb2018(src, 1, 1, seed=0)
    path = tmp_path / "made.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for p in sorted(src.rglob("*.tif")):
            arc = p.relative_to(src.parent).as_posix()
            zf.write(p, arc if layout else arc.replace("/images/", "/pictures/"))
    return path.read_bytes()


def _nothing_trusted(hw, cache):
    """No dataset folder, no archive, no partial files: nothing a rerun would use."""
    left = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
    assert left == [], left
    assert not hw.is_dsb_root(cache / "dsb2018")


def test_download_complete_archive_is_used_once(hw, server, tmp_path, monkeypatch):
    monkeypatch.delenv("DLCV_DATA_DIR", raising=False)
    url, routes, hits = server
    routes["/dsb2018.zip"] = (_dsb_zip(hw, tmp_path), None)
    cache = tmp_path / "cache"
    root, origin, source = hw.find_data("cpu", cache, offline=False, url=f"{url}/dsb2018.zip")
    assert source == "real" and root == cache / "dsb2018" and "StarDist release" in origin
    assert len(hw.load_split(root, "train")) == 1 and len(hw.load_split(root, "test")) == 1
    assert sorted(p.name for p in cache.iterdir()) == ["dsb2018"]  # unpacked; no zip, no temporary folder
    routes.clear()  # a rerun must not need the server
    assert hw.find_data("cpu", cache, offline=False, url=f"{url}/dsb2018.zip")[0] == root
    assert hw.download_dsb2018(cache, f"{url}/dsb2018.zip") == root
    assert hits == ["/dsb2018.zip"]


def _corrupt_member(data: bytes) -> bytes:
    """Flip bytes inside the first member's data: a complete zip whose CRC check fails."""
    start = 30 + int.from_bytes(data[26:28], "little") + int.from_bytes(data[28:30], "little")
    body = bytearray(data)
    for i in range(start + 20, start + 40):
        body[i] ^= 0xFF
    return bytes(body)


@pytest.mark.parametrize("case", ["truncated", "corrupt", "garbage", "wrong layout"])
def test_download_broken_archive_is_refused_and_leaves_nothing(hw, server, tmp_path, case):
    url, routes, _ = server
    good = _dsb_zip(hw, tmp_path)
    routes["/dsb2018.zip"] = {
        "truncated": (good[: len(good) // 2], len(good)),    # the connection drops half-way
        "corrupt": (_corrupt_member(good), None),            # complete, but a member fails its CRC
        "garbage": (b"PK\x03\x04 not a zip at all" * 50, None),
        "wrong layout": (_dsb_zip(hw, tmp_path / "other", layout=False), None),
    }[case]
    cache = tmp_path / "cache"
    with pytest.raises(hw.DownloadError, match="dsb2018.zip"):
        hw.download_dsb2018(cache, f"{url}/dsb2018.zip")
    _nothing_trusted(hw, cache)
    routes["/dsb2018.zip"] = (good, None)  # the next run, with a good server, gets the real thing
    assert hw.is_dsb_root(hw.download_dsb2018(cache, f"{url}/dsb2018.zip"))


def test_a_broken_zip_left_in_the_cache_is_not_reused(hw, server, tmp_path):
    url, routes, hits = server
    routes["/dsb2018.zip"] = (_dsb_zip(hw, tmp_path), None)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "dsb2018.zip").write_bytes(b"half a file from an older version")
    root = hw.download_dsb2018(cache, f"{url}/dsb2018.zip")
    assert hw.is_dsb_root(root) and hits == ["/dsb2018.zip"]


def test_download_404_gives_the_offline_error_with_its_fixes(hw, server, tmp_path, monkeypatch):
    monkeypatch.delenv("DLCV_DATA_DIR", raising=False)
    url, _, _ = server
    cache = tmp_path / "cache"
    with pytest.raises(hw.DataNotFoundError, match=r"(?s)missing\.zip.*404.*Fix it.*1\. allow the download"):
        hw.find_data("cpu", cache, offline=False, url=f"{url}/missing.zip")
    _nothing_trusted(hw, cache)
    root, _, source = hw.find_data("smoke", cache, offline=False, seed=0, n_synthetic=(1, 1), url=f"{url}/missing.zip")
    assert source == "synthetic" and hw.is_dsb_root(root)


# ---------------------------------------------------------------- crops and training


def test_crop_pool_gathers_the_right_pixels(hw):
    a = np.arange(20 * 30, dtype=np.float32).reshape(20, 30)
    b = 10000 + np.arange(16 * 12, dtype=np.float32).reshape(16, 12)
    pool = hw.CropPool([[a, a * 2], [b, b * 2]], crop=8, device=CPU)
    crops = pool.sample(16, torch.Generator().manual_seed(0), augment=False)
    assert crops.shape == (16, 2, 8, 8)
    for c in crops.numpy():
        src = a if c[0, 0, 0] < 10000 else b
        y, x = np.argwhere(src == c[0, 0, 0])[0]
        assert np.array_equal(c[0], src[y:y + 8, x:x + 8])
        assert np.array_equal(c[1], 2 * c[0])
    aug = pool.sample(16, torch.Generator().manual_seed(0), augment=True)
    assert aug.shape == (16, 2, 8, 8)
    assert torch.equal(aug[:, 1], 2 * aug[:, 0])  # image and target get the same transform


def test_crop_pool_pads_small_images(hw):
    pool = hw.CropPool([[np.ones((5, 7), np.float32)]], crop=8, device=CPU)
    crops = pool.sample(3, torch.Generator().manual_seed(0))
    assert crops.shape == (3, 1, 8, 8) and crops.sum().item() == 3 * 35


def test_train_steps_runs_exactly_its_steps_whatever_the_clock(hw, monkeypatch):
    """Budgets are steps: a clock that jumps by an hour per call changes nothing but the reported seconds."""
    rng = np.random.default_rng(0)
    imgs = [[rng.random((40, 40)).astype(np.float32), (rng.random((40, 40)) > 0.5).astype(np.float32)]]

    def run():
        hw.seed_everything(0)
        pool = hw.CropPool(imgs, 16, CPU)
        net = hw.UNet(depth=2, width=4)
        hist = hw.train_steps(net, hw.seg_sampler(pool, 4, 0), hw.seg_loss, 7, 1e-3, FP32)
        return hist, net

    first, _ = run()
    clock = iter(range(0, 10 ** 6, 3600))
    monkeypatch.setattr(hw.time, "perf_counter", lambda: float(next(clock)))
    second, net = run()
    assert len(first["loss"]) == len(second["loss"]) == 7 and second["steps"] == 7
    assert np.array_equal(first["loss"], second["loss"])
    assert not net.training


def _cpu_profile_run(hw, precision):
    """A short run with the cpu config's settings on tiny data: train, predict, score (IoU, AP, PSNR)."""
    cfg = hw.CONFIGS["cpu"]
    rng = np.random.default_rng(0)
    _, mask = hw.synthetic_nuclei((cfg["crop"] + 8, cfg["crop"] + 4), 12, rng)
    image = hw.percentile_normalise(mask.astype(np.float32) + rng.random(mask.shape).astype(np.float32))
    hw.seed_everything(cfg["seed"])
    pool = hw.CropPool([[image, *hw.seg_targets(mask, cfg["boundary_px"])]], cfg["crop"], CPU)
    net = hw.UNet(out_ch=2, depth=cfg["depth"], width=cfg["width"])
    hist = hw.train_steps(net, hw.seg_sampler(pool, 2, cfg["seed"]), hw.seg_loss, 3, cfg["lr"], precision)
    probs, counts = hw.evaluate_pixels(net, [dict(image=image, mask=mask)], CPU, precision)
    ap = hw.mean_ap([hw.to_instances(probs[0], "interior")], [mask])
    hw.seed_everything(cfg["seed"])
    den_pool = hw.CropPool([[image]], cfg["den_crop"], CPU)
    den = hw.build_denoiser(cfg, 1.2)
    den_hist = hw.train_steps(den, hw.denoise_sampler(den_pool, 2, cfg["sigma"], cfg["seed"]), hw.mse_loss, 3,
                              cfg["den_lr"], precision)
    noisy = hw.add_noise(image, cfg["sigma"], 0)
    psnr = hw.psnr(image, hw.denoise_images(den, [noisy], CPU, precision)[0])
    return hist["loss"].tolist(), den_hist["loss"].tolist(), hw.iou_dice_from_counts(counts.sum(0)), ap, psnr


@pytest.mark.parametrize("precision", [FP32, BF16], ids=["fp32", "bf16"])
def test_same_seed_same_numbers(hw, precision):
    first, second = _cpu_profile_run(hw, precision), _cpu_profile_run(hw, precision)
    assert first == second
    assert all(np.isfinite(v) for v in first[0] + first[1])


@pytest.mark.parametrize("profile", ["cpu", "full"])
@pytest.mark.parametrize("precision", [FP32, BF16], ids=["fp32", "bf16"])
def test_profile_models_take_one_step(hw, profile, precision):
    cfg = hw.CONFIGS[profile]
    rng = np.random.default_rng(0)
    size = max(cfg["crop"], cfg["den_crop"])
    image = rng.random((size + 3, size + 5)).astype(np.float32)
    target = (image > 0.5).astype(np.float32)
    for task in ("seg", "noskip", "den", "n2n"):
        hw.seed_everything(0)
        if task in ("den", "n2n"):
            pool = hw.CropPool([[image]], cfg["den_crop"], CPU)
            net = hw.build_denoiser(cfg, 1.2)
            sample = hw.denoise_sampler(pool, 2, cfg["sigma"], 0, noise2noise=task == "n2n")
            loss_fn = hw.mse_loss
        else:
            pool = hw.CropPool([[image, target, target]], cfg["crop"], CPU)
            net = hw.UNet(out_ch=2, depth=cfg["depth"], width=cfg["width"], skips=task == "seg")
            sample, loss_fn = hw.seg_sampler(pool, 2, 0), hw.seg_loss
        before = [p.detach().clone() for p in net.parameters()]
        hist = hw.train_steps(net, sample, loss_fn, 1, 1e-3, precision)
        assert hist["steps"] == 1 and np.isfinite(hist["loss"][0])
        assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
        out = hw.predict_image(net, image[:37, :50], CPU, precision, sigmoid=task in ("seg", "noskip"))
        assert out.shape == ((2 if task in ("seg", "noskip") else 1), 37, 50) and out.dtype == np.float32
