"""Bits/dim (the variational bound, Eq. 5) against known answers; the Fréchet distance and
the shipped classifier; the evaluate command on a tiny checkpoint."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from naivediffusion import Diffusion, UNet, likelihood, quality
from naivediffusion.__main__ import main
from naivediffusion.data import scale_to_unit_interval

LN2 = math.log(2.0)


# ------------------------------------------------------------------ helpers of the bound


def test_normal_kl_is_zero_for_equal_gaussians_and_matches_monte_carlo():
    mean, logvar = torch.tensor([0.3, -2.0]), torch.tensor([-1.0, 0.5])
    assert torch.allclose(likelihood.normal_kl(mean, logvar, mean, logvar), torch.zeros(2), atol=1e-7)

    # KL(p || q) = E_p[log p(x) - log q(x)], estimated from draws of p.
    g = torch.Generator().manual_seed(0)
    m1, lv1, m2, lv2 = (torch.tensor(v, dtype=torch.float64) for v in (0.2, -0.7, -0.4, 0.3))
    x = m1 + (0.5 * lv1).exp() * torch.randn(400_000, generator=g, dtype=torch.float64)
    normal = lambda m, lv: torch.distributions.Normal(m, (0.5 * lv).exp())
    log_ratio = normal(m1, lv1).log_prob(x) - normal(m2, lv2).log_prob(x)
    se = log_ratio.std() / math.sqrt(len(x))
    kl = likelihood.normal_kl(m1, lv1, m2, lv2)
    assert kl > 0.1
    assert abs(kl - log_ratio.mean()) < 4 * se


def test_quantize_puts_values_on_the_datasets_256_level_grid():
    levels = scale_to_unit_interval(torch.arange(256, dtype=torch.uint8))
    assert torch.equal(likelihood.quantize(levels), levels)
    x = torch.tensor([-3.0, -1.0, -0.999, 0.0, 0.5, 1.0, 7.0])
    q = likelihood.quantize(x)
    k = (q + 1) * 127.5
    assert torch.allclose(k, k.round(), atol=1e-4) and q.min() == -1 and q.max() == 1
    assert (q - x.clamp(-1, 1)).abs().max() <= 1 / 255 + 1e-6  # the nearest level
    assert torch.equal(likelihood.quantize(q), q)


@pytest.mark.parametrize("mean,scale", [(0.0, 0.3), (0.9, 0.05), (-1.3, 0.5), (0.2, 0.002),
                                        (0.0, 30.0), (1.0, 1e-4)])
def test_discretized_gaussian_likelihood_sums_to_one_over_the_256_levels(mean, scale):
    x = scale_to_unit_interval(torch.arange(256, dtype=torch.uint8)).double()
    log_p = likelihood.discretized_gaussian_log_likelihood(x, torch.tensor(mean, dtype=torch.float64),
                                                  torch.tensor(math.log(scale), dtype=torch.float64))
    assert torch.isfinite(log_p).all() and (log_p <= 0).all()
    assert abs(log_p.exp().sum().item() - 1.0) < 1e-6
    # Each interior level: the Gaussian's mass in [x - 1/255, x + 1/255] (Eq. 13).
    cdf = lambda v: torch.special.ndtr((v - mean) / scale)
    mass = cdf(x[1:-1] + 1 / 255) - cdf(x[1:-1] - 1 / 255)
    big = mass > 1e-6
    assert torch.allclose(log_p[1:-1][big].exp(), mass[big], rtol=1e-6, atol=0)


def test_discretized_likelihood_stays_exact_in_the_far_tails():
    # A level 100 standard deviations from the mean: naive CDF differences give log(0).
    x = torch.tensor([0.5, -0.5, 1.0, -1.0], dtype=torch.float64)
    mean, scale = torch.zeros(4, dtype=torch.float64), 0.004
    log_p = likelihood.discretized_gaussian_log_likelihood(x, mean, torch.full((4,), math.log(scale), dtype=torch.float64))
    z = (0.5 - 1 / 255) / scale
    upper_tail = torch.special.log_ndtr(torch.tensor(-z, dtype=torch.float64))
    assert torch.isfinite(log_p).all()
    # The level's mass is the whole tail beyond its lower edge, up to a negligible sliver.
    assert abs(log_p[0] - upper_tail) < 1e-3 and abs(log_p[1] - upper_tail) < 1e-3
    edge = torch.special.log_ndtr(torch.tensor(-(1 - 1 / 255) / scale, dtype=torch.float64))
    assert abs(log_p[2] - edge) < 1e-9 and abs(log_p[3] - edge) < 1e-9


def test_prior_term_is_about_1e5_bits_per_dim_for_the_paper_schedule():
    diffusion = Diffusion(1000, "linear")
    prior = likelihood.prior_bpd(diffusion, torch.tensor([-1.0, 0.0, 1.0]).reshape(3, 1, 1, 1))
    # Sec. 4: L_T ~ 1e-5 bits/dim. Most of it is the mean sqrt(abar_T) x_0 being off zero,
    # so images at the ends of the range pay the most.
    assert 1e-6 < prior[0] < 1e-4 and 1e-6 < prior[2] < 1e-4
    assert prior[1] < 0.01 * prior[0]


def test_timestep_strata_partition_all_timesteps_and_start_with_the_decoder():
    for T, k in [(1000, 1), (1000, 2), (1000, 10), (1000, 50), (1000, 999), (1000, 1000), (7, 5)]:
        edges = likelihood.timestep_strata(T, k)
        assert edges[0] == 0 and edges[-1] == T and len(edges) == k + 1
        assert all(b > a for a, b in zip(edges, edges[1:], strict=False))
        if k > 1:
            assert edges[1] == 1  # L_0 is its own stratum
    t, weights = likelihood.sample_timesteps(1000, 50, torch.Generator().manual_seed(0))
    assert t[0] == 0 and weights.sum() == 1000 and torch.equal(t, t.sort().values)
    with pytest.raises(ValueError):
        likelihood.timestep_strata(10, 11)


def test_stratified_timesteps_give_an_unbiased_sum():
    # A steep profile, like the terms of the bound: the weighted sum has the full sum as mean.
    profile = 1.0 / (torch.arange(1000, dtype=torch.float64) + 1.0) ** 1.5
    g = torch.Generator().manual_seed(0)
    for k in (2, 10):
        estimates = torch.stack([(w * profile[t]).sum()
                                 for t, w in (likelihood.sample_timesteps(1000, k, g) for _ in range(4000))])
        se = estimates.std() / math.sqrt(len(estimates))
        assert se > 0
        assert abs(estimates.mean() - profile.sum()) < 4 * se


# ---------------------------------------------- the bound against a known answer

MU, S = 0.0, 0.3  # pixels ~ N(MU, S^2), independently, then put on the 256-level grid


def level_probabilities() -> torch.Tensor:
    """P(level k), k = 0..255, of the discretised Gaussian: the mass of N(MU, S^2) in the
    level's bin, with the end bins reaching to -inf and +inf (where quantize sends values)."""
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # exact, so bins tile the line
    upper = (levels + 1 / 255).clone()
    lower = (levels - 1 / 255).clone()
    upper[-1], lower[0] = math.inf, -math.inf
    cdf = lambda v: torch.special.ndtr((v - MU) / S)
    return cdf(upper) - cdf(lower)


class OptimalEps:
    """The optimal eps-model for Gaussian data: E[eps | x_t] = sqrt(1 - abar)(x_t - sqrt(abar)
    MU) / (abar S^2 + 1 - abar), from the joint Gaussian of (x_t, eps)."""

    def __init__(self, diffusion):
        self.alphas_cumprod = diffusion.alphas_cumprod

    def __call__(self, x_t, t):
        abar = self.alphas_cumprod[t].to(x_t.dtype).reshape(-1, 1, 1, 1)
        return (1 - abar).sqrt() * (x_t - abar.sqrt() * MU) / (abar * S**2 + 1 - abar)


def variance_mismatch_bits(diffusion) -> float:
    """For continuous Gaussian data the optimal model's means are exact, so its bound exceeds
    the NLL only through sigma_t^2: KL between the true reverse step q(x_{t-1}|x_t), variance
    posterior_variance + coef1^2 Var(x_0|x_t), and N(same mean, sigma_t^2), summed over t >= 1."""
    abar = diffusion.alphas_cumprod
    var_x0 = S**2 * (1 - abar) / (abar * S**2 + 1 - abar)
    true = diffusion.posterior_variance + diffusion.posterior_mean_coef1**2 * var_x0
    model = diffusion.model_variance
    kl = 0.5 * (torch.log(model / true) + true / model - 1)
    return kl[1:].sum().item() / LN2


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_bound_of_the_optimal_model_is_at_least_the_true_nll_and_close(variance):
    diffusion = Diffusion(1000, "linear", variance=variance)
    g = torch.Generator().manual_seed(0)
    x0 = likelihood.quantize(MU + S * torch.randn(1024, 1, 4, 4, generator=g))
    probs = level_probabilities()
    assert abs(probs.sum().item() - 1) < 1e-12
    levels = ((x0 + 1) * 127.5).round().long()
    true_nll = (-probs[levels].log()).flatten(1).mean(1) / LN2  # exact, per image [N]
    entropy = -(probs * probs.log()).sum().item() / LN2  # about 7.30 bits/dim
    assert abs(true_nll.mean().item() - entropy) < 0.05

    bpd = likelihood.bits_per_dim(diffusion, OptimalEps(diffusion), x0, batch_size=4096, generator=g)
    # Compare per image with the same images' true NLL: the data's own spread cancels.
    gap = (bpd - true_nll).double()
    se = (gap.std() / math.sqrt(len(gap))).item()
    mismatch = variance_mismatch_bits(diffusion)
    # The bound holds and is tight up to (i) the cost of a fixed sigma_t^2, known exactly for
    # continuous data: 0.005 bits/dim for sigma^2 = beta (optimal for large-variance data),
    # 0.64 for the posterior variance, which is too small at the first steps; (ii) the cost
    # of discreteness, positive and small: this model is optimal for continuous data, and its
    # Gaussian decoder spreads over neighbouring levels (about 0.08 bits/dim for "beta" and
    # 0.02 for "posterior" with 130k images; the standard error here is about 0.016).
    assert gap.mean() > -3 * se
    assert mismatch - 3 * se < gap.mean() < mismatch + 0.15, (gap.mean(), mismatch, se)
    if variance == "beta":
        assert mismatch < 0.01
    else:
        assert 0.5 < mismatch < 0.8


def test_bits_per_dim_does_not_depend_on_batch_size():
    diffusion = Diffusion(1000, "linear")
    x0 = likelihood.quantize(MU + S * torch.randn(40, 1, 2, 2))
    model = OptimalEps(diffusion)
    for timesteps in (None, 30):
        runs = [likelihood.bits_per_dim(diffusion, model, x0, timesteps=timesteps, batch_size=b,
                               generator=torch.Generator().manual_seed(3), return_terms=True)
                for b in (7, 64)]
        assert torch.equal(runs[0][0], runs[1][0])
        assert torch.equal(runs[0][1]["t"], runs[1][1]["t"])
    _, terms = runs[0]
    assert terms["vb"].shape == (30, 40) and terms["t"][0] == 0


def normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def exact_x0_bound(x0: torch.Tensor, variance: str):
    """The bound, term by term, for a model that returns the true x0 ("x0" objective), from the
    paper's schedule and Eq. 5, 7 and 13 alone. Its mean equals the posterior mean at every
    t >= 1, so each KL term is the variance mismatch 0.5 (log(s2 / q2) + q2 / s2 - 1), whatever
    x_t is; at t = 0 the mean is x0 itself and the decoder's width is the posterior variance of
    paper t = 2, so L_0 is the mass of the pixel's own bin. Returns per-image bits/dim:
    (prior [N], decoder [N], kl [T] with kl[0] = 0)."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, dim=0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    posterior = betas * (1 - abar_prev) / (1 - abar)  # [0] is 0: no KL term at t = 0
    x = x0.double().flatten(1)
    a_T = abar[-1].item()
    prior = 0.5 * (-math.log(1 - a_T) + (1 - a_T) + a_T * x**2 - 1).mean(1) / LN2
    model = betas if variance == "beta" else posterior
    kl = torch.zeros(1000, dtype=torch.float64)
    kl[1:] = 0.5 * (torch.log(model[1:] / posterior[1:]) + posterior[1:] / model[1:] - 1) / LN2
    z = (1 / 255) / math.sqrt(posterior[1].item())  # half a bin over the decoder's width
    edge, interior = (torch.tensor(-math.log(p), dtype=torch.float64)
                      for p in (normal_cdf(z), 2 * normal_cdf(z) - 1))  # an end bin reaches to infinity
    decoder = torch.where(x.abs() > 1 - 1e-6, edge, interior).mean(1) / LN2
    return prior, decoder, kl


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_the_bound_of_an_exact_x0_model_has_a_closed_form(variance):
    diffusion = Diffusion(1000, "linear", objective="x0", variance=variance)
    levels = torch.tensor([[0, 255, 1, 128, 254, 37, 0, 200],  # three pixels at the ends
                           [0, 0, 0, 0, 255, 255, 255, 0],  # all of them
                           [1, 2, 100, 128, 200, 254, 253, 64]], dtype=torch.uint8)  # none
    x0 = scale_to_unit_interval(levels).reshape(3, 1, 2, 4)
    model = lambda x_t, t: x0  # the true clean images, one call for the whole batch
    prior, decoder, kl = exact_x0_bound(x0, variance)
    assert decoder.max() - decoder.min() > 0.1  # the images differ in their edge pixels

    bpd, terms = likelihood.bits_per_dim(diffusion, model, x0, batch_size=8, return_terms=True,
                                generator=torch.Generator().manual_seed(0))
    assert torch.allclose(terms["prior"].double(), prior, rtol=1e-6, atol=0)
    assert torch.allclose(terms["decoder"].double(), decoder, rtol=1e-6, atol=0)
    # (float32 log-variances: terms below 1e-9 are rounding)
    assert torch.allclose(terms["vb"][1:].double(), kl[1:, None].expand(999, 3), rtol=1e-4, atol=1e-9)
    assert torch.allclose(bpd.double(), prior + decoder + kl.sum(), rtol=1e-6, atol=0)
    if variance == "posterior":
        assert kl.sum() == 0  # the bound is the prior and the decoder alone
    else:  # sigma^2 = beta_t is too wide for a known x0: the 0.49 bits/dim floor of chapter 6
        assert kl.sum().item() == pytest.approx(0.486, abs=1e-3)

    # K = 30 stratified terms: L_0 once, every other term weighted by its stratum's size.
    bpd, terms = likelihood.bits_per_dim(diffusion, model, x0, timesteps=30, batch_size=8,
                                return_terms=True, generator=torch.Generator().manual_seed(1))
    t, weights = terms["t"], terms["weights"].double()
    assert t[0] == 0 and weights[0] == 1 and weights.sum() == 1000
    estimate = prior + decoder + (weights[1:] * kl[t[1:]]).sum()
    assert torch.allclose(bpd.double(), estimate, rtol=1e-6, atol=0)


def test_bits_per_dim_with_a_unet_is_reproducible_in_eval_mode_and_batch_invariant():
    diffusion = Diffusion(timesteps=20)
    model = UNet(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                 attention_resolutions=(4,), num_heads=2, dropout=0.5, image_size=8)
    model.train()
    x0 = likelihood.quantize(torch.rand(6, 1, 8, 8) * 2 - 1)
    a = likelihood.bits_per_dim(diffusion, model, x0, batch_size=2, generator=torch.Generator().manual_seed(1))
    b = likelihood.bits_per_dim(diffusion, model, x0, batch_size=6, generator=torch.Generator().manual_seed(1))
    assert model.training  # put back as it was
    # With dropout active the two would differ far more than this.
    assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert a.shape == (6,) and torch.isfinite(a).all() and (a > 0).all()


def test_stratified_estimate_matches_the_full_bound():
    diffusion = Diffusion(1000, "linear")
    g = torch.Generator().manual_seed(5)
    x0 = likelihood.quantize(MU + S * torch.randn(256, 1, 2, 2, generator=g))
    model = OptimalEps(diffusion)
    full = likelihood.bits_per_dim(diffusion, model, x0, generator=g, batch_size=4096)
    estimates = torch.stack([likelihood.bits_per_dim(diffusion, model, x0, timesteps=100, generator=g,
                                            batch_size=4096) for _ in range(4)])
    difference = (estimates.mean(0) - full).double()
    se = difference.std() / math.sqrt(len(difference))
    assert abs(difference.mean()) < 4 * se + 0.01, (difference.mean(), se)
    # For comparison, K = 100 timesteps drawn uniformly from all T would be off by several
    # bits/dim whenever L_0 (about 2.5 bits/dim) is drawn: 10 x L_0 enters the sum.


def test_bits_per_dim_rejects_data_off_the_grid():
    diffusion = Diffusion(timesteps=10)
    with pytest.raises(ValueError, match="quantize"):
        likelihood.bits_per_dim(diffusion, OptimalEps(diffusion), torch.full((2, 1, 2, 2), 0.001))
    with pytest.raises(ValueError, match="timesteps"):
        likelihood.bits_per_dim(diffusion, OptimalEps(diffusion), torch.full((2, 1, 2, 2), -1.0),
                       timesteps=11)


# ------------------------------------------------------------------ Fréchet distance


def random_covariance(dim, g):
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return a @ a.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)


def test_frechet_distance_of_identical_sets_is_zero():
    features = torch.randn(500, 16)
    assert quality.frechet_distance(features, features) < 1e-8
    assert quality.frechet_distance(features, features + 1.0) == pytest.approx(16.0, rel=1e-6)


def test_frechet_distance_matches_closed_forms():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    a, b = torch.rand(8, generator=g, dtype=torch.float64) + 0.1, torch.rand(8, generator=g, dtype=torch.float64) * 3
    expected = (mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()
    got = quality.frechet_distance_from_statistics((mu1, torch.diag(a)), (mu2, torch.diag(b)))
    assert got == pytest.approx(expected.item(), rel=1e-9)
    # A full covariance and a multiple of it: (S c^2 S)^(1/2) = c S, so Tr = (1 - c)^2 Tr S.
    cov = random_covariance(12, g)
    got = quality.frechet_distance_from_statistics((torch.zeros(12), cov), (torch.zeros(12), 2.25 * cov))
    assert got == pytest.approx(0.25 * cov.trace().item(), rel=1e-8)
    # From samples, the estimate approaches the closed form.
    x = mu1 + a.sqrt() * torch.randn(100_000, 8, generator=g, dtype=torch.float64)
    y = mu2 + b.sqrt() * torch.randn(100_000, 8, generator=g, dtype=torch.float64)
    assert quality.frechet_distance(x, y) == pytest.approx(expected.item(), rel=0.02)


def test_frechet_distance_is_symmetric_for_non_commuting_covariances():
    g = torch.Generator().manual_seed(1)
    s1 = (torch.randn(10, generator=g), random_covariance(10, g))
    s2 = (torch.randn(10, generator=g), random_covariance(10, g))
    assert not torch.allclose(s1[1] @ s2[1], s2[1] @ s1[1])
    d12 = quality.frechet_distance_from_statistics(s1, s2)
    assert d12 > 0.1
    assert d12 == pytest.approx(quality.frechet_distance_from_statistics(s2, s1), rel=1e-9)


# ------------------------------------------------------------------ the shipped classifier


def test_real_images_for_the_scores_are_never_downloaded(tmp_path, monkeypatch):
    """With NAIVEDIFFUSION_DOWNLOAD=0 (set by conftest.py) a missing set fails at once with the
    data-root message; the network is never tried."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(FileNotFoundError, match="downloading is off"):
        quality.load_images("mnist", n=10, root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="downloading is off"):
        quality.sample_quality(torch.zeros(4, 1, 28, 28), "mnist", n=10, root=str(tmp_path))


def test_shipped_mnist_classifier_loads_and_classifies_real_digits(mnist_root):
    classifier = quality.load_classifier("mnist")
    meta = classifier.metadata
    assert meta["dataset"] == "mnist" and meta["test_accuracy"] > 0.98
    assert "train-classifier" in meta["command"] and meta["torch_version"] and meta["date"]
    assert quality.classifier_path("mnist").stat().st_size < 1_000_000
    images, labels = quality.load_images("mnist", train=False, n=500, seed=1, root=mnist_root)
    assert quality.accuracy(classifier, images, labels) > 0.97
    features = quality.classifier_features(classifier, images)
    assert features.shape == (500, classifier.config["features"])


def test_classifier_takes_cifar_sized_images_and_saves_and_loads(tmp_path):
    classifier = quality.Classifier(in_channels=3, num_classes=10, image_size=32).eval()
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    assert classifier(x).shape == (5, 10)
    path = quality.save_classifier(classifier, tmp_path / "c.pt", dataset="cifar10", test_accuracy=0.5)
    loaded = quality.load_classifier("cifar10", path)
    assert loaded.metadata["dataset"] == "cifar10"
    assert torch.equal(quality.classifier_features(loaded, x), quality.classifier_features(classifier, x))
    with pytest.raises(ValueError, match="images"):
        quality.classifier_features(loaded, torch.zeros(2, 1, 28, 28))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a naivediffusion classifier"):
        quality.load_classifier("cifar10", tmp_path / "other.pt")


def test_missing_classifier_weights_name_the_command_that_trains_them():
    with pytest.raises(FileNotFoundError, match="train-classifier --dataset fashion-mnist"):
        quality.load_classifier("fashion-mnist")
    with pytest.raises(ValueError, match="labelled"):
        quality.load_classifier("folder:/tmp")


def blur(images):
    kernel = torch.ones(1, 1, 5, 5) / 25
    return F.conv2d(images, kernel, padding=2)


def test_sample_quality_floor_is_far_below_noise_blur_and_shuffled_pixels(mnist_root):
    real, _ = quality.load_images("mnist", train=False, n=400, seed=7, root=mnist_root)
    g = torch.Generator().manual_seed(0)
    candidates = {
        "noise": torch.rand(400, 1, 28, 28, generator=g) * 2 - 1,
        "blurred": blur(real),
        "shuffled": real.flatten(1)[:, torch.randperm(784, generator=g)].reshape(real.shape),
    }
    kwargs = dict(dataset="mnist", n=2000, root=mnist_root)  # the shipped classifier
    scores = {name: quality.sample_quality(x, **kwargs) for name, x in candidates.items()}
    same_split = quality.sample_quality(real, **kwargs)
    floor = scores["noise"]["fd_real"]
    assert all(s["fd_real"] == floor for s in scores.values())  # same held-out images
    assert scores["noise"]["n_samples"] == 400 and scores["noise"]["n_reference"] == 2000
    assert floor > 0
    # Other real test images score about like the floor; every corruption far above it
    # (noise about 250 times the floor, blurred or shuffled pixels about 100 times).
    assert same_split["fd"] < 2 * floor
    for name, s in scores.items():
        assert s["fd"] > 20 * floor, (name, s, floor)
    # Blurred digits still look like digits: closer than noise.
    assert scores["blurred"]["fd"] < scores["noise"]["fd"]


# ------------------------------------------------------------------ evaluate


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from naivediffusion.config import TrainConfig
    from naivediffusion.train import Trainer

    run_dir = tmp_path_factory.mktemp("run")
    config = TrainConfig.for_dataset(
        "mnist", steps=2, batch_size=4, timesteps=20, model_overrides={"base_channels": 8},
        device="cpu", run_dir=str(run_dir), sample_every=1000, checkpoint_every=1000,
        num_sample_images=4, sample_steps=2, warmup_steps=0, seed=0,
    )
    Trainer(config).train(progress=False)
    return run_dir / "ema.pt"


def evaluate(argv):
    """`python -m naivediffusion evaluate ARGV` in this process: its exit status."""
    return main(["evaluate", *argv])


def test_evaluate_bpd_writes_the_bound_and_its_settings(tiny_checkpoint, tmp_path, mnist_root, capsys):
    out = tmp_path / "bpd.json"
    assert evaluate(["--checkpoint", str(tiny_checkpoint), "--metric", "bpd", "--n", "6",
                     "--timesteps", "5", "--batch-size", "4", "--device", "cpu",
                     "--data-root", str(mnist_root), "--out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["metric"] == "bpd" and result["step"] == 2 and result["n"] == 6
    assert result["checkpoint"] == str(tiny_checkpoint) and result["timesteps"] == 5
    assert result["num_timesteps"] == 20 and len(result["terms"]["vb"]) == 5
    assert math.isfinite(result["bpd"]) and result["bpd"] > 0
    assert f"{result['bpd']:.4f}" in capsys.readouterr().out


def test_evaluate_fid_reports_the_score_and_the_real_data_floor(tiny_checkpoint, tmp_path, mnist_root, capsys):
    out = tmp_path / "fid.json"
    assert evaluate(["--checkpoint", str(tiny_checkpoint), "--metric", "fid", "--n", "20",
                     "--sampler", "ddim", "--steps", "2", "--device", "cpu",
                     "--data-root", str(mnist_root), "--out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["sampler"] == "ddim" and result["steps"] == 2 and result["n_samples"] == 20
    # Two training steps give noise, far from the floor of 20 real images.
    assert result["fd"] > 5 * result["fd_real"] > 0
    printed = capsys.readouterr().out
    assert f"{result['fd']:.3f}" in printed and f"{result['fd_real']:.3f}" in printed


def test_evaluate_errors_are_clear(tiny_checkpoint, tmp_path, capsys):
    assert evaluate(["--checkpoint", str(tmp_path / "nothing.pt"), "--metric", "bpd"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert evaluate(["--checkpoint", str(tiny_checkpoint), "--metric", "bpd", "--timesteps", "0",
                     "--device", "cpu", "--out", str(tmp_path / "m.json")]) == 2
    assert "timesteps" in capsys.readouterr().err and not (tmp_path / "m.json").exists()


def test_evaluate_bpd_takes_either_reverse_variance(tiny_checkpoint, tmp_path, mnist_root, capsys):
    """--variance swaps sigma_t^2 for the same network: the prior and L_0 (whose width is the
    same posterior variance for both) stay, the KL terms of t >= 1 change."""
    results = {}
    for variance in ("beta", "posterior"):
        out = tmp_path / f"{variance}.json"
        assert evaluate(["--checkpoint", str(tiny_checkpoint), "--metric", "bpd", "--n", "6",
                         "--timesteps", "5", "--variance", variance, "--device", "cpu",
                         "--data-root", str(mnist_root), "--out", str(out), "--no-progress"]) == 0
        results[variance] = json.loads(out.read_text())
        assert results[variance]["diffusion_config"]["variance"] == variance
        assert f"variance {variance}" in capsys.readouterr().out
    beta, posterior = results["beta"], results["posterior"]
    assert beta["terms"]["t"] == posterior["terms"]["t"]
    assert beta["terms"]["prior"] == posterior["terms"]["prior"]
    assert beta["terms"]["decoder"] == pytest.approx(posterior["terms"]["decoder"], rel=1e-9)
    assert all(abs(a - b) > 1e-6 for a, b in zip(beta["terms"]["vb"][1:], posterior["terms"]["vb"][1:], strict=True))


def test_variance_is_refused_where_it_changes_nothing(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert evaluate(["--checkpoint", str(tiny_checkpoint), "--metric", "fid", "--sampler", "ddim",
                     "--variance", "posterior", "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --variance applies to --sampler ddpm") and "--eta" in err
    assert not out.exists()
