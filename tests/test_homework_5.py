"""Unit tests of homework_5 (variational autoencoder on MNIST): the notebook's own `lib` cells.

References are independent of the notebook's code: torch.distributions, float64 numpy, hand-worked values,
models whose log-likelihood is known exactly, and MNIST files written by tests/synth_mnist.py.
"""

from __future__ import annotations

import ast
import copy
import gzip
import hashlib
import math

import nbformat
import numpy as np
import pytest
import synth_mnist
import torch
import torch.nn.functional as F

from conftest import ROOT
from nbload import load_lib

CPU = torch.device("cpu")
LN2_784 = 784 * math.log(2)


@pytest.fixture(scope="module")
def hw():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and robust on a busy shared machine
    yield load_lib("homework_5")
    torch.set_num_threads(threads)


@pytest.fixture()
def fp32(hw, monkeypatch):
    monkeypatch.setenv("DLCV_PRECISION", "fp32")
    return hw.choose_precision(CPU, False)


def tiny_vae(hw, latent=3, hidden=(16,), seed=0):
    torch.manual_seed(seed)
    return hw.VAE(hidden, latent)


def binary(n, p=0.3, seed=0):
    return torch.bernoulli(torch.full((n, 784), p), generator=torch.Generator().manual_seed(seed))


def settings(precision, **overrides):
    return dict(steps=4, batch_size=8, lr=1e-3, eval_every=2, precision=precision) | overrides


# ---------------------------------------------------------------- likelihoods against torch.distributions


def test_bernoulli_log_likelihood_matches_torch_distributions(hw):
    torch.manual_seed(2)
    logits = torch.randn(6, 784) * 3
    x = torch.bernoulli(torch.full((6, 784), 0.3))
    ref = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
    torch.testing.assert_close(hw.bernoulli_log_likelihood(logits, x), ref, rtol=1e-5, atol=1e-3)
    # a bf16 logit tensor (from autocast) is scored in float32
    assert hw.bernoulli_log_likelihood(logits.bfloat16(), x).dtype == torch.float32


def test_log_weights_match_torch_distributions(hw):
    model = tiny_vae(hw)
    torch.manual_seed(3)
    x = binary(4)
    eps = torch.randn(5, 4, 3)
    got = hw.log_importance_weights(model, x, eps)
    mu, logvar = model.encode(x)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    z = mu + torch.exp(0.5 * logvar) * eps
    lp = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    lpx = torch.distributions.Bernoulli(logits=model.decode(z)).log_prob(x).sum(-1)
    torch.testing.assert_close(got, lpx + lp - q.log_prob(z).sum(-1), rtol=1e-5, atol=1e-3)


# ---------------------------------------------------------------- IWAE on models whose log p(x) is known exactly


def prior_model(hw, decoder_bias=None, latent=3):
    """Encoder output 0 (q(z|x) = N(0, I) = p(z)) and a decoder that ignores z: logits = `decoder_bias`."""
    model = tiny_vae(hw, latent=latent)
    for layer in (model.encoder[-1], model.decoder[-1]):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    if decoder_bias is not None:
        with torch.no_grad():
            model.decoder[-1].bias.copy_(decoder_bias)
    return model


@pytest.mark.parametrize("k, sample_batch", [(1, 1), (7, 3), (10, 4), (16, 16), (50, 7)])
def test_iwae_is_exact_when_q_is_the_posterior(hw, k, sample_batch):
    """q = p(z) and p(x|z) independent of z: every importance weight equals p(x), so −L_k = −log p(x) exactly,
    for every k, also when k is not a multiple of the sample batch (a chunk too many or too few would show)."""
    model = prior_model(hw)
    x = binary(5, 0.5, seed=k)
    est = hw.iwae_nll(model, x, k=k, ks=(1, 2, 5, k), image_batch=3, sample_batch=sample_batch)
    assert set(est) == {j for j in (1, 2, 5, k) if j <= k}
    for j, nll in est.items():
        torch.testing.assert_close(nll, torch.full((5,), LN2_784), rtol=0, atol=2e-3, msg=f"k = {j}")
    bias = torch.linspace(-3, 3, 784)
    model = prior_model(hw, bias)
    exact = -torch.distributions.Bernoulli(logits=bias).log_prob(x).sum(-1)  # −log p(x), z integrated out
    got = hw.iwae_nll(model, x, k=k, image_batch=2, sample_batch=sample_batch)[k]
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=2e-3)


def test_iwae_converges_to_the_exact_likelihood_and_k1_pays_the_kl(hw):
    """Decoder ignores z, encoder ≠ prior: p(z|x) = p(z), so E[−L_1] = −log p(x) + KL(q ‖ p) and −L_k → −log p(x)."""
    bias = torch.linspace(-2, 2, 784)
    model = prior_model(hw, bias)
    with torch.no_grad():
        model.encoder[-1].bias.copy_(torch.tensor([0.4, -0.3, 0.2, -0.5, 0.3, -0.2]))  # μ, then log σ²
    x = binary(2, 0.5, seed=3)
    exact = -torch.distributions.Bernoulli(logits=bias).log_prob(x).sum(-1)
    mu, logvar = model.encode(x)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mu, torch.exp(0.5 * logvar)),
                                           torch.distributions.Normal(0.0, 1.0)).sum(-1).detach()
    gen = torch.Generator().manual_seed(0)
    one = hw.iwae_nll(model, x.repeat(2000, 1), k=1, image_batch=4000, sample_batch=1, generator=gen)[1]
    torch.testing.assert_close(one.reshape(2000, 2).mean(0), exact + kl, rtol=0, atol=0.02)
    many = hw.iwae_nll(model, x, k=4000, ks=(1, 4000), image_batch=2, sample_batch=1000, generator=gen)
    torch.testing.assert_close(many[4000], exact, rtol=0, atol=0.03)
    assert (kl > 0.2).all() and (many[4000] - exact).abs().max() < (kl / 5).min() < (many[1] - exact).abs().max()


def test_iwae_with_k1_equals_the_elbo_for_the_same_sample(hw):
    model = tiny_vae(hw)
    x = binary(6, 0.3, seed=4)
    gen = torch.Generator().manual_seed(5)
    nll1 = hw.iwae_nll(model, x, k=1, image_batch=6, sample_batch=1, generator=gen)[1]
    eps = torch.randn(1, 6, 3, generator=torch.Generator().manual_seed(5))[0]
    with torch.no_grad():
        rec, _ = hw.vae_terms(model, x, eps=eps)
        mu, logvar = model.encode(x)
        q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
        z = q.icdf(torch.distributions.Normal(0.0, 1.0).cdf(eps))
        mc_kl = (q.log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z)).sum(-1)
    torch.testing.assert_close(nll1, rec + mc_kl, rtol=1e-5, atol=1e-3)
    torch.manual_seed(7)
    est = hw.iwae_nll(model, x, k=64, ks=(1, 8, 64), image_batch=6, sample_batch=16)
    assert set(est) == {1, 8, 64}
    assert est[64].mean() <= est[8].mean() + 0.05 <= est[1].mean() + 0.1


def test_evaluation_is_fp32_even_inside_autocast(hw):
    """Reported numbers come from fp32 forward passes: per_image_terms switches autocast off and returns fp32."""
    model = tiny_vae(hw)
    x = binary(8, 0.4)
    ref = hw.per_image_terms(model, hw.vae_terms, x, torch.zeros(8, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = hw.per_image_terms(model, hw.vae_terms, x, torch.zeros(8, 3))
    assert all(t.dtype == torch.float32 for t in inside)
    torch.testing.assert_close(inside, ref, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- the autoencoder's Gaussian: training codes only


class RecordingAE(torch.nn.Module):
    """An autoencoder stand-in whose encoder remembers every image it was shown."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(784, 4)
        self.seen = []

    def code(self, x):
        self.seen.append(x.detach().clone())
        return self.encoder(x)


def test_code_gaussian_is_fitted_on_the_given_images_only(hw):
    torch.manual_seed(0)
    model, x_train = RecordingAE(), binary(2500, 0.3)
    mean, std = hw.fit_code_gaussian(model, x_train, batch=1000)
    assert torch.equal(torch.cat(model.seen), x_train), "the fit encodes the training images, all of them, nothing else"
    with torch.no_grad():
        codes = model.encoder(x_train).double()
    torch.testing.assert_close(mean.double(), codes.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std.double(), codes.std(0), rtol=1e-4, atol=1e-5)
    draws = hw.sample_code_gaussian((mean, std), 20000, torch.Generator().manual_seed(1))
    assert draws.shape == (20000, 4)
    torch.testing.assert_close(draws.mean(0), mean, rtol=0, atol=4 * std.max().item() / math.sqrt(20000))


def test_the_notebook_fits_the_code_gaussian_on_training_images():
    nb = nbformat.read(ROOT / "homework_5.ipynb", as_version=4)
    calls = [node for cell in nb.cells if cell.cell_type == "code" for node in ast.walk(ast.parse(cell.source))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "fit_code_gaussian"]
    assert calls, "the notebook no longer calls fit_code_gaussian"
    for call in calls:
        names = {n.id for arg in call.args for n in ast.walk(arg) if isinstance(n, ast.Name)}
        assert "X_TRAIN" in names and not any("TEST" in n or "VAL" in n for n in names), (
            f"fit_code_gaussian is called on {sorted(names)}: it must see training images only")


# ---------------------------------------------------------------- training: steps, best weights, fp16, determinism


def test_best_validation_weights_are_restored(hw, fp32):
    """A scripted validation score 9, 5, 3, 4, 6: the model must end with the weights it had at the score 3."""
    scores, snapshots = iter([9.0, 5.0, 3.0, 4.0, 6.0]), []

    def terms(model, x, eps=None):
        rec, kl = hw.vae_terms(model, x, eps)
        if model.training:
            return rec, kl
        snapshots.append(copy.deepcopy(model.state_dict()))
        return torch.full_like(rec, next(scores)), torch.zeros_like(kl)

    model = tiny_vae(hw)
    x = binary(32, 0.4)
    hist = hw.train_model(model, terms, x, x[:6], **settings(fp32, eval_every=1, lr=1e-2))
    assert hist["step"] == [0, 1, 2, 3, 4] and hist["val_objective"] == [9.0, 5.0, 3.0, 4.0, 6.0]
    assert hist["best_step"] == 2 and hist["best_val_objective"] == 3.0
    final = model.state_dict()
    assert all(torch.equal(final[k], snapshots[2][k]) for k in final)
    assert not all(torch.equal(final[k], snapshots[4][k]) for k in final), "training changed nothing?"


@pytest.mark.parametrize("n_images", [24, 400])
def test_training_cost_is_steps_not_data(hw, fp32, n_images):
    """The same number of optimizer steps (training batches) whatever the size of the training set."""
    calls = {"train": 0}

    def terms(model, x, eps=None):
        if model.training:
            calls["train"] += 1
            assert len(x) == 8
        return hw.vae_terms(model, x, eps)

    hist = hw.train_model(tiny_vae(hw), terms, binary(n_images), binary(5), **settings(fp32, steps=30, eval_every=10))
    assert calls["train"] == 30 and hist["steps"] == 30 and hist["step"] == [0, 10, 20, 30]
    assert hist["epochs"] == pytest.approx(30 * 8 / n_images) and hist["lr_steps"] == 30 and hist["skipped"] == 0


def test_training_visits_every_image_before_repeating_one(hw, fp32):
    """Batches are drawn without replacement: 3 steps of 8 over 24 images see each image exactly once."""
    seen = []

    def terms(model, x, eps=None):
        if model.training:
            seen.extend(x.argmax(-1).tolist())  # image i is 1 at pixel i only
        return hw.vae_terms(model, x, eps)

    x = torch.eye(784)[:24]
    torch.manual_seed(0)
    hw.train_model(tiny_vae(hw), terms, x, x[:4], **settings(fp32, steps=3, eval_every=3))
    assert sorted(seen) == list(range(24))


def test_fp16_overflow_skips_the_step_and_holds_the_schedule(hw, monkeypatch):
    """The T4 path on the CPU: fp16 autocast + gradient scaler. A loss that overflows makes the scaler skip the
    step: the weights, the learning-rate schedule and the KL warm-up stay put. Without the forced overflow the
    scaler skips only its first steps (while it lowers its initial scale) and the schedule counts the others."""
    monkeypatch.setenv("DLCV_PRECISION", "fp16")
    precision = hw.choose_precision(CPU, False)
    assert precision["name"] == "fp16" and hw.make_scaler(precision).is_enabled()
    x = binary(16, 0.4)

    def run(overflow, steps):
        def terms(model, xb, eps=None):
            rec, kl = hw.vae_terms(model, xb, eps)
            return (rec * math.inf if overflow and model.training else rec), kl

        model = tiny_vae(hw)
        before = copy.deepcopy(model.state_dict())
        hist = hw.train_model(model, terms, x, x[:4], **settings(precision, steps=steps, eval_every=1, warmup_steps=2))
        same = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        return hist, same

    hist, same = run(overflow=True, steps=3)
    assert hist["skipped"] == 3 and hist["lr_steps"] == 0 and same
    assert hist["val_objective"] == [hist["val_objective"][0]] * 4, "the weights moved during the run"
    hist, same = run(overflow=False, steps=12)
    assert 0 < hist["lr_steps"] == 12 - hist["skipped"] and not same


@pytest.mark.parametrize("profile", ["cpu", "full"])
def test_profile_models_take_a_training_step(hw, profile):
    cfg = hw.CONFIGS[profile]
    precision = hw.choose_precision(CPU, True, native_bf16=True)  # the bf16 path of a native-bf16 CPU
    x = binary(4, 0.4)
    for model, terms in ((hw.VAE(cfg["hidden"], cfg["latent"]), hw.vae_terms),
                         (hw.AutoEncoder(cfg["hidden"], cfg["latent"]), hw.ae_terms),
                         (hw.VAE(cfg["hidden"], 2), hw.vae_terms)):
        hist = hw.train_model(model, terms, x, x[:2], steps=1, batch_size=cfg["batch_size"], lr=cfg["lr"],
                              eval_every=cfg["eval_every"], precision=precision, warmup_steps=cfg["warmup_steps"])
        assert hist["step"] == [0, 1] and all(math.isfinite(v) for v in hist["val_objective"])
    clf = hw.mlp([784, cfg["clf_hidden"], 10])
    assert hw.train_classifier(clf, x, [0, 1, 2, 3], steps=1, batch_size=cfg["batch_size"], lr=cfg["lr"],
                               precision=precision) == {"steps": 1}
    conf, pred = hw.classifier_view(clf, x)
    assert conf.shape == (4,) and pred.shape == (4,)


def test_cpu_settings_training_is_deterministic_and_learns(hw):
    """The `cpu` profile's settings (bf16 autocast, its learning rate) on tiny sizes, twice: the same numbers."""
    cfg = hw.CONFIGS["cpu"]
    precision = hw.choose_precision(CPU, True, native_bf16=True)
    x = binary(96, 0.5) * (torch.arange(784) % 28 < 14).float()  # learnable: the right half is always 0

    def run():
        hw.seed_everything(cfg["seed"])
        m = hw.VAE((32,), 4)
        hw.init_output_bias(m, x)
        return hw.train_model(m, hw.vae_terms, x, x[:16], steps=40, batch_size=32, lr=cfg["lr"] * 3, eval_every=10,
                              precision=precision), m

    (h1, m1), (h2, m2) = run(), run()
    assert h1["val_objective"] == h2["val_objective"] and h1["train_rec"][1:] == h2["train_rec"][1:]
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert h1["val_objective"][-1] < h1["val_objective"][0]
    hw.seed_everything(1)
    a = hw.iwae_nll(m1, x[:8], k=10)[10]
    hw.seed_everything(1)
    assert torch.equal(a, hw.iwae_nll(m1, x[:8], k=10)[10])


# ---------------------------------------------------------------- random samples on class-sorted data


def test_split_on_class_sorted_labels_is_random_and_stratified(hw):
    labels = np.repeat(np.arange(10), 900)  # a class-sorted file: the first 2,000 items are two digits
    train, val = hw.split_train_val(labels, 1000, 2000, seed=0)
    assert len(val) == 900 and len(train) == 2000 and len(np.intersect1d(train, val)) == 0
    assert np.bincount(labels[val], minlength=10).tolist() == [90] * 10
    assert np.bincount(labels[train], minlength=10).tolist() == [200] * 10  # not 900, 900, 200, 0, …
    again = hw.split_train_val(labels, 1000, 2000, seed=0)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert not np.array_equal(train, hw.split_train_val(labels, 1000, 2000, seed=1)[0])
    everything, _ = hw.split_train_val(labels, 1000, None, seed=0)
    assert len(everything) == len(labels) - 900


# ---------------------------------------------------------------- data: reading and finding MNIST


def write_mnist(root, n_train=20, n_test=10, seed=0):
    """root/MNIST/raw/* from tests/synth_mnist.py; returns the MNIST folder."""
    return synth_mnist.write(root, n_train, n_test, seed)


def test_load_mnist_reads_what_was_written(hw, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {"train": (rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)),
              "test": (rng.integers(0, 256, (3, 28, 28)), rng.integers(0, 10, 3))}
    for split, (image_file, label_file) in hw.MNIST_FILES.items():
        synth_mnist.write_idx(raw / image_file, arrays[split][0])
        synth_mnist.write_idx(raw / label_file, arrays[split][1])
    data = hw.load_mnist(tmp_path / "MNIST")
    for split in arrays:
        np.testing.assert_array_equal(data[split][0], arrays[split][0])
        np.testing.assert_array_equal(data[split][1], arrays[split][1])
        assert data[split][0].dtype == np.uint8


@pytest.mark.parametrize("defect", ["missing", "truncated", "gzip", "wrong magic"])
def test_a_broken_file_is_named(hw, tmp_path, defect):
    folder = write_mnist(tmp_path)
    f = folder / "raw" / "t10k-labels-idx1-ubyte"
    if defect == "missing":
        f.unlink()
    elif defect == "truncated":
        f.write_bytes(f.read_bytes()[:-3])
    elif defect == "gzip":
        f.write_bytes(gzip.compress(f.read_bytes()))
    else:
        data = bytearray(f.read_bytes())
        data[3] = 0x03  # claims 3 dimensions: an image file's magic number
        f.write_bytes(bytes(data))
    with pytest.raises(hw.DataLayoutError, match="t10k-labels-idx1-ubyte"):
        hw.load_mnist(folder)


def test_image_label_count_mismatch_is_named(hw, tmp_path):
    folder = write_mnist(tmp_path, 20, 10)
    synth_mnist.write_idx(folder / "raw" / "train-labels-idx1-ubyte", np.zeros(19, np.uint8))
    with pytest.raises(hw.DataLayoutError, match="train-images-idx3-ubyte.*19 labels"):
        hw.load_mnist(folder)


def test_find_data_order_for_mnist(hw, tmp_path):
    folders = dict(results=tmp_path / "r", data=str(tmp_path / "data"), cache=tmp_path / "cache", offline=True)
    kaggle = tmp_path / "kaggle"
    write_mnist(tmp_path / "data")
    path, origin, source = hw.find_data("MNIST", hw.mnist_folder, folders, hw.MNIST_FIXES, kaggle_root=kaggle)
    assert path == tmp_path / "data" / "MNIST" and "DLCV_DATA_DIR" in origin and source == "real"
    flat = kaggle / "mnist-dataset" / "files"  # a Kaggle dataset with the four files directly in a folder
    flat.mkdir(parents=True)
    for f in write_mnist(tmp_path / "src").joinpath("raw").iterdir():
        (flat / f.name).write_bytes(f.read_bytes())
    folders["data"] = None
    path, origin, _ = hw.find_data("MNIST", hw.mnist_folder, folders, hw.MNIST_FIXES, kaggle_root=kaggle)
    assert path == flat and "Kaggle" in origin and hw.load_mnist(path)["train"][0].shape == (20, 28, 28)
    write_mnist(tmp_path / "cache")  # a complete cached download is used even offline
    path, origin, _ = hw.find_data("MNIST", hw.mnist_folder, folders, hw.MNIST_FIXES, kaggle_root=tmp_path / "none")
    assert path == tmp_path / "cache" / "MNIST" and "cache" in origin


def test_offline_without_data_fails_with_the_fixes(hw, tmp_path):
    folders = dict(results=tmp_path / "r", data=str(tmp_path / "empty"), cache=tmp_path / "cache", offline=True)
    with pytest.raises(hw.DataNotFoundError) as err:
        hw.find_data("MNIST", hw.mnist_folder, folders, hw.MNIST_FIXES, hw.download_mnist, tmp_path / "none")
    msg = str(err.value)
    assert "DLCV_DATA_DIR" in msg and "DLCV_OFFLINE" in msg and all(fix in msg for fix in hw.MNIST_FIXES)


# ---------------------------------------------------------------- torchvision's download, from a server on 127.0.0.1


@pytest.fixture()
def mirror(tmp_path, loopback, monkeypatch):
    """Tiny gzipped idx files served as torchvision's MNIST mirror; torchvision told their md5s."""
    torchvision = pytest.importorskip("torchvision")
    raw = write_mnist(tmp_path / "source", 30, 10, seed=3) / "raw"
    archives = {f"{f.name}.gz": gzip.compress(f.read_bytes(), mtime=0) for f in sorted(raw.iterdir())}
    for name, body in archives.items():
        loopback.routes[f"/mnist/{name}"] = (body, None)
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [f"{loopback.url}/mnist/"])
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources",
                        [(name, hashlib.md5(body).hexdigest()) for name, body in archives.items()])
    return archives, loopback.routes


def test_download_complete_is_used_and_then_found_in_the_cache(hw, tmp_path, mirror):
    _, routes = mirror
    folders = dict(results=tmp_path / "r", data=None, cache=tmp_path / "cache", offline=False)
    find = lambda: hw.find_data("MNIST", hw.mnist_folder, folders, hw.MNIST_FIXES, hw.download_mnist,  # noqa: E731
                                tmp_path / "none")
    path, origin, source = find()
    assert path == tmp_path / "cache" / "MNIST" and "download" in origin and source == "real"
    assert hw.load_mnist(path)["train"][0].shape == (30, 28, 28)
    routes.clear()  # the server forgets the files: a second run must not need the network
    path2, origin2, _ = find()
    assert path2 == path and "cache" in origin2


@pytest.mark.parametrize("defect", ["truncated", "corrupt"])
def test_download_broken_is_refused_then_repaired(hw, tmp_path, mirror, defect):
    archives, routes = mirror
    name = "train-images-idx3-ubyte.gz"
    good = archives[name]
    routes[f"/mnist/{name}"] = ((good[: len(good) // 2], len(good)) if defect == "truncated"  # connection drops
                                else (good[:-40] + bytes(40), None))  # complete, but not the file of that md5
    folders = dict(results=tmp_path / "r", data=None, cache=tmp_path / "cache", offline=False)
    with pytest.raises(hw.DataNotFoundError, match="a download \\("):
        hw.find_data("MNIST", hw.mnist_folder, folders, hw.MNIST_FIXES, hw.download_mnist, tmp_path / "none")
    assert hw.mnist_folder(tmp_path / "cache" / "MNIST") is None, "a broken download must not look complete"
    routes[f"/mnist/{name}"] = (good, None)  # the mirror is repaired: the next run downloads it whole
    path, origin, _ = hw.find_data("MNIST", hw.mnist_folder, folders, hw.MNIST_FIXES, hw.download_mnist,
                                   tmp_path / "none")
    assert "download" in origin and hw.load_mnist(path)["train"][0].shape == (30, 28, 28)


def test_synthetic_mnist_is_learnable():
    """tests/synth_mnist.py: the classes differ (a nearest-mean classifier is far above chance)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        raw = synth_mnist.write(tmp, 200, 100, seed=0) / "raw"
        read = lambda name, off: np.frombuffer((raw / name).read_bytes(), np.uint8, offset=off)  # noqa: E731
        xtr, ytr = read("train-images-idx3-ubyte", 16).reshape(-1, 784), read("train-labels-idx1-ubyte", 8)
        xte, yte = read("t10k-images-idx3-ubyte", 16).reshape(-1, 784), read("t10k-labels-idx1-ubyte", 8)
        assert Path(tmp, "MNIST") == raw.parent
    assert np.bincount(ytr, minlength=10).tolist() == [20] * 10
    means = np.stack([xtr[ytr == c].mean(0) for c in range(10)])
    assert (((xte[:, None] - means[None]) ** 2).sum(-1).argmin(1) == yte).mean() > 0.5


# ---------------------------------------------------------------- the exercise checks: solutions pass, wrong code fails


def test_checks_pass_the_notebooks_solutions(hw, capsys):
    hw.check_vae_model(hw.VAE)
    hw.check_reparameterise(hw.reparameterise)
    hw.check_kl(hw.kl_to_prior)
    hw.check_vae_terms(hw.vae_terms, hw.VAE)
    hw.check_neg_log_mean_exp(hw.neg_log_mean_exp)
    hw.check_experiment("more", " ".join(["word"] * 20), 10, 12)
    out = capsys.readouterr().out
    assert all(f"✓ Exercise 5.{i}" in out for i in ("1", "2a", "2b", "2c", "3", "4"))


def test_the_hand_worked_values_of_the_checks_are_right(hw):
    """The constants the checks compare with, against torch.distributions (independent of both)."""
    q = torch.distributions.Normal(hw._MU, (hw._LOGVAR.exp()) ** 0.5)
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(-1)
    assert torch.allclose(kl, hw._KL, atol=1e-5)
    assert torch.allclose(q.icdf(torch.distributions.Normal(0.0, 1.0).cdf(hw._EPS)), hw._Z, atol=1e-4)


class _Designs:
    """Plausible VAE designs, right and wrong, written as a student would (not by editing the solution)."""

    @staticmethod
    def make(hw, kind):
        class VAE(torch.nn.Module):
            def __init__(self, hidden=(512, 512), latent=32, pixels=784):
                super().__init__()
                self.latent = latent
                out = latent if kind == "encoder outputs latent numbers" else 2 * latent
                if kind == "two heads":
                    self.body = torch.nn.Sequential(torch.nn.Linear(pixels, hidden[0]), torch.nn.GELU())
                    self.mu, self.logvar = torch.nn.Linear(hidden[0], latent), torch.nn.Linear(hidden[0], latent)
                else:
                    self.encoder = hw.mlp([pixels, *hidden, out])
                self.decoder = hw.mlp([latent, *reversed(hidden), pixels])

            def encode(self, x):
                if kind == "two heads":
                    h = self.body(x)
                    return self.mu(h), self.logvar(h)
                mu, logvar = self.encoder(x).chunk(2, dim=-1)
                if kind == "softplus on logvar":
                    logvar = F.softplus(logvar)
                if kind == "variance instead of log-variance":
                    logvar = logvar.exp()
                return mu, logvar

            def decode(self, z):
                logits = self.decoder(z)
                if kind == "ReLU after the decoder":
                    return torch.relu(logits)
                return torch.sigmoid(logits) if kind == "sigmoid decoder" else logits

        return VAE


WRONG_VAE = {
    "encoder outputs latent numbers": "one mean and one log-variance per latent dimension",
    "softplus on logvar": "which values can a logarithm take",
    "variance instead of log-variance": "which values can a logarithm take",
    "sigmoid decoder": "applies the sigmoid itself",
    "ReLU after the decoder": "applies the sigmoid itself",
}


@pytest.mark.parametrize("wrong", list(WRONG_VAE))
def test_check_vae_model_catches(hw, wrong):
    with pytest.raises(AssertionError, match=f"(?s)Exercise 5.1.*Hint:.*{WRONG_VAE[wrong]}"):
        hw.check_vae_model(_Designs.make(hw, wrong))


def test_another_sound_design_passes_the_checks_and_trains(hw, fp32, capsys):
    """A shared body with two heads (no `encoder` attribute) is a design the checks and the loop accept."""
    design = _Designs.make(hw, "two heads")
    hw.check_vae_model(design)
    hw.check_vae_terms(hw.vae_terms, design)
    model = design((16,), 3)
    hw.init_output_bias(model, binary(20))
    hist = hw.train_model(model, hw.vae_terms, binary(20), binary(4), **settings(fp32))
    assert "✓ Exercise 5.1" in capsys.readouterr().out and len(hist["val_objective"]) == 3


WRONG_REPARAMETERISE = {
    "variance instead of std": lambda mu, logvar, eps: mu + torch.exp(logvar) * eps,
    "log-variance as σ": lambda mu, logvar, eps: mu + logvar * eps,
    "no σ": lambda mu, logvar, eps: mu + eps,
    "σ = exp(log σ²)/2": lambda mu, logvar, eps: mu + 0.5 * torch.exp(logvar) * eps,
}


@pytest.mark.parametrize("wrong", list(WRONG_REPARAMETERISE))
def test_check_reparameterise_catches(hw, wrong):
    with pytest.raises(AssertionError, match="(?s)Exercise 5.2a.*Hint:.*standard deviation"):
        hw.check_reparameterise(WRONG_REPARAMETERISE[wrong])


def _terms(mu, logvar):
    return mu.pow(2) + logvar.exp() - 1 - logvar


WRONG_KL = {
    "no KL": lambda mu, logvar: torch.zeros(len(mu)),
    "KL without the −1": lambda mu, logvar: 0.5 * (_terms(mu, logvar) + 1).sum(-1),
    "KL without the ½": lambda mu, logvar: _terms(mu, logvar).sum(-1),
    "KL mean over dimensions": lambda mu, logvar: 0.5 * _terms(mu, logvar).mean(-1),
    "KL with σ for σ²": lambda mu, logvar: 0.5 * (mu.pow(2) + torch.exp(0.5 * logvar) - 1 - logvar).sum(-1),
    "KL with the wrong sign": lambda mu, logvar: -0.5 * _terms(mu, logvar).sum(-1),
}


@pytest.mark.parametrize("wrong", list(WRONG_KL))
def test_check_kl_catches(hw, wrong):
    with pytest.raises(AssertionError, match="(?s)Exercise 5.2b.*Hint:.*mind the ½, the signs"):
        hw.check_kl(WRONG_KL[wrong])


def _wrong_vae_terms(hw, kind):
    def fn(model, x, eps=None):
        mu, logvar = model.encode(x)
        if eps is None:
            eps = {"uniform noise": torch.rand_like(mu), "noise drawn once": torch.ones_like(mu)}.get(
                kind, torch.randn_like(mu))
        if kind == "ignores the given eps":
            eps = torch.randn_like(mu)
        z = mu if kind == "decodes mu" else hw.reparameterise(mu, logvar, eps)
        if kind == "detached z":
            z = z.detach()
        logits = model.decode(z)
        rec = -hw.bernoulli_log_likelihood(logits, x)
        rec = {"mean over pixels": F.binary_cross_entropy_with_logits(logits, x, reduction="none").mean(-1),
               "log-likelihood, not its negative": -rec, "batch mean": rec.mean(),
               "mean squared error": ((torch.sigmoid(logits) - x) ** 2).sum(-1)}.get(kind, rec)
        kl = torch.zeros_like(rec) if kind == "no KL" else hw.kl_to_prior(mu, logvar)
        return rec, kl
    return fn


WRONG_VAE_TERMS = {
    "decodes mu": "not μ",
    "ignores the given eps": "not μ",
    "detached z": r"no \.detach\(\)",
    "mean over pixels": "nats per image are positive",
    "log-likelihood, not its negative": "nats per image are positive",
    "batch mean": "one number per image",
    "mean squared error": "bernoulli_log_likelihood",
    "no KL": "kl_to_prior",
    "uniform noise": "standard normal",
    "noise drawn once": "afresh",
}


@pytest.mark.parametrize("wrong", list(WRONG_VAE_TERMS))
def test_check_vae_terms_catches(hw, wrong):
    with pytest.raises(AssertionError, match=f"(?s)Exercise 5.2c.*Hint:.*{WRONG_VAE_TERMS[wrong]}"):
        hw.check_vae_terms(_wrong_vae_terms(hw, wrong), hw.VAE)


WRONG_LOG_MEAN_EXP = {
    "not negated": (lambda w: torch.logsumexp(w, 0) - math.log(w.shape[0]), "mind the 1/k and the sign"),
    "no −log k": (lambda w: -torch.logsumexp(w, 0), "mind the 1/k"),
    "log-sum-exp divided by k": (lambda w: -torch.logsumexp(w, 0) / w.shape[0], "MEAN of the weights"),
    "mean of the log-weights": (lambda w: -w.mean(0), "not their logs"),
    "exp without the shift": (lambda w: -torch.log(torch.exp(w).mean(0)), "largest log-weight"),
    "wrong axis": (lambda w: -(torch.logsumexp(w, 1) - math.log(w.shape[1])), "first axis"),
}


@pytest.mark.parametrize("wrong", list(WRONG_LOG_MEAN_EXP))
def test_check_neg_log_mean_exp_catches(hw, wrong):
    fn, hint = WRONG_LOG_MEAN_EXP[wrong]
    with pytest.raises(AssertionError, match=f"(?s)Exercise 5.3.*Hint:.*{hint}"):
        hw.check_neg_log_mean_exp(fn)


@pytest.mark.parametrize("prediction, explanation, hint", [
    ("", "word " * 30, "before you run"), ("maybe", "word " * 30, "before you run"),
    ("more", "", "quote the numbers"), ("more", "it went up", "quote the numbers"),
    ("more", None, "quote the numbers")])
def test_check_experiment_catches(hw, prediction, explanation, hint):
    with pytest.raises(AssertionError, match=f"(?s)Exercise 5.4.*Hint:.*{hint}"):
        hw.check_experiment(prediction, explanation, 10, 12)


@pytest.mark.parametrize("plain, warm, held", [(10, 12, True), (12, 10, False), (10, 10, False)])
def test_check_experiment_says_whether_the_prediction_held(hw, capsys, plain, warm, held):
    hw.check_experiment("more", "word " * 25, plain, warm)
    assert ("held" in capsys.readouterr().out.split("prediction")[-1].split("did not")[0]) == held
