"""Unit tests of homework_5 (variational autoencoder on MNIST): the notebook's own `lib` cells.

References are independent of the notebook's code: torch.distributions, float64 numpy, hand-worked values,
torchvision's own MNIST reader, and models whose log-likelihood is known exactly.
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


def tiny_vae(hw, latent=3, hidden=(16,), seed=0):
    torch.manual_seed(seed)
    return hw.VAE(hidden, latent)


def binary(n, p=0.3, seed=0):
    return torch.bernoulli(torch.full((n, 784), p), generator=torch.Generator().manual_seed(seed))


def settings(**overrides):
    base = dict(steps=4, batch_size=8, lr=1e-3, eval_every=2, device=CPU)
    return base | overrides


# ---------------------------------------------------------------- the ELBO and its terms


def test_kl_matches_torch_distributions(hw):
    torch.manual_seed(1)
    mu, logvar = torch.randn(7, 5) * 2, torch.randn(7, 5)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros(5), torch.ones(5))
    ref = torch.distributions.kl_divergence(q, p).sum(-1)
    got = hw.kl_to_standard_normal(mu, logvar)
    assert got.shape == (7,)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.all(hw.kl_to_standard_normal(torch.zeros(2, 4), torch.zeros(2, 4)) == 0)


def test_bernoulli_log_likelihood_matches_torch_distributions(hw):
    torch.manual_seed(2)
    logits = torch.randn(6, 784) * 3
    x = torch.bernoulli(torch.full((6, 784), 0.3))
    ref = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
    torch.testing.assert_close(hw.bernoulli_log_likelihood(logits, x), ref, rtol=1e-5, atol=1e-3)
    # a bf16 logit tensor (from autocast) is scored in float32
    assert hw.bernoulli_log_likelihood(logits.bfloat16(), x).dtype == torch.float32


@pytest.mark.parametrize("batch", [1, 5, 64])
def test_likelihood_is_in_nats_per_image(hw, batch):
    """Decoder logits 0 give exactly 784·ln 2 reconstruction nats per image, whatever the batch size."""
    model = tiny_vae(hw)
    for p in model.decoder[-1].parameters():
        torch.nn.init.zeros_(p)
    x = binary(batch, 0.5)
    rec, kl = hw.vae_terms(model, x)
    assert rec.shape == (batch,) and kl.shape == (batch,)
    torch.testing.assert_close(rec, torch.full((batch,), LN2_784), rtol=0, atol=1e-3)


def test_gradients_reach_the_encoder_through_the_reparameterisation(hw):
    model = tiny_vae(hw)
    rec, _ = hw.vae_terms(model, binary(8, 0.4))  # reconstruction alone: only z connects it to the encoder
    rec.mean().backward()
    grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    # dz/dμ = 1 and dz/d(log σ²) = ½ σ ε: the noise is outside the parameters
    mu = torch.tensor([0.3, -1.0], requires_grad=True)
    logvar = torch.tensor([0.2, -0.4], requires_grad=True)
    eps = torch.tensor([0.7, -1.3])
    hw.reparameterise(mu, logvar, eps).sum().backward()
    torch.testing.assert_close(mu.grad, torch.ones(2))
    torch.testing.assert_close(logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * eps)


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


def test_neg_log_mean_exp_against_float64(hw):
    g = np.random.default_rng(0)
    log_w = g.normal(-300, 20, size=(37, 5))
    top = log_w.max(0)
    ref = -(top + np.log(np.exp(log_w - top).mean(0)))
    got = hw.neg_log_mean_exp(torch.tensor(log_w, dtype=torch.float32))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5)
    torch.testing.assert_close(hw.neg_log_mean_exp(torch.tensor([[-3.0, 2.0]])), torch.tensor([3.0, -2.0]))


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
        z = hw.reparameterise(mu, logvar, eps)
        q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
        mc_kl = (q.log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z)).sum(-1)
    torch.testing.assert_close(nll1, rec + mc_kl, rtol=1e-5, atol=1e-3)
    torch.manual_seed(7)
    est = hw.iwae_nll(model, x, k=64, ks=(1, 8, 64), image_batch=6, sample_batch=16)
    assert set(est) == {1, 8, 64}
    assert est[64].mean() <= est[8].mean() + 0.05 <= est[1].mean() + 0.1


def test_ae_terms_have_no_kl(hw):
    torch.manual_seed(0)
    ae = hw.AutoEncoder((16,), 4)
    rec, kl = hw.ae_terms(ae, binary(3, 0.5), eps=torch.zeros(3, 4))
    assert rec.shape == (3,) and torch.all(kl == 0) and torch.all(rec > 0)


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


def _notebook_calls(name):
    nb = nbformat.read(ROOT / "homework_5.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            for node in ast.walk(ast.parse(cell.source)):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == name:
                    yield node


def test_the_notebook_fits_the_code_gaussian_on_training_images():
    calls = list(_notebook_calls("fit_code_gaussian"))
    assert calls, "the notebook no longer calls fit_code_gaussian"
    for call in calls:
        names = {n.id for arg in call.args for n in ast.walk(arg) if isinstance(n, ast.Name)}
        assert names & {"X_TRAIN", "X_TRAIN_BIN"} and not any("TEST" in n or "VAL" in n for n in names), (
            f"fit_code_gaussian is called on {sorted(names)}: it must see training images only")


# ---------------------------------------------------------------- training: steps, best weights, determinism


def test_best_validation_weights_are_restored(hw):
    """A scripted validation score 9, 5, 3, 4, 6: the model must end with the weights it had at the score 3."""
    scores, snapshots = iter([9.0, 5.0, 3.0, 4.0, 6.0]), []

    def terms(model, x, eps=None):
        rec, kl = hw.vae_terms(model, x, eps)
        if model.training:
            return rec, kl
        snapshots.append(copy.deepcopy(model.state_dict()))
        return torch.full_like(rec, next(scores)), torch.zeros_like(kl)

    model = tiny_vae(hw)
    x = torch.rand(32, 784)
    hist = hw.train_model(model, terms, x, x[:6], **settings(eval_every=1, lr=1e-2))
    assert hist["step"] == [0, 1, 2, 3, 4] and hist["val_objective"] == [9.0, 5.0, 3.0, 4.0, 6.0]
    assert hist["best_step"] == 2 and hist["best_val_objective"] == 3.0
    final = model.state_dict()
    assert all(torch.equal(final[k], snapshots[2][k]) for k in final)
    assert not all(torch.equal(final[k], snapshots[4][k]) for k in final), "training changed nothing?"


@pytest.mark.parametrize("n_images", [24, 400])
def test_training_cost_is_steps_not_data(hw, n_images):
    """The same number of optimizer steps (training batches) whatever the size of the training set."""
    calls = {"train": 0}

    def terms(model, x, eps=None):
        if model.training:
            calls["train"] += 1
            assert len(x) == 8
        return hw.vae_terms(model, x, eps)

    hist = hw.train_model(tiny_vae(hw), terms, torch.rand(n_images, 784), torch.rand(5, 784),
                          **settings(steps=30, eval_every=10))
    assert calls["train"] == 30 and hist["steps"] == 30 and hist["step"] == [0, 10, 20, 30]
    assert hist["epochs"] == pytest.approx(30 * 8 / n_images)


def test_training_visits_every_image_before_repeating_one(hw):
    """Batches are drawn without replacement: 3 steps of 8 over 24 images see each image exactly once."""
    seen = []

    def terms(model, x, eps=None):
        if model.training:
            seen.extend(x.argmax(-1).tolist())  # image i is 1 at pixel i only (binarisation keeps 0/1 values)
        return hw.vae_terms(model, x, eps)

    x = torch.eye(784)[:24]
    torch.manual_seed(0)
    hw.train_model(tiny_vae(hw), terms, x, x[:4], **settings(steps=3, eval_every=3))
    assert sorted(seen) == list(range(24))


def test_cosine_learning_rate(hw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lrs = []
    for step in range(4):
        hw.cosine_lr(opt, 0.1, step, 4)
        lrs.append(opt.param_groups[0]["lr"])
    np.testing.assert_allclose(lrs, [0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2, 0.05,
                                     0.1 * (1 + math.cos(3 * math.pi / 4)) / 2])


@pytest.mark.parametrize("profile", ["cpu", "full"])
def test_profile_models_take_a_training_step(hw, profile):
    cfg = hw.CONFIGS[profile]
    x = torch.rand(4, 784)
    for model, terms in ((hw.VAE(cfg["hidden"], cfg["latent"]), hw.vae_terms),
                         (hw.AutoEncoder(cfg["hidden"], cfg["latent"]), hw.ae_terms),
                         (hw.VAE(cfg["hidden"], 2), hw.vae_terms)):
        hist = hw.train_model(model, terms, x, x[:2], steps=1, batch_size=cfg["batch_size"], lr=cfg["lr"],
                              eval_every=cfg["eval_every"], kl_warmup_steps=cfg["kl_warmup_steps"], device=CPU,
                              amp_dtype=torch.bfloat16)
        assert hist["step"] == [0, 1] and math.isfinite(hist["best_val_objective"])
        assert all(math.isfinite(v) for v in hist["val_objective"])
    clf = hw.train_classifier(x, [0, 1, 2, 3], hidden=cfg["clf_hidden"], steps=1, batch_size=cfg["batch_size"],
                              lr=cfg["lr"], device=CPU, amp_dtype=torch.bfloat16)
    conf, pred = hw.classifier_view(clf, x)
    assert conf.shape == (4,) and pred.shape == (4,)
    probe = hw.precision_probe(cfg["hidden"], cfg["latent"])
    assert probe(x).shape == (4, 784)
    assert cfg["iwae_k"] in cfg["iwae_ks"] and cfg["steps"] > 0 and cfg["twod_steps"] > 0
    assert not any(key.endswith("seconds") for key in cfg), "budgets are steps, never seconds"


def test_a_training_step_changes_the_weights(hw):
    model, x = tiny_vae(hw), binary(8, 0.5)
    before = [p.detach().clone() for p in model.parameters()]
    hist = hw.train_model(model, hw.vae_terms, x, x, **settings(steps=1, eval_every=1, lr=1e-3))
    assert hist["best_step"] == 1 and hist["val_objective"][1] < hist["val_objective"][0]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_cpu_settings_training_is_deterministic_and_learns(hw):
    """The `cpu` profile's settings (bf16 autocast, its learning rate and batch size) on tiny sizes, twice."""
    cfg = hw.CONFIGS["cpu"]
    x = torch.rand(96, 784) * (torch.arange(784) % 28 < 14).float()  # learnable: left half only

    def run():
        hw.seed_everything(cfg["seed"])
        m = hw.VAE((32,), 4)
        hw.init_output_bias(m, x)
        h = hw.train_model(m, hw.vae_terms, x, x[:16], steps=40, batch_size=32, lr=cfg["lr"] * 3, eval_every=10,
                           kl_warmup_steps=cfg["kl_warmup_steps"], device=CPU, amp_dtype=torch.bfloat16)
        return h, m

    (h1, m1), (h2, m2) = run(), run()
    assert h1["val_objective"] == h2["val_objective"] and h1["train_rec"][1:] == h2["train_rec"][1:]
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert h1["val_objective"][-1] < h1["val_objective"][0]
    hw.seed_everything(1)
    a = hw.iwae_nll(m1, (x[:8] > 0.5).float(), k=10)[10]
    hw.seed_everything(1)
    b = hw.iwae_nll(m1, (x[:8] > 0.5).float(), k=10)[10]
    assert torch.equal(a, b)


def test_precision_probe_has_the_vaes_layer_sizes(hw):
    cfg = hw.CONFIGS["cpu"]
    probe = hw.precision_probe(cfg["hidden"], cfg["latent"])
    vae = hw.VAE(cfg["hidden"], cfg["latent"])
    n_probe = sum(p.numel() for p in probe.parameters())
    n_vae = sum(p.numel() for p in vae.parameters())
    assert abs(n_probe - n_vae) / n_vae < 0.01
    precision = hw.choose_precision(CPU, build_model=lambda: hw.precision_probe((16,), 2), batch=torch.rand(4, 784),
                                    loss_fn=lambda logits: logits.float().mean(), native_bf16=False)
    assert precision["name"] == "fp32"


# ---------------------------------------------------------------- random samples on class-sorted data


def test_split_on_class_sorted_labels_is_random_and_stratified(hw):
    labels = np.repeat(np.arange(10), 900)  # a class-sorted file: the first 2,000 items are two digits
    train, val = hw.split_train_val(labels, 1000, 2000, seed=0)
    assert len(val) == 900 and len(train) == 2000 and len(np.intersect1d(train, val)) == 0
    assert np.bincount(labels[val], minlength=10).tolist() == [90] * 10
    assert np.bincount(labels[train], minlength=10).tolist() == [200] * 10  # not 900, 900, 200, 0, …
    again = hw.split_train_val(labels, 1000, 2000, seed=0)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    other = hw.split_train_val(labels, 1000, 2000, seed=1)
    assert not np.array_equal(train, other[0])
    everything, _ = hw.split_train_val(labels, 1000, None, seed=0)
    assert len(everything) == len(labels) - 900


def test_one_per_class_is_a_random_member_of_each_class(hw):
    labels = np.repeat(np.arange(10), 50)
    picks = hw.one_per_class(labels, seed=0)
    assert labels[picks].tolist() == list(range(10))
    assert not np.array_equal(picks, np.arange(10) * 50), "the first image of each class is not a random one"
    assert np.array_equal(picks, hw.one_per_class(labels, seed=0))


def test_smoke_cap_on_a_real_size_folder(hw):
    """`smoke` with real data: a capped stratified random subset, whatever the folder's size or order."""
    cfg = hw.CONFIGS["smoke"]
    labels = np.sort(np.random.default_rng(0).integers(0, 10, 60000))
    train, val = hw.split_train_val(labels, cfg["n_val"], cfg["n_train"], cfg["seed"])
    assert len(train) == cfg["n_train"] and len(val) == cfg["n_val"]
    assert set(labels[train]) == set(range(10)) and set(labels[val]) == set(range(10))


# ---------------------------------------------------------------- data: parsing and finding


def write_layout(hw, root, n_train=20, n_test=10, seed=0):
    return hw.write_synthetic_mnist(root, n_train, n_test, seed)


def test_idx_round_trip_and_torchvision_agrees(hw, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    raw = write_layout(hw, tmp_path, 30, 10)
    data = hw.load_mnist(raw)
    assert data["train"][0].shape == (30, 28, 28) and data["train"][0].dtype == np.uint8
    assert data["test"][1].shape == (10,)
    ref = torchvision.datasets.MNIST(root=str(tmp_path), train=True, download=False)
    np.testing.assert_array_equal(ref.data.numpy(), data["train"][0])
    np.testing.assert_array_equal(ref.targets.numpy(), data["train"][1])


def test_missing_file_is_named(hw, tmp_path):
    raw = write_layout(hw, tmp_path)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(hw.DataLayoutError, match="t10k-labels-idx1-ubyte"):
        hw.load_mnist(raw)


def test_truncated_file_is_named(hw, tmp_path):
    raw = write_layout(hw, tmp_path)
    f = raw / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(hw.DataLayoutError, match="train-images-idx3-ubyte.*truncated"):
        hw.load_mnist(raw)
    f.write_bytes(b"\x00\x00")
    with pytest.raises(hw.DataLayoutError, match="train-images-idx3-ubyte"):
        hw.load_mnist(raw)


def test_bad_magic_number_is_named(hw, tmp_path):
    raw = write_layout(hw, tmp_path)
    f = raw / "train-labels-idx1-ubyte"
    data = bytearray(f.read_bytes())
    data[3] = 0x03  # claims 3 dimensions: the magic number of an image file
    f.write_bytes(bytes(data))
    with pytest.raises(hw.DataLayoutError, match="train-labels-idx1-ubyte.*magic"):
        hw.load_mnist(raw)
    f.write_bytes(b"\x1f\x8b\x08\x00" + bytes(20))
    with pytest.raises(hw.DataLayoutError, match="gzip"):
        hw.load_mnist(raw)


def test_image_label_count_mismatch(hw, tmp_path):
    raw = write_layout(hw, tmp_path, 20, 10)
    hw.write_idx(raw / "train-labels-idx1-ubyte", np.zeros(19, np.uint8))
    with pytest.raises(hw.DataLayoutError, match="20 images.*19 labels"):
        hw.load_mnist(raw)


def test_find_mnist_resolution_order(hw, tmp_path):
    data_dir = tmp_path / "data"
    write_layout(hw, data_dir)
    kaggle = tmp_path / "kaggle"
    raw, origin, source = hw.find_mnist(data_dir, "cpu", tmp_path / "cache", True, kaggle_root=kaggle)
    assert raw == data_dir / "MNIST" / "raw" and source == "real" and "DLCV_DATA_DIR" in origin
    write_layout(hw, kaggle / "some-dataset" / "v1")  # a Kaggle mount holding the raw files at some depth
    raw, origin, source = hw.find_mnist(None, "cpu", tmp_path / "cache", True, kaggle_root=kaggle)
    assert raw == kaggle / "some-dataset" / "v1" / "MNIST" / "raw" and "Kaggle" in origin
    cache = tmp_path / "cache"
    write_layout(hw, cache)  # a complete cached download is reused even offline
    raw, origin, _ = hw.find_mnist(None, "full", cache, True, kaggle_root=tmp_path / "none")
    assert raw == cache / "MNIST" / "raw" and "cache" in origin


def test_find_mnist_outside_smoke_fails_with_the_fixes(hw, tmp_path):
    with pytest.raises(hw.DataNotFoundError) as err:
        hw.find_mnist(tmp_path / "empty", "cpu", tmp_path / "cache", True, kaggle_root=tmp_path / "none")
    msg = str(err.value)
    assert "DLCV_DATA_DIR" in msg and "DLCV_OFFLINE" in msg and "internet" in msg
    assert all(fix in msg for fix in hw.MNIST_FIXES)


def test_smoke_falls_back_to_learnable_synthetic_data(hw, tmp_path):
    raw, origin, source = hw.find_mnist(None, "smoke", tmp_path / "cache", True,
                                        kaggle_root=tmp_path / "none", synthetic_sizes=(200, 100), seed=0)
    assert source == "synthetic" and "SYNTHETIC" in origin
    data = hw.load_mnist(raw)
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    assert np.bincount(ytr, minlength=10).tolist() == [20] * 10
    means = np.stack([xtr[ytr == c].reshape(-1, 784).mean(0) for c in range(10)])
    pred = ((xte.reshape(-1, 1, 784) / 255.0 - means[None] / 255.0) ** 2).sum(-1).argmin(1)
    assert (pred == yte).mean() > 0.5  # class-dependent strokes: far above chance


# ---------------------------------------------------------------- the MNIST download, against a server on 127.0.0.1


@pytest.fixture()
def server(loopback):
    return loopback.url, loopback.routes


@pytest.fixture()
def tiny_mnist(hw, tmp_path, server, monkeypatch):
    """Tiny gzipped idx files served as torchvision's MNIST mirror; torchvision told their md5s."""
    torchvision = pytest.importorskip("torchvision")
    url, routes = server
    raw = write_layout(hw, tmp_path / "source", 30, 10, seed=3)
    archives = {f"{name}.gz": gzip.compress((raw / name).read_bytes(), mtime=0)
                for pair in hw.MNIST_FILES.values() for name in pair}
    for name, body in archives.items():
        routes[f"/mnist/{name}"] = (body, None)
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [f"{url}/mnist/"])
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources",
                        [(name, hashlib.md5(body).hexdigest()) for name, body in archives.items()])
    return hw.load_mnist(raw), archives, routes


def _trusted_leftovers(cache):
    """What a rerun would find in the cache: any file at all under it (there should be none)."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def test_download_complete_is_used_and_cached_once(hw, tmp_path, tiny_mnist):
    source, _, routes = tiny_mnist
    cache = tmp_path / "cache"
    raw, origin, kind = hw.find_mnist(None, "cpu", cache, False, kaggle_root=tmp_path / "none")
    assert raw == cache / "MNIST" / "raw" and kind == "real" and "download" in origin
    got = hw.load_mnist(raw)
    for split in ("train", "test"):
        for a, b in zip(got[split], source[split]):
            np.testing.assert_array_equal(a, b)
    assert sorted(p.name for p in cache.iterdir()) == ["MNIST"], "no temporary folder left behind"
    assert sorted(p.name for p in raw.iterdir()) == sorted(n for pair in hw.MNIST_FILES.values() for n in pair)
    routes.clear()  # the server forgets the files: a second run must not need the network
    raw2, origin2, _ = hw.find_mnist(None, "cpu", cache, False, kaggle_root=tmp_path / "none")
    assert raw2 == raw and origin2.startswith("cache")


@pytest.mark.parametrize("defect", ["truncated", "corrupt", "bad idx inside a good archive"])
def test_download_broken_is_refused_and_leaves_nothing(hw, tmp_path, tiny_mnist, monkeypatch, defect):
    torchvision = pytest.importorskip("torchvision")
    _, archives, routes = tiny_mnist
    name = "train-images-idx3-ubyte.gz"
    good = archives[name]
    if defect == "truncated":  # the connection drops half-way through
        routes[f"/mnist/{name}"] = (good[: len(good) // 2], len(good))
    elif defect == "corrupt":  # complete, but not the file whose md5 torchvision knows
        routes[f"/mnist/{name}"] = (good[:-40] + bytes(40), None)
    else:  # the md5 matches (the publisher's own file is broken): our idx parser must refuse it
        bad = gzip.compress(b"\x00\x00\x08\x03" + bytes(30), mtime=0)
        routes[f"/mnist/{name}"] = (bad, None)
        resources = [(n, hashlib.md5(bad if n == name else archives[n]).hexdigest()) for n in archives]
        monkeypatch.setattr(torchvision.datasets.MNIST, "resources", resources)
    cache = tmp_path / "cache"
    with pytest.raises(hw.DownloadError, match="MNIST download refused"):
        hw.download_mnist(cache)
    assert _trusted_leftovers(cache) == []
    with pytest.raises(hw.DataNotFoundError, match="MNIST download refused") as err:
        hw.find_mnist(None, "cpu", cache, False, kaggle_root=tmp_path / "none")
    assert "DLCV_DATA_DIR" in str(err.value) and _trusted_leftovers(cache) == []
    routes[f"/mnist/{name}"] = (good, None)  # the mirror is repaired: the next run downloads it whole
    if defect == "bad idx inside a good archive":
        monkeypatch.setattr(torchvision.datasets.MNIST, "resources",
                            [(n, hashlib.md5(b).hexdigest()) for n, b in archives.items()])
    raw, origin, _ = hw.find_mnist(None, "cpu", cache, False, kaggle_root=tmp_path / "none")
    assert "download" in origin and hw.load_mnist(raw)["train"][0].shape == (30, 28, 28)


def test_download_404_gives_the_offline_error_with_its_fixes(hw, tmp_path, tiny_mnist):
    _, _, routes = tiny_mnist
    routes.clear()
    cache = tmp_path / "cache"
    with pytest.raises(hw.DataNotFoundError) as err:
        hw.find_mnist(None, "cpu", cache, False, kaggle_root=tmp_path / "none")
    msg = str(err.value)
    assert "404" in msg and all(fix in msg for fix in hw.MNIST_FIXES)
    assert _trusted_leftovers(cache) == []
    raw, _, kind = hw.find_mnist(None, "smoke", cache, False, kaggle_root=tmp_path / "none",
                                 synthetic_sizes=(20, 10))
    assert kind == "synthetic"


# ---------------------------------------------------------------- the exercise checks: solutions pass, wrong code fails


def test_checks_pass_the_notebooks_solutions(hw, capsys):
    hw.check_reparameterise(hw.reparameterise)
    hw.check_kl(hw.kl_to_standard_normal)
    hw.check_vae_terms(hw.vae_terms, hw.VAE)
    hw.check_neg_log_mean_exp(hw.neg_log_mean_exp)
    out = capsys.readouterr().out
    assert all(f"✓ Exercise 5.{i}" in out for i in range(1, 5))


def _eps_or_randn(mu, eps):
    return torch.randn_like(mu) if eps is None else eps


WRONG_REPARAMETERISE = {
    "variance instead of std": (lambda mu, lv, eps=None: mu + torch.exp(lv) * _eps_or_randn(mu, eps),
                                r"exp\(0\.5 \* logvar\)"),
    "ignores the given eps": (lambda mu, lv, eps=None: torch.normal(mu.detach(), torch.exp(0.5 * lv.detach())),
                              "use the given eps"),
    "detached": (lambda mu, lv, eps=None: (mu + torch.exp(0.5 * lv) * _eps_or_randn(mu, eps)).detach(),
                 r"no \.detach\(\)"),
    "uniform noise": (lambda mu, lv, eps=None: mu + torch.exp(0.5 * lv) * (torch.rand_like(mu) if eps is None else eps),
                      "torch.randn_like"),
    "noise drawn once": (lambda mu, lv, eps=None: mu + torch.exp(0.5 * lv) * (
        torch.ones_like(mu) if eps is None else eps), "fresh at every call"),
}


@pytest.mark.parametrize("wrong", list(WRONG_REPARAMETERISE))
def test_check_reparameterise_catches(hw, wrong):
    fn, hint = WRONG_REPARAMETERISE[wrong]
    with pytest.raises(AssertionError, match=f"(?s)Exercise 5.1.*Hint:.*{hint}"):
        hw.check_reparameterise(fn)


def _kl(mu, lv):
    return mu.pow(2) + lv.exp() - 1 - lv


WRONG_KL = {
    "no −1": (lambda mu, lv: 0.5 * (mu.pow(2) + lv.exp() - lv).sum(-1), "exactly 0"),
    "no ½": (lambda mu, lv: _kl(mu, lv).sum(-1), "keep the ½"),
    "mean over dimensions": (lambda mu, lv: 0.5 * _kl(mu, lv).mean(-1), r"sum \(not average\)"),
    "σ instead of σ²": (lambda mu, lv: 0.5 * (mu.pow(2) + torch.exp(0.5 * lv) - 1 - lv).sum(-1), r"σ² = exp\(logvar\)"),
    "summed over the batch": (lambda mu, lv: 0.5 * _kl(mu, lv).sum(0), "last axis"),
}


@pytest.mark.parametrize("wrong", list(WRONG_KL))
def test_check_kl_catches(hw, wrong):
    fn, hint = WRONG_KL[wrong]
    with pytest.raises(AssertionError, match=f"(?s)Exercise 5.2.*Hint:.*{hint}"):
        hw.check_kl(fn)


def _wrong_vae_terms(hw, kind):
    def fn(model, x, eps=None):
        mu, logvar = model.encode(x)
        z = hw.reparameterise(mu, logvar, eps)
        if kind == "decodes mu":
            z = mu
        if kind == "detached z":
            z = hw.reparameterise(mu.detach(), logvar.detach(), eps)
        logits = model.decode(z)
        rec = -hw.bernoulli_log_likelihood(logits, x)
        if kind == "mean over pixels":
            rec = F.binary_cross_entropy_with_logits(logits, x, reduction="none").mean(-1)
        if kind == "log-likelihood, not its negative":
            rec = -rec
        if kind == "batch mean":
            rec = rec.mean()
        if kind == "mean squared error":
            rec = ((torch.sigmoid(logits) - x) ** 2).sum(-1)
        kl = torch.zeros_like(rec) if kind == "no KL" else hw.kl_to_standard_normal(mu, logvar)
        return rec, kl
    return fn


WRONG_VAE_TERMS = {
    "decodes mu": r"\(not mu\)",
    "detached z": r"no\s+\.detach\(\)",
    "mean over pixels": r"summed over the 784 pixels \(not averaged\)",
    "log-likelihood, not its negative": "positive number",
    "batch mean": "one number per image",
    "mean squared error": "bernoulli_log_likelihood",
    "no KL": "kl_to_standard_normal",
}


@pytest.mark.parametrize("wrong", list(WRONG_VAE_TERMS))
def test_check_vae_terms_catches(hw, wrong):
    with pytest.raises(AssertionError, match=f"(?s)Exercise 5.3.*Hint:.*{WRONG_VAE_TERMS[wrong]}"):
        hw.check_vae_terms(_wrong_vae_terms(hw, wrong), hw.VAE)


WRONG_LOG_MEAN_EXP = {
    "not negated": (lambda w: torch.logsumexp(w, 0) - math.log(w.shape[0]), "return the negative"),
    "no −log k": (lambda w: -torch.logsumexp(w, 0), "MEAN of the weights"),
    "log-sum-exp divided by k": (lambda w: -torch.logsumexp(w, 0) / w.shape[0], "MEAN of the weights"),
    "mean of the log-weights": (lambda w: -w.mean(0), "not their logs"),
    "exp without the shift": (lambda w: -torch.log(torch.exp(w).mean(0)), "torch.logsumexp"),
    "wrong axis": (lambda w: -(torch.logsumexp(w, 1) - math.log(w.shape[1])), "axis 0"),
}


@pytest.mark.parametrize("wrong", list(WRONG_LOG_MEAN_EXP))
def test_check_neg_log_mean_exp_catches(hw, wrong):
    fn, hint = WRONG_LOG_MEAN_EXP[wrong]
    with pytest.raises(AssertionError, match=f"(?s)Exercise 5.4.*Hint:.*{hint}"):
        hw.check_neg_log_mean_exp(fn)
