"""The CIFAR-10 data cells shared by homeworks 1 and 2 (tag `cifar10`, synced from tools/cifar10_cells.py).

Tested once, as loaded from homework 1; test_shared.py proves homework 2 holds the very same text.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from nbload import load_lib


@pytest.fixture(scope="module")
def cf():
    return load_lib("homework_1")


def _folders(tmp_path, data=None, offline=True):
    return {"data": data, "cache": tmp_path / "cache", "offline": offline, "results": tmp_path / "results",
            "weights": None}


def _write_folder(root, per_class=(3, 2), size=32):
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for c, name in enumerate(("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                  "ship", "truck")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                img = np.full((size, size, 3), 20 * c, np.uint8) + rng.integers(0, 5, (size, size, 3), dtype=np.uint8)
                Image.fromarray(img).save(folder / f"{i:04d}.png")
    return root


def test_folder_is_decoded_once_into_nchw_uint8_and_cached(cf, tmp_path, monkeypatch):
    root = _write_folder(tmp_path / "cifar10")
    data = cf.load_cifar10("folder", root, cache_dir=tmp_path / "cache")
    assert data["x_train"].shape == (30, 3, 32, 32) and data["x_train"].dtype == torch.uint8
    assert data["y_train"].tolist() == sorted([c for c in range(10) for _ in range(3)])
    assert data["n_train_available"] == 30 and data["n_test_available"] == 20
    png = np.array(Image.open(root / "train" / "cat" / "0001.png"))  # cat = class 3, its second image
    assert torch.equal(data["x_train"][3 * 3 + 1], torch.from_numpy(png).permute(2, 0, 1))
    assert len(list((tmp_path / "cache" / "cifar10").glob("decoded-*.npz"))) == 1
    monkeypatch.setattr(cf, "decode_cifar_images", lambda files: pytest.fail("decoded again despite the cache"))
    again = cf.load_cifar10("folder", root, cache_dir=tmp_path / "cache")
    assert all(torch.equal(data[k], again[k]) for k in ("x_train", "y_train", "x_test", "y_test"))


def test_a_capped_split_is_a_stratified_random_sample_and_only_it_is_decoded(cf, tmp_path, monkeypatch):
    root = _write_folder(tmp_path / "cifar10", per_class=(6, 2))
    decoded = []
    real = cf.decode_cifar_images
    monkeypatch.setattr(cf, "decode_cifar_images", lambda files: decoded.append(len(files)) or real(files))
    data = cf.load_cifar10("folder", root, max_train=20, seed=0)
    assert decoded == [20, 20]  # 20 sampled training images of 60, the whole 20-image test split
    assert np.bincount(data["y_train"].numpy(), minlength=10).tolist() == [2] * 10  # a first-20 pick: 4 classes
    assert data["n_train_available"] == 60
    other = cf.load_cifar10("folder", root, max_train=20, seed=1)
    assert not torch.equal(data["x_train"], other["x_train"])


def test_grey_and_other_sizes_become_rgb_32(cf, tmp_path):
    Image.fromarray(np.full((40, 50), 200, np.uint8)).save(tmp_path / "grey.png")
    out = cf.decode_cifar_images([tmp_path / "grey.png"])
    assert out.shape == (1, 3, 32, 32) and out.dtype == np.uint8 and (out == 200).all()


@pytest.mark.parametrize("breakage, match", [
    (lambda r: __import__("shutil").rmtree(r / "train" / "truck"), r"Missing class folder .*train/truck"),
    (lambda r: [p.unlink() for p in (r / "test" / "cat").iterdir()], r"test/cat holds no images"),
    (lambda r: (r / "train" / "dog" / "0000.png").write_bytes(b"not a png"), r"dog/0000\.png"),
    (lambda r: (r / "train" / "unicorn").mkdir(), r"unknown class folders \['unicorn'\]"),
    (lambda r: __import__("shutil").rmtree(r / "test"), r"cifar10/test is not a folder"),
])
def test_broken_folders_are_named(cf, tmp_path, breakage, match):
    root = _write_folder(tmp_path / "cifar10")
    breakage(root)
    with pytest.raises(cf.DataLayoutError, match=match):
        cf.load_cifar10("folder", root)


# --- the official python batches, as torchvision downloads them ------------------------------------------
def _batches(n=2):
    rng = np.random.default_rng(1)
    files = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [1, 7][:n]}
        files[name] = pickle.dumps(entry, protocol=2)
    files["batches.meta"] = pickle.dumps({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                                          "frog", "horse", "ship", "truck"]}, protocol=2)
    return files


def test_official_batches_are_read_and_a_broken_one_is_named(cf, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    files = _batches()
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    data = cf.load_cifar10("batches", folder)
    assert data["x_train"].shape == (10, 3, 32, 32) and data["y_test"].tolist() == [1, 7]
    expected = np.frombuffer(pickle.loads(files["data_batch_2"])["data"].tobytes(), np.uint8).reshape(2, 3, 32, 32)
    assert torch.equal(data["x_train"][2:4], torch.from_numpy(expected.copy()))
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(cf.DataLayoutError, match="data_batch_3.*Delete"):
        cf.load_cifar10("batches", folder)


# --- where the data comes from ------------------------------------------------------------------------------
def test_resolution_order(cf, tmp_path):
    _write_folder(tmp_path / "data" / "cifar10")
    kaggle = tmp_path / "kaggle"
    (kaggle / "someone" / "cifar-10-batches-py").mkdir(parents=True)
    f = _folders(tmp_path, data=tmp_path / "data")
    assert cf.find_cifar10(f, "cpu", kaggle_root=kaggle)[:2] == ("folder", tmp_path / "data" / "cifar10")
    f["data"] = None
    kind, path, origin, source = cf.find_cifar10(f, "cpu", kaggle_root=kaggle)
    assert (kind, path.name, source) == ("batches", "cifar-10-batches-py", "real") and "Kaggle" in origin
    cached = tmp_path / "cache" / "cifar10" / "cifar-10-batches-py"
    cached.mkdir(parents=True)
    assert cf.find_cifar10(f, "cpu", kaggle_root=tmp_path / "none")[1] == cached


def test_nothing_found_outside_smoke_says_what_was_tried_and_the_cifar_fixes(cf, tmp_path):
    with pytest.raises(cf.DataNotFoundError) as err:
        cf.find_cifar10(_folders(tmp_path, data=tmp_path / "nothing"), "cpu", kaggle_root=tmp_path / "none")
    text = str(err.value)
    assert "nothing: holds no cifar10/" in text and "DLCV_OFFLINE=1" in text
    assert "torchvision can download CIFAR-10" in text and "kaggle.json" not in text


def test_smoke_falls_back_to_a_synthetic_stand_in_in_the_real_layout(cf, tmp_path):
    kind, path, origin, source = cf.find_cifar10(_folders(tmp_path), "smoke", kaggle_root=tmp_path / "none",
                                                 synthetic_per_class=(4, 2))
    assert (kind, source) == ("folder", "synthetic") and "NOT CIFAR-10" in origin
    data = cf.load_cifar10(kind, path)  # the real folder parser reads the synthetic PNGs
    assert data["x_train"].shape == (40, 3, 32, 32) and sorted(set(data["y_test"].tolist())) == list(range(10))


# --- the download, against a server on 127.0.0.1 ------------------------------------------------------------
@pytest.fixture()
def server(loopback, monkeypatch):
    """A loopback server, with torchvision's CIFAR10 pointed at it and told the tiny archive's MD5s."""
    import torchvision

    files = _batches()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    archive = buf.getvalue()
    md5 = {name: hashlib.md5(blob).hexdigest() for name, blob in files.items()}
    base = loopback.url
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "url", f"{base}/cifar-10-python.tar.gz")
    monkeypatch.setattr(cls, "tgz_md5", hashlib.md5(archive).hexdigest())
    monkeypatch.setattr(cls, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(cls, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(cls, "meta", {"filename": "batches.meta", "key": "label_names", "md5": md5["batches.meta"]})
    return base, loopback.routes, archive


def test_download_is_used_and_cached_once(cf, tmp_path, server):
    _, routes, archive = server
    routes["/cifar-10-python.tar.gz"] = (archive, None)
    f = _folders(tmp_path, offline=False)
    kind, path, origin, source = cf.find_cifar10(f, "cpu", kaggle_root=tmp_path / "none")
    assert (kind, source) == ("batches", "real") and path == tmp_path / "cache" / "cifar10" / "cifar-10-batches-py"
    assert cf.load_cifar10(kind, path)["x_test"].shape == (2, 3, 32, 32)
    assert [p.name for p in path.parent.iterdir()] == ["cifar-10-batches-py"]  # the archive is not kept
    routes.clear()  # a second run must not need the server
    assert cf.find_cifar10(f, "cpu", kaggle_root=tmp_path / "none")[1] == path


@pytest.mark.parametrize("serve", ["truncated", "corrupt", "missing"])
def test_a_broken_download_is_refused_and_leaves_nothing(cf, tmp_path, server, serve):
    _, routes, archive = server
    if serve == "truncated":
        routes["/cifar-10-python.tar.gz"] = (archive[: len(archive) // 2], len(archive))
    elif serve == "corrupt":
        routes["/cifar-10-python.tar.gz"] = (archive[:100] + b"x" * (len(archive) - 100), None)
    with pytest.raises(cf.DataNotFoundError) as err:
        cf.find_cifar10(_folders(tmp_path, offline=False), "cpu", kaggle_root=tmp_path / "none")
    text = str(err.value)
    assert "download with torchvision" in text and "torchvision can download CIFAR-10" in text
    if serve == "missing":
        assert "404" in text
    cache = tmp_path / "cache" / "cifar10"
    assert not cache.exists() or list(cache.iterdir()) == [], "a broken download left files in the cache"
