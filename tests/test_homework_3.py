"""Unit tests of homework_3's own definitions (loaded from its `lib` cells), against independent references.

No network, nothing read outside the repository and tmp_path: weights are built here from random init,
images are written here, and torch's hub directory and the Kaggle mount are redirected into tmp_path.
"""

from __future__ import annotations

import hashlib
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from nbload import load_lib
from PIL import Image
from sklearn.metrics import confusion_matrix, f1_score, recall_score, roc_auc_score


@pytest.fixture(scope="module")
def hw():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_lib("homework_3")


# --------------------------------------------------------------------------------------- weight mapping
def _radimagenet_format(state: dict, index: dict) -> dict:
    """Rename torchvision resnet50 keys to the RadImageNet checkpoint format `backbone.<i>.<rest>`."""
    inv = {v: k for k, v in index.items()}
    return {f"backbone.{inv[k.split('.')[0]]}.{k.split('.', 1)[1]}": v.clone()
            for k, v in state.items() if not k.startswith("fc.")}


@pytest.fixture(scope="module")
def resnet50_state():
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).state_dict()


def test_radimagenet_checkpoint_loads_back_exactly(hw, resnet50_state, tmp_path):
    ckpt = _radimagenet_format(resnet50_state, hw.RADIMAGENET_INDEX)
    assert "backbone.0.weight" in ckpt and "backbone.7.2.conv3.weight" in ckpt  # the published key format
    ckpt["head.weight"] = torch.zeros(165, 2048)  # a foreign head is ignored, not an error
    path = tmp_path / hw.RADIMAGENET_FILE
    torch.save(ckpt, path)
    mapped, digest = hw.radimagenet_state_dict(tmp_path, tmp_path / "cache", offline=True)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    model = hw.build_model("radimagenet", "resnet50", 3, state_dict=mapped)
    loaded = model.backbone.state_dict()
    backbone_keys = [k for k in resnet50_state if not k.startswith("fc.")]
    assert sorted(mapped) == sorted(backbone_keys)
    for k in backbone_keys:
        assert torch.equal(loaded[k], resnet50_state[k]), k
    assert loaded["fc.weight"].shape == (3, 2048)


def test_radimagenet_missing_tensor_is_refused(hw, resnet50_state):
    ckpt = _radimagenet_format(resnet50_state, hw.RADIMAGENET_INDEX)
    del ckpt["backbone.7.2.conv3.weight"]
    with pytest.raises(ValueError, match=r"lacks 1 tensors.*layer4\.2\.conv3\.weight"):
        hw.radimagenet_to_torchvision(ckpt, resnet50_state)


def test_radimagenet_without_batchnorm_counters_still_loads(hw, resnet50_state):
    ckpt = _radimagenet_format(resnet50_state, hw.RADIMAGENET_INDEX)
    ckpt = {k: v for k, v in ckpt.items() if not k.endswith("num_batches_tracked")}
    mapped = hw.radimagenet_to_torchvision(ckpt, resnet50_state)
    assert torch.equal(mapped["layer3.4.bn2.running_var"], resnet50_state["layer3.4.bn2.running_var"])
    assert "bn1.num_batches_tracked" in mapped


def test_radimagenet_misshapen_tensor_is_refused(hw, resnet50_state):
    ckpt = _radimagenet_format(resnet50_state, hw.RADIMAGENET_INDEX)
    ckpt["backbone.5.0.conv2.weight"] = torch.zeros(128, 128, 1, 1)
    with pytest.raises(ValueError, match=r"backbone\.5\.0\.conv2\.weight.*layer2\.0\.conv2\.weight.*shape"):
        hw.radimagenet_to_torchvision(ckpt, resnet50_state)


def test_radimagenet_unused_backbone_tensor_is_refused(hw, resnet50_state):
    ckpt = _radimagenet_format(resnet50_state, hw.RADIMAGENET_INDEX)
    ckpt["backbone.9.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"no place.*backbone\.9\.weight"):
        hw.radimagenet_to_torchvision(ckpt, resnet50_state)


def test_missing_weights_offline_and_failed_download(hw, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(hw.WeightsUnavailable, match="DLCV_OFFLINE"):
        hw.radimagenet_state_dict(tmp_path / "none", tmp_path / "cache", offline=True)
    with pytest.raises(hw.WeightsUnavailable, match="DLCV_OFFLINE"):
        hw.imagenet_state_dict("resnet18", None, tmp_path / "cache", offline=True)

    def no_network(url, dst, progress=True):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(hw.WeightsUnavailable, match="no network in tests"):
        hw.radimagenet_state_dict(None, tmp_path / "cache", offline=False)


def test_imagenet_weights_found_in_weights_dir(hw, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None).state_dict()
    url = hw.imagenet_weights_enum("resnet18").url
    torch.save(ref, tmp_path / url.rsplit("/", 1)[1])
    state = hw.imagenet_state_dict("resnet18", tmp_path, tmp_path / "cache", offline=True)
    model = hw.build_model("imagenet", "resnet18", 3, state_dict=state)
    assert torch.equal(model.backbone.layer3[1].conv2.weight, ref["layer3.1.conv2.weight"])
    assert torch.allclose(model.mean.flatten(), torch.tensor(hw.IMAGENET_MEAN))


# --------------------------------------------------------------------------------------------- metrics
def test_metrics_match_sklearn(hw):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    logits = rng.normal(size=(200, 3)) + 1.5 * np.eye(3)[y]
    probs = np.round(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 2)  # rounding makes ties
    pred = probs.argmax(1)
    m = hw.classification_metrics(y, probs, 3, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx((pred == y).mean())
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert list(m["per_class_recall"].values()) == pytest.approx(list(recall_score(y, pred, average=None)))
    assert np.array_equal(m["confusion"], confusion_matrix(y, pred))
    for c, name in enumerate("abc"):
        assert m["roc_auc"][name] == pytest.approx(roc_auc_score(y == c, probs[:, c]))
    probs = probs / probs.sum(1, keepdims=True)
    m = hw.classification_metrics(y, probs, 3, ["a", "b", "c"])
    assert m["roc_auc_macro"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def test_metrics_class_never_predicted(hw):
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[[0, 0, 1, 1, 1, 0]] * 0.8 + 0.1
    m = hw.classification_metrics(y, probs, 3, ["a", "b", "c"])
    pred = probs.argmax(1)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert m["per_class_recall"]["c"] == 0.0
    assert m["accuracy"] == pytest.approx(4 / 6)


def test_binary_auc_hand_worked(hw):
    # positives 0.8, 0.4; negatives 0.4, 0.1: pairs (0.8>0.4, 0.8>0.1, 0.4=0.4 → ½, 0.4>0.1) → 3.5 / 4
    assert hw.binary_auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(0.875)
    assert np.isnan(hw.binary_auc([1, 1], [0.2, 0.3]))


# ------------------------------------------------------------------------------------------------ data
def _write_layout(root, classes, n=2, size=(40, 30)):
    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full(size[::-1], 40 * i + 20, np.uint8)).save(d / f"{c}_{i}.png")


def test_unknown_class_folder(hw, tmp_path):
    _write_layout(tmp_path, [*hw.CLASSES, "TUBERCULOSIS"])
    with pytest.raises(hw.DataLayoutError, match="TUBERCULOSIS"):
        hw.list_split(tmp_path, "train")


def test_missing_and_empty_class_folder(hw, tmp_path):
    _write_layout(tmp_path, ["COVID19", "PNEUMONIA"])
    with pytest.raises(hw.DataLayoutError, match=r"NORMAL is missing"):
        hw.list_split(tmp_path, "train")
    (tmp_path / "train" / "NORMAL").mkdir()
    (tmp_path / "train" / "NORMAL" / "notes.txt").write_text("not an image")
    with pytest.raises(hw.DataLayoutError, match=r"NORMAL holds no"):
        hw.list_split(tmp_path, "train")
    with pytest.raises(hw.DataLayoutError, match="val"):
        hw.list_split(tmp_path, "val")


def test_unreadable_image_is_named(hw, tmp_path):
    _write_layout(tmp_path, hw.CLASSES)
    bad = tmp_path / "train" / "NORMAL" / "broken.jpeg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    files, labels = hw.list_split(tmp_path, "train")
    assert bad in files and labels.tolist() == [0, 0, 1, 1, 1, 2, 2]
    with pytest.raises(hw.ImageReadError, match="broken.jpeg"):
        hw.load_images(files, 16, workers=2)


def test_decode_normalises_modes_and_sizes(hw, tmp_path):
    rgb = np.zeros((30, 50, 3), np.uint8)
    rgb[..., 0] = 255  # pure red → luminance 76 (ITU-R 601-2: 0.299 * 255)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.full((60, 20), 1000, np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(np.full((64, 64), 200, np.uint8)).convert("RGB").save(tmp_path / "gray.jpg", quality=95)
    arr, meta = hw.decode_image(tmp_path / "rgb.png", 16)
    assert arr.shape == (16, 16) and arr.dtype == np.uint8 and meta == (50, 30, 1)
    assert abs(int(arr[8, 8]) - 76) <= 1
    arr, meta = hw.decode_image(tmp_path / "deep.png", 16)
    assert arr.shape == (16, 16) and meta[:2] == (20, 60)
    arr, _ = hw.decode_image(tmp_path / "gray.jpg", 16)
    assert abs(int(arr.mean()) - 200) <= 2


def test_synthetic_stand_in_has_real_layout(hw, tmp_path):
    root = hw.make_synthetic_xrays(tmp_path / "syn", per_class=(4, 2), seed=0)
    assert hw.has_layout(root)
    files, labels = hw.list_split(root, "train")
    assert np.bincount(labels).tolist() == [4, 4, 4]
    assert {f.suffix for f in files} == {".png", ".jpeg"}
    images, meta = hw.load_images(files, 32)
    assert images.shape == (12, 32, 32) and meta[:, 2].max() == 1  # some were stored as RGB


def test_find_data_order_and_error(hw, tmp_path, monkeypatch):
    monkeypatch.delenv("DLCV_DATA_DIR", raising=False)
    kaggle = tmp_path / "kaggle"
    with pytest.raises(hw.DataNotFoundError, match=r"(?s)DLCV_DATA_DIR: not set.*Kaggle.*DLCV_OFFLINE.*"
                                                    r"internet.*credentials"):
        hw.find_data(hw.DATA_NAME, "cpu", tmp_path / "cache", offline=True, kaggle_root=kaggle)
    root, origin, source = hw.find_data(hw.DATA_NAME, "smoke", tmp_path / "cache", offline=True,
                                        synthetic_dir=tmp_path / "syn", per_class=(2, 1), kaggle_root=kaggle)
    assert source == "synthetic" and hw.has_layout(root)
    _write_layout(kaggle / "somebody" / "Data", hw.CLASSES, n=1)
    root, origin, source = hw.find_data(hw.DATA_NAME, "cpu", tmp_path / "c", offline=True, kaggle_root=kaggle)
    assert source == "real" and root == kaggle / "somebody" / "Data"
    _write_layout(tmp_path / "local" / hw.DATA_NAME, hw.CLASSES, n=1)
    monkeypatch.setenv("DLCV_DATA_DIR", str(tmp_path / "local"))
    root, origin, source = hw.find_data(hw.DATA_NAME, "cpu", tmp_path / "c", offline=True, kaggle_root=kaggle)
    assert root == tmp_path / "local" / hw.DATA_NAME and "DLCV_DATA_DIR" in origin


def test_image_cache_round_trip(hw, tmp_path, monkeypatch):
    _write_layout(tmp_path / "d", hw.CLASSES)
    files, _ = hw.list_split(tmp_path / "d", "train")
    a, ma = hw.load_images_cached(files, 12, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    monkeypatch.setattr(hw, "load_images", lambda *a, **k: pytest.fail("cache was not used"))
    b, mb = hw.load_images_cached(files, 12, tmp_path / "cache")
    assert np.array_equal(a, b) and np.array_equal(ma, mb)


def test_stratified_subset_and_split(hw):
    labels = np.repeat([0, 1, 2], [50, 20, 80])
    sub = hw.stratified_subset(labels, 20, seed=3)
    assert np.bincount(labels[sub]).tolist() == [20, 20, 20]
    assert np.array_equal(sub, hw.stratified_subset(labels, 20, seed=3))
    assert not np.array_equal(sub[:20], np.arange(20))  # a random sample, not the first files
    assert not np.array_equal(sub, hw.stratified_subset(labels, 20, seed=4))
    assert len(hw.stratified_subset(labels, None, seed=0)) == 150
    tr, va = hw.stratified_split(labels, 0.2, seed=0)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 150
    assert np.bincount(labels[va]).tolist() == [10, 4, 16]


# ------------------------------------------------------------------------------------ training pieces
def test_class_weights_hand_worked(hw):
    w = hw.class_weights(np.array([0, 0, 0, 1, 2, 2]), 3)
    assert w.tolist() == pytest.approx([6 / 9, 6 / 3, 6 / 6])


def test_lr_schedule(hw):
    assert hw.lr_factor(0.0, 0.1) < 0.02
    assert hw.lr_factor(0.1, 0.1) == pytest.approx(1.0)
    assert hw.lr_factor(0.55, 0.1) == pytest.approx(0.5)
    assert hw.lr_factor(1.0, 0.1) == pytest.approx(0.0, abs=1e-12)


def test_augment_identity_and_range(hw):
    x = torch.rand(4, 1, 24, 24)
    same = hw.augment(x, torch.Generator().manual_seed(0), 0.0, (1.0, 1.0), 0.0, 0.0)
    assert torch.allclose(same, x, atol=1e-5)
    a = hw.augment(x, torch.Generator().manual_seed(1), 10.0, (0.9, 1.1), 0.1, 0.2)
    b = hw.augment(x, torch.Generator().manual_seed(1), 10.0, (0.9, 1.1), 0.1, 0.2)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1 and not torch.allclose(a, x)


def test_strategies_freeze_what_they_say(hw):
    model = hw.build_model("imagenet", "resnet18", 3)
    groups = hw.param_groups(model, "linear_probe", 1e-2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"backbone.fc.weight", "backbone.fc.bias"} and len(groups) == 1
    model.train()
    assert not model.backbone.bn1.training and not model.backbone.layer4[1].bn2.training
    groups = hw.param_groups(model, "discriminative", 1e-2, decay=0.5)
    assert [g["lr"] for g in groups] == pytest.approx([1e-2, 5e-3, 2.5e-3, 1.25e-3])
    assert not model.backbone.layer1[0].conv1.weight.requires_grad
    assert model.backbone.layer2[0].conv1.weight.requires_grad
    hw.param_groups(model, "full_finetune", 1e-3)
    assert all(p.requires_grad for p in model.parameters()) and model.frozen == ()
    with pytest.raises(ValueError, match="unknown strategy"):
        hw.param_groups(model, "half", 1e-3)


def _tiny_run(hw, seed, strategy="scratch", kind="scratch", arch="resnet18", size=32, n=6, epochs=2,
              model=None):
    g = torch.Generator().manual_seed(123)
    x = (torch.rand(n, size, size, generator=g) * 255).to(torch.uint8)
    y = torch.arange(n) % 3
    torch.manual_seed(seed)
    model = model or hw.build_model(kind, arch, 3)
    cfg = hw.CONFIGS["smoke"]
    hist = hw.train_model(model, x, y, x[:3], y[:3], strategy=strategy, lr=1e-3, epochs=epochs,
                          seconds=float("inf"),
                          batch_size=min(n, 4), weight_decay=0.01, warmup=0.1, aug=cfg["aug"],
                          loss_weights=hw.class_weights(y.numpy(), 3), seed=seed)
    return model, hist


def test_training_is_deterministic_on_cpu(hw):
    m1, h1 = _tiny_run(hw, seed=5)
    m2, h2 = _tiny_run(hw, seed=5)
    assert h1["loss"] == h2["loss"] and h1["epochs_run"] == 2
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_linear_probe_leaves_backbone_untouched(hw):
    model = hw.build_model("radimagenet", "resnet50", 3)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    _tiny_run(hw, seed=0, strategy="linear_probe", model=model, size=32, n=4, epochs=1)
    after = model.backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}  # batch-norm running statistics included


@pytest.mark.parametrize("profile", ["cpu", "full"])
def test_profile_models_take_a_training_step(hw, profile):
    """The cpu and full profiles' three models, at their resolution, take one step on two images."""
    cfg = hw.CONFIGS[profile]
    assert set(cfg["strategies"]) <= {"linear_probe", "full_finetune", "discriminative"}
    assert set(cfg["lr"]) >= set(cfg["strategies"])
    size = cfg["img_size"]
    runs = [("scratch", cfg["scratch_arch"], "scratch"),
            ("imagenet", cfg["imagenet_arch"], cfg["strategies"][-1]),
            ("radimagenet", "resnet50", cfg["strategies"][0])]
    for kind, arch, strategy in runs:
        model, hist = _tiny_run(hw, seed=0, strategy=strategy, kind=kind, arch=arch, size=size, n=2, epochs=1)
        assert hist["epochs_run"] == 1 and np.isfinite(hist["loss"][0]), (kind, arch)


# ---------------------------------------------------------------------------------------------- Grad-CAM
def test_gradcam_shape_range_and_reference(hw):
    torch.manual_seed(0)
    model = hw.build_model("scratch", "resnet18", 3)
    model.eval()
    x = torch.rand(3, 1, 64, 64)
    cam = hw.GradCAM(model, model.backbone.layer4)
    maps, logits = cam(x, target=[0, 1, 2])
    cam.remove()
    assert maps.shape == (3, 64, 64) and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    assert not model.backbone.layer4._forward_hooks  # the hook is gone
    # independent computation with torch.autograd.grad on the truncated network
    bb = model.backbone
    feats = bb.layer4(bb.layer3(bb.layer2(bb.layer1(bb.maxpool(bb.relu(bb.bn1(bb.conv1(
        (x - model.mean) / model.std)))))))).detach().requires_grad_(True)
    scores = bb.fc(torch.flatten(bb.avgpool(feats), 1))
    grads = torch.autograd.grad(scores[[0, 1, 2], [0, 1, 2]].sum(), feats)[0]
    ref = torch.relu((grads.mean((2, 3), keepdim=True) * feats).sum(1, keepdim=True))
    ref = torch.nn.functional.interpolate(ref, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    ref = ref / ref.flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1)
    assert torch.allclose(maps, ref, atol=1e-5)
    assert torch.allclose(logits, scores.detach(), atol=1e-5)


def test_gradcam_works_on_a_frozen_backbone(hw):
    model = hw.build_model("imagenet", "resnet18", 3)
    hw.param_groups(model, "linear_probe", 1e-3)
    cam = hw.GradCAM(model, model.backbone.layer4)
    maps, _ = cam(torch.rand(2, 1, 64, 64))
    cam.remove()
    assert maps.shape == (2, 64, 64) and torch.isfinite(maps).all() and maps.min() >= 0
