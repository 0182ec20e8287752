"""Unit tests of homework_3's own definitions (loaded from its `lib` cells), against independent references.

No network beyond a server on 127.0.0.1 (tests/conftest.py's `loopback`); nothing read outside the repository and
tmp_path: checkpoints are fabricated here from random init, images are written here, and torch's hub directory and
the Kaggle input root are redirected into tmp_path.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.metrics import balanced_accuracy_score, recall_score, roc_auc_score

from nbload import load_lib

SHARED_ARGS = dict(batch_size=4, weight_decay=0.05, warmup=0.1,
                   aug=dict(rotate_deg=7.0, scale=(0.9, 1.1), shift=0.06, jitter=0.1), lr_decay=0.3, evals=2)


@pytest.fixture(scope="module")
def hw():
    return load_lib("homework_3")


@pytest.fixture()
def hub(tmp_path):
    """torch's hub cache (where the notebook keeps weights) redirected into tmp_path for one test."""
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub" / "checkpoints"
    torch.hub.set_dir(before)


def _fp32(hw):
    return dict(name="fp32", amp_dtype=None, device_type="cpu", reason="test")


# ------------------------------------------------------------------------------ checkpoints: formats, key by key
def _torchvision_format(arch="resnet18", seed=0) -> dict:
    """A checkpoint under torchvision's own names (ResNet-18 stands in for ResNet-50: the same child names)."""
    torch.manual_seed(seed)
    return getattr(torchvision.models, arch)(weights=None).state_dict()


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module.", "_orig_mod."])
def test_each_checkpoint_format_maps_onto_torchvision_exactly(hw, wrap):
    ref = _torchvision_format()
    ckpt = {k: v.clone() for k, v in ref.items()}
    if wrap in ("module.", "_orig_mod."):
        ckpt = {wrap + k: v for k, v in ckpt.items()}
    elif wrap != "plain":
        ckpt = {wrap: ckpt}
    state = hw.backbone_state(ckpt, "resnet18", "test.pt")
    assert sorted(state) == sorted(k for k in ref if not k.startswith("fc."))
    assert all(torch.equal(state[k], ref[k]) for k in state)
    model = hw.build_model("imagenet", "resnet18", state_dict=state)
    assert torch.equal(model.backbone.layer3[1].conv2.weight, ref["layer3.1.conv2.weight"])


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("layer4.1.conv2.weight"), r"1 missing \['layer4\.1\.conv2\.weight'\]"),
    (lambda c: c.update({"layer2.0.conv2.weight": torch.zeros(128, 128, 1, 1)}),
     r"1 misshapen \['layer2\.0\.conv2\.weight'\]"),
    (lambda c: c.update({"relu.weight": torch.zeros(3)}), r"1 unexpected \['relu\.weight'\]"),
])
def test_a_checkpoint_that_does_not_fit_is_refused_by_name(hw, change, message):
    ckpt = _torchvision_format()
    change(ckpt)
    with pytest.raises(ValueError, match=message):
        hw.backbone_state(ckpt, "resnet18", "test.pt")


def test_batchnorm_counters_may_be_absent_and_a_non_state_dict_is_refused(hw):
    ref = _torchvision_format()
    state = hw.backbone_state({k: v for k, v in ref.items() if "num_batches" not in k}, "resnet18", "t.pt")
    assert "fc.weight" not in state and torch.equal(state["bn1.running_var"], ref["bn1.running_var"])
    assert state["layer1.0.bn1.num_batches_tracked"].item() == 0
    for junk in ([1, 2], {"a": 1}):
        with pytest.raises(ValueError, match="not a state_dict of tensors"):
            hw.backbone_state(junk, "resnet18", "t.pt")


def test_each_family_uses_its_authors_preprocessing(hw):
    pixels = torch.tensor([0.0, 127.5, 255.0])
    rad = hw.build_model("radimagenet", "resnet50")
    ours = ((pixels / 255).view(3, 1, 1, 1).expand(-1, 3, -1, -1) - rad.mean) / rad.std
    assert torch.allclose(ours[:, :, 0, 0], ((pixels - 127.5) * 2 / 255).view(3, 1).expand(3, 3))  # [-1, 1]
    img = hw.build_model("imagenet", "resnet50")
    tf = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.transforms()
    assert torch.allclose(img.mean.flatten(), torch.tensor(tf.mean)) and torch.allclose(img.std.flatten(),
                                                                                        torch.tensor(tf.std))
    scratch = hw.build_model("scratch", "resnet50", data_mean=0.4, data_std=0.2, channels=3)
    assert scratch.backbone.conv1.in_channels == 3 and torch.allclose(scratch.mean, torch.full((1, 3, 1, 1), 0.4))
    assert hw.build_model("scratch", "resnet18").backbone.conv1.in_channels == 1
    with pytest.raises(ValueError, match="unknown model kind"):
        hw.build_model("photos", "resnet18")


# ------------------------------------------------------------------ RadImageNet: the official Keras file
KERAS_STAGES = ((3, 64), (4, 128), (6, 256), (3, 512))  # keras.applications.ResNet50: blocks and widths


def _keras_layers(seed=0) -> dict:
    """{layer: {weight: array}} of a Keras ResNet50 with random weights, under Keras' own layer names."""
    rng, layers = np.random.default_rng(seed), {}

    def conv_bn(name, k, cin, cout):
        f32 = lambda a: a.astype(np.float32)  # noqa: E731
        layers[name + "_conv"] = dict(kernel=f32(rng.normal(0, (2 / (k * k * cin)) ** 0.5, (k, k, cin, cout))),
                                      bias=f32(rng.normal(0, 0.2, cout)))
        layers[name + "_bn"] = dict(gamma=f32(rng.uniform(0.3, 0.8, cout)), beta=f32(rng.normal(0, 0.1, cout)),
                                    moving_mean=f32(rng.normal(0, 0.2, cout)),
                                    moving_variance=f32(rng.uniform(0.5, 1.5, cout)))

    conv_bn("conv1", 7, 3, 64)
    cin = 64
    for s, (blocks, w) in enumerate(KERAS_STAGES, 2):
        for b in range(1, blocks + 1):
            name = f"conv{s}_block{b}"
            if b == 1:
                conv_bn(name + "_0", 1, cin, 4 * w)
            conv_bn(name + "_1", 1, cin if b == 1 else 4 * w, w)
            conv_bn(name + "_2", 3, w, w)
            conv_bn(name + "_3", 1, w, 4 * w)
        cin = 4 * w
    return layers


def _write_keras_h5(path, layers, full_model=True):
    """The layout Keras writes: (model_weights/)<layer>/<layer>/<weight>:0, the names listed in attrs."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if full_model else f
        root.attrs["layer_names"] = [n.encode() for n in ["input_1", *layers]]
        root.create_group("input_1").attrs["weight_names"] = []
        for name, weights in layers.items():
            g = root.create_group(name)
            g.attrs["weight_names"] = [f"{name}/{w}:0".encode() for w in weights]
            for w, a in weights.items():
                g.create_dataset(f"{name}/{w}:0", data=a)


def _keras_forward(layers, x):
    """Keras' ResNet50 (v1) computed from the arrays as Keras defines it: a convolution with a bias over HWIO
    kernels (as an explicit sum over unfolded patches), batch norm with epsilon 1.001e-5, the stride in the first
    1×1 convolution of a block, zero padding before the max pool; global average pooling at the end."""
    def conv_bn(x, name, stride=1, pad=0):
        k, bias = (torch.from_numpy(layers[name + "_conv"][w]) for w in ("kernel", "bias"))
        x = torch.nn.functional.pad(x, (pad,) * 4)
        cols = torch.nn.functional.unfold(x, k.shape[0], stride=stride)
        side = (x.shape[-1] - k.shape[0]) // stride + 1
        out = torch.einsum("hwio,bihwl->bol", k, cols.view(x.shape[0], k.shape[2], k.shape[0], k.shape[1], -1))
        out = (out + bias.view(1, -1, 1)).view(x.shape[0], -1, side, side)
        bn = {w: torch.from_numpy(a).view(1, -1, 1, 1) for w, a in layers[name + "_bn"].items()}
        return bn["gamma"] * (out - bn["moving_mean"]) / torch.sqrt(bn["moving_variance"] + 1.001e-5) + bn["beta"]

    x = torch.relu(conv_bn(x, "conv1", stride=2, pad=3))
    x = torch.nn.functional.max_pool2d(torch.nn.functional.pad(x, (1,) * 4), 3, 2)
    for s, (blocks, _) in enumerate(KERAS_STAGES, 2):
        for b in range(1, blocks + 1):
            name, stride = f"conv{s}_block{b}", 2 if b == 1 and s > 2 else 1
            short = conv_bn(x, name + "_0", stride) if b == 1 else x
            h = torch.relu(conv_bn(x, name + "_1", stride))
            h = torch.relu(conv_bn(h, name + "_2", pad=1))
            x = torch.relu(conv_bn(h, name + "_3") + short)
    return x.mean(dim=(2, 3))


@pytest.mark.parametrize("full_model", [True, False])
def test_the_keras_release_converts_to_the_same_function(hw, hub, full_model):
    layers = _keras_layers()
    hub.mkdir(parents=True)
    _write_keras_h5(hub / hw.RADIMAGENET_H5, layers, full_model)
    state, note = hw.pretrained_state("radimagenet", "resnet50", offline=True)
    assert hashlib.sha256((hub / hw.RADIMAGENET_H5).read_bytes()).hexdigest() in note
    model = hw.build_model("radimagenet", "resnet50", state_dict=state).backbone.eval()
    model.fc = torch.nn.Identity()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = _keras_forward(layers, x), model(x)
    assert torch.allclose(got, ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item())
    plain = torchvision.models.resnet50(weights=None)  # torchvision's strides, the same weights: another function
    plain.load_state_dict(state, strict=False)
    plain.fc = torch.nn.Identity()
    with torch.no_grad():
        assert not torch.allclose(plain.eval()(x), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_a_keras_file_that_is_broken_or_incomplete_is_unavailable_with_the_fix(hw, hub):
    with pytest.raises(hw.WeightsUnavailable, match=r"RadImageNet-ResNet50_notop\.h5 is not in .*official release"):
        hw.pretrained_state("radimagenet", "resnet50", offline=False)
    layers = _keras_layers()
    del layers["conv4_block2_3_bn"]
    hub.mkdir(parents=True)
    _write_keras_h5(hub / hw.RADIMAGENET_H5, layers)
    with pytest.raises(hw.WeightsUnavailable, match=r"no layer 'conv4_block2_3_bn'.*Fix"):
        hw.pretrained_state("radimagenet", "resnet50", offline=True)
    (hub / hw.RADIMAGENET_H5).write_bytes(b"not an HDF5 file" * 100)
    with pytest.raises(hw.WeightsUnavailable, match="Fix: the official file"):
        hw.pretrained_state("radimagenet", "resnet50", offline=True)
    with pytest.raises(hw.WeightsUnavailable, match="ResNet-50 only"):
        hw.pretrained_state("radimagenet", "resnet18", offline=True)


# ------------------------------------------------------------------ checkpoints: downloads from 127.0.0.1
def _bytes(obj, tmp_path) -> bytes:
    torch.save(obj, tmp_path / "made.pt")
    return (tmp_path / "made.pt").read_bytes()


def test_a_download_is_checked_used_and_then_served_from_the_cache(hw, hub, loopback, tmp_path):
    ref = _torchvision_format(seed=2)  # torchvision's format, as its ImageNet files hold it
    body = _bytes(ref, tmp_path)
    name = f"resnet18-{hashlib.sha256(body).hexdigest()[:8]}.pth"  # torchvision's naming: the hash prefix
    loopback.routes[f"/{name}"] = (body, None)
    state, note = hw.pretrained_state("imagenet", "resnet18", offline=False, url=f"{loopback.url}/{name}")
    assert torch.equal(state["layer2.0.conv1.weight"], ref["layer2.0.conv1.weight"])
    assert hashlib.sha256(body).hexdigest() in note and sorted(p.name for p in hub.iterdir()) == [name]
    loopback.routes.clear()  # the server forgets it: the cache must serve the second call, also offline
    state, _ = hw.pretrained_state("imagenet", "resnet18", offline=True, url=f"{loopback.url}/{name}")
    assert torch.equal(state["conv1.weight"], ref["conv1.weight"])


def test_truncated_corrupt_mismatched_or_pickled_files_are_not_trusted(hw, hub, loopback, tmp_path):
    tiny = {"conv1.weight": torch.zeros(2, 3)}
    body = _bytes(tiny, tmp_path)
    loopback.routes["/cut/resnet18-aaaa1111.pth"] = (body[: len(body) // 2], len(body))  # drops half-way
    loopback.routes["/junk/resnet18-bbbb2222.pth"] = (b"PK\x03\x04 not a checkpoint" * 50, None)  # garbage
    loopback.routes["/resnet18-0000abcd.pth"] = (body, None)  # its hash is not the one in its name
    loopback.routes["/pickled/resnet18.pth"] = (_bytes(torch.nn.Linear(2, 2), tmp_path), None)  # a model object
    cases = [("/cut/resnet18-aaaa1111.pth", "IncompleteRead|ContentTooShort|incomplete|Error"),
             ("/junk/resnet18-bbbb2222.pth", "invalid hash value|Error"),
             ("/resnet18-0000abcd.pth", "invalid hash value"),
             ("/pickled/resnet18.pth", "a pickled model object, not a state_dict: refused"),
             ("/gone/resnet18.pth", "404")]
    for path, why in cases:
        with pytest.raises(hw.WeightsUnavailable, match=why):
            hw.pretrained_state("imagenet", "resnet18", offline=False, url=f"{loopback.url}{path}")
        assert not hub.exists() or not list(hub.iterdir()), f"{path}: a file that failed was left in the cache"


def test_a_checkpoint_that_does_not_fit_is_unavailable_with_the_fix(hw, hub, loopback, tmp_path):
    loopback.routes["/resnet50.pth"] = (_bytes({"conv1.weight": torch.zeros(2, 3)}, tmp_path), None)
    with pytest.raises(hw.WeightsUnavailable, match=r"does not fit torchvision's resnet50.*Fix: delete"):
        hw.pretrained_state("imagenet", "resnet50", offline=False, url=f"{loopback.url}/resnet50.pth")


def test_offline_without_a_cached_file(hw, hub):
    with pytest.raises(hw.WeightsUnavailable, match="DLCV_OFFLINE=1 forbids a download"):
        hw.pretrained_state("imagenet", "resnet50", offline=True)


# ------------------------------------------------------------------------------------------------ data
def _write_layout(root, classes, n=2, size=(40, 30), names=None):
    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                name = f"{(names or {}).get(i, c)}_{i}.png"
                Image.fromarray(np.full(size[::-1], 40 * i + 20, np.uint8)).save(d / name)


def test_locate_finds_the_layout_below_a_folder_or_nothing(hw, tmp_path):
    assert hw.locate_xrays(tmp_path / "absent") is None
    _write_layout(tmp_path / "kaggle" / "someone" / "Data", hw.CLASSES, n=1)
    assert hw.locate_xrays(tmp_path / "kaggle") == tmp_path / "kaggle" / "someone" / "Data"
    (tmp_path / "partial" / "train" / "NORMAL").mkdir(parents=True)
    assert hw.locate_xrays(tmp_path / "partial") is None


def test_find_data_on_a_kaggle_mount_and_the_offline_error(hw, tmp_path):
    folders = dict(results=tmp_path / "r", data=None, cache=tmp_path / "cache", offline=True)
    with pytest.raises(hw.DataNotFoundError) as err:
        hw.find_data("covid_xray", hw.locate_xrays, folders, hw.XRAY_FIXES, hw.download_xrays, tmp_path / "kaggle")
    assert all(fix in str(err.value) for fix in hw.XRAY_FIXES) and "DLCV_OFFLINE=1" in str(err.value)
    _write_layout(tmp_path / "kaggle" / "x" / "Data", hw.CLASSES, n=1)
    root, origin, source = hw.find_data("covid_xray", hw.locate_xrays, folders, hw.XRAY_FIXES, hw.download_xrays,
                                        tmp_path / "kaggle")
    assert root == tmp_path / "kaggle" / "x" / "Data" and source == "real" and "Kaggle" in origin


def test_a_failed_kagglehub_download_is_reported(hw, tmp_path, monkeypatch):
    kagglehub = pytest.importorskip("kagglehub")
    seen = {}

    def unreachable(handle, *args, **kwargs):
        seen["handle"], seen["cache"] = handle, hw.os.environ.get("KAGGLEHUB_CACHE")
        raise ConnectionError("cannot reach kaggle.com")

    monkeypatch.setattr(kagglehub, "dataset_download", unreachable)
    monkeypatch.setenv("KAGGLEHUB_CACHE", "unset")
    folders = dict(results=tmp_path / "r", data=None, cache=tmp_path / "cache", offline=False)
    with pytest.raises(hw.DataNotFoundError, match="ConnectionError: cannot reach kaggle.com"):
        hw.find_data("covid_xray", hw.locate_xrays, folders, hw.XRAY_FIXES, hw.download_xrays, tmp_path / "kaggle")
    assert seen == {"handle": "prashant268/chest-xray-covid19-pneumonia/versions/2",
                    "cache": str(tmp_path / "cache" / "covid_xray")}


def test_list_split_refuses_a_wrong_layout_by_name(hw, tmp_path):
    _write_layout(tmp_path, hw.CLASSES)
    files, labels = hw.list_split(tmp_path, "train")
    assert labels.tolist() == [0, 0, 1, 1, 2, 2] and files == sorted(files, key=lambda p: (p.parent.name, p.name))
    (tmp_path / "train" / "TUBERCULOSIS").mkdir()
    with pytest.raises(hw.DataLayoutError, match="TUBERCULOSIS"):
        hw.list_split(tmp_path, "train")
    for p in (tmp_path / "test" / "NORMAL").iterdir():
        p.unlink()
    with pytest.raises(hw.DataLayoutError, match=r"test/NORMAL holds no"):
        hw.list_split(tmp_path, "test")


def test_decode_normalises_modes_and_sizes_and_names_a_broken_file(hw, tmp_path):
    rgb = np.zeros((30, 50, 3), np.uint8)
    rgb[..., 0] = 255  # pure red → luminance 76 (ITU-R 601-2: 0.299 * 255)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.full((60, 20), 1000, np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(np.full((64, 64), 200, np.uint8)).convert("RGB").save(tmp_path / "gray.jpg", quality=95)
    arr, meta = hw.decode_image(tmp_path / "rgb.png", 16)
    assert arr.shape == (16, 16) and arr.dtype == np.uint8 and meta == (50, 30, 1) and abs(int(arr[8, 8]) - 76) <= 1
    assert hw.decode_image(tmp_path / "deep.png", 16)[1][:2] == (20, 60)
    assert abs(int(hw.decode_image(tmp_path / "gray.jpg", 16)[0].mean()) - 200) <= 2
    (tmp_path / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(hw.DataLayoutError, match="broken.jpeg"):
        hw.load_images([tmp_path / "rgb.png", tmp_path / "broken.jpeg"], 16)


# ------------------------------------------------------------------------------------------ leak checks
@pytest.mark.parametrize("name, key", [
    ("person123_bacteria_456.jpeg", "Kermany:PERSON123"), ("kermany_person7_virus_13.png", "Kermany:PERSON7"),
    ("IM-0117-0001.jpeg", "Kermany:IM-0117"), ("kermany_IM-0117-0001-0002.png", "Kermany:IM-0117"),
    ("NORMAL2-IM-0381-0001.jpeg", "Kermany:NORMAL2-IM-0381"),
    ("ieee8023_covid-19-pneumonia-58-day-10.png", "COVID-19:COVID-19-PNEUMONIA-58"),
    ("ieee8023_covid-19-pneumonia-58-day-3.png", "COVID-19:COVID-19-PNEUMONIA-58"),
    ("ieee8023_1-s2.0-S1684118220300682-main.pdf-002-a1.png", "COVID-19:1-S2.0-S1684118220300682-MAIN"),
    ("ieee8023_16654_2_1.png", "COVID-19:16654"), ("ieee8023_covid-19-caso-70-2-APS.png", "COVID-19:COVID-19-CASO-70"),
    ("ieee8023_00870a9c.png", None), ("NORMAL(1281).jpg", None), ("COVID19(471).jpg", None),
])
def test_patient_of_file_names(hw, name, key):
    assert hw.patient_of(name)[0] == key


def test_near_duplicates_match_a_brute_force_hamming_count(hw):
    rng = np.random.default_rng(0)
    a, b = rng.random((30, 64)) < 0.5, rng.random((20, 64)) < 0.5
    b[3] = a[7]
    b[5] = a[2] ^ (np.arange(64) < 3)  # three bits flipped
    dist = (a[:, None, :] != b[None, :, :]).sum(-1)
    for bits in (0, 3, 25):
        assert sorted(hw.near_duplicates(a, b, bits)) == sorted(zip(*np.nonzero(dist <= bits)))
    within = (a[:, None, :] != a[None, :, :]).sum(-1)
    assert sorted(hw.near_duplicates(a, a, 25, same=True)) == sorted(
        (i, j) for i, j in zip(*np.nonzero(within <= 25)) if i < j)


def test_the_hash_finds_a_re_encoded_copy_and_not_other_x_rays(hw):
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:64, 0:64] / 64
    images = [np.clip(128 + 60 * np.sin(6 * xx * rng.uniform(1, 3) + rng.uniform(0, 6)) * np.cos(
        5 * yy * rng.uniform(1, 3)), 0, 255).astype(np.uint8) for _ in range(8)]
    copy = np.clip(images[4].astype(int) + rng.integers(-4, 5, (64, 64)), 0, 255).astype(np.uint8)  # noise added
    h = hw.dhash(np.stack(images + [copy]))
    assert h.shape == (9, 256) and hw.near_duplicates(h[8:], h[:8], 16) == [(0, 4)]


def test_merge_groups_is_connected_components(hw):
    keys = ["a", "a", "b", "c", "d", "e", "e", "f"]
    pairs = [(1, 3), (3, 4), (5, 7)]
    merged = hw.merge_groups(keys, pairs)
    ids = {k: i for i, k in enumerate(sorted(set(keys)))}
    edges = [(ids[keys[i]], ids[keys[j]]) for i, j in pairs] + [(ids[k], ids[k]) for k in keys]
    graph = coo_matrix((np.ones(len(edges)), tuple(zip(*edges))), shape=(len(ids), len(ids)))
    _, comp = connected_components(graph, directed=False)
    reference = [comp[ids[k]] for k in keys]
    assert all((merged[i] == merged[j]) == (reference[i] == reference[j]) for i in range(8) for j in range(8))


def test_grouped_split_keeps_each_group_on_one_side_and_each_class_its_share(hw):
    labels = np.repeat([0, 1, 2], [60, 60, 120])
    groups = [f"i{i}" for i in range(60)] + [f"IM-{i // 3}" for i in range(60)] + [f"P{i // 4}" for i in range(120)]
    fit, val, moved = hw.grouped_split(labels, groups, 0.2, seed=0)
    assert sorted(np.r_[fit, val].tolist()) == list(range(240))
    assert not {groups[i] for i in fit} & {groups[i] for i in val}
    per_image = hw.sample_indices(240, 48, 0, labels)
    assert moved == len(set(per_image.tolist()) ^ set(val.tolist())) > 0
    shares = np.mean([np.bincount(labels[hw.grouped_split(labels, groups, 0.2, seed=s)[1]], minlength=3) / [60, 60, 120]
                      for s in range(40)], axis=0)
    assert np.all(np.abs(shares - 0.2) < 0.03), shares
    fit, val, moved = hw.grouped_split(labels, [f"i{i}" for i in range(240)], 0.2, seed=3)
    assert np.array_equal(val, hw.sample_indices(240, 48, 3, labels)) and moved == 0


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_and_per_image_scores_match_sklearn(hw):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    logits = rng.normal(size=(200, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = probs.argmax(1)
    m = hw.classification_metrics(y, probs)
    assert list(m["per_class_recall"].values()) == pytest.approx(list(recall_score(y, pred, average=None)))
    assert m["roc_auc_macro"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert hw.balanced_scores(y, pred).mean() == pytest.approx(balanced_accuracy_score(y, pred))
    y2, p2 = np.array([0, 0, 0, 1, 1]), np.array([0, 1, 1, 1, 2])  # class 2 absent from the truth
    assert hw.balanced_scores(y2, p2).mean() == pytest.approx(balanced_accuracy_score(y2, p2))
    assert hw.classification_metrics(y2, np.eye(3)[p2])["per_class_recall"]["PNEUMONIA"] == 0.0


def test_bootstrap_se_of_an_accuracy_matches_the_binomial_one(hw):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 400)
    pred = np.where(rng.random(400) < 0.8, y, (y + 1) % 3)
    acc = (pred == y).mean()
    se = hw.bootstrap_se(y, pred, metric=lambda t, p: float((t == p).mean()), n=2000)
    assert se == pytest.approx(np.sqrt(acc * (1 - acc) / 400), rel=0.1)


# ------------------------------------------------------------------------------------- exercise checks
def _freeze(model, names):
    for n in names:
        for p in getattr(model.backbone, n).parameters():
            p.requires_grad_(False)


def _groups(model, rates):
    return [{"params": list(getattr(model.backbone, n).parameters()), "lr": r} for n, r in rates.items()]


def test_check_finetune_setup_passes_the_solution_and_catches_wrong_ones(hw, capsys):
    hw.check_finetune_setup(hw.finetune_setup)
    assert "✓ Exercise 3.2" in capsys.readouterr().out
    everything = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")

    def wrong(exponent_shift=0, set_frozen=True, reset=True, freeze_layer1=True):
        def setup(model, strategy, lr, d=0.3):
            if reset:
                for p in model.parameters():
                    p.requires_grad_(True)
                model.frozen = ()
            if strategy in ("scratch", "full_finetune"):
                return [{"params": list(model.parameters()), "lr": lr}]
            if strategy == "linear_probe":
                frozen = everything
                rates = {"fc": lr}
            else:
                frozen = ("conv1", "bn1", "layer1") if freeze_layer1 else ("conv1", "bn1")
                rates = {"fc": lr, "layer4": lr * d ** (1 - exponent_shift), "layer3": lr * d ** (2 - exponent_shift),
                         "layer2": lr * d ** (3 - exponent_shift)}
            _freeze(model, frozen)
            if set_frozen:
                model.frozen = frozen
            return _groups(model, rates)
        return setup

    def bn_only_frozen_by_name(model, strategy, lr, d=0.3):  # eval mode right, but requires_grad never switched
        groups = hw.finetune_setup(model, strategy, lr, d)
        for p in model.parameters():
            p.requires_grad_(True)
        return groups

    cases = [(wrong(exponent_shift=1), "closer a stage is to the head"), (wrong(set_frozen=False), "model.frozen"),
             (wrong(reset=False), "a set-up before may have"),
             (wrong(freeze_layer1=False), "requires_grad off outside|a frozen weight must not move"),
             (bn_only_frozen_by_name, "requires_grad off outside")]
    for fn, hint in cases:
        with pytest.raises(AssertionError, match=f"(?s)Exercise 3.2.*Hint: .*({hint})"):
            hw.check_finetune_setup(fn)


def test_check_gradcam_weighting_passes_the_solution_and_catches_wrong_ones(hw, capsys):
    hw.check_gradcam_weighting(hw.gradcam_weighting)
    assert "✓ Exercise 3.4" in capsys.readouterr().out
    relu = torch.nn.functional.relu
    cases = [(lambda a, g: (g.mean(dim=(2, 3), keepdim=True) * a).sum(1), "evidence FOR"),
             (lambda a, g: relu((g.mean(dim=1, keepdim=True) * a).sum(1)), "AVERAGED over the positions"),
             (lambda a, g: relu((g * a).sum(1)), "AVERAGED over the positions"),
             (lambda a, g: relu((g.sum(dim=(2, 3), keepdim=True) * a).sum(1)), "AVERAGED over the positions"),
             (lambda a, g: relu((g.mean(dim=(2, 3), keepdim=True) * a).mean(1)), "AVERAGED over the positions"),
             (lambda a, g: relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True)), "channel axis")]
    for fn, hint in cases:
        with pytest.raises(AssertionError, match=f"(?s)Exercise 3.4.*Hint: .*{hint}"):
            hw.check_gradcam_weighting(fn)


@pytest.mark.parametrize("prediction", [None, {"short": "linear_probe"}, {"short": "probe", "long": "discriminative"},
                                        {"short": "linear_probe", "long": "scratch"}])
def test_check_prediction_refuses_what_is_not_a_prediction(hw, prediction):
    with pytest.raises(AssertionError, match="Exercise 3.3"):
        hw.check_prediction(prediction, ("short", "long"), hw.STRATEGIES, "Exercise 3.3")


def test_check_prediction_passes_a_prediction_and_refuses_an_unknown_outcome(hw, capsys):
    hw.check_prediction({"short": "linear_probe", "long": "discriminative"}, ("short", "long"), hw.STRATEGIES, "Ex 3.3")
    assert "✓ Ex 3.3" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="Exercise 3.5"):
        hw.check_prediction({"lung_blind_vs_headline": "same"}, ("lung_blind_vs_headline",),
                            ("worse", "tie", "better"), "Exercise 3.5")


def test_check_balanced_scores_passes_the_solution_and_catches_wrong_ones(hw, capsys):
    hw.check_balanced_scores(hw.balanced_scores)
    assert "✓ Exercise 3.1" in capsys.readouterr().out

    def per_class_only(y, p):  # 1/n_c: sums to the recalls, its mean is not their mean
        counts = np.bincount(y, minlength=3)
        return (p == y) / counts[y]

    def always_three_classes(y, p):  # K = 3 even when a class is absent
        counts = np.bincount(y, minlength=3)
        return (p == y) * len(y) / (3 * counts[y])

    cases = [(lambda y, p: (p == y).astype(float), "rare class must earn more"),
             (per_class_only, "rare class must earn more"),
             (always_three_classes, r"classes \(0, 2\).*count only the classes present"),
             (lambda y, p: np.ones(len(y)), "a wrong prediction scored more than 0"),
             (lambda y, p: (p == y).mean(), "one score per image")]
    for fn, hint in cases:
        with pytest.raises(AssertionError, match=f"(?s)Exercise 3.1.*{hint}"):
            hw.check_balanced_scores(fn)


# ------------------------------------------------------------------------------------- Grad-CAM, probes
def test_gradcam_matches_an_autograd_reference(hw):
    torch.manual_seed(0)
    model = hw.build_model("scratch", "resnet18", channels=3)
    model.eval()
    x = torch.rand(3, 1, 64, 64)
    cam = hw.GradCAM(model, model.backbone.layer4)
    maps, logits = cam(x, target=[0, 1, 2])
    cam.remove()
    assert maps.shape == (3, 64, 64) and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    assert not model.backbone.layer4._forward_hooks  # the hook is gone
    bb = model.backbone
    feats = bb.layer4(bb.layer3(bb.layer2(bb.layer1(bb.maxpool(bb.relu(bb.bn1(bb.conv1(
        (x.expand(-1, 3, -1, -1) - model.mean) / model.std)))))))).detach().requires_grad_(True)
    scores = bb.fc(torch.flatten(bb.avgpool(feats), 1))
    grads = torch.autograd.grad(scores[[0, 1, 2], [0, 1, 2]].sum(), feats)[0]
    ref = torch.relu((grads.mean((2, 3), keepdim=True) * feats).sum(1, keepdim=True))
    ref = torch.nn.functional.interpolate(ref, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    ref = ref / ref.flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1)
    assert torch.allclose(maps, ref, atol=1e-5) and torch.allclose(logits, scores.detach(), atol=1e-5)


def test_gradcam_works_on_a_frozen_backbone(hw):
    model = hw.build_model("imagenet", "resnet18")
    hw.finetune_setup(model, "linear_probe", 1e-3)
    cam = hw.GradCAM(model, model.backbone.layer4)
    maps, _ = cam(torch.rand(2, 1, 64, 64))
    cam.remove()
    assert maps.shape == (2, 64, 64) and torch.isfinite(maps).all() and maps.min() >= 0


def test_hide_centre_fills_the_centre_with_each_images_mean_and_leaves_the_rest(hw):
    x = torch.stack([torch.full((10, 10), 10, dtype=torch.uint8), torch.arange(100, dtype=torch.uint8).view(10, 10)])
    out = hw.hide_centre(x, 0.6)  # rows and columns 2..7
    inside = torch.zeros(10, 10, dtype=torch.bool)
    inside[2:8, 2:8] = True
    assert torch.equal(out[:, ~inside], x[:, ~inside]) and torch.equal(x[1], torch.arange(100).view(10, 10).byte())
    assert (out[0][inside] == 10).all() and (out[1][inside] == round(49.5)).all()  # mean of 0..99, rounded


# ---------------------------------------------------------------------------------------------- training
def test_lr_schedule(hw):
    assert hw.lr_factor(0.0, 0.1) < 0.02
    assert hw.lr_factor(0.1, 0.1) == pytest.approx(1.0)
    assert hw.lr_factor(0.55, 0.1) == pytest.approx(0.5)
    assert hw.lr_factor(1.0, 0.1) == pytest.approx(0.0, abs=1e-12)


def test_augment_identity_and_range(hw):
    x = torch.rand(4, 1, 24, 24)
    assert torch.allclose(hw.augment(x, torch.Generator().manual_seed(0), 0.0, (1.0, 1.0), 0.0, 0.0), x, atol=1e-5)
    a = hw.augment(x, torch.Generator().manual_seed(1), 10.0, (0.9, 1.1), 0.1, 0.2)
    b = hw.augment(x, torch.Generator().manual_seed(1), 10.0, (0.9, 1.1), 0.1, 0.2)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1 and not torch.allclose(a, x)


def _tiny_run(hw, precision, seed=0, strategy="scratch", kind="scratch", arch="resnet18", size=32, n=6, steps=3,
              model=None, weights=None, channels=None):
    g = torch.Generator().manual_seed(123)
    x = (torch.rand(n, size, size, generator=g) * 255).to(torch.uint8)
    y = torch.arange(n) % 3
    torch.manual_seed(seed)
    model = model or hw.build_model(kind, arch, channels=channels)
    hist = hw.train_model(model, x, y, x[:3], y[:3], strategy=strategy, lr=1e-3, steps=steps, seed=seed,
                          precision=precision, loss_weights=torch.ones(3) if weights is None else weights,
                          **SHARED_ARGS)
    return model, hist, hw.predict_proba(model, x, 8)


def test_training_is_deterministic(hw):
    m1, h1, p1 = _tiny_run(hw, _fp32(hw), seed=5)
    m2, h2, p2 = _tiny_run(hw, _fp32(hw), seed=5)
    assert h1["loss"] == h2["loss"] and h1["val_macro_f1"] == h2["val_macro_f1"] and h1["step"] == [2, 3]
    assert np.array_equal(p1, p2) and all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(),
                                                                            m2.state_dict().values()))
    assert _tiny_run(hw, _fp32(hw), seed=6)[1]["loss"] != h1["loss"]


def test_cost_grows_with_steps_not_with_the_data(hw):
    for n in (8, 64):
        model = hw.build_model("scratch", "resnet18")
        seen: list = []
        model.register_forward_hook(lambda mod, inp, out, seen=seen: seen.append(len(inp[0])) if mod.training else None)
        _, hist, _ = _tiny_run(hw, _fp32(hw), model=model, n=n, steps=5, size=16)
        assert seen == [4] * 5 and hist["steps"] == 5


def test_a_linear_probe_leaves_the_backbone_and_its_statistics_untouched(hw):
    model = hw.build_model("radimagenet", "resnet18")
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    _tiny_run(hw, _fp32(hw), strategy="linear_probe", model=model, n=4, steps=2)
    after = model.backbone.state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} == {"fc.weight", "fc.bias"}


def _small_xraynet(hw):
    """An XrayNet around a few-layer conv net (fp16 convolutions are slow on a CPU; the path is what is tested)."""
    torch.manual_seed(0)
    body = torch.nn.Sequential(OrderedDict(conv1=torch.nn.Conv2d(1, 4, 3), bn1=torch.nn.BatchNorm2d(4),
                                           relu=torch.nn.ReLU(), avgpool=torch.nn.AdaptiveAvgPool2d(1),
                                           flatten=torch.nn.Flatten(), fc=torch.nn.Linear(4, 3)))
    return hw.XrayNet(body, 1, (0.5,), (0.25,))


def test_the_fp16_path_skips_an_overflowing_step_without_moving_the_weights_or_the_schedule(hw, monkeypatch):
    """The T4 path on the CPU: fp16 autocast + GradScaler. Infinite loss weights make every loss and gradient NaN:
    the scaler skips each step, so no weight moves and the learning-rate schedule stays at its first value."""
    monkeypatch.setenv("DLCV_PRECISION", "fp16")
    precision = hw.choose_precision(torch.device("cpu"), cpu_bf16_gains=False)
    assert precision["name"] == "fp16" and precision["amp_dtype"] == torch.float16
    model = _small_xraynet(hw)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    _, hist, _ = _tiny_run(hw, precision, model=model, weights=torch.full((3,), float("inf")), steps=4)
    assert hist["skipped"] == 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
    assert hist["last_lr"] == pytest.approx([1e-3 * hw.lr_factor(0.0, SHARED_ARGS["warmup"])])
    model = _small_xraynet(hw)  # finite losses: the steps taken, and only they, move the schedule and the weights
    _, hist, probs = _tiny_run(hw, precision, model=model, steps=8)
    taken = 8 - hist["skipped"]
    assert taken > 0 and hist["last_lr"] == pytest.approx([1e-3 * hw.lr_factor(taken / 8, 0.1)], abs=1e-12)
    assert not torch.equal(model.backbone.fc.weight, _small_xraynet(hw).backbone.fc.weight)
    assert probs.dtype == np.float32 and np.allclose(probs.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("profile", ["cpu", "full"])
def test_profile_models_take_a_training_step(hw, profile):
    """The cpu and full profiles' models, at their image sizes, take one step on two images (smallest cases)."""
    cfg = hw.CONFIGS[profile]
    for kind, arch, strategy, size, channels in (
            ("scratch", cfg["scratch_arch"], "scratch", cfg["img_size"], None),
            ("imagenet", cfg["compare_arch"], "discriminative", cfg["compare_size"], None)):
        _, hist, _ = _tiny_run(hw, _fp32(hw), strategy=strategy, kind=kind, arch=arch, size=size, n=2, steps=1,
                               channels=channels)
        assert hist["steps"] == 1 and np.isfinite(hist["loss"][0]), (kind, arch, strategy)
