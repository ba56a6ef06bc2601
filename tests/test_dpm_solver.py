"""DPM-Solver++(2M) and its stochastic form (`sampling.dpm_solver_step`): the step against a hand
computation, its first order against DDIM, its order of convergence on Gaussian data whose
probability-flow ODE has a known solution, guidance, no host reads, and the bad inputs."""

import math

import pytest
import torch

from naivediffusion import Diffusion, UNet, sampling
from naivediffusion.__main__ import main

MU, S = 0.5, 0.3  # the Gaussian data N(MU, S^2) of the convergence test


def linear_model(x, t):
    """Any fixed callable will do for the algebra: an output that depends on x and on t."""
    return 0.3 * x + 0.001 * t.reshape(-1, *[1] * (x.dim() - 1)).to(x.dtype)


def test_the_first_order_step_is_ddim_with_eta_0():
    diffusion = Diffusion(1000, "linear", "v")
    x = torch.randn(4, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 700)
    ddim, ddim_x0 = sampling.ddim_step(diffusion, linear_model, x, t, 500, eta=0.0)
    dpm, dpm_x0, _ = sampling.dpm_solver_step(diffusion, linear_model, x, t, 500)
    torch.testing.assert_close(dpm, ddim, rtol=1e-5, atol=1e-5)
    assert torch.equal(dpm_x0, ddim_x0)


@pytest.mark.parametrize("sde", [False, True])
def test_the_second_order_step_against_a_hand_computation(sde):
    diffusion = Diffusion(1000, "linear", "eps")
    x = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    before, now, prev = 900, 700, 500
    abar = diffusion.alphas_cumprod
    lam = {s: 0.5 * math.log(abar[s] / (1 - abar[s])) for s in (before, now, prev)}
    x0_before = torch.randn_like(x)
    state = (x0_before, torch.full((2, 1, 1, 1), lam[before], dtype=torch.float64))
    t = torch.full((2,), now)
    generator = torch.Generator().manual_seed(2)
    x_prev, x0, (kept, kept_lam) = sampling.dpm_solver_step(diffusion, linear_model, x, t, prev, state,
                                                            sde=sde, clip=False, generator=generator)
    # By hand, in float64: the data prediction from eps, the extrapolation in lambda, the update.
    eps = linear_model(x, t)
    x0_hand = (x - math.sqrt(1 - abar[now]) * eps) / math.sqrt(abar[now])
    h, r = lam[prev] - lam[now], (lam[now] - lam[before]) / (lam[prev] - lam[now])
    data = x0_hand + (x0_hand - x0_before) / (2 * r)
    sigma, sigma_prev, alpha_prev = math.sqrt(1 - abar[now]), math.sqrt(1 - abar[prev]), math.sqrt(abar[prev])
    if sde:
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
        hand = (sigma_prev / sigma * math.exp(-h) * x + alpha_prev * (1 - math.exp(-2 * h)) * data
                + sigma_prev * math.sqrt(1 - math.exp(-2 * h)) * z)
    else:
        hand = sigma_prev / sigma * x + alpha_prev * (1 - math.exp(-h)) * data
    torch.testing.assert_close(x0, x0_hand)
    torch.testing.assert_close(x_prev, hand)
    assert kept is x0 and torch.allclose(kept_lam, torch.tensor(lam[now], dtype=torch.float64))


def test_the_last_step_returns_the_data_prediction():
    diffusion = Diffusion(1000, "linear", "eps")
    x = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(3))
    x_prev, x0, _ = sampling.dpm_solver_step(diffusion, linear_model, x, torch.zeros(2, dtype=torch.long), -1,
                                             (torch.zeros_like(x), torch.zeros(2, 1, 1, 1)))
    assert torch.equal(x_prev, x0)


def gaussian_eps(diffusion):
    """The exact noise prediction for data N(MU, S^2): -sqrt(1 - abar) times the score of p_t."""
    def model(x, t):
        abar = diffusion.alphas_cumprod[t].reshape(-1, *[1] * (x.dim() - 1)).to(x.dtype)
        return (1 - abar).sqrt() * (x - abar.sqrt() * MU) / (abar * S**2 + 1 - abar)
    return model


def ode_solution(diffusion, x_T):
    """Where the probability-flow ODE takes x_T: the same standard score at code t = 0, whose
    data prediction E[x_0 | x_t] the samplers return."""
    a_T, a_0 = diffusion.alphas_cumprod[-1], diffusion.alphas_cumprod[0]
    z = (x_T - a_T.sqrt() * MU) / (a_T * S**2 + 1 - a_T).sqrt()
    x_t = a_0.sqrt() * MU + (a_0 * S**2 + 1 - a_0).sqrt() * z
    return MU + a_0.sqrt() * S**2 / (a_0 * S**2 + 1 - a_0) * (x_t - a_0.sqrt() * MU)


@pytest.mark.parametrize("sampler, order", [("ddim", 1), ("dpm++2m", 2)])
def test_the_order_of_convergence_on_gaussian_data(sampler, order):
    """Halving the step size divides the error at t = 0 by about 2 for DDIM (first order) and
    about 4 for DPM-Solver++(2M) (second order), once the steps are small."""
    diffusion = Diffusion(1000, "linear", "eps")
    errors = []
    for steps in (80, 160, 320):
        generator = torch.Generator().manual_seed(0)
        x = sampling.sample(diffusion, gaussian_eps(diffusion), (256, 1, 1, 1), sampler=sampler, steps=steps,
                            generator=generator, progress=False, clip=False)
        x_T = torch.randn((256, 1, 1, 1), generator=torch.Generator().manual_seed(0))
        errors.append((x.double() - ode_solution(diffusion, x_T.double())).abs().max().item())
    slopes = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(slope - order) < 0.2 for slope in slopes), (errors, slopes)


def test_guidance_with_dpm_solver_is_the_guided_model():
    model = UNet.from_preset("mnist", base_channels=8, channel_mults=[1, 2], num_res_blocks=1,
                             attention_resolutions=[], num_classes=3)
    diffusion = Diffusion(50, "linear", "v")
    labels = torch.tensor([0, 2])
    common = dict(sampler="dpm++2m-sde", steps=5, progress=False)
    guided = sampling.sample(diffusion, model, (2, 1, 8, 8), labels=labels, guidance_scale=1.5, null_label=3,
                             generator=torch.Generator().manual_seed(4), **common)
    by_hand = sampling.sample(diffusion, diffusion.guided_model(model, labels, 1.5, 3), (2, 1, 8, 8),
                              generator=torch.Generator().manual_seed(4), **common)
    torch.testing.assert_close(guided, by_hand)


def test_bad_inputs_to_the_solver():
    diffusion, shape = Diffusion(50), (1, 1, 4, 4)
    with pytest.raises(ValueError, match="eta applies to the ddim sampler; dpm\\+\\+2m takes none"):
        sampling.sample(diffusion, linear_model, shape, sampler="dpm++2m", eta=0.5, progress=False)
    with pytest.raises(ValueError, match="steps must be an integer from 1 to T=50"):
        sampling.sample(diffusion, linear_model, shape, sampler="dpm++2m-sde", steps=51, progress=False)
    with pytest.raises(ValueError, match="dpm\\+\\+2m-sde"):
        sampling.sample(diffusion, linear_model, shape, sampler="heun", progress=False)


def test_the_command_line_refuses_eta_with_dpm_solver(capsys):
    code = main(["sample", "--checkpoint", "pretrained:mnist", "--sampler", "dpm++2m", "--eta", "0.5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err == ("error: --eta applies to --sampler ddim; dpm++2m takes none (dpm++2m-sde is its "
                   "stochastic form)")


def test_the_command_line_samples_with_dpm_solver(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", "pretrained:mnist", "--sampler", "dpm++2m", "--steps", "3",
                 "--n", "2", "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    assert out.stat().st_size > 0 and "dpm++2m 3 steps," in capsys.readouterr().out
