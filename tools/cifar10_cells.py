# %%
# @title CIFAR-10 1/3: where it comes from (DLCV_DATA_DIR, Kaggle input, cache, torchvision)
import pickle
import socket

from PIL import Image

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR10_FIXES = [
    "turn the internet on (Kaggle: Settings → Internet) so torchvision can download CIFAR-10 (170 "
    "MB);",
    "on Kaggle, Add Input → a CIFAR-10 dataset in the class-folder or cifar-10-batches-py layout;",
    "put a copy in the layout shown in the README under a folder and set DLCV_DATA_DIR to it.",
]


def locate_cifar10(path):
    """The CIFAR-10 folder at or in `path`: class folders ({train,test}/<class>/) or the official
    batches."""
    for folder in (Path(path), Path(path) / "cifar-10-batches-py"):
        batches = all(
            (folder / name).is_file() for names in CIFAR10_BATCHES.values() for name in names
        )
        if batches or (
            (folder / "train" / CIFAR10_CLASSES[0]).is_dir() and (folder / "test").is_dir()
        ):
            return folder


def download_cifar10(folder, timeout: float = 60.0) -> Path:
    """torchvision's download into `folder`; it checks the archive's MD5 and each batch's, so a cut
    or corrupt download is refused (and fetched again next time). The 170 MB archive is not kept."""
    import torchvision

    # for this process: a dead network fails fast instead of hanging
    socket.setdefaulttimeout(timeout)
    try:
        torchvision.datasets.CIFAR10(root=str(folder), train=True, download=True)
        torchvision.datasets.CIFAR10(root=str(folder), train=False)  # checks the test batch too
    finally:
        (Path(folder) / "cifar-10-python.tar.gz").unlink(missing_ok=True)
    return Path(folder) / "cifar-10-batches-py"


def find_cifar10(folders: dict, kaggle_root="/kaggle/input") -> tuple:
    """(folder, origin, "real"/"synthetic") by the shared finder's order; DataNotFoundError with the
    fixes."""
    return find_data("cifar10", locate_cifar10, folders, CIFAR10_FIXES, download_cifar10,
                     kaggle_root)


# %%
# @title CIFAR-10 2/3: class folders or the official batches (a broken file is named)
def read_cifar_split(folder, split: str, cap=None, seed: int = 0) -> tuple:
    """(uint8 images (N, 3, 32, 32), int64 labels, images available); `cap`: a stratified random
    sample, and from class folders only the sampled images are decoded."""
    folder, batches = Path(folder), (Path(folder) / "test_batch").is_file()
    lists = (
        []
        if batches
        else [
            sorted(
                p
                for p in (folder / split / name).glob("*")
                if p.suffix.lower() in (".png", ".jpg", ".jpeg")
            )
            for name in CIFAR10_CLASSES
        ]
    )
    if not batches and not all(lists):
        empty = folder / split / CIFAR10_CLASSES[[len(f) for f in lists].index(0)]
        raise DataLayoutError(f"{empty}: no .png/.jpg images; expected "
                              f"{folder}/{{train,test}}/<class>/*.png with the classes "
                              f"{', '.join(CIFAR10_CLASSES)} (see the README).")
    files, file = (
        [folder / name for name in CIFAR10_BATCHES[split]] if batches else sum(lists, []),
        folder,
    )
    try:
        if batches:  # the official python batches, read as torchvision reads them
            parts = []
            for file in files:
                parts.append(pickle.loads(file.read_bytes(), encoding="latin1"))
            x = np.concatenate(
                [np.asarray(b["data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for b in parts]
            )
            labels = np.concatenate([np.asarray(b["labels"], dtype=np.int64) for b in parts])
        else:
            labels = np.concatenate(
                [np.full(len(f), c, dtype=np.int64) for c, f in enumerate(lists)]
            )
        keep = sample_indices(len(labels), cap, seed, labels) if cap else np.arange(len(labels))
        if batches:
            x = x[keep]
        else:
            x = np.empty((len(keep), 32, 32, 3), dtype=np.uint8)
            for i, file in enumerate(files[k] for k in keep):
                with Image.open(file) as im:  # grey or RGBA → RGB; another size → 32×32
                    x[i] = np.asarray(im.convert("RGB").resize((32, 32), Image.BILINEAR))
            x = x.transpose(0, 3, 1, 2)
    # a missing, cut or corrupt file: Pillow and pickle raise several types
    except Exception as err:
        raise DataLayoutError(
            f"{file}: unreadable ({type(err).__name__}: {err}). Replace or delete it (a downloaded "
            "folder is fetched again once deleted)."
        ) from err
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(labels[keep]), len(labels)


# %%
# @title CIFAR-10 3/3: both splits, capped by a seeded sample
def load_cifar10(folder, max_train=None, max_test=None, seed: int = 0) -> dict:
    """{x_train, y_train, x_test, y_test, n_train_available, n_test_available} from a located
    folder."""
    out = {}
    for split, cap in (("train", max_train), ("test", max_test)):
        out[f"x_{split}"], out[f"y_{split}"], out[f"n_{split}_available"] = read_cifar_split(
            folder, split, cap, seed
        )
    return out
