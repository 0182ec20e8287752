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
    return {"data": data, "cache": tmp_path / "cache", "offline": offline, "results": tmp_path / "results"}


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


def test_folder_is_decoded_into_nchw_uint8_in_class_order(cf, tmp_path):
    root = _write_folder(tmp_path / "cifar10")
    data = cf.load_cifar10(root)
    assert data["x_train"].shape == (30, 3, 32, 32) and data["x_train"].dtype == torch.uint8
    assert data["y_train"].tolist() == sorted([c for c in range(10) for _ in range(3)])
    assert data["n_train_available"] == 30 and data["n_test_available"] == 20
    png = np.array(Image.open(root / "train" / "cat" / "0001.png"))  # cat = class 3, its second image
    assert torch.equal(data["x_train"][3 * 3 + 1], torch.from_numpy(png).permute(2, 0, 1))


def test_a_capped_split_is_a_stratified_random_sample_and_only_it_is_decoded(cf, tmp_path, monkeypatch):
    root = _write_folder(tmp_path / "cifar10", per_class=(6, 2))
    opened = []
    real = cf.Image.open
    monkeypatch.setattr(cf.Image, "open", lambda f, *a, **k: opened.append(f) or real(f, *a, **k))
    data = cf.load_cifar10(root, max_train=20, seed=0)
    assert len(opened) == 20 + 20  # 20 sampled training images of 60, the whole 20-image test split
    assert np.bincount(data["y_train"].numpy(), minlength=10).tolist() == [2] * 10  # a first-20 pick: 4 classes
    assert data["n_train_available"] == 60
    for x, y, f in zip(data["x_train"], data["y_train"], opened[:20]):  # images and labels stay together
        assert cf.CIFAR10_CLASSES[int(y)] == f.parent.name
        assert torch.equal(x, torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1))
    other = cf.load_cifar10(root, max_train=20, seed=1)
    assert not torch.equal(data["x_train"], other["x_train"])


def test_grey_and_other_sizes_become_rgb_32(cf, tmp_path):
    root = _write_folder(tmp_path / "cifar10", per_class=(1, 1))
    Image.fromarray(np.full((40, 50), 200, np.uint8)).save(root / "train" / "cat" / "0000.png")
    x = cf.load_cifar10(root)["x_train"][3]
    assert x.shape == (3, 32, 32) and (x == 200).all()


@pytest.mark.parametrize("breakage, match", [
    (lambda r: __import__("shutil").rmtree(r / "train" / "truck"), r"train/truck: no \.png/\.jpg images"),
    (lambda r: [p.unlink() for p in (r / "test" / "cat").iterdir()], r"test/cat: no \.png/\.jpg images"),
    (lambda r: (r / "train" / "dog" / "0000.png").write_bytes(b"not a png"), r"train/dog/0000\.png: unreadable"),
    (lambda r: __import__("shutil").rmtree(r / "test"), r"test/airplane: no \.png"),
])
def test_broken_folders_are_named(cf, tmp_path, breakage, match):
    root = _write_folder(tmp_path / "cifar10")
    breakage(root)
    with pytest.raises(cf.DataLayoutError, match=match):
        cf.load_cifar10(root)


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


def test_official_batches_are_read_capped_and_a_broken_one_is_named(cf, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    files = _batches()
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    data = cf.load_cifar10(folder)
    assert data["x_train"].shape == (10, 3, 32, 32) and data["y_test"].tolist() == [1, 7]
    expected = np.frombuffer(pickle.loads(files["data_batch_2"])["data"].tobytes(), np.uint8).reshape(2, 3, 32, 32)
    assert torch.equal(data["x_train"][2:4], torch.from_numpy(expected.copy()))
    capped = cf.load_cifar10(folder, max_train=4, seed=0)
    assert capped["x_train"].shape == (4, 3, 32, 32) and sorted(capped["y_train"].tolist()) == [1, 1, 7, 7]
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(cf.DataLayoutError, match="data_batch_3: unreadable"):
        cf.load_cifar10(folder)


# --- where the data comes from (the shared find_data with CIFAR-10's locate and download) -----------------
def test_locate_accepts_both_layouts_and_nothing_else(cf, tmp_path):
    root = _write_folder(tmp_path / "a" / "cifar10")
    assert cf.locate_cifar10(root) == root
    batches = tmp_path / "b" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name in _batches():
        (batches / name).write_bytes(b"x")
    assert cf.locate_cifar10(batches) == batches and cf.locate_cifar10(batches.parent) == batches
    (batches / "test_batch").unlink()  # an interrupted extraction is not trusted
    assert cf.locate_cifar10(batches.parent) is None
    assert cf.locate_cifar10(tmp_path / "nothing") is None and cf.locate_cifar10(root / "train") is None


def test_resolution_order(cf, tmp_path):
    _write_folder(tmp_path / "data" / "cifar10")
    kaggle = tmp_path / "kaggle"
    _write_folder(kaggle / "someone" / "cifar10-png")  # a Kaggle input in the course layout, two levels down
    f = _folders(tmp_path, data=tmp_path / "data")
    path, origin, source = cf.find_cifar10(f, kaggle_root=kaggle)
    assert (path, source) == (tmp_path / "data" / "cifar10", "real") and "DLCV_DATA_DIR" in origin
    f["data"] = None
    path, origin, source = cf.find_cifar10(f, kaggle_root=kaggle)
    assert path == kaggle / "someone" / "cifar10-png" and "Kaggle input" in origin
    cached = tmp_path / "cache" / "cifar10" / "cifar-10-batches-py"
    cached.mkdir(parents=True)
    for name in _batches():
        (cached / name).write_bytes(b"x")
    path, origin, _ = cf.find_cifar10(f, kaggle_root=tmp_path / "none")
    assert path == cached and "download cache" in origin
    (tmp_path / "data" / "cifar10" / "SYNTHETIC").write_text("test data")
    assert cf.find_cifar10(_folders(tmp_path, data=tmp_path / "data"))[2] == "synthetic"


def test_nothing_found_says_what_was_tried_and_the_cifar_fixes(cf, tmp_path):
    with pytest.raises(cf.DataNotFoundError) as err:
        cf.find_cifar10(_folders(tmp_path, data=tmp_path / "nothing"), kaggle_root=tmp_path / "none")
    text = str(err.value)
    assert f"$DLCV_DATA_DIR/cifar10 ({tmp_path / 'nothing'})" in text and "DLCV_OFFLINE=1" in text
    assert "torchvision can download CIFAR-10" in text and "cifar-10-batches-py layout" in text


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


def test_download_is_used_then_found_in_the_cache(cf, tmp_path, server):
    _, routes, archive = server
    routes["/cifar-10-python.tar.gz"] = (archive, None)
    f = _folders(tmp_path, offline=False)
    path, origin, source = cf.find_cifar10(f, kaggle_root=tmp_path / "none")
    assert source == "real" and path == tmp_path / "cache" / "cifar10" / "cifar-10-batches-py" and "download" in origin
    assert cf.load_cifar10(path)["x_test"].shape == (2, 3, 32, 32)
    assert [p.name for p in path.parent.iterdir()] == ["cifar-10-batches-py"]  # the archive is not kept
    routes.clear()  # a second run must not need the server
    path, origin, _ = cf.find_cifar10(f, kaggle_root=tmp_path / "none")
    assert "download cache" in origin


@pytest.mark.parametrize("serve", ["truncated", "corrupt", "missing"])
def test_a_broken_download_is_refused_not_trusted_and_fetched_again(cf, tmp_path, server, serve):
    _, routes, archive = server
    if serve == "truncated":
        routes["/cifar-10-python.tar.gz"] = (archive[: len(archive) // 2], len(archive))
    elif serve == "corrupt":
        routes["/cifar-10-python.tar.gz"] = (archive[:100] + b"x" * (len(archive) - 100), None)
    f = _folders(tmp_path, offline=False)
    with pytest.raises(cf.DataNotFoundError) as err:
        cf.find_cifar10(f, kaggle_root=tmp_path / "none")
    text = str(err.value)
    assert "a download (" in text and "torchvision can download CIFAR-10" in text
    if serve == "missing":
        assert "404" in text
    cache = tmp_path / "cache" / "cifar10"
    assert cf.locate_cifar10(cache) is None, "a broken download left a folder that a rerun would trust"
    assert not list(cache.glob("*.tar.gz")), "a broken archive was kept"
    routes["/cifar-10-python.tar.gz"] = (archive, None)  # the network is back: the next run downloads again
    path, origin, _ = cf.find_cifar10(f, kaggle_root=tmp_path / "none")
    assert "download (" in origin and cf.load_cifar10(path)["y_test"].tolist() == [1, 7]
