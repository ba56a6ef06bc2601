"""How much compute a chapter or a command spends, chosen in one place.

The same notebook runs tiny in CI, small on a laptop CPU and full on a GPU. The
budget is picked by the hardware and can be forced with the environment
variable NAIVEDIFFUSION_BUDGET ("ci", "cpu" or "gpu"); CI sets "ci".
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

ENV_VAR = "NAIVEDIFFUSION_BUDGET"


@dataclass(frozen=True)
class Budget:
    """Compute settings for the book's chapters.

    Attributes:
        name: "ci", "cpu" or "gpu".
        train_steps: optimisation steps for a training run in a chapter.
        batch_size: training batch size.
        num_samples: images drawn when a chapter shows samples.
        sample_steps: DDIM steps when a chapter samples quickly.
        eval_images: images used for likelihood / sample-quality numbers.
        bpd_timesteps: timesteps evaluated per image for bits/dim (T = all of them).
    """

    name: str
    train_steps: int
    batch_size: int
    num_samples: int
    sample_steps: int
    eval_images: int
    bpd_timesteps: int


BUDGETS = {
    "ci": Budget("ci", train_steps=30, batch_size=16, num_samples=16, sample_steps=20,
                 eval_images=64, bpd_timesteps=50),
    "cpu": Budget("cpu", train_steps=600, batch_size=64, num_samples=36, sample_steps=50,
                  eval_images=256, bpd_timesteps=100),
    "gpu": Budget("gpu", train_steps=10_000, batch_size=128, num_samples=64, sample_steps=100,
                  eval_images=2_000, bpd_timesteps=1000),
}


def pick_device(preference: str = "auto") -> torch.device:
    """The device to compute on: "auto" takes CUDA, else Apple's MPS, else the CPU."""
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if preference not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {preference!r}; choose one of auto, cpu, cuda, mps")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available; use --device auto or cpu")
    if preference == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for but MPS is not available; use --device auto or cpu")
    return torch.device(preference)


def get_budget(name: str | None = None) -> Budget:
    """The compute budget: `name`, else $NAIVEDIFFUSION_BUDGET, else "gpu" with CUDA and "cpu" without."""
    name = name or os.environ.get(ENV_VAR) or ("gpu" if torch.cuda.is_available() else "cpu")
    if name not in BUDGETS:
        raise ValueError(f"unknown budget {name!r} (from {ENV_VAR}?); choose one of {', '.join(BUDGETS)}")
    return BUDGETS[name]
