"""Noise schedules: the paper's linear betas, Improved DDPM's cosine, and the rescaling for other T."""

import math

import pytest
import torch

from naivediffusion import schedule


def test_linear_endpoints_for_the_papers_T():
    betas = schedule.linear(1000)
    assert betas.dtype == torch.float64
    assert betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert torch.all(betas[1:] > betas[:-1])


def test_linear_T1000_ends_in_pure_noise():
    alphas_cumprod = torch.cumprod(1 - schedule.linear(1000), 0)
    assert alphas_cumprod[-1] < 1e-4


def test_linear_rescaled_for_other_T():
    betas = schedule.linear(200)
    assert betas[0].item() == pytest.approx(1e-4 * 5)
    assert betas[-1].item() == pytest.approx(0.02 * 5)
    # The rescaled schedule still ends near pure noise ...
    signal_left = torch.cumprod(1 - betas, 0)[-1].sqrt()
    assert signal_left < 0.01
    # ... while the unscaled one (the common pitfall) leaves about 36% of the signal.
    unscaled = torch.linspace(1e-4, 0.02, 200, dtype=torch.float64)
    assert torch.cumprod(1 - unscaled, 0)[-1].sqrt().item() == pytest.approx(0.36, abs=0.01)


def test_cosine_matches_improved_ddpm_eq17():
    T, s = 1000, 0.008
    betas = schedule.cosine(T)
    assert betas.dtype == torch.float64
    alphas_cumprod = torch.cumprod(1 - betas, 0)

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    expected = torch.tensor([f(t) / f(0) for t in range(1, T + 1)], dtype=torch.float64)
    unclipped = betas < 0.999  # only the very last betas hit the clip
    assert unclipped[: T - 5].all()
    assert torch.allclose(alphas_cumprod[: T - 5], expected[: T - 5], rtol=1e-10, atol=1e-12)
    assert betas.max().item() <= 0.999


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="linear, cosine"):
        schedule.get_schedule("quadratic", 10)


@pytest.mark.parametrize("T", [0, -3, 2.5])
def test_bad_timesteps(T):
    with pytest.raises(ValueError, match="timesteps"):
        schedule.linear(T)
