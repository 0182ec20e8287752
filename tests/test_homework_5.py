"""Unit tests of homework_5 (variational autoencoder on MNIST): the notebook's own `lib` cells."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from nbload import load_lib

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def hw():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and robust on a busy shared machine
    yield load_lib("homework_5")
    torch.set_num_threads(threads)


def tiny_vae(hw, latent=3, hidden=(16,), seed=0):
    torch.manual_seed(seed)
    return hw.VAE(hidden, latent)


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


@pytest.mark.parametrize("batch", [1, 5, 64])
def test_likelihood_is_in_nats_per_image(hw, batch):
    """Decoder logits 0 give exactly 784·ln 2 reconstruction nats per image, whatever the batch size."""
    model = tiny_vae(hw)
    for p in model.decoder[-1].parameters():
        torch.nn.init.zeros_(p)
    x = torch.bernoulli(torch.full((batch, 784), 0.5))
    rec, kl = hw.vae_terms(model, x)
    assert rec.shape == (batch,) and kl.shape == (batch,)
    torch.testing.assert_close(rec, torch.full((batch,), 784 * math.log(2)), rtol=0, atol=1e-3)
    nll = hw.iwae_nll(model, x, k=4, image_batch=3, sample_batch=2)[4]
    assert nll.shape == (batch,)


def test_gradients_reach_the_encoder_through_the_reparameterisation(hw):
    model = tiny_vae(hw)
    x = torch.bernoulli(torch.full((8, 784), 0.4))
    rec, _ = hw.vae_terms(model, x)  # reconstruction alone: only the sampled z connects it to the encoder
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
    x = torch.bernoulli(torch.full((4, 784), 0.3))
    eps = torch.randn(5, 4, 3)
    got = hw.log_importance_weights(model, x, eps)
    mu, logvar = model.encode(x)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    z = mu + torch.exp(0.5 * logvar) * eps
    lp = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    lpx = torch.distributions.Bernoulli(logits=model.decode(z)).log_prob(x).sum(-1)
    torch.testing.assert_close(got, lpx + lp - q.log_prob(z).sum(-1), rtol=1e-5, atol=1e-3)


def test_iwae_with_k1_equals_the_elbo_for_the_same_sample(hw):
    model = tiny_vae(hw)
    x = torch.bernoulli(torch.full((6, 784), 0.3), generator=torch.Generator().manual_seed(4))
    # the IWAE estimator with k = 1 and fixed noise ...
    gen = torch.Generator().manual_seed(5)
    nll1 = hw.iwae_nll(model, x, k=1, image_batch=6, sample_batch=1, generator=gen)[1]
    # ... equals the one-sample ELBO (Monte-Carlo KL) for the same ε
    eps = torch.randn(1, 6, 3, generator=torch.Generator().manual_seed(5))[0]
    with torch.no_grad():
        rec, _ = hw.vae_terms(model, x, eps=eps)
        mu, logvar = model.encode(x)
        z = hw.reparameterise(mu, logvar, eps)
        q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
        mc_kl = (q.log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z)).sum(-1)
    torch.testing.assert_close(nll1, rec + mc_kl, rtol=1e-5, atol=1e-3)
    # in expectation that is the analytic −ELBO; and a larger k never gives a looser (higher) average
    torch.manual_seed(6)
    many = hw.iwae_nll(model, x.repeat(400, 1), k=1, image_batch=1200, sample_batch=1)[1]
    rec_a, kl_a = hw.neg_elbo(model, x.repeat(400, 1))
    assert abs(many.mean().item() - (rec_a + kl_a).mean().item()) < 0.5
    torch.manual_seed(7)
    est = hw.iwae_nll(model, x, k=64, ks=(1, 8, 64), image_batch=6, sample_batch=16)
    assert set(est) == {1, 8, 64}
    assert est[64].mean() <= est[8].mean() + 0.05 <= est[1].mean() + 0.1


def test_ae_terms_have_no_kl(hw):
    torch.manual_seed(0)
    ae = hw.AutoEncoder((16,), 4)
    rec, kl = hw.ae_terms(ae, torch.bernoulli(torch.full((3, 784), 0.5)))
    assert rec.shape == (3,) and torch.all(kl == 0) and torch.all(rec > 0)


# ---------------------------------------------------------------- data


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
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        hw.load_mnist(raw)


def test_truncated_file_is_named(hw, tmp_path):
    raw = write_layout(hw, tmp_path)
    f = raw / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(hw.DataFormatError, match="train-images-idx3-ubyte.*truncated"):
        hw.load_mnist(raw)
    f.write_bytes(b"\x00\x00")
    with pytest.raises(hw.DataFormatError, match="train-images-idx3-ubyte"):
        hw.load_mnist(raw)


def test_bad_magic_number_is_named(hw, tmp_path):
    raw = write_layout(hw, tmp_path)
    f = raw / "train-labels-idx1-ubyte"
    data = bytearray(f.read_bytes())
    data[3] = 0x03  # claims 3 dimensions: the magic number of an image file
    f.write_bytes(bytes(data))
    with pytest.raises(hw.DataFormatError, match="train-labels-idx1-ubyte.*magic"):
        hw.load_mnist(raw)
    f.write_bytes(b"\x1f\x8b\x08\x00" + bytes(20))
    with pytest.raises(hw.DataFormatError, match="gzip"):
        hw.load_mnist(raw)


def test_image_label_count_mismatch(hw, tmp_path):
    raw = write_layout(hw, tmp_path, 20, 10)
    hw.write_idx(raw / "train-labels-idx1-ubyte", np.zeros(19, np.uint8))
    with pytest.raises(hw.DataFormatError, match="20 images.*19 labels"):
        hw.load_mnist(raw)


def test_find_mnist_resolution_order(hw, tmp_path):
    data_dir = tmp_path / "data"
    write_layout(hw, data_dir)
    kaggle = tmp_path / "kaggle"
    raw, origin, source = hw.find_mnist(data_dir, "cpu", tmp_path / "cache", True, kaggle_root=kaggle)
    assert raw == data_dir / "MNIST" / "raw" and source == "real" and "DLCV_DATA_DIR" in origin
    # a Kaggle mount holding the raw files at some depth
    write_layout(hw, kaggle / "some-dataset" / "v1")
    raw, origin, source = hw.find_mnist(None, "cpu", tmp_path / "cache", True, kaggle_root=kaggle)
    assert raw == kaggle / "some-dataset" / "v1" / "MNIST" / "raw" and "Kaggle" in origin
    # a complete cached download is reused even offline
    cache = tmp_path / "cache"
    write_layout(hw, cache)
    raw, origin, _ = hw.find_mnist(None, "full", cache, True, kaggle_root=tmp_path / "none")
    assert raw == cache / "MNIST" / "raw" and "cache" in origin


def test_find_mnist_outside_smoke_fails_with_the_fixes(hw, tmp_path):
    with pytest.raises(hw.DataNotFoundError) as err:
        hw.find_mnist(tmp_path / "empty", "cpu", tmp_path / "cache", True, kaggle_root=tmp_path / "none")
    msg = str(err.value)
    assert "DLCV_DATA_DIR" in msg and "DLCV_OFFLINE" in msg and "internet" in msg


def test_smoke_falls_back_to_learnable_synthetic_data(hw, tmp_path):
    raw, origin, source = hw.find_mnist(None, "smoke", tmp_path / "cache", True,
                                        kaggle_root=tmp_path / "none", synthetic_sizes=(200, 100), seed=0)
    assert source == "synthetic" and "SYNTHETIC" in origin
    data = hw.load_mnist(raw)
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    assert np.bincount(ytr, minlength=10).tolist() == [20] * 10
    # class-dependent strokes: a nearest-class-mean classifier beats chance by far
    means = np.stack([xtr[ytr == c].reshape(-1, 784).mean(0) for c in range(10)])
    pred = ((xte.reshape(-1, 1, 784) / 255.0 - means[None] / 255.0) ** 2).sum(-1).argmin(1)
    assert (pred == yte).mean() > 0.5


def test_stratified_subset_and_split(hw):
    labels = np.repeat(np.arange(10), [100, 50, 100, 100, 100, 100, 100, 100, 100, 150])
    idx = hw.stratified_indices(labels, 200, seed=0)
    assert len(idx) == 200 == len(set(idx.tolist()))
    counts = np.bincount(labels[idx], minlength=10)
    assert counts[1] == 10 and counts[9] == 30 and counts[0] == 20
    np.testing.assert_array_equal(idx, hw.stratified_indices(labels, 200, seed=0))
    assert not np.array_equal(np.sort(idx), np.arange(200))  # not the first N
    rest, hold = hw.stratified_split(labels, 100, seed=0)
    assert len(np.intersect1d(rest, hold)) == 0 and len(rest) + len(hold) == len(labels)


# ---------------------------------------------------------------- profiles, training, determinism


@pytest.mark.parametrize("profile", ["cpu", "full"])
def test_profile_models_take_a_training_step(hw, profile):
    cfg = hw.CONFIGS[profile]
    torch.manual_seed(0)
    model = hw.VAE(cfg["hidden"], cfg["latent"])
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.rand(4, 784)
    hist = hw.train_model(model, hw.vae_terms, x, x[:2], seconds=60, max_epochs=1,
                          batch_size=cfg["batch_size"], lr=cfg["lr"], device=CPU,
                          kl_warmup_frac=cfg["kl_warmup_frac"])
    assert hist["epochs_run"] == 1 and math.isfinite(hist["best_val_objective"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for key in ("ae_seconds", "vae_seconds", "twod_seconds", "beta_seconds", "iwae_k", "betas"):
        assert key in cfg
    assert cfg["iwae_k"] in cfg["iwae_ks"]


def test_training_is_deterministic_and_learns(hw):
    x = torch.rand(96, 784) * (torch.arange(784) % 28 < 14).float()  # learnable: left half only

    def run():
        hw.seed_everything(0)
        m = hw.VAE((32,), 4)
        h = hw.train_model(m, hw.vae_terms, x, x[:16], seconds=600, max_epochs=4, batch_size=32, lr=3e-3,
                           device=CPU)
        return h, m

    h1, m1 = run()
    h2, m2 = run()
    assert h1["val_objective"] == h2["val_objective"] and h1["train_rec"] == h2["train_rec"]
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert h1["epochs_run"] == 4 and h1["val_objective"][-1] < h1["val_objective"][0]
    hw.seed_everything(1)
    a = hw.iwae_nll(m1, (x[:8] > 0.5).float(), k=10)[10]
    hw.seed_everything(1)
    b = hw.iwae_nll(m1, (x[:8] > 0.5).float(), k=10)[10]
    assert torch.equal(a, b)


def test_cpu_profile_setup(hw):
    assert hw.resolve_profile("smoke", CPU) == "smoke"
    with pytest.raises(ValueError):
        hw.resolve_profile("huge", CPU)
    n_before = torch.get_num_threads()
    threads, times = hw.pick_cpu_threads(CPU, width=64, batch=8, rounds=1)
    assert threads in (1, n_before) and torch.get_num_threads() == threads
    torch.set_num_threads(n_before)
