"""Unit tests of homework_4's own definitions (U-Net, metrics, instances, data path)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from nbload import load_lib
from skimage.metrics import peak_signal_noise_ratio
from sklearn.metrics import f1_score, jaccard_score


@pytest.fixture(scope="module")
def hw():
    return load_lib("homework_4")


def disk(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


# ---------------------------------------------------------------- U-Net


@pytest.mark.parametrize("hw_size", [(64, 64), (37, 53), (100, 7), (17, 129), (1, 1), (250, 333)])
@pytest.mark.parametrize("skips", [True, False])
def test_unet_output_size_equals_input_size(hw, hw_size, skips):
    net = hw.UNet(depth=4, width=4, skips=skips).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, *hw_size))
    assert out.shape == (2, 1, *hw_size)


@pytest.mark.parametrize("hw_size", [(64, 64), (37, 53), (5, 3), (130, 67)])
def test_unshuffled_unet_output_size(hw, hw_size):
    net = hw.UNet(depth=3, width=4, unshuffle=2, residual=True).eval()
    with torch.no_grad():
        torch.nn.init.normal_(net.head.weight)
        out = net(torch.rand(1, 1, *hw_size))
    assert out.shape == (1, 1, *hw_size)


def test_unet_residual_starts_near_identity_and_needs_matching_channels(hw):
    net = hw.UNet(depth=2, width=4, residual=True).eval()
    with torch.no_grad():
        torch.nn.init.zeros_(net.head.weight)
        torch.nn.init.zeros_(net.head.bias)
        x = torch.rand(1, 1, 30, 41)
        assert torch.equal(net(x), x)
    with pytest.raises(ValueError):
        hw.UNet(in_ch=1, out_ch=2, residual=True)


def test_noskip_decoder_has_fewer_inputs(hw):
    assert hw.n_params(hw.UNet(depth=3, width=8, skips=False)) < hw.n_params(hw.UNet(depth=3, width=8))


def test_skips_change_the_output(hw):
    torch.manual_seed(0)
    a = hw.UNet(depth=2, width=4).eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        y = a(x)
        a.skips = False  # same weights, skip branch removed: shapes must break (channel count differs)
        with pytest.raises(RuntimeError):
            a(x)
    assert y.shape == x.shape


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


# ---------------------------------------------------------------- instance metrics


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


def test_touching_blobs_merge_in_components_split_by_watershed(hw):
    shape = (40, 60)
    touching = disk(shape, 20, 20, 9) | disk(shape, 20, 36, 9)   # overlap: one connected blob
    separate = disk(shape, 10, 10, 6) | disk(shape, 28, 45, 8)
    assert hw.label_components(touching).max() == 1
    ws = hw.label_watershed(touching, h=2.0)
    assert len(np.unique(ws[ws > 0])) == 2
    assert hw.label_components(separate).max() == 2
    ws_sep = hw.label_watershed(separate, h=2.0)
    assert len(np.unique(ws_sep[ws_sep > 0])) == 2
    # every foreground pixel keeps a label, background stays 0
    assert np.array_equal(ws > 0, touching)


def test_watershed_keeps_tiny_blobs(hw):
    b = np.zeros((10, 10), bool)
    b[2, 2] = True
    b[7:9, 7:9] = True
    lab = hw.label_watershed(b, h=3.0)
    assert len(np.unique(lab[lab > 0])) == 2


# ---------------------------------------------------------------- denoising metrics


def test_psnr_matches_skimage(hw):
    rng = np.random.default_rng(0)
    clean = rng.random((32, 48)).astype(np.float32)
    noisy = hw.add_noise(clean, 0.1, seed=5)
    reference = peak_signal_noise_ratio(clean, noisy, data_range=1.0)
    assert hw.psnr(clean, noisy) == pytest.approx(reference, rel=1e-6)
    assert hw.psnr(clean, noisy) == pytest.approx(20.0, abs=0.5)
    assert np.array_equal(noisy, hw.add_noise(clean, 0.1, seed=5))


def test_classical_denoisers_improve_psnr(hw):
    from scipy import ndimage

    clean = ndimage.gaussian_filter(disk((64, 64), 32, 32, 16).astype(np.float32) * 0.8, 1.0)
    noisy = hw.add_noise(clean, 0.1, seed=3)
    for est in (hw.gaussian_denoise(noisy, 1.0), hw.nlm_denoise(noisy, 0.8 * 0.1, 0.1)):
        assert est.min() >= 0.0 and est.max() <= 1.0
        assert hw.psnr(clean, est) > hw.psnr(clean, noisy) + 8


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


def test_mask_without_image(hw, tmp_path):
    write_pair(tmp_path, "train", "a.tif", good_image(), np.zeros((32, 40), np.uint16))
    write_pair(tmp_path, "train", "orphan.tif", None, np.zeros((32, 40), np.uint16))
    with pytest.raises(ValueError, match="Mask.*without image.*orphan.tif"):
        hw.load_split(tmp_path, "train")


def test_image_without_mask(hw, tmp_path):
    write_pair(tmp_path, "train", "a.tif", good_image(), np.zeros((32, 40), np.uint16))
    write_pair(tmp_path, "train", "lonely.tif", good_image(), None)
    with pytest.raises(ValueError, match="without mask.*lonely.tif"):
        hw.load_split(tmp_path, "train")


def test_mismatched_sizes(hw, tmp_path):
    write_pair(tmp_path, "train", "a.tif", good_image((32, 40)), np.zeros((32, 41), np.uint16))
    with pytest.raises(ValueError, match="Size mismatch for a.tif"):
        hw.load_split(tmp_path, "train")


def test_unreadable_tiff_is_named(hw, tmp_path):
    write_pair(tmp_path, "train", "a.tif", good_image(), np.zeros((32, 40), np.uint16))
    (tmp_path / "train" / "images" / "broken.tif").write_bytes(b"this is not a tiff")
    write_pair(tmp_path, "train", "broken.tif", None, np.zeros((32, 40), np.uint16))
    with pytest.raises(ValueError, match="broken.tif"):
        hw.load_split(tmp_path, "train")


def test_missing_or_empty_folders(hw, tmp_path):
    (tmp_path / "train" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="masks"):
        hw.load_split(tmp_path, "train")
    (tmp_path / "train" / "masks").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tif"):
        hw.load_split(tmp_path, "train")


def test_stratified_subset_is_seeded_and_stratified(hw):
    names = [f"{i:03d}.tif" for i in range(40)]
    keys = [(256, 256)] * 30 + [(520, 696)] * 10
    a = hw.stratified_subset(names, keys, 8, seed=1)
    assert a == hw.stratified_subset(names, keys, 8, seed=1)
    assert a != hw.stratified_subset(names, keys, 8, seed=2)
    assert len(a) == 8 and a != names[:8]
    assert sum(int(n[:3]) >= 30 for n in a) == 2  # 25 % of the sample from the 25 % stratum
    assert hw.stratified_subset(names, keys, None, 0) == names


def test_find_data_order_and_errors(hw, tmp_path, monkeypatch):
    monkeypatch.delenv("DLCV_DATA_DIR", raising=False)
    with pytest.raises(hw.DataNotFoundError, match="DLCV_DATA_DIR"):
        hw.find_data("cpu", tmp_path / "cache", offline=True)
    root, origin, source = hw.find_data("smoke", tmp_path / "cache", offline=True, seed=0, n_synthetic=(2, 1))
    assert source == "synthetic" and hw.is_dsb_root(root)
    data = hw.load_split(root, "train")
    assert len(data) == 2 and all(r["mask"].max() >= 5 for r in data)
    assert tifffile.imread(root / "train" / "masks" / data[0]["name"]).dtype == np.uint16
    monkeypatch.setenv("DLCV_DATA_DIR", str(root.parent))
    assert hw.find_data("cpu", tmp_path / "cache", offline=True) == (root, f"DLCV_DATA_DIR ({root})", "real")


def test_failed_download_is_caught(hw, tmp_path, monkeypatch):
    monkeypatch.delenv("DLCV_DATA_DIR", raising=False)

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(hw.torch.hub, "download_url_to_file", no_network)
    with pytest.raises(hw.DataNotFoundError, match="network is unreachable"):
        hw.find_data("cpu", tmp_path / "cache", offline=False)
    assert not (tmp_path / "cache" / "dsb2018").exists()


def test_download_unpacks_atomically_from_a_local_archive(hw, tmp_path, monkeypatch):
    import zipfile

    src = tmp_path / "src" / "dsb2018"
    hw.make_synthetic_dsb2018(src, 1, 1, seed=0)
    archive = tmp_path / "fake.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in src.rglob("*.tif"):
            zf.write(p, p.relative_to(src.parent))

    def fake_download(url, dst, progress=False):
        import shutil

        shutil.copy(archive, dst)

    monkeypatch.setattr(hw.torch.hub, "download_url_to_file", fake_download)
    root = hw.download_dsb2018(tmp_path / "cache")
    assert hw.is_dsb_root(root) and root == tmp_path / "cache" / "dsb2018"
    assert len(hw.load_split(root, "test")) == 1
    assert not list((tmp_path / "cache").glob(".dsb2018-*"))  # temp folder cleaned up


# ---------------------------------------------------------------- crops and training


def test_crop_pool_gathers_the_right_pixels(hw):
    a = np.arange(20 * 30, dtype=np.float32).reshape(20, 30)
    b = 10000 + np.arange(16 * 12, dtype=np.float32).reshape(16, 12)
    pool = hw.CropPool([[a, a * 2], [b, b * 2]], crop=8, device=torch.device("cpu"))
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
    pool = hw.CropPool([[np.ones((5, 7), np.float32)]], crop=8, device=torch.device("cpu"))
    crops = pool.sample(3, torch.Generator().manual_seed(0))
    assert crops.shape == (3, 1, 8, 8) and crops.sum().item() == 3 * 35


def test_training_is_deterministic(hw):
    rng = np.random.default_rng(0)
    imgs = [[rng.random((40, 40)).astype(np.float32), (rng.random((40, 40)) > 0.5).astype(np.float32)]]

    def run():
        hw.seed_everything(0)
        pool = hw.CropPool(imgs, 16, torch.device("cpu"))
        g = torch.Generator().manual_seed(0)
        net = hw.UNet(depth=2, width=4)
        hist = hw.train_budgeted(net, lambda s: tuple(pool.sample(4, g).split(1, dim=1)), hw.bce_dice_loss,
                                 torch.device("cpu"), None, max_steps=3, lr=1e-3)
        return hist["loss"], hist["steps"]

    first, second = run(), run()
    assert first == second and first[1] == 3


@pytest.mark.parametrize("profile", ["cpu", "full"])
def test_profile_models_take_one_step(hw, profile):
    cfg = hw.CONFIGS[profile]
    dev = torch.device("cpu")
    rng = np.random.default_rng(0)
    size = max(cfg["crop"], cfg["den_crop"])
    image = rng.random((size + 3, size + 5)).astype(np.float32)
    target = (image > 0.5).astype(np.float32)
    for task in ("seg", "noskip", "den"):
        hw.seed_everything(0)
        if task == "den":
            pool = hw.CropPool([[image]], cfg["den_crop"], dev)
            net = hw.UNet(depth=cfg["den_depth"], width=cfg["den_width"], residual=True,
                          unshuffle=cfg["den_unshuffle"])
            sample = hw.denoise_sampler(pool, 2, cfg["sigma"], 0)
            loss_fn = hw.mse_loss
        else:
            pool = hw.CropPool([[image, target]], cfg["crop"], dev)
            net = hw.UNet(depth=cfg["depth"], width=cfg["width"], skips=task == "seg")
            g = torch.Generator().manual_seed(0)
            sample = lambda s, pool=pool, g=g: tuple(pool.sample(2, g).split(1, dim=1))
            loss_fn = hw.bce_dice_loss
        before = [p.detach().clone() for p in net.parameters()]
        hist = hw.train_budgeted(net, sample, loss_fn, dev, None, max_steps=1, lr=1e-3)
        assert hist["steps"] == 1 and np.isfinite(hist["loss"][0])
        assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
        out = hw.predict_image(net, image[:37, :50], dev, sigmoid=task != "den")
        assert out.shape == (37, 50)


def test_noise2noise_pairs_are_independent(hw):
    pool = hw.CropPool([[np.full((16, 16), 0.5, np.float32)]], 16, torch.device("cpu"))
    a, b = hw.noise2noise_sampler(pool, 4, 0.1, 0)(0)
    assert a.shape == b.shape == (4, 1, 16, 16)
    assert not torch.equal(a, b)
    assert abs(float((a - 0.5).std()) - 0.1) < 0.02


def test_losses(hw):
    target = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    perfect = (target * 2 - 1) * 50
    assert hw.dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    assert hw.bce_dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    assert hw.dice_loss(-perfect, target).item() > 0.6
