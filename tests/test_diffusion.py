"""The diffusion process: each equation of DDPM checked against an independent computation."""

import math
from fractions import Fraction

import pytest
import torch

from naivediffusion import Diffusion, sampling


def _t(value: int, batch: int) -> torch.Tensor:
    return torch.full((batch,), value, dtype=torch.long)


# --------------------------------------------------------------------- tables

def test_tables_are_float64_and_use_the_papers_names():
    d = Diffusion(timesteps=100)
    for name in ["betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance",
                 "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"]:
        table = getattr(d, name)
        assert table.dtype == torch.float64, name
        assert table.shape == (100,), name
    # Code index 0 is the paper's t = 1: alpha-bar_0 = 1 sits in alphas_cumprod_prev[0].
    assert d.alphas_cumprod_prev[0] == 1.0
    assert d.alphas_cumprod[0] == pytest.approx(1 - d.betas[0].item())
    assert torch.allclose(d.alphas_cumprod_prev[1:], d.alphas_cumprod[:-1])


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_the_decoders_variance_is_the_posterior_variance_of_paper_t_2(variance):
    """Index 0 of the log-variances (paper t = 1, where the posterior variance is 0) holds the
    posterior variance of paper t = 2, beta_2 (1 - abar_1) / (1 - abar_2), as in the DDPM
    code; it is the width of the decoder L_0. Computed here from the paper's betas."""
    d = Diffusion(timesteps=1000, variance=variance)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # DDPM Sec. 4
    beta1, beta2 = betas[0].item(), betas[1].item()
    abar1, abar2 = 1 - beta1, (1 - beta1) * (1 - beta2)
    expected = math.log(beta2 * (1 - abar1) / (1 - abar2))
    assert abs(expected - math.log(beta1)) > 0.5  # log beta_1 would be far off
    assert d.posterior_log_variance_clipped[0].item() == pytest.approx(expected, rel=1e-12)
    assert d.model_log_variance[0].item() == pytest.approx(expected, rel=1e-12)
    assert d.model_variance[0].item() == pytest.approx(math.exp(expected), rel=1e-12)
    # From paper t = 2 on: log beta_t, or the log of the posterior variance.
    abar = torch.cumprod(1 - betas, dim=0)
    posterior = betas[1:] * (1 - abar[:-1]) / (1 - abar[1:])
    rest = betas[1:] if variance == "beta" else posterior
    assert torch.allclose(d.model_log_variance[1:], rest.log(), rtol=1e-12, atol=0)
    assert torch.allclose(d.posterior_log_variance_clipped[1:], posterior.log(), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"schedule": "quad"}, "linear, cosine"), ({"objective": "score"}, "eps, x0, v"),
     ({"variance": "learnt"}, "beta, posterior, learned")],
)
def test_bad_constructor_arguments_name_the_choices(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Diffusion(**kwargs)


# ------------------------------------------------------------ forward process

def test_q_sample_statistics_match_eq4():
    d = Diffusion(timesteps=1000)
    x0 = torch.linspace(-1, 1, 8, dtype=torch.float64).reshape(1, 8, 1, 1)
    n = 40_000
    for step in [0, 10, 300, 999]:
        x_t = d.q_sample(x0.expand(n, 8, 1, 1), _t(step, n))
        abar = d.alphas_cumprod[step].item()
        mean, var = x_t.mean(0), x_t.var(0)
        se_mean = math.sqrt((1 - abar) / n)
        assert torch.allclose(mean, math.sqrt(abar) * x0[0], atol=5 * se_mean + 1e-12)
        # Standard error of a sample variance of a Gaussian: var * sqrt(2 / n).
        assert torch.allclose(var, torch.full_like(var, 1 - abar), rtol=5 * math.sqrt(2 / n),
                              atol=1e-12)


def test_q_sample_equals_iterating_eq2():
    """Closed form (Eq. 4) versus applying q(x_t | x_{t-1}) (Eq. 2) t times."""
    d = Diffusion(timesteps=200)
    # Exactly: Gaussian means and variances propagate as m <- sqrt(alpha) m, v <- alpha v + beta.
    m, v = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    for step in range(200):
        m = d.alphas[step].sqrt() * m
        v = d.alphas[step] * v + d.betas[step]
        assert m.item() == pytest.approx(d.sqrt_alphas_cumprod[step].item(), rel=1e-10)
        assert v.item() == pytest.approx(1 - d.alphas_cumprod[step].item(), rel=1e-10)
    # And by simulation: the chain's samples after 60 steps have the closed-form statistics.
    n, x0 = 50_000, 0.7
    x = torch.full((n, 1, 1, 1), x0, dtype=torch.float64)
    for step in range(60):
        x = d.alphas[step].sqrt() * x + d.betas[step].sqrt() * torch.randn_like(x)
    closed = d.q_sample(torch.full_like(x, x0), _t(59, n))
    abar = d.alphas_cumprod[59].item()
    assert x.mean().item() == pytest.approx(math.sqrt(abar) * x0, abs=5 * math.sqrt(1 / n))
    assert x.var().item() == pytest.approx(1 - abar, rel=5 * math.sqrt(2 / n))
    assert closed.mean().item() == pytest.approx(x.mean().item(), abs=7 * math.sqrt(1 / n))


def test_q_sample_uses_the_given_noise_and_checks_t():
    d = Diffusion(timesteps=10)
    x0, noise = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    t = torch.tensor([0, 4, 9])
    expected = (d.sqrt_alphas_cumprod[t].float().reshape(3, 1, 1, 1) * x0
                + d.sqrt_one_minus_alphas_cumprod[t].float().reshape(3, 1, 1, 1) * noise)
    assert torch.allclose(d.q_sample(x0, t, noise), expected, atol=1e-6)
    with pytest.raises(ValueError, match="LongTensor"):
        d.q_sample(x0, t.float(), noise)


# ----------------------------------------------------------------- posterior

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_posterior_equals_bayes_rule(schedule):
    """q(x_{t-1} | x_t, x_0) by 1-D Gaussian conditioning, independently of Eq. 7."""
    d = Diffusion(timesteps=100, schedule=schedule)
    x0 = torch.tensor([-0.8, 0.1, 0.5], dtype=torch.float64).reshape(3, 1, 1, 1)
    x_t = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64).reshape(3, 1, 1, 1)
    for step in range(1, 100):
        abar_prev = d.alphas_cumprod[step - 1].item()
        alpha, beta = d.alphas[step].item(), d.betas[step].item()
        # prior x_{t-1} | x0 ~ N(sqrt(abar_prev) x0, 1 - abar_prev); likelihood x_t | x_{t-1}
        # ~ N(sqrt(alpha) x_{t-1}, beta). Posterior precision and mean by Bayes' rule:
        precision = 1 / (1 - abar_prev) + alpha / beta
        var = 1 / precision
        mean = var * (math.sqrt(abar_prev) * x0 / (1 - abar_prev) + math.sqrt(alpha) * x_t / beta)
        got_mean, got_var, got_log_var = d.q_posterior(x0, x_t, _t(step, 3))
        assert torch.allclose(got_mean, mean, rtol=1e-9, atol=1e-12)
        assert torch.allclose(got_var, torch.full_like(got_var, var), rtol=1e-9)
        assert torch.allclose(got_log_var, torch.full_like(got_var, math.log(var)), rtol=1e-9)
    # At the first step (paper t = 1) the posterior is x_0 itself, with zero variance.
    mean0, var0, log_var0 = d.q_posterior(x0, x_t, _t(0, 3))
    assert torch.allclose(mean0, x0) and torch.all(var0 == 0)
    assert torch.isfinite(log_var0).all()  # clipped


def test_q_posterior_by_monte_carlo():
    """Sample (x0 fixed, x_{t-1}, x_t) jointly; keep x_t near a value; compare moments."""
    d = Diffusion(timesteps=50)
    step, x0, n = 20, 0.4, 2_000_000
    x_prev = d.q_sample(torch.full((n, 1, 1, 1), x0, dtype=torch.float64), _t(step - 1, n))
    x_t = d.alphas[step].sqrt() * x_prev + d.betas[step].sqrt() * torch.randn_like(x_prev)
    near = (x_t - 0.5).abs() < 0.01
    mean, var, _ = d.q_posterior(torch.full((1, 1, 1, 1), x0, dtype=torch.float64),
                                 torch.full((1, 1, 1, 1), 0.5, dtype=torch.float64), _t(step, 1))
    selected = x_prev[near]
    assert selected.numel() > 5000
    se = math.sqrt(var.item() / selected.numel())
    assert selected.mean().item() == pytest.approx(mean.item(), abs=6 * se + 1e-3)
    assert selected.var().item() == pytest.approx(var.item(), rel=0.05)


# -------------------------------------------------------------- conversions

@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_objective_conversions_invert_each_other(objective):
    d = Diffusion(timesteps=1000, objective=objective)
    x0 = torch.rand(6, 2, 3, 3, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 100, 500, 998, 999])
    x_t = d.q_sample(x0, t, noise)
    target = d.target(x0, noise, t)
    assert torch.allclose(d.predict_x0(x_t, t, target), x0, atol=1e-8)
    assert torch.allclose(d.predict_eps(x_t, t, x0), noise, atol=1e-8)


def test_v_is_the_rotation_of_eps_and_x0():
    d = Diffusion(timesteps=100, objective="v")
    x0, noise = torch.randn(4, 1, 2, 2, dtype=torch.float64), torch.randn(4, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 10, 50, 99])
    a = d.sqrt_alphas_cumprod[t].reshape(4, 1, 1, 1)
    b = d.sqrt_one_minus_alphas_cumprod[t].reshape(4, 1, 1, 1)
    assert torch.allclose(d.velocity(x0, noise, t), a * noise - b * x0)
    # x_t and v are an orthonormal rotation of (x0, eps): their norms add up the same.
    x_t = d.q_sample(x0, t, noise)
    v = d.velocity(x0, noise, t)
    assert torch.allclose(x_t**2 + v**2, x0**2 + noise**2)


def test_p_mean_without_clipping_is_eq11():
    d = Diffusion(timesteps=100)
    x_t = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([1, 2, 30, 70, 99])
    eps = torch.randn_like(x_t)
    out = d.p_mean_variance(lambda x, tt: eps, x_t, t, clip=False)
    alpha = d.alphas[t].reshape(5, 1, 1, 1)
    beta = d.betas[t].reshape(5, 1, 1, 1)
    abar = d.alphas_cumprod[t].reshape(5, 1, 1, 1)
    eq11 = (x_t - beta / (1 - abar).sqrt() * eps) / alpha.sqrt()
    assert torch.allclose(out["mean"], eq11, atol=1e-10)
    # sigma^2 = beta_t for t > 0 with variance="beta"
    assert torch.allclose(out["variance"].flatten(), d.betas[t])
    posterior = Diffusion(timesteps=100, variance="posterior")
    out = posterior.p_mean_variance(lambda x, tt: eps, x_t, t, clip=False)
    assert torch.allclose(out["variance"].flatten(), posterior.posterior_variance[t])


def test_clipping_clips_the_predicted_x0_and_the_mean_follows_it():
    """pred_x0 is Eq. 15 clipped to [-1, 1], and the mean is Eq. 7 with the clipped x0 (the
    sampler steps are replayed exactly in test_sampler_steps.py)."""
    d = Diffusion(timesteps=100)
    x_t = torch.linspace(-3, 3, 64, dtype=torch.float64).reshape(4, 1, 4, 4)
    t = torch.tensor([99, 60, 20, 2])
    eps = 0.5 * x_t
    abar = torch.cumprod(1 - d.betas, 0)[t].reshape(4, 1, 1, 1)  # tested above against Eq. 2
    raw = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
    assert (raw.abs() > 1.05).any() and (raw.abs() < 0.95).any()
    for clip, x0 in ((False, raw), (True, raw.clamp(-1, 1))):
        out = d.p_mean_variance(lambda x, tt: 0.5 * x, x_t, t, clip=clip)
        assert torch.allclose(out["pred_x0"], x0, atol=1e-12)
        mean, _, _ = d.q_posterior(x0, x_t, t)  # checked against Bayes' rule above
        assert torch.allclose(out["mean"], mean, atol=1e-12)


# -------------------------------------------------------------------- loss

def test_loss_draws_t_uniformly_over_all_T():
    d = Diffusion(timesteps=10)
    seen = []

    def model(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    for _ in range(400):
        d.loss(model, torch.zeros(25, 1, 2, 2))
    counts = torch.bincount(torch.cat(seen), minlength=10)
    assert counts.numel() == 10 and counts.min() > 0  # t = 0 (paper t = 1) and t = T - 1 occur
    expected = 10_000 / 10
    assert ((counts - expected).abs() < 5 * math.sqrt(expected)).all()


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_loss_is_zero_for_the_oracle_and_the_mse_otherwise(objective):
    d = Diffusion(timesteps=50, objective=objective)
    x0 = torch.rand(4, 1, 3, 3) * 2 - 1
    noise, t = torch.randn_like(x0), torch.tensor([0, 5, 20, 49])
    target = d.target(x0, noise, t)
    assert d.loss(lambda x, tt: target, x0, t=t, noise=noise).item() == pytest.approx(0.0, abs=1e-12)
    zero = d.loss(lambda x, tt: torch.zeros_like(x), x0, t=t, noise=noise)
    assert zero.item() == pytest.approx((target**2).mean().item(), rel=1e-6)


def test_loss_passes_labels_to_the_model():
    d = Diffusion(timesteps=10)
    got = {}

    def model(x, t, labels):
        got["labels"] = labels
        return torch.zeros_like(x)

    d.loss(model, torch.zeros(3, 1, 2, 2), labels=torch.tensor([1, 2, 3]))
    assert got["labels"].tolist() == [1, 2, 3]


# ----------------------------------------------------------------- sampling

class GaussianOracle:
    """The exact eps-prediction E[eps | x_t] when every pixel of x0 ~ N(mu, s^2) independently.

    x_t = sqrt(abar) x0 + sqrt(1 - abar) eps is jointly Gaussian with eps, so
    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar).
    """

    def __init__(self, diffusion, mu, s):
        self.d, self.mu, self.s = diffusion, mu, s

    def __call__(self, x_t, t):
        abar = self.d.alphas_cumprod[t].to(x_t.dtype).reshape(-1, 1, 1, 1)
        return (1 - abar).sqrt() * (x_t - abar.sqrt() * self.mu) / (abar * self.s**2 + 1 - abar)


MU, S = 0.3, 0.2


@pytest.mark.parametrize(
    "sampler, steps, variance",
    [("ddpm", None, "beta"), ("ddpm", None, "posterior"), ("ddim", 1000, "beta")],
)
def test_samplers_reproduce_gaussian_data(sampler, steps, variance):
    d = Diffusion(timesteps=1000, variance=variance)
    g = torch.Generator().manual_seed(1)
    x = d.sample(GaussianOracle(d, MU, S), (2000, 1, 4, 4), sampler=sampler, steps=steps,
                 generator=g, progress=False)
    n = x.numel()
    # Monte Carlo error (5 standard errors) plus a small allowance for the T = 1000 discretisation.
    assert x.mean().item() == pytest.approx(MU, abs=5 * S / math.sqrt(n) + 0.002)
    assert x.std().item() == pytest.approx(S, rel=5 * math.sqrt(1 / (2 * n)) + 0.01)


def test_ddim_with_few_steps_converges_to_the_data_distribution():
    """DDIM (eta = 0) with 50 steps gets the mean right, and its std approaches s as steps grow.

    With few steps DDIM's first-order update shrinks the spread: a single step from
    x_T returns E[x0 | x_T], whose variance is below the data's. The error must fall
    monotonically with the number of steps and be small at 50.
    """
    d = Diffusion(timesteps=1000)
    model = GaussianOracle(d, MU, S)
    errors = {}
    for steps in [10, 20, 50, 1000]:
        x = d.sample(model, (2000, 1, 4, 4), sampler="ddim", steps=steps,
                     generator=torch.Generator().manual_seed(1), progress=False)
        n = x.numel()
        assert x.mean().item() == pytest.approx(MU, abs=5 * S / math.sqrt(n) + 0.002)
        errors[steps] = abs(x.std().item() - S) / S
    assert errors[10] > errors[20] > errors[50] > errors[1000]
    assert errors[50] < 0.15
    assert errors[1000] < 5 * math.sqrt(1 / (2 * 32000)) + 0.01


def test_ddim_with_eta_1_over_all_steps_is_ddpm_with_posterior_variance():
    d = Diffusion(timesteps=100, variance="posterior")
    model = GaussianOracle(d, MU, S)
    ddpm = d.sample(model, (8, 1, 3, 3), sampler="ddpm", generator=torch.Generator().manual_seed(3),
                    progress=False)
    ddim = d.sample(model, (8, 1, 3, 3), sampler="ddim", steps=100, eta=1.0,
                    generator=torch.Generator().manual_seed(3), progress=False)
    assert torch.allclose(ddpm, ddim, atol=1e-5)


def test_ddim_eta0_is_deterministic_given_x_T_and_ddpm_is_not():
    d = Diffusion(timesteps=100)
    model = GaussianOracle(d, MU, S)
    a = d.sample(model, (4, 1, 2, 2), sampler="ddim", steps=10, generator=torch.Generator().manual_seed(0),
                 progress=False)
    b = d.sample(model, (4, 1, 2, 2), sampler="ddim", steps=10, generator=torch.Generator().manual_seed(0),
                 progress=False)
    assert torch.equal(a, b)


def test_ddpm_adds_no_noise_at_the_last_step():
    d = Diffusion(timesteps=20)
    calls = []

    def model(x, t):
        calls.append(t[0].item())
        return torch.zeros_like(x)

    images, chain = d.sample(model, (2, 1, 2, 2), sampler="ddpm", progress=False, return_chain=True,
                             clip=False)
    assert calls == list(range(19, -1, -1))  # T-1 down to 0
    # The last step returns the posterior mean at t = 0, which is the predicted x0 itself.
    assert torch.allclose(images, chain["pred_x0"][-1])
    assert chain["x_t"].shape == (20, 2, 1, 2, 2) and chain["t"].tolist() == list(range(19, -1, -1))


@pytest.mark.parametrize("timesteps", [1000, 100])
def test_ddim_timesteps_are_the_rounded_linspace(timesteps):
    """`steps` timesteps round((T - 1) i / (steps - 1)), i = steps - 1 .. 0: evenly spaced over
    0..T-1 with both ends, descending. Computed with exact fractions; the step counts are ones
    where no value is a tie (x.5; with T - 1 odd, every odd count has one in the middle),
    so rounding is unambiguous."""
    d = Diffusion(timesteps=timesteps)
    counts = [2, 4, 6, 10, 12, 20, 34, 50, 64, 100, timesteps]
    if timesteps == 1000:
        counts += [250, 1000]
    for steps in counts:
        exact = [Fraction((timesteps - 1) * i, steps - 1) for i in range(steps)]
        assert all(v - math.floor(v) != Fraction(1, 2) for v in exact), steps
        expected = [math.floor(v + Fraction(1, 2)) for v in reversed(exact)]
        got = sampling.ddim_timesteps(d, steps)
        assert got.dtype == torch.long
        assert got.tolist() == expected, steps
    assert sampling.ddim_timesteps(d, 1).tolist() == [timesteps - 1]


@pytest.mark.parametrize("kwargs", [{"sampler": "ddim", "steps": 0}, {"sampler": "ddim", "steps": 11},
                                    {"sampler": "ddpm", "steps": 11}, {"sampler": "euler"}])
def test_bad_sampler_arguments(kwargs):
    d = Diffusion(timesteps=10)
    with pytest.raises(ValueError, match="steps|sampler"):
        d.sample(lambda x, t: x, (1, 1, 2, 2), progress=False, **kwargs)


def test_sampling_puts_a_module_in_eval_mode_and_restores_it():
    modes = []

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x, t):
            modes.append(self.training)
            return self.drop(x)

    net = Net().train()
    Diffusion(timesteps=5).sample(net, (1, 1, 2, 2), progress=False)
    assert modes == [False] * 5
    assert net.training
