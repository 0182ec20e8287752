# %%
# @title CIFAR-10 1/4: where the data comes from (the same in homeworks 1 and 2, one download cache)
import hashlib
import pickle
import socket

from PIL import Image

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CIFAR10_FIXES = (
    "turn the internet on (Kaggle: Settings → Internet) so torchvision can download CIFAR-10 (170 MB);",
    "on Kaggle, Add Input → a CIFAR-10 dataset in the class-folder or cifar-10-batches-py layout;",
    "put a copy in the layout shown in the README under a folder and set DLCV_DATA_DIR to it.",
)


def is_cifar_folder(path) -> bool:
    """The course layout: train/ and test/, each with one folder per class (airplane/ checked)."""
    return (Path(path) / "train" / CIFAR10_CLASSES[0]).is_dir() and (Path(path) / "test").is_dir()


def search_kaggle_input(kaggle_root, max_depth: int = 4):
    """Breadth-first search of a Kaggle input mount: ("folder" | "batches", path) or None."""
    level = [Path(kaggle_root)]
    for _ in range(max_depth):
        deeper = []
        for folder in level:
            for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
                if sub.name == "cifar-10-batches-py":
                    return "batches", sub
                if is_cifar_folder(sub):
                    return "folder", sub
                deeper.append(sub)
        level = deeper
    return None


def download_cifar10(cache_dir, timeout: float = 60.0) -> Path:
    """The official python batches via torchvision into `cache_dir/cifar10/cifar-10-batches-py`, once.

    torchvision checks the archive's and every batch's MD5; the folder gets its final name only after
    that, so a cut or corrupt download leaves nothing that a rerun would trust.
    """
    import torchvision

    target = Path(cache_dir) / "cifar10" / "cifar-10-batches-py"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # a dead network fails fast instead of hanging
    try:
        torchvision.datasets.CIFAR10(root=str(tmp), train=True, download=True)
        torchvision.datasets.CIFAR10(root=str(tmp), train=False, download=False)  # checks the test batch
        os.replace(tmp / "cifar-10-batches-py", target)
    finally:
        socket.setdefaulttimeout(old_timeout)
        shutil.rmtree(tmp, ignore_errors=True)  # the 170 MB archive is not kept
    return target


# %%
# @title CIFAR-10 2/4: find it (DLCV_DATA_DIR, Kaggle input, download cache, download, smoke stand-in)
def find_cifar10(folders: dict, profile: str, kaggle_root="/kaggle/input", synthetic_per_class=(40, 10),
                 seed: int = 0):
    """Where CIFAR-10 comes from: (kind, path, origin, data_source), kind "folder" or "batches".

    Order: `folders["data"]`/cifar10 (or cifar-10-batches-py), a Kaggle input mount, the download cache,
    the download (unless offline), and in `smoke` only a synthetic stand-in written in the real layout.
    """
    tried = []
    if folders["data"]:
        for kind, path in (("folder", Path(folders["data"]) / "cifar10"),
                           ("batches", Path(folders["data"]) / "cifar-10-batches-py")):
            if path.is_dir():
                return kind, path, f"DLCV_DATA_DIR ({path})", "real"
        tried.append(f"DLCV_DATA_DIR={folders['data']}: holds no cifar10/ or cifar-10-batches-py/")
    else:
        tried.append("DLCV_DATA_DIR: not set")
    if Path(kaggle_root).is_dir():
        found = search_kaggle_input(kaggle_root)
        if found:
            return found[0], found[1], f"Kaggle input ({found[1]})", "real"
        tried.append(f"Kaggle input {kaggle_root}: no CIFAR-10 folder found")
    else:
        tried.append(f"Kaggle input: {kaggle_root} does not exist (not on Kaggle)")
    cached = Path(folders["cache"]) / "cifar10" / "cifar-10-batches-py"
    if cached.is_dir():
        return "batches", cached, f"download cache ({cached})", "real"
    if folders["offline"]:
        tried.append(f"download: skipped because DLCV_OFFLINE=1 (cache {cached} is empty)")
    else:
        try:
            return "batches", download_cifar10(folders["cache"]), f"torchvision download ({cached})", "real"
        except Exception as err:  # no internet, DNS failure, timeout, corrupt archive, disk full ...
            tried.append(f"download with torchvision into {cached}: failed ({type(err).__name__}: {err})")
    if profile == "smoke":
        root = write_synthetic_cifar10(tempfile.mkdtemp(prefix="dlcv-cifar10-"), *synthetic_per_class, seed=seed)
        return "folder", root, f"synthetic stand-in written to {root} (NOT CIFAR-10)", "synthetic"
    raise data_error("CIFAR-10", tried, CIFAR10_FIXES)


def synthetic_cifar_image(label: int, rng: np.random.Generator) -> np.ndarray:
    """A 32×32×3 uint8 image: stripes at a class-dependent angle and colour, random phase, noise."""
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    angle = np.pi * label / len(CIFAR10_CLASSES) + rng.normal(0, 0.08)
    wave = np.sin((0.35 + 0.05 * (label % 3)) * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 7))
    hue = np.array([np.cos(label), np.cos(label + 2.1), np.cos(label + 4.2)], dtype=np.float32)
    img = 128 + 60 * hue[:, None, None] * (wave[None] > 0) + rng.uniform(-30, 30) + rng.normal(0, 25, (3, 32, 32))
    return np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 0)


def write_synthetic_cifar10(root, n_train_per_class: int, n_test_per_class: int, seed: int) -> Path:
    """A small learnable look-alike written as PNGs in the course layout (root/{train,test}/<class>/)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train_per_class), ("test", n_test_per_class)):
        for label, name in enumerate(CIFAR10_CLASSES):
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(synthetic_cifar_image(label, rng)).save(folder / f"{i:04d}.png")
    return Path(root)


# %%
# @title CIFAR-10 3/4: read a class-folder split or the official batches, naming any broken file
def list_cifar_split(split_dir):
    """(files, labels) of `split_dir/<class>/*.png|jpg`, sorted by class then name; layout errors name the folder."""
    split_dir = Path(split_dir)
    fix = f"expected {split_dir}/<class>/*.png with the classes {', '.join(CIFAR10_CLASSES)} (see the README)"
    if not split_dir.is_dir():
        raise DataLayoutError(f"{split_dir} is not a folder; {fix}.")
    extra = sorted(p.name for p in split_dir.iterdir()
                   if p.is_dir() and not p.name.startswith(".") and p.name not in CIFAR10_CLASSES)
    if extra:
        raise DataLayoutError(f"{split_dir} holds unknown class folders {extra}; {fix}.")
    files, labels = [], []
    for label, name in enumerate(CIFAR10_CLASSES):
        folder = split_dir / name
        if not folder.is_dir():
            raise DataLayoutError(f"Missing class folder {folder}; {fix}.")
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataLayoutError(f"Class folder {folder} holds no images (.png/.jpg); copy them back or point "
                                  "DLCV_DATA_DIR at a complete copy.")
        files += found
        labels += [label] * len(found)
    return files, np.array(labels, dtype=np.int64)


def decode_cifar_images(files) -> np.ndarray:
    """uint8 (N, 3, 32, 32); grey or RGBA images become RGB, other sizes are resized to 32×32."""
    out = np.empty((len(files), 32, 32, 3), dtype=np.uint8)
    for i, file in enumerate(files):
        try:
            with Image.open(file) as im:
                im = im.convert("RGB")
                out[i] = np.asarray(im if im.size == (32, 32) else im.resize((32, 32), Image.BILINEAR))
        except Exception as err:  # Pillow raises several types for broken files
            raise DataLayoutError(f"Cannot read image {file}: {type(err).__name__}: {err}. Replace or delete "
                                  "this file (re-download or re-copy the data set).") from err
    return out.transpose(0, 3, 1, 2).copy()


def read_cifar_batches(folder) -> dict:
    """The official `cifar-10-batches-py` pickles → {x_train, y_train, x_test, y_test} as numpy arrays."""
    out = {}
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        xs, ys = [], []
        for name in names:
            file = Path(folder) / name
            try:
                with open(file, "rb") as f:
                    batch = pickle.load(f, encoding="latin1")  # as torchvision reads them
                xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(batch["labels"], dtype=np.int64))
            except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as err:
                raise DataLayoutError(f"{file}: missing or unreadable CIFAR-10 batch ({type(err).__name__}: "
                                      f"{err}). Delete {folder} so that it is downloaded again.") from err
        out[f"x_{split}"], out[f"y_{split}"] = np.concatenate(xs), np.concatenate(ys)
    return out


# %%
# @title CIFAR-10 4/4: decode once (only the sampled images), cache the decode atomically
def load_cifar10(kind: str, path, cache_dir=None, max_train=None, max_test=None, seed: int = 0) -> dict:
    """CIFAR-10 as uint8 tensors {x_train (N, 3, 32, 32), y_train, x_test, y_test} plus the split sizes.

    `max_train`/`max_test` cap a split with a seeded random sample that keeps the class proportions
    (folders list files by class: the first N would be a few classes); from a folder only the sampled
    files are decoded. With `cache_dir`, a folder's decode is cached as .npz under `cache_dir/cifar10/`,
    keyed by the files (path and size) and the sample, so it is decoded once.
    """
    caps = {"train": max_train, "test": max_test}
    if kind == "batches":
        arrays = read_cifar_batches(path)
    else:
        lists = {split: list_cifar_split(Path(path) / split) for split in ("train", "test")}
        picks = {s: sample_indices(len(y), caps[s], seed, y) if caps[s] else np.arange(len(y))
                 for s, (_, y) in lists.items()}
        key = hashlib.sha1(repr((seed, caps)).encode())
        for s, (files, _) in lists.items():
            for i in picks[s]:
                key.update(f"{files[i].relative_to(path)}:{files[i].stat().st_size};".encode())
        cache = Path(cache_dir) / "cifar10" / f"decoded-{key.hexdigest()[:16]}.npz" if cache_dir else None
        if cache is not None and cache.exists():
            with np.load(cache) as z:
                arrays = {k: z[k] for k in z.files}
        else:
            arrays = {}
            for s, (files, labels) in lists.items():
                arrays[f"x_{s}"] = decode_cifar_images([files[i] for i in picks[s]])
                arrays[f"y_{s}"], arrays[f"n_{s}"] = labels[picks[s]], np.array(len(labels))
            if cache is not None:
                atomic_write(cache, lambda f: np.savez(f, **arrays))
    out = {}
    for s in ("train", "test"):
        x, y = arrays[f"x_{s}"], arrays[f"y_{s}"]
        out[f"n_{s}_available"] = int(arrays.get(f"n_{s}", len(y)))
        if kind == "batches" and caps[s] and caps[s] < len(y):
            keep = sample_indices(len(y), caps[s], seed, y)
            x, y = x[keep], y[keep]
        out[f"x_{s}"], out[f"y_{s}"] = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
    return out
