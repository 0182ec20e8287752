"""Unit tests of homework_4's own definitions: U-Net, metrics, instances, denoising, data path, exercise checks.

Every test compares the notebook's code with something independent of it: scikit-learn / scikit-image /
scipy references, hand-worked cases, brute force, or a behaviour (what skips change, what a download
leaves in the cache). Each exercise check is shown to pass the solution and to fail plausible wrong answers.
"""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import synth_dsb2018
import tifffile
import torch
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sklearn.metrics import f1_score, jaccard_score

from nbload import load_lib

CPU = torch.device("cpu")


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


def precision(hw, monkeypatch, name):
    """The notebook's precision dict for `name`, chosen the way a run forced by $DLCV_PRECISION gets it."""
    monkeypatch.setenv("DLCV_PRECISION", name)
    return hw.choose_precision(CPU, hw.CPU_BF16_GAINS)


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
    net = hw.DenoisingUNet(depth=3, width=4, unshuffle=2).eval()
    with torch.no_grad():
        torch.nn.init.normal_(net.unet.head.weight)  # make the correction non-zero so its shape matters
        out = net(torch.rand(1, 1, *hw_size))
    assert out.shape == (1, 1, *hw_size)


@pytest.mark.parametrize("unshuffle", [1, 2])
def test_residual_unet_is_the_identity_as_built(hw, unshuffle):
    """No re-zeroing here: the constructor itself must make the untrained denoiser return its input."""
    torch.manual_seed(0)
    net = hw.DenoisingUNet(depth=2, width=4, unshuffle=unshuffle).eval()
    x = torch.rand(2, 1, 30, 41)
    with torch.no_grad():
        assert torch.equal(net(x), x)
    net.train()  # batch statistics change the features, not the zero head
    with torch.no_grad():
        assert torch.equal(net(x), x)


def test_residual_unet_with_shortcut_starts_as_scipys_gaussian_filter(hw):
    rng = np.random.default_rng(1)
    image = rng.random((40, 52)).astype(np.float32)
    net = hw.DenoisingUNet(depth=2, width=4, shortcut_sigma=1.4).eval()
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


def _wrong_unet(hw, kind):
    """A plausible wrong answer to exercise 4.1, as a subclass of the notebook's UNet."""

    class Wrong(hw.UNet):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            ch = [m[0].out_channels for m in self.down]
            if kind == "wide up-conv":  # up keeps the coarse channels; merge sized to fit: runs, wrong size
                self.up = torch.nn.ModuleList([torch.nn.ConvTranspose2d(ch[i + 1], ch[i + 1], 2, stride=2)
                                               for i in range(self.depth)])
                self.merge = torch.nn.ModuleList([hw.conv_block(ch[i + 1] + (ch[i] if self.skips else 0), ch[i])
                                                  for i in range(self.depth)])
            if kind == "merge not doubled":  # forgets that concatenation doubles the channels
                self.merge = torch.nn.ModuleList([hw.conv_block(ch[i], ch[i]) for i in range(self.depth)])

        def decode_step(self, z, skip, level):
            z = self.up[level](z)
            if kind == "upsampled twice":  # concatenates the upsampled map with itself: shapes fine, no skip
                return self.merge[level](torch.cat([z, z], 1) if self.skips else z)
            if kind == "skips flag ignored":
                return self.merge[level](torch.cat([z, skip], 1))
            if kind == "added, not concatenated":
                return self.merge[level](z + skip if self.skips else z)
            return self.merge[level](torch.cat([z, skip], 1) if self.skips else z)

    return Wrong


def test_check_unet_passes_the_solution_and_fails_wrong_ones(hw, capsys):
    hw.check_unet(hw.UNet)
    assert "✓ Exercise 4.1" in capsys.readouterr().out
    for kind, message in [("upsampled twice", "one-pixel change.*Hint:.*level-0 skip"),
                          ("wide up-conv", "decoder level 0: the merge block received"),
                          ("skips flag ignored", "skips=False.*raised"),
                          ("merge not doubled", "skips=True.*raised"),
                          ("added, not concatenated", "skips=True.*raised")]:
        with pytest.raises(AssertionError, match=f"(?s)Exercise 4.1.*{message}"):
            hw.check_unet(_wrong_unet(hw, kind))


@pytest.mark.parametrize("kind", ["4x4", "bilinear"])
def test_another_upsampling_design_passes(hw, capsys, kind):
    """The layers are the student's choice: a 4×4 transposed convolution, or bilinear upsampling and a 1×1
    convolution, gives the same sizes and channels as the diagram and passes."""
    class Other(hw.UNet):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            ch = [m[0].out_channels for m in self.down]
            self.up = torch.nn.ModuleList([
                torch.nn.ConvTranspose2d(ch[i + 1], ch[i], 4, stride=2, padding=1) if kind == "4x4" else
                torch.nn.Sequential(torch.nn.Upsample(scale_factor=2, mode="bilinear"),
                                    torch.nn.Conv2d(ch[i + 1], ch[i], 1))
                for i in range(self.depth)])

    hw.check_unet(Other)
    assert "✓ Exercise 4.1" in capsys.readouterr().out


def test_student_stub_stops_with_not_implemented(hw):
    class Stub(hw.UNet):
        def decode_step(self, z, skip, level):
            raise NotImplementedError("Exercise 4.1")

    with pytest.raises(NotImplementedError):
        hw.check_unet(Stub)


# ---------------------------------------------------------------- the receptive field (exercise 4.1)


def test_receptive_fields_by_hand_and_by_measurement(hw):
    assert hw.encoder_receptive_fields(4) == [5, 14, 32, 68, 140]
    assert hw._measured_receptive_fields(4) == [5, 14, 32, 68, 140]
    assert hw.encoder_receptive_fields(2, convs=1) == [3, 8, 18]


def test_check_receptive_fields_passes_the_solution_and_fails_wrong_ones(hw, capsys):
    hw.check_receptive_fields(hw.encoder_receptive_fields)
    assert "✓ Exercise 4.3" in capsys.readouterr().out

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

    def measures(depth):  # passes the values on by measuring them: not the exercise
        return hw._measured_receptive_fields(depth)

    for wrong, hint in [(no_jump, "jump"), (pool_ignored, "pool adds"), (bottleneck_missing, "bottleneck"),
                        (measures, "compute it")]:
        with pytest.raises(AssertionError, match=f"(?s)Exercise 4.3.*Hint:.*{hint}"):
            hw.check_receptive_fields(wrong)


# ---------------------------------------------------------------- losses


def test_losses(hw):
    target = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]]]])
    perfect = (target * 2 - 1) * 50
    assert hw.dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    assert hw.seg_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    assert hw.dice_loss(-perfect, target).item() > 0.6
    bce = torch.nn.functional.binary_cross_entropy_with_logits(torch.zeros_like(target), target)
    dice = (hw.dice_loss(torch.zeros(1, 2, 2), target[:, 0]) + hw.dice_loss(torch.zeros(1, 2, 2), target[:, 1])) / 2
    assert hw.seg_loss(torch.zeros_like(target), target).item() == pytest.approx((bce + dice).item())
    # by hand: p = 0.75, 0.25, 0.5, 0.5 against t = 1, 0, 1, 0 → 1 − (2·1.25 + 1)/(2 + 2 + 1) = 0.3
    l3 = float(np.log(3.0))
    got = hw.dice_loss(torch.tensor([[l3, -l3], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]), eps=1.0)
    assert got.item() == pytest.approx(0.3, abs=1e-6)


def test_dice_loss_of_hard_predictions_is_one_minus_sklearn_f1(hw):
    rng = np.random.default_rng(0)
    t, q = rng.random((2, 1, 9, 11)) < 0.3, rng.random((2, 1, 9, 11)) < 0.5
    hard = hw.dice_loss(torch.tensor(np.where(q, 40.0, -40.0)).float(), torch.tensor(t).float(), eps=1e-9).item()
    assert hard == pytest.approx(1 - f1_score(t.ravel(), q.ravel()), abs=1e-5)


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
    assert "✓ Exercise 4.2" in capsys.readouterr().out

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

    for wrong, hint in [(union_without_minus, "− intersection"), (axes_swapped, "row sum|last line of the error"),
                        (intersection_only, "union")]:
        with pytest.raises(AssertionError, match=f"(?s)Exercise 4.2.*Hint:.*({hint})"):
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




def test_tune_instances_picks_the_best_setting_by_brute_force(hw):
    """On two touching nuclei the interior seeds win over components; the table holds every grid point."""
    shape = (40, 60)
    mask = np.zeros(shape, np.int32)
    mask[disk(shape, 20, 20, 9)] = 1
    mask[disk(shape, 20, 36, 9) & (mask == 0)] = 2
    prob = np.stack(hw.seg_targets(mask, boundary_px=2))
    cfg = dict(ws_h_grid=[1.0, 50.0], seed_grid=[0.5, 0.9], min_size_grid=[0, 10])
    best, table = hw.tune_instances([prob], [mask], cfg)
    assert len(table) == (1 + 2 + 2) * 2
    for (m, h, s), ap in table.items():
        assert ap == pytest.approx(hw.mean_ap([hw.to_instances(prob, m, h, s)], [mask]))
    assert table[(best["method"], best["h"], best["min_size"])] == max(table.values()) == 1.0
    assert table[("components", 0.0, 0)] < 1.0  # one merged blob for two nuclei: a miss at least
    assert list(hw.ap_per_image([prob, prob], [mask, mask], best)) == [1.0, 1.0]


def test_edge_sharpness_per_image(hw):
    counts = np.array([[6.0, 3.0, 1.0, 10.0], [0.0, 0.0, 0.0, 10.0]])
    assert list(hw.edge_sharpness(counts)) == [2.0, 0.0]


# ---------------------------------------------------------------- denoising: PSNR, SSIM, filters


def test_psnr_matches_skimage(hw):
    rng = np.random.default_rng(0)
    clean = rng.random((32, 48)).astype(np.float32)
    noisy = hw.add_noise(clean, 0.1, seed=5)
    assert hw.psnr(clean, noisy) == pytest.approx(peak_signal_noise_ratio(clean, noisy, data_range=1.0), rel=1e-6)
    assert hw.psnr(clean, noisy) == pytest.approx(20.0, abs=0.5)
    assert hw.psnr(clean, clean + 0.1) == pytest.approx(20.0)  # an error of 0.1 everywhere: 20 dB by hand
    u8 = (clean * 255).astype(np.uint8)
    assert hw.psnr(u8, u8[::-1], 255.0) == pytest.approx(peak_signal_noise_ratio(u8, u8[::-1], data_range=255))
    assert np.array_equal(noisy, hw.add_noise(clean, 0.1, seed=5))


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
    expected = np.clip((good_image().astype(np.float32) - np.percentile(good_image(), 1))
                       / (np.percentile(good_image(), 99.8) - np.percentile(good_image(), 1)), 0, 1)
    np.testing.assert_allclose(data[0]["image"], expected, atol=1e-6)


@pytest.mark.parametrize("case, message", [
    ("orphan mask", "Unpaired.*masks without image.*orphan.tif"),
    ("orphan image", "Unpaired.*images without mask.*lonely.tif"),
    ("size mismatch", "masks/a.tif: a mask must be a 2-D label image of the image's size"),
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
    monkeypatch.setattr(hw, "read_tiff", lambda p, header_only=False: (
        real_read(p, header_only) if header_only else decoded.append(p.name) or real_read(p)))
    data = hw.load_split(tmp_path, "train", n=8, seed=1)
    names = [r["name"] for r in data]
    assert len(names) == 8 and names != [f"{i:03d}.tif" for i in range(8)]
    assert sum(r["image"].shape == (40, 32) for r in data) == 2  # 25 % of the sample from the 25 % stratum
    assert sorted(set(decoded)) == sorted(names)  # only the sampled files are decoded
    assert names == [r["name"] for r in hw.load_split(tmp_path, "train", n=8, seed=1)]
    assert names != [r["name"] for r in hw.load_split(tmp_path, "train", n=8, seed=2)]
    assert len(hw.load_split(tmp_path, "train", n=None)) == 40


def _folders(tmp_path, data=None, offline=True):
    return dict(results=tmp_path / "results", data=data, cache=tmp_path / "cache", offline=offline)


def _find(hw, folders, kaggle_root):
    return hw.find_data(hw.DATA_NAME, hw.locate_dsb, folders, hw.DSB2018_FIXES, hw.download_dsb2018,
                        kaggle_root=str(kaggle_root))


def test_find_data_order_and_the_offline_error(hw, tmp_path):
    expected = "(?s)DLCV_DATA_DIR/dsb2018 \\(not set\\).*DLCV_OFFLINE=1.*1. allow"
    with pytest.raises(hw.DataNotFoundError, match=expected) as err:
        _find(hw, _folders(tmp_path), tmp_path / "no-kaggle")
    text = str(err.value)
    assert "dsb2018.zip" in text and "torchvision" not in text and "kagglehub" not in text
    assert "\n  3. " in text and "\n  4. " not in text  # its own three fixes, nobody else's
    kaggle = tmp_path / "kaggle" / "some-user" / "nuclei-v2"  # a Kaggle input holding dsb2018/ two levels down
    root = synth_dsb2018.write(kaggle, {"train": 1, "test": 1})
    assert _find(hw, _folders(tmp_path), tmp_path / "kaggle")[:2] == (root, f"Kaggle input ({root})")
    data_dir = tmp_path / "data"
    synth_dsb2018.write(data_dir, {"train": 1, "test": 1})
    found, origin, source = _find(hw, _folders(tmp_path, data=str(data_dir)), tmp_path / "kaggle")
    assert found == data_dir / "dsb2018" and origin.startswith("DLCV_DATA_DIR") and source == "real"
    assert len(hw.load_split(found, "train")) == 1


# --- the StarDist zip, served from 127.0.0.1 ------------------------------------------------------------------
def _dsb_zip(tmp_path, layout=True) -> bytes:
    """A tiny dsb2018.zip in the StarDist layout (dsb2018/{train,test}/{images,masks}/*.tif), compressed."""
    src = synth_dsb2018.write(tmp_path / "src", {"train": 1, "test": 1})
    path = tmp_path / "made.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(src.rglob("*.tif")):
            arc = p.relative_to(src.parent).as_posix()
            zf.write(p, arc if layout else arc.replace("/images/", "/pictures/"))
    return path.read_bytes()


def _nothing_trusted(hw, cache):
    """No dataset folder, no archive, no partial files: nothing a rerun would use."""
    left = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
    assert left == [], left
    assert hw.locate_dsb(cache / "dsb2018") is None


def test_download_complete_archive_is_used_once(hw, loopback, tmp_path, monkeypatch):
    loopback.routes["/dsb2018.zip"] = (_dsb_zip(tmp_path), None)
    monkeypatch.setattr(hw, "DSB_URL", "unused")
    download = lambda folder: hw.download_dsb2018(folder, f"{loopback.url}/dsb2018.zip")  # noqa: E731
    folders = _folders(tmp_path, offline=False)
    find = lambda: hw.find_data("dsb2018", hw.locate_dsb, folders, [], download, str(tmp_path / "no"))  # noqa: E731
    root, origin, source = find()
    cache = tmp_path / "cache"
    assert source == "real" and root == cache / "dsb2018" and origin.startswith("download")
    assert len(hw.load_split(root, "train")) == 1 and len(hw.load_split(root, "test")) == 1
    assert sorted(p.name for p in cache.iterdir()) == ["dsb2018"]  # unpacked; no zip, no temporary folder
    loopback.routes.clear()  # a rerun must not need the server
    assert find()[:2] == (root, f"download cache ({root})")
    assert loopback.hits == ["/dsb2018.zip"]


def _corrupt_member(data: bytes) -> bytes:
    """Flip bytes inside the first member's data: a complete zip whose CRC (or inflate) check fails."""
    start = 30 + int.from_bytes(data[26:28], "little") + int.from_bytes(data[28:30], "little")
    body = bytearray(data)
    for i in range(start + 20, start + 40):
        body[i] ^= 0xFF
    return bytes(body)


@pytest.mark.parametrize("case", ["truncated", "corrupt", "garbage", "wrong layout"])
def test_download_broken_archive_is_refused_and_leaves_nothing(hw, loopback, tmp_path, case):
    good = _dsb_zip(tmp_path)
    loopback.routes["/dsb2018.zip"] = {
        "truncated": (good[: len(good) // 2], len(good)),    # the connection drops half-way
        "corrupt": (_corrupt_member(good), None),            # complete, but a member fails its check
        "garbage": (b"PK\x03\x04 not a zip at all" * 50, None),
        "wrong layout": (_dsb_zip(tmp_path / "other", layout=False), None),
    }[case]
    cache = tmp_path / "cache"
    with pytest.raises(Exception, match="dsb2018") as err:
        hw.download_dsb2018(cache / "dsb2018", f"{loopback.url}/dsb2018.zip")
    if case != "truncated":  # a short body may already fail in the HTTP client; the rest must name the zip
        assert isinstance(err.value, hw.DataLayoutError) and "dsb2018.zip" in str(err.value)
    _nothing_trusted(hw, cache)
    loopback.routes["/dsb2018.zip"] = (good, None)  # the next run, with a good server, gets the real thing
    assert hw.locate_dsb(hw.download_dsb2018(cache / "dsb2018", f"{loopback.url}/dsb2018.zip"))


def test_download_404_gives_the_offline_error_with_its_fixes(hw, loopback, tmp_path):
    download = lambda folder: hw.download_dsb2018(folder, f"{loopback.url}/missing.zip")  # noqa: E731
    with pytest.raises(hw.DataNotFoundError, match=r"(?s)a download \(.*404.*Fixes:.*1\. allow the download"):
        hw.find_data("dsb2018", hw.locate_dsb, _folders(tmp_path, offline=False), hw.DSB2018_FIXES, download,
                     str(tmp_path / "no"))
    _nothing_trusted(hw, tmp_path / "cache")


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
    fp32 = precision(hw, monkeypatch, "fp32")

    def run():
        hw.seed_everything(0)
        pool = hw.CropPool(imgs, 16, CPU)
        net = hw.UNet(depth=2, width=4)
        return hw.train_steps(net, hw.seg_sampler(pool, 4, 0), hw.seg_loss, 7, 1e-3, fp32), net

    first, _ = run()
    clock = iter(range(0, 10 ** 6, 3600))
    monkeypatch.setattr(hw.time, "perf_counter", lambda: float(next(clock)))
    second, net = run()
    assert len(first["loss"]) == len(second["loss"]) == 7 and second["steps"] == 7 and second["skipped"] == 0
    assert np.array_equal(first["loss"], second["loss"])
    assert not net.training


def test_fp16_overflow_skips_the_step_and_holds_the_schedule(hw, monkeypatch):
    """The T4 path (fp16 autocast + gradient scaler), run on the CPU: a step whose loss overflows is skipped by
    the scaler, leaves the weights as they were, and does not advance the learning-rate schedule."""
    fp16 = precision(hw, monkeypatch, "fp16")
    assert fp16["name"] == "fp16" and fp16["amp_dtype"] == torch.float16
    schedulers = []

    class Recorded(torch.optim.lr_scheduler.LambdaLR):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            schedulers.append(self)

    monkeypatch.setattr(torch.optim.lr_scheduler, "LambdaLR", Recorded)
    rng = np.random.default_rng(0)
    pool = hw.CropPool([[rng.random((40, 40)).astype(np.float32)]], 16, CPU)
    sample = hw.denoise_sampler(pool, 2, 0.1, 0)
    overflow_at = {0}
    calls = iter(range(100))

    def loss_fn(out, target):  # the notebook's loss, times infinity on the chosen steps
        loss = hw.mse_loss(out, target)
        return loss * float("inf") if next(calls) in overflow_at else loss

    hw.seed_everything(0)
    net = hw.build_denoiser(dict(den_depth=2, den_width=4, den_unshuffle=2), 1.2)
    before = [p.detach().clone() for p in net.parameters()]
    hist = hw.train_steps(net, sample, loss_fn, 1, 1e-2, fp16)
    assert hist["skipped"] == 1 and schedulers[-1].last_epoch == 0
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    calls, overflow_at = iter(range(100)), {1}
    hist = hw.train_steps(net, sample, loss_fn, 3, 1e-2, fp16)  # steps 0 and 2 count, step 1 does not
    assert hist["skipped"] == 1 and schedulers[-1].last_epoch == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert torch.isfinite(hist["loss"][[0, 2]]).all()


def _cpu_profile_run(hw, prec):
    """A short run with the cpu config's settings on tiny data: train, predict, score (IoU, AP, PSNR)."""
    cfg = hw.CONFIGS["cpu"]
    rng = np.random.default_rng(0)
    _, mask = synth_dsb2018.synthetic_nuclei((cfg["crop"] + 8, cfg["crop"] + 4), 12, rng)
    image = hw.percentile_normalise(mask.astype(np.float32) + rng.random(mask.shape).astype(np.float32))
    hw.seed_everything(cfg["seed"])
    pool = hw.CropPool([[image, *hw.seg_targets(mask, cfg["boundary_px"])]], cfg["crop"], CPU)
    net = hw.UNet(out_ch=2, depth=cfg["depth"], width=cfg["width"])
    hist = hw.train_steps(net, hw.seg_sampler(pool, 2, cfg["seed"]), hw.seg_loss, 3, cfg["lr"], prec)
    probs, counts = hw.evaluate_pixels(net, [dict(image=image, mask=mask)], CPU)
    ap = hw.mean_ap([hw.to_instances(probs[0], "interior")], [mask])
    hw.seed_everything(cfg["seed"])
    den_pool = hw.CropPool([[image]], cfg["den_crop"], CPU)
    den = hw.build_denoiser(cfg, 1.2)
    den_hist = hw.train_steps(den, hw.denoise_sampler(den_pool, 2, cfg["sigma"], cfg["seed"]), hw.mse_loss, 3,
                              cfg["den_lr"], prec)
    noisy = hw.add_noise(image, cfg["sigma"], 0)
    psnr = hw.psnr(image, hw.denoise_images(den, [noisy], CPU)[0])
    return hist["loss"].tolist(), den_hist["loss"].tolist(), hw.iou_dice_from_counts(counts.sum(0)), ap, psnr


@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_same_seed_same_numbers(hw, monkeypatch, name):
    prec = precision(hw, monkeypatch, name)
    first, second = _cpu_profile_run(hw, prec), _cpu_profile_run(hw, prec)
    assert first == second
    assert all(np.isfinite(v) for v in first[0] + first[1])


def test_predictions_are_fp32_even_under_an_outer_autocast(hw):
    """Reported metrics come from fp32 forward passes: predict_image runs the model without autocast."""
    net = hw.UNet(out_ch=2, depth=2, width=4).eval()
    image = np.random.default_rng(0).random((20, 28)).astype(np.float32)
    with torch.no_grad():
        reference = torch.sigmoid(net(torch.from_numpy(image)[None, None]))[0].numpy()
    np.testing.assert_allclose(hw.predict_image(net, image, CPU), reference, atol=1e-6)


@pytest.mark.parametrize("profile", ["cpu", "full"])
@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_profile_models_take_one_step(hw, monkeypatch, profile, name):
    cfg, prec = hw.CONFIGS[profile], precision(hw, monkeypatch, name)
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
        hist = hw.train_steps(net, sample, loss_fn, 1, 1e-3, prec)
        assert hist["steps"] == 1 and hist["skipped"] == 0 and torch.isfinite(hist["loss"][0])
        assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
        out = hw.predict_image(net, image[:37, :50], CPU, sigmoid=task in ("seg", "noskip"))
        assert out.shape == ((2 if task in ("seg", "noskip") else 1), 37, 50) and out.dtype == np.float32


# ---------------------------------------------------------------- the experiment's check (exercise 4.4)


def test_check_sigma_experiment(hw, capsys):
    results = {0.05: (30.0, 31.0), 0.1: (33.0, 30.0), 0.2: (27.0, 26.0)}
    hw.check_sigma_experiment({0.05: "behind", 0.2: "behind"}, results)
    out = capsys.readouterr().out
    assert "✓ Exercise 4.4" in out and "held for σ = 0.05;" in out
    for wrong in [None, {}, {0.05: "behind"}, {0.05: "better", 0.2: "behind"}, {0.05: "", 0.2: ""}]:
        with pytest.raises(AssertionError, match="(?s)Exercise 4.4.*MY_PREDICTION"):
            hw.check_sigma_experiment(wrong, results)
