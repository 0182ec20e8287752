"""Synthetic dsb2018 in the real layout (tests only): ``dsb2018/{train,test}/{images,masks}/*.tif``.

Fluorescence-like grayscale images (uint8) with uint16 instance masks (0 = background, 1…N one label per
nucleus), zlib-compressed TIFFs of a few sizes, like the StarDist ``dsb2018`` subset. Elliptical nuclei of
random size and brightness on a dark background, blurred like a microscope would, plus noise; about a
third are placed against an earlier one (touching), as in real clumps, so the boundary class matters.
Learnable (a smoke run's U-Net finds the nuclei), but it says nothing about the real data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

N_IMAGES = {"train": 16, "test": 6}
SIZES = [(96, 96), (128, 96), (112, 144), (96, 128)]


def synthetic_nuclei(shape, n_nuclei: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic fluorescence image (uint8) and its uint16 instance mask (labels 1..N, no gaps)."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    mask = np.zeros(shape, np.uint16)
    signal = np.zeros(shape, np.float32)
    centres = []
    for label in range(1, n_nuclei + 1):
        ry, rx = rng.uniform(4, 9, size=2)
        if centres and rng.random() < 0.3:  # touching: next to an earlier nucleus
            cy, cx = centres[rng.integers(len(centres))]
            angle = rng.uniform(0, 2 * np.pi)
            cy, cx = cy + 1.6 * ry * np.sin(angle), cx + 1.6 * rx * np.cos(angle)
        else:
            cy, cx = rng.uniform(8, h - 8), rng.uniform(8, w - 8)
        centres.append((cy, cx))
        theta = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / rx
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ry
        inside = (u**2 + v**2 <= 1.0) & (mask == 0)
        mask[inside] = label
        signal[inside] = rng.uniform(0.35, 1.0) * (1.0 - 0.3 * (u[inside] ** 2 + v[inside] ** 2))
    labels = np.unique(mask[mask > 0])  # relabel 1..N (a fully covered nucleus would leave a gap)
    lut = np.zeros(int(mask.max()) + 1, np.uint16)
    lut[labels] = np.arange(1, len(labels) + 1)
    image = ndimage.gaussian_filter(signal, 1.2) + 0.04 + rng.normal(0, 0.02, size=shape)
    return np.clip(image * 255, 0, 255).astype(np.uint8), lut[mask]


def write(data_dir, n_images: dict | None = None, seed: int = 0) -> Path:
    """Write ``data_dir/dsb2018`` (train and test, images and masks of the same names); return that folder."""
    root = Path(data_dir) / "dsb2018"
    rng = np.random.default_rng(seed)
    for split, n in (n_images or N_IMAGES).items():
        for kind in ("images", "masks"):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, mask = synthetic_nuclei(SIZES[i % len(SIZES)], int(rng.integers(10, 20)), rng)
            name = f"synth_{split}_{i:03d}.tif"
            tifffile.imwrite(root / split / "images" / name, image, compression="zlib")
            tifffile.imwrite(root / split / "masks" / name, mask, compression="zlib")
    return root
