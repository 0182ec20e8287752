"""Unit tests of homework_1's own definitions (its `lib` cells), against independent references."""

from __future__ import annotations

import itertools
import math

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


def train_recipe(hw, recipe, data, steps, eval_every=None, seed=0, **fit_kwargs):
    """The notebook's two halves of a run, without its store: the seeded model, then `fit`: (model, history)."""
    model = hw.seeded_model(recipe, data["x_train"].device, seed)
    return model, hw.fit(model, data, recipe, steps, eval_every, **fit_kwargs)


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


class NoFloat64(torch.Tensor):
    """A tensor that behaves like one on a device without float64 (Apple's MPS): any float64 result of an
    operation on it fails; `.cpu()` hands back a plain tensor, on which float64 is fine."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        if func in (torch.Tensor.cpu, torch.Tensor.numpy):
            return out.as_subclass(torch.Tensor) if isinstance(out, torch.Tensor) else out
        outs = out if isinstance(out, tuple | list) else (out,)
        assert not any(isinstance(o, torch.Tensor) and o.dtype == torch.float64 for o in outs), (
            f"{getattr(func, '__name__', func)} made a float64 tensor on the device")
        return out


def test_no_float64_stand_in_catches_a_float64_conversion():
    x = torch.zeros(2, 3, dtype=torch.uint8).as_subclass(NoFloat64)
    with pytest.raises(AssertionError, match="float64 tensor on the device"):
        x.to(torch.float64)
    with pytest.raises(AssertionError, match="float64 tensor on the device"):
        x.double().sum()
    assert x.cpu().double().dtype == torch.float64


def test_channel_stats_never_makes_float64_on_the_device(hw):
    x = torch.randint(0, 256, (20, 3, 4, 4), dtype=torch.uint8)
    mean, std = hw.channel_stats(x.as_subclass(NoFloat64), chunk=7)
    ref_mean, ref_std = hw.channel_stats(x)
    assert torch.equal(mean, ref_mean) and torch.equal(std, ref_std)


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


def test_crop_flip_outputs_are_windows_of_the_reflection_padded_image(hw):
    from torchvision.transforms.functional import hflip

    x = torch.randn(16, 3, 8, 8)
    out = hw.random_crop_flip(x, pad=2, flip=True, generator=torch.Generator().manual_seed(0))
    padded = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect"))
    flips, offsets = 0, set()
    for i in range(len(x)):
        windows = {(dy, dx): padded[i, :, dy:dy + 8, dx:dx + 8] for dy, dx in itertools.product(range(5), range(5))}
        plain = [k for k, w in windows.items() if torch.equal(out[i], w)]
        mirrored = [k for k, w in windows.items() if torch.equal(out[i], hflip(w))]
        assert plain or mirrored, f"image {i} is not a (flipped) crop"
        flips += bool(mirrored) and not plain
        offsets.add((plain or mirrored)[0])
    assert 0 < flips < len(x), "about half the images should be flipped"
    assert len(offsets) > 3, "the shifts differ from image to image"
    assert torch.equal(hw.random_crop_flip(x, 0, False), x)


# ---------------------------------------------------------------- model


def test_mlp_parameter_count_by_hand(hw):
    model = hw.MLP((64, 32), batchnorm=True, dropout=0.1)
    expected = 3072 * 64 + 2 * 64 + 64 * 32 + 2 * 32 + 32 * 10 + 10
    assert hw.count_parameters(model) == expected
    plain = hw.MLP((64,))
    assert hw.count_parameters(plain) == 3072 * 64 + 64 + 64 * 10 + 10
    assert plain(torch.randn(5, 3, 32, 32)).shape == (5, 10)


def test_mlp_matches_torch_functional(hw):
    """The forward pass against torch.nn.functional applied to the model's own parameters (eval mode)."""
    torch.manual_seed(0)
    model = hw.MLP((16, 8), n_classes=5, in_features=48, batchnorm=True, dropout=0.5).eval()
    for norm in model.norms:
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    x = torch.randn(6, 3, 4, 4)
    h = x.flatten(1)
    for linear, norm in zip(model.linears, model.norms):
        h = F.gelu(F.batch_norm(F.linear(h, linear.weight), norm.running_mean, norm.running_var, norm.weight,
                                norm.bias, eps=norm.eps))
    torch.testing.assert_close(model(x), F.linear(h, model.head.weight, model.head.bias))


def test_tapered_widths(hw):
    assert hw.tapered(1024, 1) == (1024,)
    assert hw.tapered(1024, 3) == (1024, 512, 256)
    assert hw.tapered(32, 3) == (32, 16, 16)


def test_shuffle_pixels_is_one_permutation_for_every_image_and_channel(hw):
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    out = hw.shuffle_pixels(x, perm)
    ref = x.numpy().reshape(4, 3, 64)[:, :, perm.numpy()].reshape(4, 3, 8, 8)
    np.testing.assert_array_equal(out.numpy(), ref)
    np.testing.assert_array_equal(np.sort(out.numpy().reshape(4, 3, -1)), np.sort(x.numpy().reshape(4, 3, -1)))


# ---------------------------------------------------------------- training


def test_lr_schedule(hw):
    assert hw.lr_factor(0.5, "constant", 0.1) == 1.0
    assert hw.lr_factor(0.0, "cosine", 0.1) < 0.02
    assert hw.lr_factor(0.1, "cosine", 0.1) == pytest.approx(1.0)
    assert hw.lr_factor(0.55, "cosine", 0.1) == pytest.approx(0.5)
    assert hw.lr_factor(1.0, "cosine", 0.1) == pytest.approx(0.0, abs=1e-12)


def test_fit_follows_the_schedule_and_evaluates_in_fp32(hw, monkeypatch):
    """lr at each evaluation = peak × lr_factor(steps done / steps); evaluation never runs under autocast."""
    data = tiny_data(hw)
    recipe = dict(widths=(8,), lr=1e-2, weight_decay=0.0, batch_size=8, schedule="cosine", warmup=0.2)
    seen = []
    real = hw.predict
    monkeypatch.setattr(hw, "predict", lambda *a: seen.append(torch.is_autocast_enabled("cpu")) or real(*a))
    monkeypatch.setenv("DLCV_PRECISION", "bf16")
    bf16 = hw.choose_precision(torch.device("cpu"), False)
    _, hist = train_recipe(hw, recipe, data, steps=10, eval_every=2, precision=bf16)
    assert hist["lr"] == pytest.approx([1e-2 * hw.lr_factor(s / 10, "cosine", 0.2) for s in (1, 3, 5, 7, 9)])
    assert seen and not any(seen)


def test_training_is_deterministic_on_cpu(hw):
    """The `cpu` recipe (tiny widths and batch), trained twice with the same seed: the same numbers."""
    data = tiny_data(hw)
    recipe = dict(hw.CONFIGS["cpu"]["recipe"], widths=(16, 8), batch_size=8)
    runs = [train_recipe(hw, recipe, data, steps=12, eval_every=4, seed=1) for _ in range(2)]
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
        if x.shape[0] == 8:  # training batches; evaluations use batches of eval_batch_size = 20
            seen.append(x[:, 0, 0, 0].tolist())
        return real(x, mean, std)

    monkeypatch.setattr(hw, "normalize", spy)
    recipe = dict(widths=(8,), lr=1e-3, weight_decay=0.0, batch_size=8)
    _, hist = train_recipe(hw, recipe, data, steps=12, eval_every=5, eval_batch_size=20)
    assert hist["steps_run"] == 12 and hist["step"] == [5, 10, 12] and len(hist["step_loss"]) == 12
    assert hist["epochs_run"] == pytest.approx(12 / 5) and hist["epoch"] == pytest.approx([1, 2, 12 / 5])
    assert len(seen) == 12
    for k in (0, 5):  # two full passes of 5 batches
        assert sorted(sum(seen[k:k + 5], [])) == list(range(40))
    assert seen[0:5] != seen[5:10], "a new permutation each pass"


def test_training_accuracy_is_measured_in_eval_mode_on_a_fixed_probe(hw):
    """train_acc = the accuracy of the current weights, in eval mode, on the same random training images
    (as many as there are validation images) at every evaluation; per-image scores are kept."""
    data = tiny_data(hw, n=40, n_val=10)
    recipe = dict(widths=(16,), batchnorm=True, dropout=0.5, lr=1e-3, weight_decay=0.0, batch_size=8)
    model, hist = train_recipe(hw, recipe, data, steps=6, eval_every=3)
    probe = torch.from_numpy(hw.sample_indices(40, 10, 0))
    loss, acc, hits = hw.evaluate(model, data["x_train"][probe], data["y_train"][probe], data["mean"], data["std"], 64)
    assert hist["train_acc"][-1] == acc and hist["train_loss"][-1] == pytest.approx(loss)
    np.testing.assert_array_equal(hist["train_hits"][-1], hits)
    assert len(hist["val_hits"][-1]) == 10 and hist["val_acc"][-1] == np.mean(hist["val_hits"][-1])


def test_history_is_kept_by_the_store_unchanged(hw):
    """The run store saves a history with torch.save and loads it with weights_only=True: no numpy inside."""
    import io

    model, hist = train_recipe(hw, dict(widths=(8,), lr=1e-3, weight_decay=0.0, batch_size=8), tiny_data(hw), steps=4,
                               eval_every=2, stopper=hw.EarlyStopping(None))
    buffer = io.BytesIO()
    torch.save(hist, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == hist


def test_fit_without_validation_data_only_trains(hw):
    data = {k: v for k, v in tiny_data(hw).items() if not k.endswith("_val")}
    _, hist = train_recipe(hw, dict(widths=(8,), lr=1e-3, weight_decay=0.0, batch_size=8), data, steps=7)
    assert hist["steps_run"] == 7 and hist["val_acc"] == [] and hist["best_step"] is None


def test_early_stopping_restores_the_best_weights(hw):
    data = tiny_data(hw)
    data["x_val"], data["y_val"] = data["x_train"][20:], data["y_train"][20:]  # unseen: noise labels
    recipe = dict(widths=(64,), lr=3e-3, weight_decay=0.0, batch_size=10, schedule="constant")
    model, hist = train_recipe(hw, recipe, data, steps=160, eval_every=4, stopper=hw.EarlyStopping(2))
    assert hist["stop_reason"] == "patience" and len(hist["val_acc"]) == hist["best_eval"] + 2
    assert hist["best_val_acc"] == max(hist["val_acc"]) == hist["val_acc"][hist["best_eval"] - 1]
    _, acc, hits = hw.evaluate(model, data["x_val"], data["y_val"], data["mean"], data["std"], 64)
    assert acc == pytest.approx(hist["best_val_acc"])
    np.testing.assert_array_equal(hits, hist["best_val_hits"])


@pytest.mark.parametrize("profile", ["cpu", "full"])
def test_profile_models_build_and_take_a_step(hw, profile):
    cfg = hw.CONFIGS[profile]
    data = tiny_data(hw, n=4, n_val=2)
    biggest = hw.tapered(max(cfg["arch_widths"]), max(cfg["arch_depths"]))
    for widths in (cfg["recipe"]["widths"], cfg["overfit_widths"], biggest):
        recipe = dict(cfg["recipe"], widths=widths)
        model, hist = train_recipe(hw, dict(recipe, batch_size=2), data, steps=1)
        assert hist["steps_run"] == 1 and np.isfinite(hist["train_loss"][0])
    for config in hw.sample_configs(cfg["search_space"], cfg["search_trials"], cfg["seed"]):
        assert set(config) <= set(cfg["recipe"]), "the search varies recipe keys only"
    assert cfg["short_steps"] * 4 <= cfg["final_steps"] and cfg["final_steps"] % 10 == 0


# ---------------------------------------------------------------- the fp16 path (a T4), run on the CPU


def _fp16(hw, monkeypatch):
    monkeypatch.setenv("DLCV_PRECISION", "fp16")
    precision = hw.choose_precision(torch.device("cpu"), False)
    assert precision["name"] == "fp16" and precision["amp_dtype"] == torch.float16
    return precision


def test_fp16_step_skipped_on_overflow_leaves_weights_and_schedule_alone(hw, monkeypatch):
    precision = _fp16(hw, monkeypatch)
    torch.manual_seed(0)
    model = hw.MLP((16,), in_features=12)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))
    scaler = hw.make_scaler(precision)
    x, y = torch.randn(8, 3, 2, 2), torch.arange(8) % 10
    before = [p.detach().clone() for p in model.parameters()]
    loss, _ = hw.train_step(model, x * 1e30, y, opt, scaler, scheduler, precision)  # fp16 overflows
    assert not torch.isfinite(loss)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "a skipped step moved the weights"
    assert scheduler.last_epoch == 0 and opt.param_groups[0]["lr"] == pytest.approx(1e-2)
    hw.train_step(model, x, y, opt, scaler, scheduler, precision)  # a normal batch: the step is taken
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scheduler.last_epoch == 1 and opt.param_groups[0]["lr"] == pytest.approx(5e-3)


def test_fp16_fit_does_not_advance_the_schedule_on_a_skipped_step(hw, monkeypatch):
    """The loop through the T4 path: the loss of step 3 is made infinite; the schedule then repeats a value."""
    precision = _fp16(hw, monkeypatch)
    calls = []

    class Overflow:  # torch.nn.functional, with the training loss of the third step made infinite
        def __getattr__(self, name):
            return getattr(F, name)

        @staticmethod
        def cross_entropy(*args, **kwargs):
            loss = F.cross_entropy(*args, **kwargs)
            if "label_smoothing" in kwargs:
                calls.append(1)
                return loss * float("inf") if len(calls) == 3 else loss
            return loss

    data = tiny_data(hw)
    recipe = dict(widths=(8,), lr=1e-2, weight_decay=0.0, batch_size=8, schedule="cosine", warmup=0.0)
    monkeypatch.setattr(hw, "F", Overflow())
    _, hist = train_recipe(hw, recipe, data, steps=6, eval_every=1, precision=precision)
    expected = [1e-2 * hw.lr_factor(done / 6, "cosine", 0.0) for done in (0, 1, 2, 2, 3, 4)]
    assert hist["lr"] == pytest.approx(expected)
    assert np.isfinite(hist["val_loss"]).all()


# ---------------------------------------------------------------- the noise rule, the search, the ablation


def test_choose_smallest_tie_uses_the_paired_rule(hw):
    """Worked by hand: `mid` differs from `big` on 12 of 2,000 images (8 worse, 4 better): d = 0.002, paired SE
    = 0.0017, so a tie, and the cheaper wins; `small` is 0.10 worse on 200 images: beyond noise."""
    big = np.r_[np.ones(1100), np.zeros(900)]
    mid = big.copy()
    mid[:8], mid[1100:1104] = 0, 1
    small = big.copy()
    small[:200] = 0
    rows = [dict(name="big", parameters=100, val_accuracy=big.mean(), hits=big),
            dict(name="mid", parameters=50, val_accuracy=mid.mean(), hits=mid),
            dict(name="small", parameters=10, val_accuracy=small.mean(), hits=small)]
    assert hw.choose_smallest_tie(rows)["name"] == "mid"
    rows[1]["hits"] = mid = big.copy()
    mid[:20] = 0  # 20 images worse, none better: d = 0.01 > 2 SE = 0.0044 (paired), a real difference
    assert hw.choose_smallest_tie(rows)["name"] == "big"


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


def test_ablation_decision_by_the_paired_rule_and_ties_go_to_the_simpler_recipe(hw):
    ref = np.r_[np.ones(600), np.zeros(400)]  # 0.60 on 1,000 images
    worse = ref.copy()
    worse[:80] = 0  # 0.52: 80 images worse, none better — far beyond noise
    swapped = ref.copy()
    swapped[:3], swapped[600:603] = 0, 1  # three images worse, three better: the same accuracy
    assert hw.ablation_decision(ref, worse) == "helps"
    assert hw.ablation_decision(worse, ref) == "hurts"
    assert hw.ablation_decision(ref, ref) == "tie: dropped"
    assert hw.ablation_decision(ref, swapped) == "tie: dropped"


# ---------------------------------------------------------------- the exercises' checks: pass on the solution,
# fail with a diagnosis on a plausible wrong implementation


def test_checks_pass_on_the_notebooks_solutions(hw, capsys):
    hw.check_stratified_split(hw.stratified_split)
    hw.check_mlp(hw.MLP)
    hw.check_train_step(hw.train_step)
    hw.check_early_stopping(hw.EarlyStopping)
    hw.check_experiment(hw.shuffle_pixels, "same", "an MLP has no notion of neighbouring pixels")
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


@pytest.mark.parametrize("wrong, diagnosis", [
    (first_n_split, "first of each class"),
    (unstratified_split, "per class; by hand"),
    (overlapping_split, "disjoint"),
    (unseeded_split, "same seed must give the same split"),
])
def test_split_check_catches(hw, wrong, diagnosis):
    with pytest.raises(hw.ExerciseError, match=diagnosis):
        hw.check_stratified_split(wrong)


def _mlp_variant(hw, forward=None, init=None):
    return type("WrongMLP", (hw.MLP,), {k: v for k, v in (("forward", forward), ("__init__", init)) if v})


def gelu_before_norm(self, x):
    h = x.flatten(1)
    for linear, norm in zip(self.linears, self.norms):
        h = self.dropout(norm(F.gelu(linear(h))))
    return self.head(h)


def relu_not_gelu(self, x):
    h = x.flatten(1)
    for linear, norm in zip(self.linears, self.norms):
        h = self.dropout(F.relu(norm(linear(h))))
    return self.head(h)


def no_nonlinearity(self, x):
    h = x.flatten(1)
    for linear, norm in zip(self.linears, self.norms):
        h = self.dropout(norm(linear(h)))
    return self.head(h)


def no_dropout(self, x):
    h = x.flatten(1)
    for linear, norm in zip(self.linears, self.norms):
        h = F.gelu(norm(linear(h)))
    return self.head(h)


def gelu_on_logits(self, x):
    h = x.flatten(1)
    for linear, norm in zip(self.linears, self.norms):
        h = self.dropout(F.gelu(norm(linear(h))))
    return F.gelu(self.head(h))


def detached_head(self, x):
    h = x.flatten(1)
    for linear, norm in zip(self.linears, self.norms):
        h = self.dropout(F.gelu(norm(linear(h))))
    return self.head(h.detach())


def _init(bias_before_norm=False, plain_list=False, every_width_from_input=False):
    """Wrong versions of MLP.__init__: a bias before batch norm, a plain list, every layer from the input."""
    def init(self, widths, n_classes=10, in_features=3072, batchnorm=False, dropout=0.0):
        torch.nn.Module.__init__(self)
        linears, norms, fan_in = [], [], in_features
        for width in widths:
            linears.append(torch.nn.Linear(fan_in, width, bias=bias_before_norm or not batchnorm))
            norms.append(torch.nn.BatchNorm1d(width) if batchnorm else torch.nn.Identity())
            fan_in = in_features if every_width_from_input else width
        self.linears = linears if plain_list else torch.nn.ModuleList(linears)
        self.norms = norms if plain_list else torch.nn.ModuleList(norms)
        self.dropout, self.head = torch.nn.Dropout(dropout), torch.nn.Linear(widths[-1], n_classes)
    return init


@pytest.mark.parametrize("forward, init, diagnosis", [
    (gelu_before_norm, None, r"batchnorm=True: logits"),
    (relu_not_gelu, None, r"batchnorm=False: logits"),
    (no_nonlinearity, None, r"batchnorm=False: logits"),
    (gelu_on_logits, None, r"batchnorm=False: logits .* by hand \[-3.1365, -1.1365\]"),
    (no_dropout, None, "no dropout"),
    (detached_head, None, "some parameters get no gradient"),
    (None, _init(bias_before_norm=True), r"batchnorm=True: 82 parameters; by formula 74"),
    (None, _init(plain_list=True), r"batchnorm=True: 8 parameters; by formula 74"),
    (None, _init(every_width_from_input=True), r"batchnorm=True: 80 parameters; by formula 74"),
])
def test_mlp_check_catches(hw, forward, init, diagnosis):
    with pytest.raises(hw.ExerciseError, match=diagnosis):
        hw.check_mlp(_mlp_variant(hw, forward, init))


def test_mlp_check_hint_does_not_give_the_code_away(hw):
    with pytest.raises(hw.ExerciseError) as err:
        hw.check_mlp(_mlp_variant(hw, gelu_before_norm))
    assert "F.gelu" not in str(err.value) and "flatten(1)" not in str(err.value)


def _step(hw, smoothing=True, step=True, twice=False, argmax_dim=1, plain_step=False):
    def train_step(model, xb, yb, opt, scaler, scheduler, precision, label_smoothing=0.0):
        logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb, label_smoothing=label_smoothing if smoothing else 0.0)
        if plain_step:
            opt.step()  # forgot the backward pass and the helper
        elif step:
            for _ in range(2 if twice else 1):
                loss_k = F.cross_entropy(model(xb).float(), yb, label_smoothing=label_smoothing) if _ else loss
                hw.optimizer_step(loss_k, opt, scaler, scheduler)
        correct = (logits.argmax(argmax_dim) == yb[: logits.shape[1 - argmax_dim]]).sum()
        return loss.detach(), correct

    return train_step


@pytest.mark.parametrize("kwargs, diagnosis", [
    (dict(smoothing=False), r"label-smoothed cross-entropy"),
    (dict(step=False), r"the weights are not w − lr·∇loss"),
    (dict(plain_step=True), r"the weights are not w − lr·∇loss"),
    (dict(twice=True), r"the weights are not w − lr·∇loss, or the schedule advanced 2 times"),
    (dict(argmax_dim=0), r"correct counted"),
])
def test_train_step_check_catches(hw, kwargs, diagnosis):
    wrong = _step(hw, **kwargs)
    with pytest.raises(hw.ExerciseError, match=diagnosis):
        hw.check_train_step(wrong)


def _stopper(hw, clone=True, ties=False, off_by_one=False, none_is_zero=False):
    class Wrong(hw.EarlyStopping):
        def update(self, evaluation, val_acc, model):
            if val_acc > self.best_acc or (ties and val_acc == self.best_acc):
                self.best_acc, self.best_evaluation = val_acc, evaluation
                self.best_state = ({k: v.detach().clone() for k, v in model.state_dict().items()} if clone
                                   else model.state_dict())
            if none_is_zero:
                return evaluation - self.best_evaluation >= (self.patience or 0)
            limit = self.patience + 1 if off_by_one and self.patience is not None else self.patience
            return limit is not None and evaluation - self.best_evaluation >= limit

    return Wrong


@pytest.mark.parametrize("kwargs, diagnosis", [
    (dict(clone=False), "not of the best, 2"),
    (dict(ties=True), r"best 4, stop=False; by hand best 2"),
    (dict(off_by_one=True), r"stop=False; by hand best 2, stop=True"),
    (dict(none_is_zero=True), "with patience=None"),
])
def test_early_stopping_check_catches(hw, kwargs, diagnosis):
    with pytest.raises(hw.ExerciseError, match=diagnosis):
        hw.check_early_stopping(_stopper(hw, **kwargs))


def inverse_shuffle(x, perm):
    out = torch.empty_like(x.flatten(2))
    out[:, :, perm] = x.flatten(2)
    return out.reshape(x.shape)


def channels_mixed(x, perm):
    flat = x.flatten(1)
    return flat[:, torch.cat([perm, perm + len(perm)])[torch.randperm(2 * len(perm))]].reshape(x.shape)


@pytest.mark.parametrize("shuffle, prediction, why, diagnosis", [
    (inverse_shuffle, "same", "no notion of neighbouring pixels at all", r"gave \[1.0, 3.0, 0.0, 2.0"),
    (channels_mixed, "same", "no notion of neighbouring pixels at all", "by hand"),
    (None, "maybe", "no notion of neighbouring pixels at all", "prediction 'maybe'"),
    (None, "lower", "", "a reason of 0 words"),
])
def test_experiment_check_catches(hw, shuffle, prediction, why, diagnosis):
    torch.manual_seed(0)
    with pytest.raises(hw.ExerciseError, match=diagnosis):
        hw.check_experiment(shuffle or hw.shuffle_pixels, prediction, why)
