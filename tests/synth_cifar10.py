"""Synthetic CIFAR-10 in the course layout (tests only): `cifar10/{train,test}/<class>/*.png`.

Each class is a stripe pattern at its own angle, frequency and colour with a random phase, brightness and
noise: an MLP learns it within a smoke run, but it says nothing about the real data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def image(label: int, rng: np.random.Generator) -> np.ndarray:
    """A 32×32×3 uint8 image of class `label`."""
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    angle = np.pi * label / len(CLASSES) + rng.normal(0, 0.08)
    wave = np.sin((0.35 + 0.05 * (label % 3)) * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 7))
    hue = np.array([np.cos(label), np.cos(label + 2.1), np.cos(label + 4.2)], dtype=np.float32)
    img = 128 + 60 * hue[:, None, None] * (wave[None] > 0) + rng.uniform(-30, 30) + rng.normal(0, 25, (3, 32, 32))
    return np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 0)


def write(data_dir, n_train: int = 40, n_test: int = 10, seed: int = 0) -> Path:
    """Write `n_train`/`n_test` PNGs per class under `data_dir/cifar10`; return that folder."""
    root, rng = Path(data_dir) / "cifar10", np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for label, name in enumerate(CLASSES):
            (folder := root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(image(label, rng)).save(folder / f"{i:04d}.png")
    return root
