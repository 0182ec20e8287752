"""Unit tests of homework_1's own definitions (its `lib` cells), against independent references."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nbload import load_lib


@pytest.fixture(scope="module")
def hw():
    return load_lib("homework_1")


def tiny_data(hw, n=40, seed=0, n_val=20):
    """Random uint8 images with labels 0..9 in turn; validation = the first `n_val` (fine for unit tests)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % 10
    mean, std = hw.channel_stats(x)
    return {"x_train": x, "y_train": y, "x_val": x[:n_val], "y_val": y[:n_val], "mean": mean, "std": std}


# ---------------------------------------------------------------- data: split, random samples, normalisation


def test_stratified_split_matches_sklearn_counts(hw):
    from sklearn.model_selection import train_test_split

    labels = np.repeat(np.arange(10), [50, 60, 70, 80, 90, 100, 110, 120, 130, 140])  # sorted by class
    train, val = hw.stratified_split(labels, 190, seed=3)
    _, ref_val = train_test_split(np.arange(len(labels)), test_size=190, stratify=labels, random_state=0)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    np.testing.assert_array_equal(np.bincount(labels[val]), np.bincount(labels[ref_val]))
    np.testing.assert_array_equal(val, hw.stratified_split(labels, 190, seed=3)[1])
    assert not np.array_equal(val, hw.stratified_split(labels, 190, seed=4)[1])
    first_of_class = [np.flatnonzero(labels == c)[0] for c in range(10)]
    assert not set(first_of_class) <= set(val), "a random sample, not the first items of each class"


def test_subset_of_class_sorted_data_keeps_every_class(hw):
    """A first-N subset of a class-sorted training set would hold one or two classes."""
    y = torch.arange(10).repeat_interleave(50)
    data = {"x_train": torch.arange(500), "y_train": y}
    part = hw.subset(data, 100, seed=0)
    np.testing.assert_array_equal(np.bincount(part["y_train"].numpy(), minlength=10), [10] * 10)
    assert torch.equal(part["y_train"], y[part["x_train"]]), "images and labels are drawn together"
    assert not torch.equal(part["x_train"][:10], torch.arange(10))
    assert torch.equal(hw.subset(data, 100, seed=0)["x_train"], part["x_train"])


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


# ---------------------------------------------------------------- model


def test_mlp_parameter_count_by_hand(hw):
    model = hw.MLP((64, 32), batchnorm=True, dropout=0.1)
    expected = 3072 * 64 + 2 * 64 + 64 * 32 + 2 * 32 + 32 * 10 + 10
    assert hw.count_parameters(model) == expected
    plain = hw.MLP((64,))
    assert hw.count_parameters(plain) == 3072 * 64 + 64 + 64 * 10 + 10
    assert plain(torch.randn(5, 3, 32, 32)).shape == (5, 10)


def test_timing_twin_has_the_mlps_layers(hw):
    """The run-setup cell times `timing_twin` for the precision choice: it must cost what the MLP costs."""
    recipe = hw.CONFIGS["cpu"]["recipe"]
    twin, mlp = hw.timing_twin(recipe), hw.build_model(recipe)
    assert hw.count_parameters(twin) == hw.count_parameters(mlp)
    assert Counter(tuple(p.shape) for p in twin.parameters()) == Counter(tuple(p.shape) for p in mlp.parameters())


def test_tapered_widths(hw):
    assert hw.tapered(1024, 1) == (1024,)
    assert hw.tapered(1024, 3) == (1024, 512, 256)
    assert hw.tapered(32, 3) == (32, 16, 16)


# ---------------------------------------------------------------- training


def test_lr_schedule(hw):
    assert hw.lr_factor(0.5, "constant", 0.1) == 1.0
    assert hw.lr_factor(0.0, "cosine", 0.1) < 0.02
    assert hw.lr_factor(0.1, "cosine", 0.1) == pytest.approx(1.0)
    assert hw.lr_factor(0.55, "cosine", 0.1) == pytest.approx(0.5)
    assert hw.lr_factor(1.0, "cosine", 0.1) == pytest.approx(0.0, abs=1e-12)


def test_training_is_deterministic_on_cpu(hw):
    """The `cpu` recipe (tiny widths and batch), trained twice with the same seed: the same numbers."""
    data = tiny_data(hw)
    recipe = dict(hw.CONFIGS["cpu"]["recipe"], widths=(16, 8), batch_size=8)
    runs = [hw.train_recipe(recipe, data, steps=12, eval_every=4, seed=1) for _ in range(2)]
    for key in ("val_loss", "val_acc", "train_loss", "step_loss"):
        assert runs[0][1][key] == runs[1][1][key], key
    for a, b in zip(runs[0][0].state_dict().values(), runs[1][0].state_dict().values()):
        assert torch.equal(a, b)


def test_fit_counts_steps_and_each_pass_sees_every_image_once(hw, monkeypatch):
    data = tiny_data(hw, n=40)
    data["x_train"] = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 3, 32, 32).contiguous()
    seen = []
    real = hw.normalize

    def spy(x, mean, std):
        if x.shape[0] == 8:  # training batches; validation uses eval_batch_size
            seen.append(x[:, 0, 0, 0].tolist())
        return real(x, mean, std)

    monkeypatch.setattr(hw, "normalize", spy)
    recipe = dict(widths=(8,), lr=1e-3, weight_decay=0.0, batch_size=8)
    _, hist = hw.train_recipe(recipe, data, steps=12, eval_every=5, eval_batch_size=20)
    assert hist["steps_run"] == 12 and hist["step"] == [5, 10, 12] and len(hist["step_loss"]) == 12
    assert hist["epochs_run"] == pytest.approx(12 / 5) and hist["epoch"] == pytest.approx([1, 2, 12 / 5])
    assert len(seen) == 12
    for k in (0, 5):  # two full passes of 5 batches
        assert sorted(sum(seen[k:k + 5], [])) == list(range(40))
    assert seen[0:5] != seen[5:10], "a new permutation each pass"


def test_fit_without_validation_data_only_trains(hw):
    data = {k: v for k, v in tiny_data(hw).items() if not k.endswith("_val")}
    _, hist = hw.train_recipe(dict(widths=(8,), lr=1e-3, weight_decay=0.0, batch_size=8), data, steps=7)
    assert hist["steps_run"] == 7 and hist["val_acc"] == [] and hist["best_step"] is None


def test_early_stopping_restores_the_best_weights(hw):
    data = tiny_data(hw)
    data["x_val"], data["y_val"] = data["x_train"][20:], data["y_train"][20:]  # unseen: noise labels
    recipe = dict(widths=(64,), lr=3e-3, weight_decay=0.0, batch_size=10, schedule="constant")
    model, hist = hw.train_recipe(recipe, data, steps=160, eval_every=4, patience=2)
    assert hist["stop_reason"] == "patience" and len(hist["val_acc"]) == hist["best_eval"] + 2
    assert hist["best_val_acc"] == max(hist["val_acc"]) == hist["val_acc"][hist["best_eval"] - 1]
    _, acc = hw.evaluate(model, data["x_val"], data["y_val"], data["mean"], data["std"], 64)
    assert acc == pytest.approx(hist["best_val_acc"])


@pytest.mark.parametrize("profile", ["cpu", "full"])
def test_profile_models_build_and_take_a_step(hw, profile):
    cfg = hw.CONFIGS[profile]
    data = tiny_data(hw, n=4, n_val=2)
    biggest = hw.tapered(max(cfg["arch_widths"]), max(cfg["arch_depths"]))
    for widths in (cfg["recipe"]["widths"], cfg["overfit_widths"], biggest):
        recipe = dict(cfg["recipe"], widths=widths)
        model, hist = hw.train_recipe(dict(recipe, batch_size=2), data, steps=1)
        assert hist["steps_run"] == 1 and np.isfinite(hist["train_loss"][0])
    for config in hw.sample_configs(cfg["search_space"], cfg["search_trials"], cfg["seed"]):
        assert set(config) <= set(cfg["recipe"]), "the search varies recipe keys only"
    assert cfg["explore_size"] >= cfg["overfit_size"] and cfg["final_steps"] % cfg["final_eval_every"] == 0


def test_bf16_training_step_on_cpu(hw):
    data = tiny_data(hw, n=8, n_val=4)
    precision = {"amp_dtype": torch.bfloat16, "scaler": False}
    _, hist = hw.train_recipe(dict(hw.RECIPE, widths=(16,), batch_size=4), data, steps=2, precision=precision)
    assert np.isfinite(hist["val_loss"][0]) and 0 <= hist["val_acc"][0] <= 1


# ---------------------------------------------------------------- the noise rule, the search, the ablation


def test_beyond_noise_is_two_standard_errors(hw):
    assert hw.NOISE_SES == 2
    margin = 2 * math.sqrt(0.55 * 0.45 / 2000)  # worked by hand: 0.0222
    assert hw.beyond_noise(0.55, 0.52, 2000) == (True, pytest.approx(margin))
    assert hw.beyond_noise(0.55, 0.535, 2000)[0] is False
    assert hw.beyond_noise(0.52, 0.55, 2000)[0] is False, "a worse model never beats"


def test_choose_smallest_tie(hw):
    rows = [dict(name="big", parameters=100, val_accuracy=0.560), dict(name="mid", parameters=50, val_accuracy=0.550),
            dict(name="small", parameters=10, val_accuracy=0.500)]
    assert hw.choose_smallest_tie(rows, 2000)["name"] == "mid"  # 0.010 < 0.0222: a tie, and cheaper
    assert hw.choose_smallest_tie(rows, 200000)["name"] == "big"  # a large validation set resolves it


def test_sample_configs_log_uniform_and_uniform(hw):
    space = {"lr": ("log", 1e-4, 1e-1), "dropout": ("uniform", 0.0, 0.5)}
    picks = hw.sample_configs(space, 400, seed=0)
    assert picks == hw.sample_configs(space, 400, seed=0) and picks != hw.sample_configs(space, 400, seed=1)
    lrs = np.array([p["lr"] for p in picks])
    assert lrs.min() >= 1e-4 and lrs.max() <= 1e-1 and len(set(lrs.tolist())) > 300
    below = (lrs < math.sqrt(1e-4 * 1e-1)).mean()  # the geometric midpoint halves a log-uniform draw
    assert 0.4 < below < 0.6, below  # a uniform draw would put 3 % there
    drops = np.array([p["dropout"] for p in picks])
    assert 0.4 < (drops < 0.25).mean() < 0.6 and drops.min() >= 0 and drops.max() <= 0.5
    with pytest.raises(ValueError, match="unknown scale"):
        hw.sample_configs({"lr": ("grid", 1, 2)}, 1, seed=0)


def test_ablation_changes_one_ingredient_at_a_time(hw):
    recipe = hw.CONFIGS["cpu"]["recipe"]
    variants = hw.ablation_recipes(recipe)
    assert len(variants) == len(hw.INGREDIENTS) + 1
    changed = {name: {k for k in recipe if v[k] != recipe[k]} for name, v in variants.items()}
    assert changed["− batch norm"] == {"batchnorm"} and changed["− dropout"] == {"dropout"}
    assert changed["− crop + flip"] == {"crop_pad", "flip"} and changed["− weight decay"] == {"weight_decay"}
    everything = {"batchnorm", "dropout", "weight_decay", "crop_pad", "flip", "label_smoothing"}
    assert changed["plain MLP (none)"] == everything
    pruned = hw.prune_recipe(recipe, ["dropout", "label smoothing"])
    assert pruned == dict(recipe, dropout=0.0, label_smoothing=0.0) and hw.prune_recipe(recipe, []) == recipe


def test_ablation_decision_by_the_noise_rule(hw):
    # 2 standard errors at 0.55 on 2,000 images = 0.0222 (by hand)
    assert hw.ablation_decision(0.55, 0.52, "dropout", 2000) == "helps"
    assert hw.ablation_decision(0.55, 0.58, "dropout", 2000) == "hurts"
    assert hw.ablation_decision(0.55, 0.54, "dropout", 2000) == "tie: kept (regulariser)"
    assert hw.ablation_decision(0.55, 0.54, "batch norm", 2000) == "tie: dropped"
    assert hw.ablation_decision(0.55, 0.58, "batch norm", 2000) == "hurts"
    assert set(hw.REGULARISERS) == set(hw.INGREDIENTS) - {"batch norm"}


def test_confusion_matrix_matches_sklearn(hw):
    from sklearn.metrics import confusion_matrix

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 10, 300), rng.integers(0, 10, 300)
    np.testing.assert_array_equal(hw.confusion_matrix(y, p, 10), confusion_matrix(y, p, labels=range(10)))


# ---------------------------------------------------------------- the exercises' checks: pass on the solution,
# fail with their hint on a plausible wrong implementation


def test_checks_pass_on_the_notebooks_solutions(hw, capsys):
    hw.check_stratified_split(hw.stratified_split)
    hw.check_mlp_forward(hw.MLP)
    hw.check_train_step(hw.train_step)
    hw.check_early_stopping(hw.EarlyStopping)
    hw.check_confusion_matrix(hw.confusion_matrix)
    assert capsys.readouterr().out.count("✓ Exercise 1.") == 5


def test_a_missing_solution_is_not_reported_as_a_wrong_one(hw):
    def stub(*args):
        raise NotImplementedError("Exercise 1.1: stratified split — write your code here")

    with pytest.raises(NotImplementedError, match="Exercise 1.1"):
        hw.check_stratified_split(stub)


def first_n_split(labels, n_val, seed):
    labels = np.asarray(labels)
    quota = {c: round(n_val * (labels == c).mean()) for c in np.unique(labels)}
    val = np.concatenate([np.flatnonzero(labels == c)[:k] for c, k in quota.items()])
    return np.setdiff1d(np.arange(len(labels)), val), val


def unstratified_split(labels, n_val, seed):
    val = np.sort(np.random.default_rng(seed).choice(len(labels), size=n_val, replace=False))
    return np.setdiff1d(np.arange(len(labels)), val), val


def overlapping_split(labels, n_val, seed):
    _, val = unstratified_split(labels, n_val, seed)
    return np.arange(len(labels)), val


def unseeded_split(labels, n_val, seed):
    labels, rng = np.asarray(labels), np.random.default_rng()
    val = np.concatenate([rng.choice(np.flatnonzero(labels == c), round(n_val * (labels == c).mean()), replace=False)
                          for c in np.unique(labels)])
    return np.setdiff1d(np.arange(len(labels)), val), val


@pytest.mark.parametrize("wrong, hint", [
    (first_n_split, "rng.choice"),
    (unstratified_split, "draw from each class separately"),
    (overlapping_split, "complement of val"),
    (unseeded_split, "not from np.random"),
])
def test_split_check_catches(hw, wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        hw.check_stratified_split(wrong)


def _mlp_variant(hw, forward):
    return type("WrongMLP", (hw.MLP,), {"forward": forward})


def relu_before_norm(self, x):
    h = x.flatten(1)
    for linear, norm in zip(self.linears, self.norms):
        h = self.dropout(norm(F.relu(linear(h))))
    return self.head(h)


def no_dropout(self, x):
    h = x.flatten(1)
    for linear, norm in zip(self.linears, self.norms):
        h = F.relu(norm(linear(h)))
    return self.head(h)


def no_flatten(self, x):
    h = x
    for linear, norm in zip(self.linears, self.norms):
        h = self.dropout(F.relu(norm(linear(h))))
    return self.head(h)


def relu_on_logits(self, x):
    h = x.flatten(1)
    for linear, norm in zip(self.linears, self.norms):
        h = self.dropout(F.relu(norm(linear(h))))
    return F.relu(self.head(h))


def detached_head(self, x):
    h = x.flatten(1)
    for linear, norm in zip(self.linears, self.norms):
        h = self.dropout(F.relu(norm(linear(h))))
    return self.head(h.detach())


@pytest.mark.parametrize("forward, hint", [
    (relu_before_norm, "linear → norm → ReLU → dropout"),
    (no_dropout, "apply self.dropout"),
    (no_flatten, "raised RuntimeError"),
    (relu_on_logits, "no ReLU after self.head"),
    (detached_head, "do not .detach"),
])
def test_mlp_check_catches(hw, forward, hint):
    with pytest.raises(AssertionError, match=hint):
        hw.check_mlp_forward(_mlp_variant(hw, forward))


def _step(no_zero=False, smoothing=True, step=True, detach=True, argmax_dim=1):
    def train_step(model, opt, xb, yb, label_smoothing=0.0, amp_dtype=None, scaler=None):
        logits = model(xb)
        if not no_zero:
            opt.zero_grad()
        loss = F.cross_entropy(logits.float(), yb, label_smoothing=label_smoothing if smoothing else 0.0)
        loss.backward()
        if step:
            opt.step()
        correct = (logits.argmax(argmax_dim) == yb[: logits.shape[1 - argmax_dim]]).sum()
        return (loss.detach() if detach else loss), correct

    return train_step


@pytest.mark.parametrize("wrong, hint", [
    (_step(no_zero=True), r"zero the old gradients"),
    (_step(smoothing=False), r"label_smoothing=label_smoothing"),
    (_step(step=False), r"call loss.backward\(\), then opt.step\(\)"),
    (_step(detach=False), r"return loss.detach\(\)"),
    (_step(argmax_dim=0), r"argmax\(1\)"),
])
def test_train_step_check_catches(hw, wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        hw.check_train_step(wrong)


def _stopper(hw, clone=True, ties=False, off_by_one=False):
    class Wrong(hw.EarlyStopping):
        def update(self, epoch, val_acc, model):
            if val_acc > self.best_acc or (ties and val_acc == self.best_acc):
                self.best_acc, self.best_epoch = val_acc, epoch
                self.best_state = ({k: v.detach().clone() for k, v in model.state_dict().items()} if clone
                                   else model.state_dict())
            limit = self.patience + 1 if off_by_one and self.patience is not None else self.patience
            return limit is not None and epoch - self.best_epoch >= limit

    return Wrong


def _none_means_zero(hw):
    class Wrong(hw.EarlyStopping):  # patience=None read as 0: stops at once
        def update(self, epoch, val_acc, model):
            if val_acc > self.best_acc:
                self.best_acc, self.best_epoch = val_acc, epoch
                self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return epoch - self.best_epoch >= (self.patience or 0)

    return Wrong


@pytest.mark.parametrize("kind, hint", [
    ("no clone", r"clone\(\)"),
    ("ties", "strictly greater"),
    ("off by one", "epoch − best_epoch ≥ patience"),
    ("none", "never stop"),
])
def test_early_stopping_check_catches(hw, kind, hint):
    wrong = {"no clone": lambda: _stopper(hw, clone=False), "ties": lambda: _stopper(hw, ties=True),
             "off by one": lambda: _stopper(hw, off_by_one=True), "none": lambda: _none_means_zero(hw)}[kind]()
    with pytest.raises(AssertionError, match=hint):
        hw.check_early_stopping(wrong)


def transposed_cm(y_true, y_pred, n):
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_pred), np.asarray(y_true)), 1)
    return cm


def fancy_index_cm(y_true, y_pred, n):
    cm = np.zeros((n, n), dtype=np.int64)
    cm[np.asarray(y_true), np.asarray(y_pred)] += 1
    return cm


def no_minlength_cm(y_true, y_pred, n):
    k = max(int(np.max(y_true)), int(np.max(y_pred))) + 1
    return np.bincount(np.asarray(y_true) * k + np.asarray(y_pred), minlength=k * k).reshape(k, k)


@pytest.mark.parametrize("wrong, hint", [
    (transposed_cm, "rows are the true classes"),
    (fancy_index_cm, r"np.add.at"),
    (no_minlength_cm, "even for a class that never occurs"),
])
def test_confusion_matrix_check_catches(hw, wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        hw.check_confusion_matrix(wrong)
