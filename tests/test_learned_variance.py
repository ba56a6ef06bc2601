"""Learned variances (Improved DDPM, Nichol & Dhariwal 2021): the interpolation, the hybrid
loss's stop-gradient, and the bound of a fitted variance on Gaussian data, where the best
variance is known."""

from __future__ import annotations

import math

import pytest
import torch

from naivediffusion import likelihood, variance
from naivediffusion.diffusion import Diffusion
from naivediffusion.unet import UNet

LN2 = math.log(2.0)


def test_f_0_and_f_1_give_beta_tilde_and_beta_exactly():
    learned = Diffusion(1000, "linear", variance="learned")
    beta, posterior = Diffusion(1000, "linear", variance="beta"), Diffusion(1000, "linear", variance="posterior")
    t = torch.arange(1000)
    ones = torch.ones(1000, 1, 1, 1, dtype=torch.float64)
    at_0 = variance.learned_log_variance(learned, -ones, t).flatten()  # v = -1: f = 0
    at_1 = variance.learned_log_variance(learned, ones, t).flatten()  # v = +1: f = 1
    assert torch.equal(at_0, posterior.model_log_variance)
    assert torch.equal(at_1, torch.log(learned.betas))
    assert torch.equal(at_1[1:], beta.model_log_variance[1:])  # t = 0 is the decoder's width (see Diffusion)
    middle = variance.learned_log_variance(learned, 0 * ones, t).flatten()  # f = 1/2: the geometric mean
    assert torch.allclose(middle.exp(), (learned.betas * posterior.model_variance).sqrt(), rtol=1e-12)
    assert (at_0 < middle).all() and (middle < at_1).all()


def test_a_fixed_variance_reads_a_learned_networks_mean_and_a_learned_one_needs_its_output():
    model = UNet.from_preset("mnist-small", out_channels=2).eval()
    torch.nn.init.normal_(model.conv_out.weight, std=0.01)
    x = torch.randn(3, 1, 28, 28)
    t = torch.tensor([0, 400, 999])
    learned, fixed = Diffusion(variance="learned"), Diffusion(variance="beta")
    with torch.no_grad():
        a, b = learned.p_mean_variance(model, x, t), fixed.p_mean_variance(model, x, t)
        assert torch.equal(a["mean"], b["mean"])
        assert a["log_variance"].shape == x.shape and b["log_variance"].shape == (3, 1, 1, 1)
        v = model(x, t)[:, 1:]
        assert torch.allclose(a["log_variance"], variance.learned_log_variance(learned, v, t))
        with pytest.raises(ValueError, match="twice the image's 1 output channels"):
            learned.p_mean_variance(UNet.from_preset("mnist-small"), x, t)


def test_no_vlb_gradient_reaches_the_mean():
    diffusion = Diffusion(100, "linear", objective="v", variance="learned")
    g = torch.Generator().manual_seed(0)
    x0 = likelihood.quantize(torch.rand(16, 1, 8, 8, generator=g) * 2 - 1)
    t = torch.randint(0, 100, (16,), generator=g)
    t[:3] = 0  # the decoder's term too
    noise = torch.randn(x0.shape, generator=g)
    output = torch.randn(16, 2, 8, 8, generator=g, requires_grad=True)

    def model(x_t, step):
        return output

    x_t = diffusion.q_sample(x0, t, noise)
    vlb = variance.vlb_terms(diffusion, x0, x_t, t, output[:, :1], output[:, 1:])
    (grad,) = torch.autograd.grad(vlb.sum(), output)
    assert torch.count_nonzero(grad[:, :1]) == 0
    assert (grad[:, 1:].abs().flatten(1).amax(1) > 0).all()  # every image's term trains v

    # The hybrid loss: the mean's gradient is L_simple's alone, v's is L_vlb's alone.
    (hybrid,) = torch.autograd.grad(diffusion.loss(model, x0, t=t, noise=noise), output)
    mse = ((diffusion.target(x0, noise, t) - output[:, :1]) ** 2).mean()
    (simple,) = torch.autograd.grad(mse, output)
    assert torch.equal(hybrid[:, :1], simple[:, :1])
    weight = diffusion.num_timesteps * 0.001
    assert torch.allclose(hybrid[:, 1:], weight * grad[:, 1:] / 16, rtol=1e-5, atol=1e-12)


# ------------------------------------- the bound of a fitted variance on Gaussian data

MU, S = 0.0, 0.05  # pixels ~ N(MU, S^2), independently, put on the 256-level grid


def optimal_eps(diffusion, x_t, t):
    """E[eps | x_t] for Gaussian data (from the joint Gaussian of x_t and eps)."""
    abar = diffusion.alphas_cumprod[t].to(x_t.dtype).reshape(-1, 1, 1, 1)
    return (1 - abar).sqrt() * (x_t - abar.sqrt() * MU) / (abar * S**2 + 1 - abar)


def optimal_log_variance(diffusion) -> torch.Tensor:
    """The variance of the true reverse step q(x_{t-1} | x_t) for continuous Gaussian data:
    the posterior variance plus coef1^2 Var(x_0 | x_t). It is what a learned variance should find."""
    abar = diffusion.alphas_cumprod
    var_x0 = S**2 * (1 - abar) / (abar * S**2 + 1 - abar)
    return torch.log(diffusion.posterior_variance + diffusion.posterior_mean_coef1**2 * var_x0)


def fit_v(diffusion, x0, iterations=150) -> torch.Tensor:
    """One v per timestep, fitted by Adam to the bound's terms on the data (every term at once:
    each L_t depends on its own v_t only)."""
    v = torch.zeros(diffusion.num_timesteps, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([v], lr=0.05)
    g = torch.Generator().manual_seed(1)
    t = torch.arange(diffusion.num_timesteps).repeat_interleave(8)
    for _ in range(iterations):
        images = x0[torch.randint(0, len(x0), (len(t),), generator=g)]
        x_t = diffusion.q_sample(images, t, torch.randn(images.shape, generator=g, dtype=torch.float64))
        model = lambda x, step: torch.cat([optimal_eps(diffusion, x, step), v[step].reshape(-1, 1, 1, 1).expand_as(x)], 1)
        loss = likelihood.vb_terms(diffusion, model, images, x_t, t, clip=False).sum() / 8
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return v.detach()


def test_a_fitted_variance_gives_a_bound_below_both_fixed_ones():
    g = torch.Generator().manual_seed(0)
    x0 = likelihood.quantize(MU + S * torch.randn(512, 1, 2, 2, generator=g, dtype=torch.float64))
    learned = Diffusion(1000, "linear", variance="learned")
    v = fit_v(learned, x0)
    # What it found: the true reverse variance, wherever beta and beta-tilde are far enough
    # apart for the bound to care (t >= 1; at t = 0 the decoder's width is another matter).
    found = variance.learned_log_variance(learned, v.reshape(-1, 1, 1, 1), torch.arange(1000)).flatten()
    gap = (learned.log_betas - learned.posterior_log_variance_clipped)[1:15]
    assert (gap > 0.1).all()
    error = (found - optimal_log_variance(learned))[1:15].abs()
    assert (error < 0.2 * gap).all(), (error / gap)  # Adam on noisy terms; data on the grid

    fitted = lambda x, step: torch.cat([optimal_eps(learned, x, step), v[step].reshape(-1, 1, 1, 1).expand_as(x)], 1)
    bounds = {}
    for name, diffusion, model in [
        ("learned", learned, fitted),
        ("beta", Diffusion(1000, "linear", variance="beta"), lambda x, step: optimal_eps(learned, x, step)),
        ("posterior", Diffusion(1000, "linear", variance="posterior"), lambda x, step: optimal_eps(learned, x, step)),
    ]:
        # The same seed: the same x_t for all three, so their differences are paired.
        bounds[name] = likelihood.bits_per_dim(diffusion, model, x0, batch_size=512, clip=False,
                                               generator=torch.Generator().manual_seed(2))
    for fixed in ("beta", "posterior"):
        diff = (bounds[fixed] - bounds["learned"]).double()
        se = (diff.std() / math.sqrt(len(diff))).item()
        assert diff.mean() > 5 * se, (fixed, diff.mean(), se)
    # beta is close to optimal for most t here, beta-tilde far from it at the first steps.
    assert (bounds["posterior"] - bounds["learned"]).mean() > 0.2
    assert (bounds["beta"] - bounds["learned"]).mean() > 0.02


# ------------------------------------------------ DDPM on fewer, respaced steps


class Affine(torch.nn.Module):
    """A stand-in network: x0 prediction a x_t (objective "x0"), and a constant v."""

    def __init__(self, v: float | None):
        super().__init__()
        self.v = v

    def forward(self, x, t):
        out = 0.5 * x
        return out if self.v is None else torch.cat([out, torch.full_like(x, self.v)], 1)


def draw(diffusion, model, sampler, steps, eta=0.0):
    return diffusion.sample(model, (4, 1, 6, 6), sampler=sampler, steps=steps, eta=eta, progress=False,
                            generator=torch.Generator().manual_seed(3))


def test_respaced_ddpm_with_beta_tilde_is_ddim_with_eta_1_and_v_picks_between_the_variances():
    posterior = Diffusion(1000, "linear", objective="x0", variance="posterior")
    ddim = draw(posterior, Affine(None), "ddim", 10, eta=1.0)
    assert torch.allclose(draw(posterior, Affine(None), "ddpm", 10), ddim, atol=1e-5)
    learned = Diffusion(1000, "linear", objective="x0", variance="learned")
    assert torch.allclose(draw(learned, Affine(-1.0), "ddpm", 10), ddim, atol=1e-5)  # f = 0
    beta = draw(Diffusion(1000, "linear", objective="x0", variance="beta"), Affine(None), "ddpm", 10)
    assert torch.allclose(draw(learned, Affine(1.0), "ddpm", 10), beta, atol=1e-5)  # f = 1
    assert not torch.allclose(beta, ddim, atol=1e-3)
    # All T steps: Algorithm 2 itself, whatever the variance.
    full = Diffusion(20, "linear", objective="x0", variance="learned")
    assert torch.allclose(draw(full, Affine(1.0), "ddpm", None),
                          draw(Diffusion(20, "linear", objective="x0"), Affine(None), "ddpm", None), atol=1e-5)
    with pytest.raises(ValueError, match="steps must be an integer from 1 to T=20"):
        draw(full, Affine(1.0), "ddpm", 21)


def test_data_without_channels_is_all_mean():
    """Points of one dimension [B] (the chapters' toy data) have no channel axis to split."""
    d = Diffusion(100, "linear")
    x, t = torch.randn(5, dtype=torch.float64), torch.full((5,), 10)
    eps = torch.randn(5, dtype=torch.float64)
    assert variance.split_output(x, eps) == (eps, None)
    assert torch.allclose(d.predict_eps(x, t, d.predict_x0(x, t, eps)), eps, atol=1e-9)
