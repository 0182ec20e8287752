"""Synthetic covid_xray in the real layout (tests only): ``covid_xray/{train,test}/{COVID19,NORMAL,PNEUMONIA}``.

Small fake chest X-rays (PNG and JPEG, grayscale and RGB, varied sizes) whose class cues imitate the real
confound: COVID19 "adult" chests with bilateral hazy blobs and a bright publication marker in a corner;
NORMAL small clean chests; PNEUMONIA small chests with one dense patch. The file names follow the real
collection's, so that homework 3's patient grouping has something to group:

* NORMAL ``kermany_IM-<n>-0001`` and PNEUMONIA ``kermany_person<n>_bacteria_<m>`` (Kermany et al.); in the
  training split the first patients of each class have two images each;
* COVID19 ``ieee8023_covid-19-pneumonia-<n>-day<d>`` (Cohen et al.'s collection): a few patients are
  imaged on several days.

One test image is an exact copy of a training image under another name, so that the duplicate check finds
something. Patients never cross the train/test boundary. Each image gets its own smooth random texture, so
that only the planted copy is a near-duplicate. Writes about 100 images in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("COVID19", "NORMAL", "PNEUMONIA")
PER_CLASS = {"train": 24, "test": 10}


def _blob(h, w, cy, cx, ry, rx):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.exp(-(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2))


def _image(cls: str, rng) -> np.ndarray:
    w = int(rng.integers(72, 150))
    h = int(w * rng.uniform(0.85, 1.25))
    body = 0.75 if cls == "COVID19" else 0.6
    img = 0.1 + 0.45 * _blob(h, w, h * 0.55, w / 2, h * body, w * body * 0.75)
    for side in (-1, 1):  # dark lungs either side of a bright spine
        img -= 0.25 * _blob(h, w, h * 0.5, w / 2 + side * w * 0.2, h * 0.28, w * 0.12)
    img += 0.2 * _blob(h, w, h * 0.5, w / 2, h * 0.6, w * 0.04)
    if cls == "COVID19":
        for side in (-1, 1):
            img += 0.18 * _blob(h, w, h * rng.uniform(0.55, 0.7), w / 2 + side * w * rng.uniform(0.18, 0.26),
                                h * 0.1, w * 0.08)
        img[2:h // 8, 2:w // 8] = 0.95  # an annotation marker, as in figures cut from papers
    elif cls == "PNEUMONIA":
        side = rng.choice([-1, 1])
        img += 0.35 * _blob(h, w, h * rng.uniform(0.45, 0.65), w / 2 + side * w * 0.2, h * 0.09, w * 0.07)
    field = rng.uniform(-1, 1, size=(6, 6)).astype(np.float32)  # a smooth random texture: every image differs
    img += 0.15 * np.asarray(Image.fromarray(field, mode="F").resize((w, h), Image.Resampling.BICUBIC))
    img += rng.normal(0, 0.03, size=img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _stem(cls: str, split: str, i: int) -> str:
    """Real-style names; in train, images 0-3 belong to two patients (two images each)."""
    patient = (i // 2 if i < 4 else i) + (500 if split == "test" else 0)
    if cls == "NORMAL":
        return f"kermany_IM-{patient:04d}-{1 + (i % 2 if i < 4 else 0):04d}"
    if cls == "PNEUMONIA":
        return f"kermany_person{patient}_bacteria_{1000 + 10 * patient + i}"
    return f"ieee8023_covid-19-pneumonia-{patient}-day{i}"


def write(data_dir) -> Path:
    root = Path(data_dir) / "covid_xray"
    rng = np.random.default_rng(0)
    first_train = None
    for split, n in PER_CLASS.items():
        for ci, cls in enumerate(CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pil = Image.fromarray(_image(cls, rng))
                if i % 3 == 0:
                    pil = pil.convert("RGB")
                ext = ".jpeg" if (i + ci) % 2 else ".png"
                pil.save(folder / f"{_stem(cls, split, i)}{ext}")
                if first_train is None:
                    first_train = pil
    first_train.save(root / "test" / CLASSES[0] / "ieee8023_copy-of-a-training-image.png")  # a cross-split duplicate
    return root
