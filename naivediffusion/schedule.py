"""Noise schedules: how much noise the forward process adds at each step.

A schedule is the sequence beta_1 .. beta_T of the forward process
q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)   (DDPM, Eq. 2).

Every schedule here is returned as a float64 tensor of shape [T]. Products of a
thousand numbers close to one (alphas_cumprod) lose digits in float32, so the
tables are built in float64 and cast to the data's dtype only when indexed.
Index 0 of the tensor is the paper's beta_1.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine")


def linear(timesteps: int) -> torch.Tensor:
    """The DDPM schedule: beta rises linearly from 1e-4 to 0.02 over T = 1000 steps.

    For another T both ends are multiplied by 1000 / T, as the reference code of Improved
    DDPM does (`get_named_beta_schedule` in openai/improved-diffusion, "extended to work
    for any number of diffusion steps"): fewer, larger steps destroy
    the same amount of signal, so x_T is still (almost) pure noise. Without the
    rescaling, T = 200 leaves sqrt(alphas_cumprod[-1]) ~ 0.36 of the signal.

    Returns:
        betas, float64 tensor of shape [timesteps].
    """
    _check_timesteps(timesteps)
    scale = 1000 / timesteps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    # Below T = 20 the rescaled end would reach beta = 1 (alpha = 0); clip like the cosine schedule.
    return betas.clamp(max=0.999)


def cosine(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule of Improved DDPM (Nichol & Dhariwal 2021, Eq. 17).

    alphas_cumprod(t) = f(t) / f(0) with f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2),
    and beta_t = 1 - alphas_cumprod(t) / alphas_cumprod(t - 1), clipped at `max_beta`
    because the last betas approach 1 (the paper clips at 0.999).
    The small offset s keeps beta_1 from being vanishingly small.

    Returns:
        betas, float64 tensor of shape [timesteps].
    """
    _check_timesteps(timesteps)
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=max_beta)


def get_schedule(name: str, timesteps: int) -> torch.Tensor:
    """Betas [timesteps] (float64) of the schedule called `name` ("linear" or "cosine")."""
    if name == "linear":
        return linear(timesteps)
    if name == "cosine":
        return cosine(timesteps)
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def _check_timesteps(timesteps: int) -> None:
    if not isinstance(timesteps, int) or timesteps < 1:
        raise ValueError(f"timesteps must be a positive integer, got {timesteps!r}")
