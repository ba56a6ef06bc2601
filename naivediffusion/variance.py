"""Learned reverse variances (Improved DDPM, Nichol & Dhariwal 2021): the network's second output.

DDPM fixes the variance of each reverse step to beta_t or to the posterior's beta-tilde_t
(`Diffusion(variance="beta" | "posterior")`). Both are right only in a limit; the bound of
Eq. 5 pays for the gap, mostly at the first steps (chapter 6). Improved DDPM lets the network
choose per pixel: it outputs 2C channels for C image channels, the objective's C (eps, x0 or v)
and C numbers v, read as

    log sigma_t^2 = f log beta_t + (1 - f) log beta-tilde_t,   f = (v + 1) / 2   (Eq. 15)

and it learns v from the bound's terms L_t alone (the hybrid loss L_simple + lambda L_vlb, with
the mean detached in L_vlb). `Diffusion(variance="learned")` uses these functions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def split_output(x_t: Tensor, output: Tensor, variance: str | None = None) -> tuple[Tensor, Tensor | None]:
    """(the mean's part, the variance's part v) of a network's `output` at x_t.

    A network for a learned variance outputs 2C channels for the C of x_t: the first C are the
    objective's, the last C are v. Any other network's output is all mean: (output, None),
    which `variance` "learned" refuses with one line.
    """
    channels = x_t.shape[1] if x_t.dim() > 1 else None  # data of one dimension [B] has no channels
    if channels is not None and output.dim() == x_t.dim() and output.shape[1] == 2 * channels:
        return output[:, :channels], output[:, channels:]
    if variance == "learned":
        raise ValueError(f"variance 'learned' needs a network with twice the image's {channels} output "
                         f"channels; this one has {output.shape[1]}: use a fixed variance ('beta' or 'posterior')")
    return output, None


def learned_log_variance(diffusion, v: Tensor, t: Tensor) -> Tensor:
    """log sigma^2 = f log beta_t + (1 - f) log beta-tilde_t with f = (v + 1) / 2, written for v
    as the reference code does: f = 0 gives beta-tilde_t (its log clipped at t = 0, as
    `Diffusion.posterior_log_variance_clipped`), f = 1 gives beta_t, exactly. v is not bounded:
    f outside [0, 1] extrapolates. v [B, C, H, W] (computed in float32 at least), t [B]."""
    v = v.float() if v.dtype in (torch.float16, torch.bfloat16) else v
    return interpolate(v, diffusion._coef("log_betas", t, v), diffusion._coef("posterior_log_variance_clipped", t, v))


def interpolate(v: Tensor, log_beta: Tensor, log_beta_tilde: Tensor) -> Tensor:
    """f log_beta + (1 - f) log_beta_tilde with f = (v + 1) / 2: Eq. 15 on any pair of tables
    (those of T steps, or of a respaced schedule's shorter steps)."""
    frac = (v + 1.0) / 2.0
    return frac * log_beta + (1.0 - frac) * log_beta_tilde


def vlb_terms(diffusion, x0: Tensor, x_t: Tensor, t: Tensor, output: Tensor, v: Tensor) -> Tensor:
    """L_t of the bound for each image, in bits per dimension, float32 [B], as the hybrid loss
    uses it. The terms are the likelihood module's `vb_terms` (the one definition of the bound),
    with the mean's `output` detached, so that their gradient reaches v only (the stop-gradient
    of Improved DDPM Sec. 3.1), and the x0 estimate unclipped (the reference code's choice for
    training). L_vlb = sum_t L_t is then T E_t[L_t]; in bits per dimension, as the reference
    code, lambda = 0.001 and T = 1000 give the term weight 1. x0 must lie on the 256-level grid
    (for L_0's discrete decoder)."""
    from .likelihood import vb_terms  # likelihood.py builds on diffusion.py, which uses this module

    frozen = torch.cat([output.detach().to(v.dtype), v], dim=1)
    return vb_terms(diffusion, lambda x, step: frozen, x0, x_t, t, clip=False).float()
