"""How much compute a chapter or a command spends, chosen in one place.

The same notebook runs tiny in CI, small on a laptop CPU and full on a GPU. The
budget is picked by the hardware and can be forced with the environment
variable NAIVEDIFFUSION_BUDGET ("ci", "cpu" or "gpu"). The tests (nbval) run the
chapters with "ci"; the published book is built with "cpu".

Every size a chapter spends compute on is a field of `Budget`, so that
`chapter_work` can count, without running anything, the network calls each
chapter makes under each budget, and `estimate_seconds` can turn them into time:
on this project's 2-core build machine (constants measured by
`benchmarks/book_budget.py`) and on a Colab T4 (a FLOP count at a stated
throughput). The tests keep the `cpu` budget under its ceiling.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

ENV_VAR = "NAIVEDIFFUSION_BUDGET"


@dataclass(frozen=True)
class Budget:
    """Compute settings for the book's chapters.

    Attributes:
        name: "ci", "cpu" or "gpu".
        train_steps: optimisation steps of chapter 4's training run.
        batch_size: training batch size.
        num_samples: images drawn when a chapter shows samples.
        sample_steps: DDIM steps when a chapter samples quickly (chapters 4 and 7).
        ddpm_images: images per 1000-step sampling run in chapter 5.
        ddim_images: images per DDIM run in chapter 5's step-count comparison.
        ddim_steps: the DDIM step counts chapter 5 compares, the most first.
        bpd_images: test images of chapter 6's bits/dim.
        bpd_timesteps: terms of the bound evaluated per image (T = all of them).
        fd_images: samples per sampler for chapter 6's sample-quality score.
        fd_steps: the DDIM step counts chapter 6 scores (each with eta = 0 and 1).
        fd_ddpm: whether chapter 6 also scores DDPM's 1000 ancestral steps.
        neighbour_pool: training images searched for nearest neighbours (chapter 6).
        guidance_images: samples per guidance weight in chapter 7.
        guidance_weights: the guidance weights chapter 7 measures.
        guidance_per_class: images per digit in chapter 7's panels.
        toy_points: points sampled from chapter 7's two-Gaussian example (1000 DDPM steps of
            an analytic model for each of four weights: not counted by `chapter_work`, and
            on a CPU as costly as the network work for 20,000 points).
        solver_calls: the network calls (steps) at which chapter 8 scores each sampler.
        solver_images: samples per sampler, number of calls and draw in chapter 8.
        solver_draws: independent draws of each, for the spread of the score.
        variance_images: samples per variance and number of steps in chapter 9's respaced DDPM.
        variance_steps: the numbers of respaced DDPM steps chapter 9 compares.
    """

    name: str
    train_steps: int
    batch_size: int
    num_samples: int
    sample_steps: int
    ddpm_images: int
    ddim_images: int
    ddim_steps: tuple[int, ...]
    bpd_images: int
    bpd_timesteps: int
    fd_images: int
    fd_steps: tuple[int, ...]
    fd_ddpm: bool
    neighbour_pool: int
    guidance_images: int
    guidance_weights: tuple[float, ...]
    guidance_per_class: int
    toy_points: int
    solver_calls: tuple[int, ...]
    solver_images: int
    solver_draws: int
    variance_images: int
    variance_steps: tuple[int, ...]


BUDGETS = {
    "ci": Budget(
        "ci", train_steps=30, batch_size=16, num_samples=16, sample_steps=20,
        ddpm_images=1, ddim_images=4, ddim_steps=(100, 50, 20, 10),
        bpd_images=32, bpd_timesteps=50, fd_images=64, fd_steps=(10, 20), fd_ddpm=False,
        neighbour_pool=10_000,
        guidance_images=60, guidance_weights=(0.0, 0.5, 1.0, 3.0, 7.0), guidance_per_class=4,
        toy_points=4_000, solver_calls=(5, 10), solver_images=32, solver_draws=2,
        variance_images=32, variance_steps=(10,)),
    # The published book: every chapter in at most about 3 minutes on a 2-core CPU, the
    # whole book in about 10 (checked by tests/test_budget_viz.py with `estimate_seconds`).
    "cpu": Budget(
        "cpu", train_steps=400, batch_size=64, num_samples=36, sample_steps=20,
        ddpm_images=4, ddim_images=8, ddim_steps=(1000, 100, 50, 20, 10),
        bpd_images=128, bpd_timesteps=50, fd_images=256, fd_steps=(10, 20, 50), fd_ddpm=False,
        neighbour_pool=60_000,
        guidance_images=200, guidance_weights=(0.0, 0.5, 1.0, 3.0, 7.0), guidance_per_class=8,
        toy_points=4_000, solver_calls=(5, 10, 20, 50), solver_images=128, solver_draws=2,
        variance_images=128, variance_steps=(10, 25)),
    # A Colab T4: every chapter in at most about 10 minutes by its FLOP count at T4_FLOPS
    # (`estimate_seconds(..., "t4")`; tests/test_book_budget.py keeps each under
    # GPU_CHAPTER_SECONDS). Chapter 4 trains the full `mnist` network for 6,000 steps (about
    # 8 min); chapter 6 scores 2,000 samples per sampler and the bound on 1,000 test images
    # with all T terms (about 4 min).
    "gpu": Budget(
        "gpu", train_steps=6_000, batch_size=128, num_samples=64, sample_steps=100,
        ddpm_images=16, ddim_images=16, ddim_steps=(1000, 100, 50, 20, 10),
        bpd_images=1_000, bpd_timesteps=1000, fd_images=2_000, fd_steps=(10, 20, 50, 100),
        fd_ddpm=True, neighbour_pool=60_000,
        guidance_images=2_000, guidance_weights=(0.0, 0.5, 1.0, 3.0, 7.0), guidance_per_class=8,
        toy_points=20_000, solver_calls=(5, 10, 20, 50, 100), solver_images=1_000, solver_draws=5,
        variance_images=1_000, variance_steps=(10, 25, 50, 100)),
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


# ---------------------------------------------------------------------------------------------
# What a chapter costs

@dataclass(frozen=True)
class Work:
    """Network calls of one kind: `calls` forward passes on batches that hold `images` images
    in all, of the U-Net preset `network`; `train` counts a forward and a backward pass."""

    network: str
    calls: int
    images: int
    train: bool = False


def _sampling(calls_per_image: int, images: int, batch: int = 500, network: str = "mnist-small",
              doubled: bool = False) -> Work:
    """`images` drawn in batches of at most `batch`, `calls_per_image` network calls each;
    `doubled`: classifier-free guidance runs one pass on twice the batch."""
    batches = -(-images // batch)
    factor = 2 if doubled else 1
    return Work(network, calls_per_image * batches, calls_per_image * images * factor)


def chapter_work(budget: Budget) -> dict[str, list[Work]]:
    """The network calls each chapter makes under `budget`, cell by cell, as the notebooks
    run them (chapters 1-3 evaluate networks on a handful of images only: not counted).

    Chapters 5-7 sample from the shipped `mnist-small` models. Chapter 4 trains the CPU
    network (`mnist-small`) under "cpu" and "ci" (where it is smaller still) and the full
    `mnist` network under "gpu".
    """
    b = budget
    trained = "mnist" if b.name == "gpu" else "mnist-small"
    T = 1000
    resume_steps = max(10, b.train_steps // 10)  # chapter 4 resumes the run for this many
    grids = 5  # sample grids written during the run (every quarter, and at the end)
    return {
        "04_training": [
            Work(trained, 21 + b.train_steps + resume_steps,  # 21 steps by hand first
                 (21 + b.train_steps + resume_steps) * b.batch_size, train=True),
            _sampling(b.sample_steps, b.num_samples * (grids + 1), network=trained),
            # The shipped model as a v- and as an eps-model, with and without a small error.
            *[_sampling(b.sample_steps, b.num_samples) for _ in range(3)],
        ],
        "05_sampling": [
            # Algorithm 2 by hand, the package's DDPM and DDPM with sigma^2 = beta-tilde: three
            # runs of T calls (the other runs replay recorded answers); then DDIM-50 at eta 0 and 1.
            _sampling(3 * T + 2 * 50, b.ddpm_images, batch=b.ddpm_images),
            # DDIM by hand and the package's on 10 steps, then every step count compared.
            _sampling(sum(b.ddim_steps) + 2 * 10, b.ddim_images, batch=b.ddim_images),
        ],
        "06_evaluation": [
            # The bound twice (sigma^2 = beta and beta-tilde), in batches of 256.
            Work("mnist-small", 2 * b.bpd_timesteps * -(-b.bpd_images // 256),
                 2 * b.bpd_timesteps * b.bpd_images),
            *[_sampling(steps, b.fd_images) for steps in b.fd_steps for _ in range(2)],
            *([_sampling(T, b.fd_images)] if b.fd_ddpm else []),
        ],
        "07_guidance": [
            *[_sampling(b.sample_steps, 10 * b.guidance_per_class, doubled=w > 0)
              for w in (0.0, 1.0, 3.0, 7.0)],  # the panels
            *[_sampling(b.sample_steps, b.guidance_images, doubled=w > 0)
              for w in b.guidance_weights],  # the trade-off
            _sampling(b.sample_steps, b.guidance_images),  # the unconditional model
            _sampling(b.sample_steps, b.guidance_images, doubled=True),  # the recommended w
        ],
        "08_fewer_steps": [
            # DDIM (eta 0 and 1) and DPM-Solver++(2M) in both forms, at each number of calls,
            # in each draw; then DDIM against the first-order step on a few images.
            *[_sampling(calls, b.solver_images) for calls in b.solver_calls
              for _ in range(4 * b.solver_draws)],
            _sampling(2 * 10, 8),
        ],
        "09_learned_variances": [
            # The bound four times: the learned model under its own variance, beta and
            # beta-tilde, and the shipped fixed-variance model under beta-tilde.
            Work("mnist-small", 4 * b.bpd_timesteps * -(-b.bpd_images // 256), 4 * b.bpd_timesteps * b.bpd_images),
            Work("mnist-small", 12, 12 * 64, train=True),  # the gradient of L_t at 12 t, 64 images each
            # Respaced DDPM with beta, beta-tilde and the learned variance.
            *[_sampling(steps, b.variance_images) for steps in b.variance_steps for _ in range(3)],
        ],
    }


# Seconds per sampler step (one network call) and per image in it, and per training image, for
# `mnist-small` on the project's build machine (2 CPU cores, 2 threads), measured by
# benchmarks/book_budget.py (its record: benchmarks/results/book_budget.json; the tests check
# that these agree with it).
CPU_SECONDS_PER_CALL = 0.0029
CPU_SECONDS_PER_IMAGE = 0.00125
CPU_SECONDS_PER_TRAINING_IMAGE = 0.0027
# A Colab T4, by assumption (there is no T4 here to measure): 4 TFLOP/s of fp32 arithmetic
# (half its 8.1 TFLOP/s peak), and 4 ms per forward call of a small U-Net, whose hundred-odd
# kernels are launch-bound (12 ms for a training step: backward and optimizer).
T4_FLOPS = 4e12
T4_SECONDS_PER_CALL = 0.004
# The most a chapter may take under the `gpu` budget on a T4, by `estimate_seconds`: the book's
# promise of about 10 minutes a chapter on a free Colab GPU.
GPU_CHAPTER_SECONDS = 600


@functools.cache
def forward_flops(network: str) -> int:
    """Floating-point operations of one forward pass on one image of the preset `network`
    (a multiply-add counts two),
    counted with torch.utils.flop_counter on the meta device (nothing is computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .unet import UNet

    with torch.device("meta"):
        model = UNet.from_preset(network)
        size, channels = model.config["image_size"], model.config["in_channels"]
        x, t = torch.zeros(1, channels, size, size), torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t)
    return counter.get_total_flops()


def estimate_seconds(work: list[Work], machine: str = "cpu") -> float:
    """Seconds that `work` takes on `machine`: "cpu" (the 2-core build machine, `mnist-small`
    constants measured there) or "t4" (a Colab T4, by FLOP count at `T4_FLOPS`)."""
    seconds = 0.0
    for w in work:
        passes = 3 if w.train else 1  # a backward pass costs about two forward passes
        if machine == "cpu":
            per_image = CPU_SECONDS_PER_TRAINING_IMAGE if w.train else CPU_SECONDS_PER_IMAGE
            scale = forward_flops(w.network) / forward_flops("mnist-small")
            seconds += passes * w.calls * CPU_SECONDS_PER_CALL + w.images * per_image * scale
        elif machine == "t4":
            seconds += (passes * w.calls * T4_SECONDS_PER_CALL
                        + passes * w.images * forward_flops(w.network) / T4_FLOPS)
        else:
            raise ValueError(f"unknown machine {machine!r}; choose cpu or t4")
    return seconds


def describe_cost(chapter: str, budget: Budget | None = None) -> str:
    """One line for a chapter's opening: its network calls under `budget` and the minutes they
    take on a 2-core CPU and on a Colab T4 (estimates from `chapter_work`)."""
    budget = budget or get_budget()
    if chapter not in chapter_work(budget):
        return (f"budget {budget.name!r}: no training or sampling on this page, so it computes the "
                "same under every budget: well under a minute on a 2-core CPU or a Colab T4")
    cpu_work = chapter_work(BUDGETS["cpu"])[chapter]
    gpu_work = chapter_work(BUDGETS["gpu"])[chapter]
    images = sum(w.images * (3 if w.train else 1) for w in chapter_work(budget)[chapter])
    return (f"budget {budget.name!r}: {images:,} images through the network on this page; about "
            f"{max(1, round(estimate_seconds(cpu_work) / 60))} min with the 'cpu' budget on a "
            f"2-core CPU, about {max(1, round(estimate_seconds(gpu_work, 't4') / 60))} min with "
            "the 'gpu' budget on a Colab T4")
