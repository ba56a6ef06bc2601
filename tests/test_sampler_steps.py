"""Single sampler steps replayed exactly: DDPM (Algorithm 2, both variances) and DDIM (Song et
al. 2021, Eq. 12 and 16), with clipping active, against formulas computed here from the paper's
schedule, not from `Diffusion`'s own coefficient tables.

The model is a deterministic stub whose implied clean image (Eq. 15 solved for x0) is a known
function of x_t and t that leaves [-1, 1] for part of the pixels, so every step mixes clipped
and unclipped pixels, and querying it at the wrong t gives a different answer.
"""

import math

import pytest
import torch

from naivediffusion import Diffusion, sampling

T = 1000
# DDPM Sec. 4: beta rises linearly from 1e-4 to 0.02 over T = 1000 steps. In float64, by hand.
BETAS = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
ALPHAS = 1.0 - BETAS
ABAR = torch.cumprod(ALPHAS, dim=0)  # ABAR[t] is the paper's alpha-bar_{t+1}


def abar(t: int) -> float:
    """alpha-bar of code index t; t = -1 stands for alpha-bar_0 = 1 (no noise)."""
    return 1.0 if t < 0 else ABAR[t].item()


def believed_x0(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean image the stub implies: between -1.6 and 1.6, a different one for every t."""
    tt = t.to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
    return 1.6 * torch.sin(2.0 * x_t + 0.9 * tt)


class StubEps:
    """eps(x_t, t) = (x_t - sqrt(abar_t) x0(x_t, t)) / sqrt(1 - abar_t) for believed_x0 above,
    so that Eq. 15 gives back believed_x0. Records the t and labels of every call."""

    def __init__(self):
        self.calls: list[torch.Tensor] = []
        self.labels: list[torch.Tensor | None] = []

    def __call__(self, x_t, t, labels=None):
        self.calls.append(t.clone())
        self.labels.append(None if labels is None else labels.clone())
        a = ABAR.to(x_t.dtype)[t].reshape(-1, *([1] * (x_t.dim() - 1)))
        return (x_t - a.sqrt() * believed_x0(x_t, t)) / (1 - a).sqrt()


def grid_x(batch: int = 2, dtype=torch.float64) -> torch.Tensor:
    """x_t [batch, 1, 4, 8]: values spread over [-2.5, 2.5]."""
    n = batch * 32
    return torch.linspace(-2.5, 2.5, n, dtype=dtype).reshape(batch, 1, 4, 8)


def full_t(step: int, batch: int) -> torch.Tensor:
    return torch.full((batch,), step, dtype=torch.long)


def clipped_x0(x_t, step):
    """The stub's x0, clipped to [-1, 1]; checks that some pixels are clipped and some not."""
    x0 = believed_x0(x_t, full_t(step, x_t.shape[0]))
    assert (x0.abs() > 1.05).any() and (x0.abs() < 0.95).any(), "the stub should straddle the clip"
    return x0.clamp(-1.0, 1.0)


def ddpm_expected(x_t, step, variance):
    """(mean, sigma) of p(x_{t-1} | x_t) by Bayes' rule for q(x_{t-1} | x_t, x0) (Eq. 6-7), x0
    being the clipped estimate; sigma^2 = beta_t or the posterior variance (Sec. 3.2)."""
    x0 = clipped_x0(x_t, step)
    if step == 0:
        return x0, 0.0  # the last step returns the clipped x0 itself, with no noise
    alpha, beta, abar_prev = ALPHAS[step].item(), BETAS[step].item(), abar(step - 1)
    # prior x_{t-1} | x0 ~ N(sqrt(abar_prev) x0, 1 - abar_prev); likelihood x_t | x_{t-1} ~
    # N(sqrt(alpha) x_{t-1}, beta): multiply the two Gaussians.
    posterior_variance = 1.0 / (1.0 / (1.0 - abar_prev) + alpha / beta)
    mean = posterior_variance * (math.sqrt(abar_prev) * x0 / (1.0 - abar_prev)
                                 + math.sqrt(alpha) * x_t / beta)
    sigma2 = beta if variance == "beta" else posterior_variance
    return mean, math.sqrt(sigma2)


def ddim_expected(x_t, step, prev, eta):
    """(mean, sigma) of the DDIM step from t to prev (Song et al. Eq. 12, sigma of Eq. 16),
    with the noise direction re-derived from the clipped x0."""
    x0 = clipped_x0(x_t, step)
    a_t, a_prev = abar(step), abar(prev)
    eps = (x_t - math.sqrt(a_t) * x0) / math.sqrt(1.0 - a_t)
    sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
    mean = math.sqrt(a_prev) * x0 + math.sqrt(max(0.0, 1.0 - a_prev - sigma**2)) * eps
    return mean, sigma


def standard_normal(shape, seed, dtype=torch.float64):
    """The z the sampler draws from a CPU generator seeded with `seed`."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_the_stub_and_the_schedule_are_the_papers():
    d = Diffusion(timesteps=T)
    assert torch.allclose(d.betas, BETAS, rtol=1e-12, atol=0)
    # Eq. 15 applied to the stub's output gives back believed_x0 (no clipping here).
    x_t, t = grid_x(), full_t(500, 2)
    assert torch.allclose(d.predict_x0(x_t, t, StubEps()(x_t, t)), believed_x0(x_t, t), atol=1e-10)


STEPS = [T - 1, 500, 1, 0]


@pytest.mark.parametrize("variance", ["beta", "posterior"])
@pytest.mark.parametrize("step", STEPS)
def test_one_ddpm_step_has_the_exact_mean_and_noise_scale(variance, step):
    d = Diffusion(timesteps=T, variance=variance)
    x_t = grid_x()
    model = StubEps()
    seed = 11 + step
    x_prev, pred_x0 = sampling.ddpm_step(d, model, x_t, full_t(step, 2), True, None,
                                   torch.Generator().manual_seed(seed))
    assert [c.tolist() for c in model.calls] == [[step, step]]  # queried at t, not t - 1
    mean, sigma = ddpm_expected(x_t, step, variance)
    assert torch.allclose(pred_x0, clipped_x0(x_t, step), rtol=0, atol=1e-10)
    z = standard_normal(x_t.shape, seed)
    assert torch.allclose(x_prev, mean + sigma * z, rtol=0, atol=1e-10)
    if step > 0:  # the noise is there, with exactly this scale
        assert torch.allclose((x_prev - mean) / sigma, z, rtol=0, atol=1e-8)


def test_the_two_ddpm_variances_differ_where_the_test_looks():
    """beta_t and the posterior variance must differ at the replayed steps by far more than the
    tolerance of 1e-10, or the test above could not tell them apart: at paper t = T the
    standard deviations differ by about 6e-8; at paper t = 2 the posterior variance is
    beta_2 beta_1 / (beta_1 + beta_2) to first order, about 0.45 beta_2."""
    for step in (T - 1, 500, 1):
        (_, beta), (_, posterior) = (ddpm_expected(grid_x(), step, v) for v in ("beta", "posterior"))
        assert beta - posterior > 1e-8
    assert ddpm_expected(grid_x(), 1, "posterior")[1] ** 2 == pytest.approx(
        BETAS[1].item() * BETAS[0].item() / (BETAS[0].item() + BETAS[1].item()), rel=1e-3)


# (t, prev, eta): from T-1 and from the middle to 20 steps earlier, from 1 to 0, from 0 to x_0.
DDIM_STEPS = [(T - 1, T - 21, 0.0), (T - 1, T - 21, 0.7), (500, 480, 0.0), (500, 480, 1.0),
              (1, 0, 0.0), (1, 0, 0.5), (0, -1, 0.0), (0, -1, 1.0)]


@pytest.mark.parametrize("step, prev, eta", DDIM_STEPS)
def test_one_ddim_step_has_the_exact_mean_and_noise_scale(step, prev, eta):
    d = Diffusion(timesteps=T)
    x_t = grid_x()
    model = StubEps()
    seed = 5 + step
    x_prev, pred_x0 = sampling.ddim_step(d, model, x_t, full_t(step, 2), prev, eta, True, None,
                                   torch.Generator().manual_seed(seed))
    assert [c.tolist() for c in model.calls] == [[step, step]]
    mean, sigma = ddim_expected(x_t, step, prev, eta)
    assert torch.allclose(pred_x0, clipped_x0(x_t, step), rtol=0, atol=1e-10)
    z = standard_normal(x_t.shape, seed)
    assert torch.allclose(x_prev, mean + sigma * z, rtol=0, atol=1e-10)
    if eta > 0 and prev >= 0:
        assert sigma > 1e-3
        assert torch.allclose((x_prev - mean) / sigma, z, rtol=0, atol=1e-8)
    if prev < 0:
        assert sigma == 0 and torch.allclose(x_prev, clipped_x0(x_t, step), rtol=0, atol=1e-10)


def test_ddim_with_eta_1_between_neighbours_has_the_posterior_variance():
    """Song et al. Sec. 4.3: eta = 1 on consecutive steps is DDPM with sigma^2 = beta-tilde_t."""
    for step in (T - 1, 500, 1):
        _, sigma = ddim_expected(grid_x(), step, step - 1, 1.0)
        _, posterior = ddpm_expected(grid_x(), step, "posterior")
        assert sigma == pytest.approx(posterior, rel=1e-9)


def test_a_ddim_chain_replays_step_by_step():
    """Through `sample`: every step of a 5-step DDIM chain (eta = 0, float32) is the step
    computed here from the chain's own input, at the timesteps of the rounded linspace."""
    d = Diffusion(timesteps=T)
    model = StubEps()
    images, chain = d.sample(model, (2, 1, 4, 8), sampler="ddim", steps=5, progress=False,
                             generator=torch.Generator().manual_seed(0), return_chain=True)
    timesteps = [999, 749, 500, 250, 0]  # round(999 * i / 4), descending
    assert chain["t"].tolist() == timesteps
    assert [c.tolist() for c in model.calls] == [[s, s] for s in timesteps]
    outputs = [*chain["x_t"][1:], images]
    for i, step in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x_t = chain["x_t"][i].double()
        mean, _ = ddim_expected(x_t, step, prev, 0.0)
        assert torch.allclose(outputs[i].double(), mean, rtol=0, atol=1e-4), step
        # float32: at t = T-1, Eq. 15 multiplies rounding errors by 1/sqrt(abar) ~ 156
        assert torch.allclose(chain["pred_x0"][i].double(), clipped_x0(x_t, step), rtol=0, atol=5e-4)


class LabelledStub:
    """A class-conditional stub, eps = 0.1 * label * x_t, that records the labels it is given."""

    def __init__(self):
        self.labels: list[torch.Tensor | None] = []

    def __call__(self, x_t, t, labels=None):
        self.labels.append(None if labels is None else labels.clone())
        scale = 0.0 if labels is None else 0.1 * labels.to(x_t.dtype).reshape(-1, 1, 1, 1)
        return scale * x_t


@pytest.mark.parametrize("sampler, steps", [("ddpm", None), ("ddim", 4), ("ddim", 10)])
def test_sampling_passes_the_labels_to_every_model_call(sampler, steps):
    d = Diffusion(timesteps=10)

    def draw(model, labels):
        return d.sample(model, (3, 1, 2, 2), sampler=sampler, steps=steps, eta=0.5, labels=labels,
                        progress=False, generator=torch.Generator().manual_seed(0))

    model = LabelledStub()
    with_labels = draw(model, torch.tensor([3, 0, 7]))
    assert len(model.labels) == (10 if steps is None else steps)
    assert all(seen is not None and seen.tolist() == [3, 0, 7] for seen in model.labels)
    # The labels change what is drawn: other labels, other images from the same noise.
    assert not torch.allclose(draw(LabelledStub(), torch.tensor([1, 1, 1])), with_labels)
