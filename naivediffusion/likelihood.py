"""Bits per dimension: the variational bound of DDPM on the negative log-likelihood.

The bound L of Eq. 5 on E[-log p_theta(x_0)], divided by the number of dimensions D and
by ln 2, is an upper bound on how many bits an ideal code built from the model needs per
pixel and channel (Ho et al. 2020, Sec. 4, Table 1: 3.70-3.75 on CIFAR-10). It is the sum
of the prior term L_T, one KL term L_{t-1} per timestep, and the discrete decoder L_0
(Eq. 13):

    bpd = bits_per_dim(diffusion, model, x0)                 # [N], all T terms
    bpd, terms = bits_per_dim(diffusion, model, x0, timesteps=100, return_terms=True)

The command line is `python -m naivediffusion evaluate --metric bpd` (in `__main__.py`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .data import scale_to_unit_interval
from .diffusion import Diffusion
from .unet import eval_mode

LN2 = math.log(2.0)
BIN_WIDTH = 2.0 / 255.0  # the 256 levels 0..255 scaled to [-1, 1] are 2/255 apart


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums of many small terms; MPS has no float64, so float32 there."""
    return torch.float32 if device.type == "mps" else torch.float64


def quantize(x: Tensor) -> Tensor:
    """Put values in [-1, 1] on the 256-level grid of the data: k / 127.5 - 1, k = 0..255.

    Values outside [-1, 1] go to the nearest end. Returns a float tensor shaped like x.
    """
    levels = ((x.float() + 1.0) * 127.5).round().clamp(0, 255)
    return scale_to_unit_interval(levels).to(x.dtype if x.is_floating_point() else torch.float32)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats, elementwise.

    0.5 * (logvar2 - logvar1 + (exp(logvar1) + (mean1 - mean2)^2) / exp(logvar2) - 1).
    The arguments broadcast against each other; every L_{t-1} of Eq. 5 is a sum of these.
    """
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _log_diff_ndtr(lower: Tensor, upper: Tensor) -> Tensor:
    """log(Phi(upper) - Phi(lower)) for lower < upper, without cancellation; Phi is the
    exact CDF of N(0, 1) (torch.special.ndtr), not the tanh approximation of the DDPM code.

    Phi(b) - Phi(a) = Phi(b) (1 - Phi(a)/Phi(b)), so the log is log Phi(b) + log1p(-exp(
    log Phi(a) - log Phi(b))); log_ndtr keeps its precision far into the lower tail. In
    the upper tail the mirror image Phi(-a) - Phi(-b) is used, so both tails stay exact.
    """
    mirror = lower + upper > 0
    a = torch.where(mirror, -upper, lower)
    b = torch.where(mirror, -lower, upper)
    log_b = torch.special.log_ndtr(b)
    log_a = torch.special.log_ndtr(a)
    # exp(-80) ~ 2e-35 changes nothing; the clamp keeps subnormal numbers, which CPUs
    # handle a hundred times slower, out of exp and log1p.
    return log_b + torch.log1p(-torch.exp((log_a - log_b).clamp(min=-80.0)))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log p(x) for the discrete decoder of Eq. 13, elementwise, in nats.

    Each data value x on the 256-level grid in [-1, 1] owns the bin [x - 1/255, x + 1/255]
    (width 2/255), except that the bin of -1 reaches down to -inf and that of 1 up to +inf,
    so the 256 probabilities sum to 1. p(x) is the mass of N(mean, exp(log_scale)^2) in it.

    Args:
        x: data on the grid (see `quantize`), any shape.
        mean, log_scale: the Gaussian's mean and log standard deviation, broadcast to x.
    Returns:
        log-probabilities shaped like x (always <= 0).
    """
    inv_scale = torch.exp(-log_scale)
    upper = torch.where(x > 1.0 - 1e-3, torch.full_like(x, math.inf),
                        (x + BIN_WIDTH / 2 - mean) * inv_scale)
    lower = torch.where(x < -1.0 + 1e-3, torch.full_like(x, -math.inf),
                        (x - BIN_WIDTH / 2 - mean) * inv_scale)
    log_probs = _log_diff_ndtr(lower, upper)
    # When the bin is so narrow next to the scale that both CDF values round to the same
    # number, the mass is the density at the centre times the bin width (as PixelCNN++).
    log_density = (-0.5 * ((x - mean) * inv_scale) ** 2 - log_scale - 0.5 * math.log(2 * math.pi)
                   + math.log(BIN_WIDTH))
    return torch.where(torch.isfinite(log_probs), log_probs, log_density).clamp(max=0.0)


def prior_bpd(diffusion: Diffusion, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) of Eq. 5, in bits per dimension, for each image.

    q(x_T | x_0) = N(sqrt(abar_T) x_0, (1 - abar_T) I) (Eq. 4). It has no parameters to
    learn; for the paper's schedule it is about 1e-5 bits/dim (Sec. 4).

    Args:
        x0: images [N, C, H, W] on the 256-level grid in [-1, 1].
    Returns:
        [N], in the accumulation dtype (float64 except on MPS).
    """
    dtype = _accumulation_dtype(x0.device)
    abar = diffusion.alphas_cumprod[-1].item()
    x0 = x0.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=x0.device)
    kl = normal_kl(math.sqrt(abar) * x0, zero + math.log(1.0 - abar), zero, zero)
    return kl.flatten(1).mean(1) / LN2


def vb_terms(
    diffusion: Diffusion,
    model,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    clip: bool = True,
    labels: Tensor | None = None,
) -> Tensor:
    """One term of the bound (Eq. 5) per image, in bits per dimension.

    For code t >= 1 (the paper's t >= 2) it is L_{t-1} = KL(q(x_{t-1} | x_t, x_0) ||
    p_theta(x_{t-1} | x_t)) between two Gaussians (Eq. 6-7 and the model's mean and
    variance). For code t = 0 it is the decoder's L_0 = -log p_theta(x_0 | x_1) with the
    discrete likelihood of Eq. 13, whose Gaussian has the model's mean and variance at
    t = 0. Both are averaged over the D dimensions of an image and divided by ln 2.

    Args:
        x0: images [B, C, H, W] on the grid; x_t: q_sample(x0, t, noise) [B, C, H, W].
        t: LongTensor [B] of code timesteps; 0 and other values may be mixed.
        clip: clip the model's x0 estimate to [-1, 1] (as the samplers do); the bound
            holds for any choice, it is part of what the model is.
    Returns:
        [B] in the accumulation dtype (float64 except on MPS).
    """
    dtype = _accumulation_dtype(x0.device)
    out = diffusion.p_mean_variance(model, x_t, t, clip=clip, labels=labels)
    mean, log_variance = out["mean"].to(dtype), out["log_variance"].to(dtype)
    terms = torch.zeros(x0.shape[0], dtype=dtype, device=x0.device)
    decoder = t == 0
    if not decoder.all():
        true_mean, _, true_log_variance = diffusion.q_posterior(x0, x_t, t)
        kl = normal_kl(true_mean.to(dtype), true_log_variance.to(dtype), mean, log_variance)
        terms = torch.where(decoder, terms, kl.flatten(1).mean(1))
    if decoder.any():
        log_likelihood = discretized_gaussian_log_likelihood(x0.to(dtype), mean, 0.5 * log_variance)
        terms = torch.where(decoder, -log_likelihood.flatten(1).mean(1), terms)
    return terms / LN2


def timestep_strata(num_timesteps: int, k: int) -> list[int]:
    """Edges 0 = b_0 < b_1 < ... < b_k = T of k strata [b_{j-1}, b_j) of the code timesteps.

    The first stratum is {0} alone (the decoder L_0 differs from every KL term); then the
    edges grow geometrically, b_j ~ T^((j-1)/(k-1)), each stratum holding at least one
    timestep. The terms of the bound fall steeply with t, so small strata go where they
    change fast: with T = 1000 and k = 50, t = 0..22 are single strata.
    """
    if not 1 <= k <= num_timesteps:
        raise ValueError(f"k must be from 1 to T={num_timesteps}; got {k}")
    if k == 1:
        return [0, num_timesteps]
    edges = [0]
    for j in range(1, k + 1):
        geometric = round(num_timesteps ** ((j - 1) / (k - 1)))
        edges.append(min(max(edges[-1] + 1, geometric), num_timesteps - (k - j)))
    return edges


def sample_timesteps(
    num_timesteps: int, k: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """k code timesteps and weights for an unbiased estimate of a sum over all T terms.

    One timestep is drawn uniformly from each stratum of `timestep_strata`, and weighted
    by the stratum's size: sum_j weight_j * L_{t_j} has expectation sum_t L_t, exactly.

    Returns:
        (t LongTensor [k], ascending; weights float64 [k], summing to T), on the CPU.
        With k = T: every timestep, weight 1.
    """
    edges = torch.tensor(timestep_strata(num_timesteps, k))
    sizes = edges[1:] - edges[:-1]
    device = generator.device if generator is not None else "cpu"
    u = torch.rand(k, generator=generator, device=device).cpu().double()
    t = edges[:-1] + (u * sizes).long().clamp(max=sizes - 1)
    return t, sizes.to(torch.float64)


@torch.no_grad()
def bits_per_dim(
    diffusion: Diffusion,
    model,
    x0: Tensor,
    timesteps: int | None = None,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    labels: Tensor | None = None,
    clip: bool = True,
    progress: bool = False,
    return_terms: bool = False,
):
    """The variational bound on -log p(x_0) (Eq. 5), in bits per dimension, per image.

        L = L_T + sum_{t=2..T} L_{t-1} + L_0, divided by D ln 2,

    with the prior term L_T (`prior_bpd`), one KL term L_{t-1} per paper t = 2..T
    (code 1..T-1) and the discrete decoder L_0 (Eq. 13) at code t = 0 (see `vb_terms`).
    Each term is estimated with one draw x_t ~ q(x_t | x_0) per image: unbiased, and
    its noise averages out over images.

    Args:
        diffusion: the process the model was trained with.
        model: callable (x_t, t) -> output; an nn.Module is put in eval mode (and back).
        x0: images [N, C, H, W] on the 256-level grid in [-1, 1] (a dataset from
            `data.load_dataset` is; otherwise use `quantize`), on the model's device.
        timesteps: None evaluates all T terms. An integer K < T evaluates K of them, for
            K/T of the cost: an unbiased estimate of the sum over all T, stratified
            (`sample_timesteps`): L_0 always, then one t drawn uniformly from each of
            K - 1 strata that widen geometrically with t, weighted by the stratum's size.
            The terms fall steeply with t, so this is far more precise than K timesteps
            drawn uniformly from all T (for the Gaussian data of the tests, K = 50 gives
            a spread of about 0.03 bits/dim against 11 for uniform draws). The same K
            timesteps serve all N images (drawn once per call).
        batch_size: images per model call. The result does not depend on it: the noise
            for all N images is drawn at once per timestep.
        generator: a torch.Generator on x0's device, for reproducible numbers.
        labels: optional class labels [N] passed to the model.
        clip: clip the model's x0 estimate to [-1, 1] (see `vb_terms`).
        progress: show a progress bar over the timesteps.
        return_terms: also return the terms, each in bits/dim.

    Returns:
        bpd [N] (float64 except on MPS); with `return_terms`, ``(bpd, terms)`` where terms
        = {"prior": [N], "t": LongTensor [K] (code timesteps, ascending), "weights": [K]
        (1 each for all T; stratum sizes otherwise), "vb": [K, N] (the term of each
        timestep; the row of t = 0 is L_0), "decoder": [N] (L_0)}, so that
        bpd = prior + (weights[:, None] * vb).sum(0).
    """
    num_timesteps = diffusion.num_timesteps
    n = x0.shape[0]
    if n == 0 or x0.dim() != 4:
        raise ValueError(f"x0 must be a non-empty batch of images [N, C, H, W]; got {tuple(x0.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    if not torch.allclose(x0, quantize(x0), atol=1e-4, rtol=0):
        raise ValueError("x0 must lie on the 256-level grid in [-1, 1] (k / 127.5 - 1) for the "
                         "discrete decoder of Eq. 13; pass quantize(x0)")
    if timesteps is not None and not (isinstance(timesteps, int) and 1 <= timesteps <= num_timesteps):
        raise ValueError(f"timesteps must be None or an integer from 1 to T={num_timesteps}; "
                         f"got {timesteps!r}")
    device = x0.device
    dtype = _accumulation_dtype(device)
    if timesteps is None or timesteps == num_timesteps:
        ts, weights = torch.arange(num_timesteps), torch.ones(num_timesteps, dtype=torch.float64)
    else:
        ts, weights = sample_timesteps(num_timesteps, timesteps, generator)

    vb = torch.empty(len(ts), n, dtype=dtype, device=device)
    with eval_mode(model):
        for k, step in enumerate(tqdm(ts.tolist(), disable=not progress, desc="bits/dim")):
            # Drawn for all N images at once, so chunking the batch cannot change the draws.
            noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
            for first in range(0, n, batch_size):
                chunk = slice(first, first + batch_size)
                x0_chunk = x0[chunk]
                t = torch.full((x0_chunk.shape[0],), step, device=device, dtype=torch.long)
                x_t = diffusion.q_sample(x0_chunk, t, noise[chunk])
                vb[k, chunk] = vb_terms(diffusion, model, x0_chunk, x_t, t, clip=clip,
                                        labels=None if labels is None else labels[chunk])

    prior = prior_bpd(diffusion, x0)
    bpd = prior + (weights.to(device=device, dtype=dtype)[:, None] * vb).sum(0)
    if not return_terms:
        return bpd
    return bpd, {"prior": prior, "t": ts, "weights": weights, "vb": vb, "decoder": vb[0]}
