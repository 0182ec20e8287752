"""Unit tests of homework_1's own definitions (its `lib` cells), against independent references."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from nbload import load_lib
from PIL import Image


@pytest.fixture(scope="module")
def hw():
    return load_lib("homework_1")


def write_layout(root, hw, per_class=2, size=32, classes=None, splits=("train", "test")):
    """A tiny folder in the contract layout, with random RGB PNGs."""
    rng = np.random.default_rng(0)
    for split in splits:
        for name in classes or hw.CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def tiny_data(hw, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % 10
    mean, std = hw.channel_stats(x)
    return {"x_train": x, "y_train": y, "x_val": x[:20], "y_val": y[:20], "mean": mean, "std": std}


# ---------------------------------------------------------------- data: layout and bad input


def test_stratified_split_matches_sklearn_counts(hw):
    from sklearn.model_selection import train_test_split

    labels = np.repeat(np.arange(10), [50, 60, 70, 80, 90, 100, 110, 120, 130, 140])
    train, val = hw.stratified_split(labels, 0.2, seed=3)
    _, ref_val = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    np.testing.assert_array_equal(np.bincount(labels[val]), np.bincount(labels[ref_val]))
    again = hw.stratified_split(labels, 0.2, seed=3)
    np.testing.assert_array_equal(val, again[1])
    assert not np.array_equal(val, hw.stratified_split(labels, 0.2, seed=4)[1])


def test_stratified_sample_is_not_the_first_n(hw):
    labels = np.repeat(np.arange(10), 100)
    idx = hw.stratified_sample(labels, 55, seed=0)
    assert len(idx) == len(np.unique(idx)) == 55
    assert np.bincount(labels[idx], minlength=10).min() >= 5
    assert not np.array_equal(idx[:5], np.arange(5))


def test_channel_stats_and_normalize_match_numpy(hw):
    x = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    mean, std = hw.channel_stats(x, chunk=7)
    ref = x.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(mean.numpy(), ref.mean((0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(std.numpy(), ref.std((0, 2, 3)), rtol=1e-5)
    z = hw.normalize(x, mean, std).double().numpy()
    np.testing.assert_allclose(z.mean((0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(z.std((0, 2, 3)), 1, atol=1e-4)


# ---------------------------------------------------------------- augmentation


def test_crop_flip_outputs_are_windows_of_the_padded_image(hw):
    from torchvision.transforms.functional import hflip

    x = torch.randn(16, 3, 8, 8)
    out = hw.random_crop_flip(x, pad=2, flip=True, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = 0
    for i in range(len(x)):
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy, dx in itertools.product(range(5), range(5))]
        plain = any(torch.equal(out[i], w) for w in windows)
        mirrored = any(torch.equal(out[i], hflip(w)) for w in windows)
        assert plain or mirrored, f"image {i} is not a (flipped) crop"
        flips += mirrored and not plain
    assert 0 < flips < len(x), "about half the images should be flipped"
    assert torch.equal(hw.random_crop_flip(x, 0, False), x)


# ---------------------------------------------------------------- model and training


def test_mlp_parameter_count_by_hand(hw):
    model = hw.MLP((64, 32), batchnorm=True, dropout=0.1)
    expected = 3072 * 64 + 2 * 64 + 64 * 32 + 2 * 32 + 32 * 10 + 10
    assert hw.count_parameters(model) == expected
    plain = hw.MLP((64,))
    assert hw.count_parameters(plain) == 3072 * 64 + 64 + 64 * 10 + 10
    assert plain(torch.randn(5, 3, 32, 32)).shape == (5, 10)


def test_lr_schedule(hw):
    assert hw.lr_factor(0.5, "constant", 0.1) == 1.0
    assert hw.lr_factor(0.0, "cosine", 0.1) < 0.02
    assert hw.lr_factor(0.1, "cosine", 0.1) == pytest.approx(1.0)
    assert hw.lr_factor(0.55, "cosine", 0.1) == pytest.approx(0.5)
    assert hw.lr_factor(1.0, "cosine", 0.1) == pytest.approx(0.0, abs=1e-12)


def test_training_is_deterministic_on_cpu(hw):
    data = tiny_data(hw)
    recipe = dict(hw.CONFIGS["smoke"]["recipe"], widths=(16,), batch_size=8)
    runs = [hw.train_recipe(recipe, data, max_epochs=2, seed=1, progress_bar=False) for _ in range(2)]
    assert runs[0][1]["val_loss"] == runs[1][1]["val_loss"]
    for a, b in zip(runs[0][0].state_dict().values(), runs[1][0].state_dict().values()):
        assert torch.equal(a, b)


def test_early_stopping_restores_the_best_weights(hw):
    data = tiny_data(hw)
    data["x_val"], data["y_val"] = data["x_train"][20:], data["y_train"][20:]  # unseen: noise labels
    recipe = dict(widths=(64,), lr=3e-3, weight_decay=0.0, batch_size=10, schedule="constant")
    model, hist = hw.train_recipe(recipe, data, max_epochs=40, patience=2, progress_bar=False)
    assert hist["stop_reason"] == "patience" and hist["epochs_run"] == hist["best_epoch"] + 2
    assert hist["best_val_acc"] == max(hist["val_acc"])
    _, acc = hw.evaluate(model, data["x_val"], data["y_val"], data["mean"], data["std"], 64)
    assert acc == pytest.approx(hist["best_val_acc"])


def test_time_budget_stops_after_at_least_one_step(hw):
    _, hist = hw.train_recipe(dict(widths=(8,), lr=1e-3, weight_decay=0.0, batch_size=4), tiny_data(hw),
                              max_epochs=50, seconds=1e-9, progress_bar=False)
    assert hist["epochs_run"] == 1 and hist["stop_reason"] == "time budget"


@pytest.mark.parametrize("profile", ["cpu", "full"])
def test_profile_models_build_and_take_a_step(hw, profile):
    cfg = hw.CONFIGS[profile]
    data = tiny_data(hw, n=4)
    recipes = [cfg["recipe"], dict(cfg["recipe"], widths=cfg["overfit_widths"])]
    for recipe in recipes:
        recipe = dict(recipe, batch_size=2)
        model, hist = hw.train_recipe(recipe, data, max_epochs=1, progress_bar=False)
        assert hist["epochs_run"] == 1 and np.isfinite(hist["train_loss"][0])
    for config in hw.sample_configs(cfg["sweep_space"], cfg["sweep_trials"], cfg["seed"]):
        assert set(config) <= set(cfg["recipe"]), "the search varies recipe keys only"
    assert cfg["final_epochs"] >= 1 and cfg["explore_size"] >= cfg["overfit_size"]


# ---------------------------------------------------------------- search, ablation, evaluation


def test_sample_configs(hw):
    space = {"lr": [1e-3, 1e-2], "widths": [(8,), (16, 8)], "batch_size": [32, 64, 128]}
    picks = hw.sample_configs(space, 5, seed=0)
    assert len(picks) == 5 and len({json.dumps(hw.jsonable(p), sort_keys=True) for p in picks}) == 5
    assert all(p[k] in space[k] for p in picks for k in space)
    assert picks == hw.sample_configs(space, 5, seed=0)
    assert len(hw.sample_configs(space, 100, seed=0)) == 12
    json.dumps(hw.jsonable({"widths": (8, 4), "lr": np.float64(0.1)}))


def test_ablation_changes_one_ingredient_at_a_time(hw):
    recipe = hw.CONFIGS["cpu"]["recipe"]
    variants = hw.ablation_recipes(recipe, (16,))
    assert variants["chosen recipe"] == recipe
    changed = {name: {k for k in recipe if v[k] != recipe[k]} for name, v in variants.items()}
    assert changed["− batch norm"] == {"batchnorm"} and changed["− dropout"] == {"dropout"}
    assert changed["− crop + flip"] == {"crop_pad", "flip"} and changed["− width/depth"] == {"widths"}
    assert len(changed["plain MLP (none)"]) == 6


def test_confusion_matrix_matches_sklearn(hw):
    from sklearn.metrics import confusion_matrix

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 10, 300), rng.integers(0, 10, 300)
    np.testing.assert_array_equal(hw.confusion_matrix(y, p, 10), confusion_matrix(y, p, labels=range(10)))
