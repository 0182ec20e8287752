"""After the smoke runs: each notebook wrote its results JSON with the contract's keys.

Runs last (see conftest). A notebook not executed in this session (``pytest tests/``) is skipped.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import NOTEBOOKS

# The contract's metric keys (shared/DESIGN.md, "Results").
METRIC_KEYS = {
    "homework_1": {"test_accuracy", "best_epoch", "epochs_run", "sweep"},
    "homework_2": {
        "test_accuracy", "val_accuracy_cnn", "val_accuracy_resnet", "schedules", "train_seconds",
    },
    "homework_3": {"scratch", "imagenet", "radimagenet"},
    "homework_4": {
        "seg_iou", "seg_dice", "seg_ap50", "denoise_sigma",
        "denoise_psnr_input", "denoise_psnr_unet", "denoise_psnr_baseline",
    },
    "homework_5": {"test_neg_elbo", "test_nll_iwae", "iwae_k"},
}
FRACTIONS = {"test_accuracy", "val_accuracy_cnn", "val_accuracy_resnet", "val_accuracy_mlp",
             "seg_iou", "seg_dice", "seg_ap50",
             "macro_f1", "val_accuracy"}


def _fractions_ok(obj, path="metrics"):
    """Every key the contract calls a fraction lies in [0, 1], wherever it is nested."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in FRACTIONS:
                assert isinstance(v, int | float) and 0.0 <= v <= 1.0, f"{path}.{k} = {v!r} is not in [0, 1]"
            _fractions_ok(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _fractions_ok(v, f"{path}[{i}]")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_results_json(name, results_dir, notebooks_run):
    if name not in notebooks_run:
        pytest.skip(f"{name} was not executed in this session (run a bare `pytest`)")
    stem = name.removesuffix(".ipynb")
    path = results_dir / f"{stem}.json"
    assert path.exists(), f"{name} ran but wrote no {path.name} into DLCV_RESULTS_DIR"
    data = json.loads(path.read_text())
    assert data["notebook"] == stem
    assert data["profile"] == "smoke"
    assert data["device"] in {"cpu", "cuda", "mps"}
    assert isinstance(data["torch"], str) and data["torch"]
    assert data["data_source"] == "synthetic", "the tests' data carries a SYNTHETIC file: the finder must see it"
    assert isinstance(data["seconds"], int | float) and 0 < data["seconds"] < 3600
    missing = METRIC_KEYS[stem] - set(data["metrics"])
    assert not missing, f"{path.name} lacks the contract's metric keys {sorted(missing)}"
    _fractions_ok(data["metrics"])
    _finite(data["metrics"], f"{path.name}: metrics")
    assert data["precision"] in {"fp32", "bf16", "fp16"}, f"{path.name}: precision {data.get('precision')!r}"
    lessons = data["lessons"]
    assert isinstance(lessons, dict) and lessons, f"{path.name}: no lessons recorded (contract v2, 'Lessons')"
    for key, lesson in lessons.items():
        assert isinstance(lesson.get("evidence"), str) and lesson["evidence"].strip(), f"lesson {key}: no evidence"
        if lesson.get("unavailable"):
            assert lesson["holds"] is None, f"lesson {key} is unavailable, so it neither held nor failed"
        else:
            assert isinstance(lesson["holds"], bool), f"lesson {key}: holds must be true or false"
    RELATIONS.get(stem, lambda m: None)(data["metrics"])


def _finite(obj, path):
    """Every number, at every depth, is finite."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _finite(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _finite(v, f"{path}[{i}]")
    elif isinstance(obj, float):
        assert math.isfinite(obj), f"{path} is {obj}"


def _homework_4(m):
    """Gaussian noise of std σ on [0, 1] images: PSNR = −20·log10 σ, or higher when clipping to [0, 1] (it can
    only move a noisy value closer to the clean one)."""
    expected = -20 * math.log10(m["denoise_sigma"])
    if m.get("denoise_input_clipped"):
        assert m["denoise_psnr_input"] >= expected - 0.3, (m["denoise_psnr_input"], expected)
    else:
        assert abs(m["denoise_psnr_input"] - expected) <= 0.3, (m["denoise_psnr_input"], expected)


def _homework_5(m):
    """The importance-weighted bound is at least as tight as the ELBO (up to Monte-Carlo noise)."""
    assert m["test_nll_iwae"] <= m["test_neg_elbo"] + 0.5, (m["test_nll_iwae"], m["test_neg_elbo"])


RELATIONS = {"homework_4": _homework_4, "homework_5": _homework_5}
