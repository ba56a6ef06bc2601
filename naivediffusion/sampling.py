"""Sampling: the reverse process run as a loop, from pure noise x_T down to an image x_0.

`diffusion.py` holds the math of one step (the tables, p's mean and variance of Eq. 1 and 7,
the conversions between eps, x0 and v, guidance as math on a callable); this module holds the
loops that chain the steps together:

- `sample`: Algorithm 2 of DDPM (Ho et al. 2020), over all T steps or respaced to fewer
  (Improved DDPM), DDIM (Song et al. 2021), or DPM-Solver++(2M) (Lu et al. 2022) and its
  stochastic form; one step of each is `ddpm_step` (`respaced_ddpm_step`), `ddim_step` and
  `dpm_solver_step`, and `ddim_timesteps` says which timesteps the fewer-step samplers visit.
  `Diffusion.sample(model, shape, ...)`, the chapters' entry point, calls it.
- `draw`: n images in batches, with optional labels and classifier-free guidance, exactly as
  the command line (``python -m naivediffusion sample`` and ``evaluate``) and the benchmarks
  draw them.

    from naivediffusion import Diffusion, UNet, sampling
    images = sampling.sample(diffusion, model, (16, 1, 28, 28), sampler="ddim")  # = diffusion.sample(...)
    images = sampling.draw(diffusion, model, 1000, (1, 28, 28), generator=torch.Generator().manual_seed(0))

A model is any callable ``model(x_t, t)`` (or ``model(x_t, t, labels)``) returning a tensor
shaped like x_t; an nn.Module is put in eval mode while it samples (`unet.eval_mode`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .diffusion import Diffusion, _check_choice
from .unet import eval_mode
from .variance import interpolate, split_output

SAMPLERS = ("ddpm", "ddim", "dpm++2m", "dpm++2m-sde")
# The samplers that visit `ddim_timesteps` and take `steps` (DDPM too, respaced, when given steps).
STEPPED_SAMPLERS = ("ddim", "dpm++2m", "dpm++2m-sde")

# DDIM's number of steps when none is given: 20 times fewer network calls than DDPM's 1000.
# `Diffusion.sample`, the command line (or T if that is smaller), the training run's sample
# grids (TrainConfig.sample_steps) and the benchmarks default to it.
DDIM_STEPS = 50

# DDIM's noise level eta for the command line (`sample`, `evaluate`) and `draw`. The
# deterministic eta = 0 is DDIM's own default and the one `sample` and the book's chapters
# teach with; on the shipped MNIST models, fresh noise at every step (eta = 1, the posterior
# variance of each jump) gave the lower sample-quality score at 50 steps in every draw
# measured (benchmarks/samplers.py, README), so the command line draws with it.
DEFAULT_ETA = 1.0

# The command line's sampler (`sample`, `evaluate`) and its number of steps: the stochastic form
# of DPM-Solver++(2M) with 20 network calls. On pretrained:mnist it scored as well as DDIM with 50
# calls at eta = 1 did, over five draws of 1,000 samples each (within twice the real-data floor in
# 3 of 5 draws for both, the mean score over floor 1.83 against 1.91, smudges 0.8% against 0.7%:
# benchmarks/results/samplers_mnist.json and targets_mnist.json), for 40% of the network calls.
CLI_SAMPLER = "dpm++2m-sde"
SOLVER_STEPS = 20


def model_device(model) -> torch.device:
    """Where `model` runs: the device of its first parameter; the CPU for a callable without any."""
    params = getattr(model, "parameters", None)
    first = next(params(), None) if params is not None else None
    return first.device if first is not None else torch.device("cpu")


def ddim_timesteps(diffusion: Diffusion, steps: int) -> Tensor:
    """`steps` timesteps evenly spaced over 0..T-1, both ends included, descending.

    Returns:
        LongTensor [steps], starting at T-1 and ending at 0.
    """
    T = diffusion.num_timesteps
    if not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer from 1 to T={T}, got {steps!r}")
    if steps == 1:
        return torch.tensor([T - 1])
    # Rounding linspace over the T integers never repeats a value when steps <= T.
    seq = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long()
    return seq.flip(0)


@torch.no_grad()
def sample(
    diffusion: Diffusion,
    model,
    shape: tuple[int, ...],
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: bool = True,
    return_chain: bool = False,
    labels: Tensor | None = None,
    device: torch.device | str | None = None,
    clip: bool = True,
    chain_every: int = 1,
    *,
    guidance_scale: float | None = None,
    null_label: int | None = None,
):
    """Draw images from the reverse process of `diffusion`, starting from x_T ~ N(0, I).

    Args:
        diffusion: the noise process (its schedule, objective and reverse variance).
        model: callable (x_t, t) -> output (see `Diffusion`'s `objective`). An nn.Module is
            put in eval mode for sampling and restored afterwards.
        shape: (B, C, H, W) of the images to draw.
        sampler: "ddpm" — Algorithm 2 over all T steps, T-1 down to 0, adding no
            noise at the last step, or with `steps` < T on the respaced schedule of Improved
            DDPM (`respaced_ddpm_step`); "ddim" — Song et al. 2021, Eq. 12, over `steps`
            evenly spaced timesteps from T-1 down to 0; "dpm++2m" — DPM-Solver++(2M), the
            second-order multistep solver of the probability-flow ODE, on the same timesteps
            (`dpm_solver_step`); "dpm++2m-sde" — its stochastic (SDE) form.
        steps: number of steps, that is network calls, of the fewer-step samplers (1..T;
            default DDIM_STEPS, 50). For "ddpm" None means all T.
        eta: DDIM's noise level (Song et al. Eq. 16): 0 is deterministic, 1 is
            DDPM-like (sigma^2 = posterior variance). DPM-Solver++ takes only 0; DDPM ignores it.
        generator: a torch.Generator on `device`, for reproducible samples.
        progress: show a progress bar.
        return_chain: also return the chain of x_t and predicted x0.
        labels: optional class labels [B] passed to the model (called as
            model(x_t, t, labels) then).
        device: where to sample; default: the model's device (else CPU).
        clip: clip the predicted x0, and the final images, to the data range [-1, 1]
            (as the reference code does). Off only for data that is not images.
        chain_every: keep every n-th step in the chain (the last is always kept).
        guidance_scale: classifier-free guidance weight w >= 0 (Ho & Salimans Eq. 6,
            eps~ = (1 + w) eps(x, c) - w eps(x, null); s = 1 + w in other codebases),
            applied at every step of either sampler through `Diffusion.guided_model`; needs
            `labels`. None (the default) or 0: plain conditional sampling with one
            forward pass per step; w > 0: one forward pass on a doubled batch per step.
            The random draws (x_T, the noise of each step) do not depend on w, so the
            same generator seed gives the same starting noise for every w.
        null_label: the label meaning "no class" (`num_classes` of a UNet); needed when
            guidance_scale > 0.

    Returns:
        images [B, C, H, W] in [-1, 1]; with `return_chain`, ``(images, chain)`` where
        chain = {"t": LongTensor [K], "x_t": [K, B, C, H, W], "pred_x0": [K, B, C, H, W]}
        on the CPU, "x_t" being the input of the step at time "t".
    """
    _check_choice("sampler", sampler, SAMPLERS)
    T = diffusion.num_timesteps
    if sampler in ("dpm++2m", "dpm++2m-sde") and eta != 0:
        raise ValueError(f"eta applies to the ddim sampler; {sampler} takes none (dpm++2m-sde is the "
                         "stochastic form of DPM-Solver++)")
    if guidance_scale is not None and labels is None:
        raise ValueError("guidance_scale needs labels: guidance steers towards a class")
    if device is None:
        device = model_device(model)
    step_model, step_labels = model, labels
    if guidance_scale is not None:
        # The step functions see a plain (x_t, t) -> output model; the guidance is inside.
        step_model = _guided(diffusion, model, shape[0], labels, guidance_scale, null_label, device)
        step_labels = None
    # The timesteps as Python numbers: the loop never reads a number back from the device.
    respaced = sampler == "ddpm" and steps not in (None, T)
    if sampler == "ddpm" and not respaced:
        timesteps = list(range(T - 1, -1, -1))
    else:
        timesteps = ddim_timesteps(diffusion, DDIM_STEPS if steps is None else steps).tolist()

    with eval_mode(model):
        x = torch.randn(shape, generator=generator, device=device)  # x_T
        chain = {"t": [], "x_t": [], "pred_x0": []}
        previous = None  # DPM-Solver++'s data prediction and log-SNR of the step before
        for i, step in enumerate(tqdm(timesteps, disable=not progress, desc=sampler)):
            t = torch.full((shape[0],), step, device=device, dtype=torch.long)
            prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            if respaced:
                x_next, pred_x0 = respaced_ddpm_step(diffusion, step_model, x, t, prev, clip, step_labels,
                                                     generator)
            elif sampler == "ddpm":
                x_next, pred_x0 = ddpm_step(diffusion, step_model, x, t, clip, step_labels, generator,
                                            final=step == 0)
            elif sampler == "ddim":
                x_next, pred_x0 = ddim_step(diffusion, step_model, x, t, prev, eta, clip, step_labels,
                                            generator)
            else:
                x_next, pred_x0, previous = dpm_solver_step(
                    diffusion, step_model, x, t, prev, previous, sde=sampler == "dpm++2m-sde",
                    clip=clip, labels=step_labels, generator=generator)
            if return_chain and (i % chain_every == 0 or i == len(timesteps) - 1):
                chain["t"].append(step)
                chain["x_t"].append(x.cpu())
                chain["pred_x0"].append(pred_x0.cpu())
            x = x_next
    if clip:
        x = x.clamp(-1.0, 1.0)
    if not return_chain:
        return x
    return x, {
        "t": torch.tensor(chain["t"]),
        "x_t": torch.stack(chain["x_t"]),
        "pred_x0": torch.stack(chain["pred_x0"]),
    }


def _guided(diffusion: Diffusion, model, batch: int, labels, guidance_scale: float,
            null_label: int | None, device):
    """`model` under classifier-free guidance towards `labels` (one label, or [batch] of them)."""
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    if labels.ndim == 0:
        labels = labels.expand(batch)
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape [{batch}]; got {tuple(labels.shape)}")
    return diffusion.guided_model(model, labels, guidance_scale, null_label)


def ddpm_step(diffusion: Diffusion, model, x, t, clip=True, labels=None, generator=None, *,
              final: bool | None = None):
    """One step of Algorithm 2: x_{t-1} = mean + sigma_t z, with z = 0 at the last step.

    `final` says whether this is the last step (t = 0); `sample` passes it from its Python
    timesteps, and None reads it from t, which waits for the device."""
    out = diffusion.p_mean_variance(model, x, t, clip=clip, labels=labels)
    if final if final is not None else t[0].item() == 0:
        return out["mean"], out["pred_x0"]
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return out["mean"] + (0.5 * out["log_variance"]).exp() * z, out["pred_x0"]


def respaced_ddpm_step(diffusion: Diffusion, model, x, t, prev: int, clip=True, labels=None,
                       generator=None):
    """One step of Algorithm 2 from t to prev on the respaced schedule (Improved DDPM Sec. 4);
    prev = -1 means x_0.

    The jump t -> prev is one step of a shorter diffusion with alpha = abar_t / abar_prev and
    beta = 1 - alpha; its posterior (Eq. 6-7) gives the mean from the model's x0, and its
    variance is beta, beta-tilde = beta (1 - abar_prev) / (1 - abar_t), or, for a learned
    variance, the network's v interpolating between these two in log space. With beta-tilde
    the step is DDIM's with eta = 1."""
    output = model(x, t) if labels is None else model(x, t, labels)
    mean_output, v = split_output(x, output.to(x.dtype), diffusion.variance)
    pred_x0 = diffusion.predict_x0(x, t, mean_output)
    if clip:
        pred_x0 = pred_x0.clamp(-1.0, 1.0)
    if prev < 0:
        return pred_x0, pred_x0
    work = torch.float32 if x.device.type == "mps" else torch.float64
    abar = diffusion._coef("alphas_cumprod", t, x.to(work))
    abar_prev = diffusion._coef("alphas_cumprod", torch.full_like(t, prev), abar)
    beta = 1.0 - abar / abar_prev
    log_beta, log_beta_tilde = beta.log(), (beta * (1.0 - abar_prev) / (1.0 - abar)).log()
    mean = (abar_prev.sqrt() * beta / (1.0 - abar) * pred_x0.to(work)
            + (1.0 - beta).sqrt() * (1.0 - abar_prev) / (1.0 - abar) * x.to(work))
    if diffusion.variance == "learned":
        log_variance = interpolate(v.to(work), log_beta, log_beta_tilde)
    else:
        log_variance = log_beta if diffusion.variance == "beta" else log_beta_tilde
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (mean + (0.5 * log_variance).exp() * z).to(x.dtype), pred_x0


def ddim_step(diffusion: Diffusion, model, x, t, prev: int, eta=0.0, clip=True, labels=None,
              generator=None):
    """One DDIM step from t to prev (Song et al. 2021, Eq. 12 and 16); prev = -1 means x_0."""
    output = model(x, t) if labels is None else model(x, t, labels)
    output = output.to(x.dtype)
    pred_x0 = diffusion.predict_x0(x, t, output)
    if clip:
        pred_x0 = pred_x0.clamp(-1.0, 1.0)
    # The noise direction consistent with the (clipped) x0 estimate.
    eps = diffusion.predict_eps(x, t, pred_x0)
    abar = diffusion._coef("alphas_cumprod", t, x)
    if prev >= 0:
        abar_prev = diffusion._coef("alphas_cumprod", torch.full_like(t, prev), x)
    else:
        abar_prev = torch.ones_like(abar)
    sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
    x_prev = abar_prev.sqrt() * pred_x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
    if prev >= 0 and eta > 0:
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_prev = x_prev + sigma * z
    return x_prev, pred_x0


def dpm_solver_step(diffusion: Diffusion, model, x, t, prev: int, previous=None, sde: bool = False,
                    clip: bool = True, labels=None, generator=None):
    """One step of DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) from t to prev; prev = -1 means x_0.

    The probability-flow ODE, written for the data prediction x0(x_lambda) in the half
    log-SNR lambda = log(alpha / sigma) (alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)),
    is solved exactly in its linear part; the network's part is integrated with x0 held
    constant over the step (first order: exactly DDIM with eta = 0) or, with `previous`, the
    data prediction and lambda of the step before, extrapolated linearly in lambda (second
    order). With h = lambda_prev - lambda_t and r = (lambda_t - lambda_before) / h:

        D      = x0 + (x0 - x0_before) / (2 r)          (x0 alone on the first step)
        x_prev = sigma_prev / sigma_t * x + alpha_prev * (1 - exp(-h)) * D

    `sde` takes the stochastic form (the SDE solver DPM-Solver++(2M) of the same paper, as
    diffusers' "sde-dpmsolver++"): x_prev = sigma_prev / sigma_t * exp(-h) * x
    + alpha_prev * (1 - exp(-2h)) * D + sigma_prev * sqrt(1 - exp(-2h)) * z. The step to x_0
    (sigma = 0, h infinite) returns the data prediction: the last step is first order.

    Returns:
        (x at prev, the clipped x0 prediction, the state to pass as `previous` next time).
    """
    output = model(x, t) if labels is None else model(x, t, labels)
    pred_x0 = diffusion.predict_x0(x, t, output.to(x.dtype))
    if clip:
        pred_x0 = pred_x0.clamp(-1.0, 1.0)
    lam = 0.5 * diffusion._coef("snr", t, x).log()  # tables in float64, cast to x's dtype
    if prev < 0:
        return pred_x0, pred_x0, (pred_x0, lam)
    t_prev = torch.full_like(t, prev)
    lam_prev = 0.5 * diffusion._coef("snr", t_prev, x).log()
    alpha_prev = diffusion._coef("sqrt_alphas_cumprod", t_prev, x)
    sigma_prev = diffusion._coef("sqrt_one_minus_alphas_cumprod", t_prev, x)
    sigma = diffusion._coef("sqrt_one_minus_alphas_cumprod", t, x)
    h = lam_prev - lam
    data = pred_x0
    if previous is not None:
        x0_before, lam_before = previous
        data = pred_x0 + (pred_x0 - x0_before) * (h / (2 * (lam - lam_before)))
    if not sde:
        x_prev = (sigma_prev / sigma) * x + alpha_prev * (-(-h).expm1()) * data
    else:
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_prev = ((sigma_prev / sigma) * (-h).exp() * x + alpha_prev * (-(-2 * h).expm1()) * data
                  + sigma_prev * (-(-2 * h).expm1()).sqrt() * z)
    return x_prev, pred_x0, (pred_x0, lam)


def draw(
    diffusion: Diffusion,
    model,
    n: int,
    image_shape: tuple[int, ...],
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float | None = None,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    labels: Tensor | None = None,
    guidance: float = 0.0,
    progress: bool = True,
) -> Tensor:
    """n images [n, C, H, W] in [-1, 1] on the CPU, `batch_size` at a time: what the command
    line (`sample`, `evaluate`) and the benchmarks draw.

    Each batch is one `sample` call on the generator's device (the model's without a
    generator) that goes on drawing from the same `generator`, so the same seed and the same
    `batch_size` give the same images (another batch size, other images).

    Args:
        image_shape: (C, H, W) of one image.
        sampler, steps, eta: as for `sample`; by default DDIM with DDIM_STEPS steps at the
            command line's DEFAULT_ETA (eta None: DEFAULT_ETA for DDIM, 0 for the others).
        labels: optional class labels [n] (LongTensor) of a class-conditional model; None
            draws without labels.
        guidance: with `labels`, the classifier-free guidance weight w >= 0 (0: plain
            conditional sampling); the null label is the model's `num_classes`.
        progress: show a progress bar for each batch.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be at least 1; got {n} and {batch_size}")
    if eta is None:
        eta = DEFAULT_ETA if sampler == "ddim" else 0.0
    device = generator.device if generator is not None else model_device(model)
    chunks = []
    for first in range(0, n, batch_size):
        size = min(batch_size, n - first)
        part = None if labels is None else labels[first:first + size].to(device)
        chunks.append(sample(
            diffusion, model, (size, *image_shape), sampler=sampler, steps=steps, eta=eta,
            generator=generator, progress=progress, device=device, labels=part,
            guidance_scale=guidance if part is not None else None,
            null_label=getattr(model, "num_classes", None)).cpu())
    return torch.cat(chunks)
