"""Synthetic MNIST in torchvision's raw idx layout (test data only; homework 5 runs on it in CI).

``write(data_dir)`` fills ``data_dir/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` with small
digit-like images: pen strokes per digit, drawn with a random rotation, shear, scale, shift and stroke width.
The ten classes differ, so a model learns something and every figure still shows digits; the numbers say
nothing about real MNIST. An idx file is a big-endian header (magic 0x0803 for uint8 images of 3
dimensions, 0x0801 for uint8 labels, then one 32-bit size per dimension) followed by the raw bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

N_TRAIN, N_TEST, SEED = 600, 200, 0
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _ellipse(cx, cy, rx, ry, n=28):
    t = np.linspace(0, 2 * np.pi, n)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


STROKES = {  # polylines in a unit box, x to the right and y downwards
    0: [_ellipse(0.5, 0.5, 0.26, 0.36)],
    1: [np.array([[0.38, 0.25], [0.52, 0.12], [0.52, 0.88]])],
    2: [np.array([[0.25, 0.3], [0.4, 0.14], [0.64, 0.14], [0.74, 0.3], [0.26, 0.85], [0.78, 0.85]])],
    3: [np.array([[0.25, 0.15], [0.7, 0.15], [0.45, 0.45], [0.72, 0.6], [0.65, 0.84], [0.25, 0.84]])],
    4: [np.array([[0.64, 0.88], [0.64, 0.12], [0.22, 0.62], [0.8, 0.62]])],
    5: [np.array([[0.75, 0.15], [0.32, 0.15], [0.3, 0.45], [0.64, 0.45], [0.74, 0.65], [0.6, 0.86], [0.25, 0.82]])],
    6: [np.array([[0.64, 0.12], [0.36, 0.45], [0.32, 0.7], [0.5, 0.87], [0.7, 0.7], [0.6, 0.52], [0.33, 0.57]])],
    7: [np.array([[0.22, 0.15], [0.78, 0.15], [0.42, 0.88]])],
    8: [_ellipse(0.5, 0.3, 0.19, 0.16), _ellipse(0.5, 0.68, 0.23, 0.2)],
    9: [_ellipse(0.5, 0.33, 0.2, 0.18), np.array([[0.7, 0.35], [0.62, 0.88]])],
}
POINTS = {label: np.concatenate([a + np.linspace(0, 1, 2 + int(30 * np.hypot(*(b - a))))[:, None] * (b - a)
                                 for line in lines for a, b in zip(line[:-1], line[1:])]) - 0.5
          for label, lines in STROKES.items()}  # about two points per pixel of stroke
GRID = np.stack(np.meshgrid(np.arange(28.0), np.arange(28.0), indexing="xy"), -1).reshape(-1, 2)


def draw_digit(label: int, rng: np.random.Generator) -> np.ndarray:
    """The strokes of `label` with a random affine jitter, rasterised into a 28×28 uint8 image."""
    angle, scale, shear = rng.uniform(-0.25, 0.25), rng.uniform(0.8, 1.05), rng.uniform(-0.25, 0.25)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = POINTS[int(label)] @ (rot @ np.array([[1.0, shear], [0.0, 1.0]])).T * scale * 20 + 14
    pts = pts + rng.uniform(-1.5, 1.5, 2)
    d2 = ((GRID ** 2).sum(1)[:, None] + (pts ** 2).sum(1)[None] - 2 * GRID @ pts.T).min(1).clip(0)  # squared distance
    img = np.clip(1.6 * np.exp(-d2 / (2 * rng.uniform(0.9, 1.5) ** 2)), 0, 1)
    return (img.reshape(28, 28) * 255).astype(np.uint8)


def write_idx(path, array) -> None:
    """A uint8 array as an uncompressed idx file (the format torchvision's MNIST reads from raw/)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    Path(path).write_bytes(header + array.tobytes())


def write(data_dir, n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = SEED) -> Path:
    """Write data_dir/MNIST/raw/ (balanced classes in a shuffled order); return data_dir/MNIST."""
    rng = np.random.default_rng(seed)
    raw = Path(data_dir) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        images, label_file = FILES[split]
        write_idx(raw / images, np.stack([draw_digit(y, rng) for y in labels]))
        write_idx(raw / label_file, labels)
    return raw.parent
