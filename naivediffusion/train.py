"""Training: L_simple (Eq. 14, Algorithm 1) at scale, with the engineering around it.

Algorithm 1 of DDPM is four lines: draw x_0, draw t and eps, take a gradient step
on ||eps - eps_theta(x_t, t)||^2, repeat. Turning it into a run that gives good
samples, survives a crashed session and can be repeated bit for bit needs more:

- `TrainConfig`: every setting, with per-dataset defaults (CIFAR-10: the paper's).
- AdamW with a linear learning-rate warm-up and gradient clipping (Appendix B).
- An exponential moving average (EMA) of the weights, which is what we sample from.
- Mixed precision (bf16, or fp16 with a gradient scaler), channels_last and
  `torch.compile` (with CUDA graphs in mode "reduce-overhead") on a GPU.
- The dataset held on the device as uint8 and batched there, so a GPU step never
  waits for the host.
- Batches in a reproducible, resumable order (`data.EpochBatchSampler`); checkpoints
  written atomically and loaded with `torch.load(weights_only=True)`, so a checkpoint
  cannot run code (`checkpoint`).
- A guard that stops training at the first non-finite loss.
- Many processes under torchrun, one global batch (`distributed`).

    config = TrainConfig.for_dataset("mnist", steps=2000, run_dir="runs/mnist")
    Trainer(config).train()                          # runs/mnist/{log.jsonl, samples/, checkpoint.pt, ema.pt}
    Trainer.resume("runs/mnist", steps=4000).train()  # continue the same run
    model, diffusion, info = checkpoint.load_model("runs/mnist/ema.pt")
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import viz
from .budget import pick_device
from .checkpoint import (
    CheckpointError,
    checkpoint_record,
    load_checkpoint,
    save_atomic,
    total_steps,
    unwrap_state_dict,
    write_text_atomic,
)
from .data import (
    FOLDER_PREFIX,
    EpochBatchSampler,
    InMemoryImages,
    dataset_info,
    derive_seed,
    load_dataset,
)
from .diffusion import WEIGHTINGS, Diffusion
from .distributed import (
    agree_on_stop,
    check_global_batch,
    distributed_from_env,
    host_group,
    init_distributed,
    mean_over_processes,
    rank_slice,
)
from .sampling import DDIM_STEPS
from .unet import UNet

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")
LR_SCHEDULES = ("constant", "cosine")
# torch.compile's modes, and "none". "reduce-overhead" records the compiled network's kernels
# into CUDA graphs and replays them with one launch each step: the cure for a step bound by
# launching ~1,000 small kernels, and it needs what the loop already gives it, one batch shape.
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class TrainingDivergedError(ValueError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training was stopped by Ctrl-C (SIGINT) or SIGTERM after writing a checkpoint."""

    def __init__(self, signum: int, checkpoint: Path, step: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; "
                         f"checkpoint written to {checkpoint}")
        self.signum, self.checkpoint, self.step = signum, checkpoint, step
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM, as shells report them


class _StopOnSignal:
    """While active, Ctrl-C (SIGINT) and SIGTERM only set `signum`; the training loop looks at
    it after each step, so a stop never lands half-way through an optimizer update. Outside
    the main thread (where Python cannot install handlers) it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.signum, self._previous = None, {}
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C: stop now, the old way
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


# ------------------------------------------------------------------ settings


@dataclass
class TrainConfig:
    """Every setting of a training run. Build one with `TrainConfig.for_dataset`.

    The field defaults are the paper's CIFAR-10 run (Ho et al. 2020, Appendix B).
    All values are plain Python data, so `dataclasses.asdict(config)` goes into a
    checkpoint that `torch.load(weights_only=True)` can read.
    """

    dataset: str  # "mnist", "fashion-mnist", "cifar10" or "folder:PATH"
    model: str = "ddpm-cifar10"  # a preset name of `UNet.PRESETS`
    model_overrides: dict = field(default_factory=dict)  # UNet arguments, e.g. {"base_channels": 64}
    image_size: int | None = None  # None: the dataset's own size
    steps: int = 800_000
    batch_size: int = 128
    lr: float = 2e-4
    warmup_steps: int = 5000  # linear learning-rate warm-up
    lr_schedule: str = "constant"  # after the warm-up: "constant", or "cosine" decay to 0 at the end
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) after n updates
    dropout: float | None = None  # None: the preset's
    weight_decay: float = 0.0  # AdamW with no weight decay is the paper's Adam
    timesteps: int = 1000
    schedule: str = "linear"
    objective: str = "eps"
    variance: str = "beta"
    loss_weighting: str = "none"  # "none" (L_simple, Eq. 14) or "min-snr" (Hang et al. 2023)
    min_snr_gamma: float = 5.0  # gamma of Min-SNR-gamma (the paper's default)
    max_minutes: float | None = None  # end after this much training time, as if `steps` were reached
    # Fine-tuning: start from the EMA weights of this checkpoint (a run's checkpoint.pt or
    # ema.pt, a run folder, or "pretrained:NAME") instead of random ones, with a new optimizer,
    # learning-rate schedule and step count. Its network and noise process must be this run's.
    init_from: str | None = None
    # Classifier-free guidance (Ho & Salimans 2022): learn eps(x_t, c) and, through a null
    # class, the unconditional eps(x_t) in one network. Each training image's label is
    # replaced by the null class with probability p_uncond, per image (the paper tries 0.1
    # and 0.2).
    class_conditional: bool = False
    p_uncond: float = 0.1
    precision: str = "auto"  # "auto", "fp32", "bf16" or "fp16"
    compile: str = "none"  # torch.compile the network in this mode (COMPILE_MODES); "none": not
    # A torchvision dataset at its native size is held on the training device as uint8 and
    # batched there (data.InMemoryImages); False reads it image by image through a DataLoader,
    # as a folder of images always is. Both give the same batches in the same order (the
    # flips of CIFAR-10 come from different random draws).
    data_on_device: bool = True
    # Convolutions in channels-last (NHWC) memory. None: on CUDA (tensor cores want it) and on
    # the CPU, for the CPU default network: `benchmarks/speed.py --contiguous` on 2 threads
    # measured the mnist-small step at batch 64 6% faster in NHWC (259 against 275 ms), and
    # ddpm-cifar10's at batch 16 4% slower (2.93 against 2.81 s; README). Off on MPS (not measured).
    channels_last: bool | None = None
    device: str = "auto"  # "auto", "cpu", "cuda" or "mps"
    seed: int = 0
    run_dir: str | None = None  # None: runs/<dataset>
    log_every: int = 100
    sample_every: int = 10_000
    checkpoint_every: int = 5_000
    num_sample_images: int = 64
    sample_steps: int = DDIM_STEPS  # DDIM steps for the sample grids written while training
    num_workers: int | None = None  # None: 0 on a CPU, up to 4 with CUDA
    data_root: str | None = None  # None: $NAIVEDIFFUSION_DATA, else a cache folder

    def __post_init__(self):
        if self.run_dir is None:
            self.run_dir = str(Path("runs") / _dataset_slug(self.dataset))
        # Checkpoints from before the modes hold compile = False / True.
        self.compile = {False: "none", True: "default", None: "none"}.get(self.compile, self.compile)
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {self.compile!r}; choose one of {', '.join(COMPILE_MODES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.channels_last not in (None, True, False):
            raise ValueError(f"channels_last must be True, False or None (the device's measured "
                             f"default); got {self.channels_last!r}")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1); got {self.ema_decay}")
        for name in ("steps", "warmup_steps", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 0; got {getattr(self, name)}")
        for name in ("batch_size", "log_every", "sample_every", "checkpoint_every",
                     "num_sample_images", "sample_steps", "timesteps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive; got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.lr_schedule!r}; choose one of "
                             f"{', '.join(LR_SCHEDULES)}")
        if self.loss_weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {self.loss_weighting!r}; choose one of "
                             f"{', '.join(WEIGHTINGS)}")
        if not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be positive (the paper uses 5); got {self.min_snr_gamma}")
        if self.init_from is not None and not (isinstance(self.init_from, str) and self.init_from):
            raise ValueError(f"init_from must name a checkpoint (a path or pretrained:NAME); got {self.init_from!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be positive (or None for no time limit); got {self.max_minutes}")
        if not 0.0 <= self.p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be a probability in [0, 1] (0.1 is usual); got {self.p_uncond}")
        if self.class_conditional and self.dataset.startswith(FOLDER_PREFIX):
            raise ValueError("a folder of images has no class labels, so it cannot train a class-conditional "
                             "model; drop --class-conditional, or use mnist, fashion-mnist or cifar10")

    @classmethod
    def for_dataset(cls, name: str, **overrides) -> TrainConfig:
        """The default settings for dataset `name`, with any field overridden.

        MNIST and Fashion-MNIST on a machine without a GPU (device "cpu", or "auto" with no
        CUDA or MPS) get CPU_DEFAULTS, a smaller network and batch, unless `model` is given.
        """
        if name.startswith(FOLDER_PREFIX):
            defaults = DATASET_DEFAULTS["cifar10"]
        elif name in CPU_DEFAULTS and "model" not in overrides and runs_on_cpu(overrides.get("device", "auto")):
            defaults = CPU_DEFAULTS[name]  # sized for a CPU; naming a --model gives the full recipe
        elif name in DATASET_DEFAULTS:
            defaults = DATASET_DEFAULTS[name]
        else:
            choices = ", ".join([*DATASET_DEFAULTS, FOLDER_PREFIX + "PATH"])
            raise ValueError(f"unknown dataset {name!r}; choose one of {choices}")
        return cls(dataset=name, **{**defaults, **overrides})


# CIFAR-10: the paper, Appendix B. MNIST: meant to give clean digits in about 10 minutes on
# a Colab T4. The 1.6M-parameter "mnist" preset costs about 240 GFLOPs per step at batch 128
# (forward + backward), a few milliseconds of tensor-core time; the step is bound instead by
# launching its ~1,000 small kernels from Python (even an H200 runs only ~19 steps/s in bf16),
# so a T4 under fp16 should manage roughly 15-20 steps/s: 10,000 steps (21 epochs) in about
# 10 minutes. The digits are already clean after 5,000 steps. A small network tolerates a
# larger learning rate than the paper's 35.7M one, which matters in a run this short (5e-4
# reached a lower loss than 2e-4 at every point of a 5,000-step comparison); 500 warm-up steps
# keep Adam's first updates, made while its variance estimates are still poor, small. EMA
# 0.999 averages over roughly the last 1,000 steps; the paper's 0.9999 would average over
# most of so short a run (and without the warm-up still hold 37% of the initial weights).
_MNIST = dict(
    model="mnist", steps=10_000, batch_size=128, lr=5e-4, warmup_steps=500, lr_schedule="cosine",
    loss_weighting="none", grad_clip=1.0, ema_decay=0.999, log_every=50, sample_every=1000,
    checkpoint_every=1000,
)
# MNIST on a machine without a GPU (chosen by `TrainConfig.for_dataset` when no model is named):
# the 0.41M-parameter "mnist-small" network at batch 64, which 2 CPU cores run at about
# 4 steps/s (4,609 steps in a 20-minute run, 2026-12-06; README), with a larger learning rate
# and a shorter warm-up.
_MNIST_CPU = dict(
    model="mnist-small", steps=6_000, batch_size=64, lr=1e-3, warmup_steps=200, lr_schedule="cosine",
    objective="v", loss_weighting="none", grad_clip=1.0, ema_decay=0.999, log_every=50, sample_every=1000,
    checkpoint_every=500,
)
DATASET_DEFAULTS: dict[str, dict] = {
    "mnist": _MNIST,
    "fashion-mnist": _MNIST,
    "cifar10": dict(
        model="ddpm-cifar10", steps=800_000, batch_size=128, lr=2e-4, warmup_steps=5000,
        lr_schedule="constant", loss_weighting="none", grad_clip=1.0, ema_decay=0.9999,
        dropout=0.1, log_every=100, sample_every=10_000, checkpoint_every=5_000,
    ),
}
CPU_DEFAULTS: dict[str, dict] = {"mnist": _MNIST_CPU, "fashion-mnist": _MNIST_CPU}


def runs_on_cpu(device: str = "auto") -> bool:
    """Whether a run with this `device` setting trains on the CPU."""
    if device == "auto":
        mps = getattr(torch.backends, "mps", None)
        return not torch.cuda.is_available() and not (mps is not None and mps.is_available())
    return device == "cpu"


# Settings a resumed run may change: where and how fast it runs, not what it learns.
RESUMABLE_FIELDS = frozenset({
    "steps", "device", "precision", "compile", "num_workers", "data_root", "run_dir", "data_on_device",
    "channels_last",
    "log_every", "sample_every", "checkpoint_every", "num_sample_images", "sample_steps",
})


def _dataset_slug(name: str) -> str:
    if name.startswith(FOLDER_PREFIX):
        return Path(name[len(FOLDER_PREFIX):]).expanduser().name or "folder"
    return name


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" on GPUs that have it (Ampere and later), "fp16" on older ones such
    as the T4, "fp32" on CPU and MPS. An explicit choice is checked against the device."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        # Ask the hardware: is_bf16_supported() also says yes where bf16 is only emulated (slowly).
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"--precision fp16 needs a CUDA GPU (the device is {device.type}); "
                         "use fp32 or bf16")
    if precision == "bf16" and device.type == "mps":
        raise ValueError("--precision bf16 is not supported on MPS; use fp32")
    return precision


# ------------------------------------------------------- the pieces of a step


# Devices with a fused AdamW kernel: CUDA, and the CPU since torch 2.4 (this package's oldest).
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def adamw(parameters, lr: float, weight_decay: float, device: torch.device | str) -> torch.optim.AdamW:
    """AdamW, fused into one kernel over all parameters where the device has one.

    The arithmetic is Adam's; only how it is run changes. On CUDA the step is otherwise bound by
    launching several kernels per parameter tensor; on the CPU the default runs a Python loop
    over them. Measured on this project's 2-core CPU (2026-12-06, fp32, 2 threads): one
    optimizer step of `mnist-small` 8.0 -> 1.4 ms, of `ddpm-cifar10` 105 -> 26 ms (the for-loop
    default, then fused; `foreach=True` lay in between for the first and was slower for the
    second). Of a whole training step that is little, as the convolutions dominate: the median
    `mnist-small` step at batch 64 went from 255 to 252 ms, and `ddpm-cifar10`'s at batch 16
    (about 2.5 s) moved less than its rounds varied.
    """
    fused = torch.device(device).type in FUSED_ADAMW_DEVICES or None
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused)


def ema_update_fn(decay: float, warmup: bool = True):
    """The averaging rule for `torch.optim.swa_utils.AveragedModel`:
    ema <- d * ema + (1 - d) * weights, with d = min(decay, (1 + n) / (10 + n)) after n updates.

    The warm-up (as in TensorFlow's ExponentialMovingAverage with num_updates) lets the
    average forget the random initial weights quickly: with d = 0.9999 from the start it
    would still hold 37% of them after 10,000 steps, and early samples would be noise.
    """

    @torch.no_grad()
    def update(ema_params: list[Tensor], params: list[Tensor], num_averaged: Tensor) -> None:
        n = int(num_averaged)
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        if ema_params[0].is_floating_point():
            torch._foreach_lerp_(ema_params, params, 1.0 - d)  # ema += (1 - d) * (w - ema)
        else:  # integer buffers (counters) are copied, not averaged
            torch._foreach_copy_(ema_params, params)

    return update


def linear_warmup(warmup_steps: int):
    """Learning-rate factor after `step` optimizer steps: rises linearly to 1 over warmup_steps."""

    def factor(step: int) -> float:
        return 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)

    return factor


def cosine_decay(warmup_steps: int, total_steps: int):
    """Learning-rate factor after `step` optimizer steps: 1 during the warm-up, then half a
    cosine from 1 down to 0 at `total_steps` (Loshchilov & Hutter 2017, without restarts).

    Multiplied with `linear_warmup`. A small learning rate at the end of a run averages out the
    noise of the last updates, which the EMA alone does only over its ~1/(1 - decay) steps.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# ------------------------------------------------------------------ the trainer


class Trainer:
    """Everything a run needs, built from a `TrainConfig`; `train()` runs it.

    Writes into config.run_dir:
    - log.jsonl: every `log_every` steps a line {"step", "loss" (mean since the last line),
      "lr", "images_per_sec", "elapsed" (seconds spent in training steps so far)};
    - samples/step_NNNNNN.png: a grid from the EMA model every `sample_every` steps;
    - checkpoint.pt: the latest full state, every `checkpoint_every` steps and at the end;
    - ema.pt, at the end: the EMA weights and the configs only, the file to ship.
    A new Trainer refuses a run_dir that already holds a checkpoint; `Trainer.resume`
    continues it.

    Under torchrun (WORLD_SIZE > 1) it joins the process group and wraps the network in
    DistributedDataParallel. `config.batch_size` is then the global batch: each of the N
    processes reads its slice of it and of one global draw of t, eps (and the label drop
    mask), and only rank 0 writes the files above; the logged loss is the mean over the
    global batch. Every process holds the same weights, EMA and optimizer state after each
    step, and a checkpoint resumes with any number of processes.

    `data` replaces the dataset that config.dataset names (its images must have the shape
    that dataset's have): any Dataset of (image in [-1, 1], label), or an `InMemoryImages`,
    which is batched on the device. The benchmarks time the real `train_step` on synthetic
    images this way.
    """

    def __init__(self, config: TrainConfig, *, checkpoint: dict | None = None, data: Dataset | None = None):
        self.config = config
        self.run_dir = Path(config.run_dir).expanduser()
        self.checkpoint_path = self.run_dir / "checkpoint.pt"
        if checkpoint is None and self.checkpoint_path.exists():
            raise ValueError(f"{self.run_dir} already holds a checkpoint{_step_of(self.checkpoint_path)}; "
                             "pass --resume to continue it (Trainer.resume in Python) or choose "
                             "another --run-dir")
        self.dist = distributed_from_env()
        check_global_batch(config.batch_size, self.dist.world_size)  # before anything is built
        self.device = pick_device(config.device)
        if self.dist.enabled:
            self.device = init_distributed(self.dist, self.device)
        self.precision = resolve_precision(config.precision, self.device)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        cuda = self.device.type == "cuda"
        if cuda:
            # TF32 matrix multiplies: float32 range with a 10-bit mantissa, much faster on
            # Ampere and later, and accurate enough for training.
            torch.set_float32_matmul_precision("high")
        # Channels-last (NHWC) memory where it was measured faster: CUDA and the CPU (TrainConfig).
        nhwc = config.channels_last if config.channels_last is not None else self.device.type in ("cuda", "cpu")
        self.memory_format = torch.channels_last if nhwc else torch.contiguous_format
        torch.manual_seed(config.seed)  # the initial weights, and dropout from here on

        self._build_model(fine_tune=checkpoint is None)
        self.diffusion = Diffusion(config.timesteps, config.schedule, config.objective, config.variance)
        self._build_data(data)
        self._build_optimizer()
        # The group on which processes agree on host numbers once per step (see `agree_on_stop`).
        self._host_group = host_group(self.dist)
        # t and eps of the loss come from their own generator, dropout from the global one.
        self.noise_generator = torch.Generator(device=self.device)
        self.noise_generator.manual_seed(derive_seed(config.seed, "noise"))

        self.step = 0
        self.epoch, self.position = 0, 0  # where the next batch comes from
        self.elapsed = 0.0  # seconds spent in training steps, over all sessions of the run
        self.last_checkpoint: tuple[Path, int] | None = None
        self._interval = None  # the steps since the last log line, while train() runs
        if checkpoint is not None:
            self.load_state_dict(checkpoint)

    def _build_model(self, fine_tune: bool) -> None:
        """The network (self.model), its EMA (self.ema) and what train_step calls (self.network).

        The network is a preset, sized to the data. The preset's image_size stays the
        reference for its attention resolutions; the size the data has is checked here,
        before any data is read. With `fine_tune` (a new run, not a resumed one) and
        config.init_from, it starts from that checkpoint's EMA weights.
        """
        config = self.config
        channels, size, num_classes = dataset_info(config.dataset, config.image_size)
        self.image_shape = (channels, size, size)
        overrides = dict(in_channels=channels, **config.model_overrides)
        if config.class_conditional:
            # One embedding row per class plus the null class, index num_classes (see UNet).
            overrides["num_classes"] = num_classes
        if config.dropout is not None:
            overrides["dropout"] = config.dropout
        self.model = UNet.from_preset(config.model, **overrides)
        self.model.check_size(size, size)
        # What the weights started from: None for random ones, else {"path", "step",
        # "total_steps"} of config.init_from (kept in the checkpoints, so a resumed run knows).
        self.init = None
        if config.init_from is not None and fine_tune:
            self.init = self._start_from(config.init_from)
        self.model.to(self.device, memory_format=self.memory_format)
        self.ema = AveragedModel(self.model, multi_avg_fn=ema_update_fn(config.ema_decay, config.ema_warmup),
                                 use_buffers=True)
        self.ema.eval()  # it is only ever sampled from
        # What train_step calls: the model, under torchrun wrapped in DDP (made after the EMA's
        # copy, so the copy carries none of DDP's hooks), then maybe compiled (DDP first, as
        # torch.compile expects). self.model stays the plain UNet the optimizer and EMA see.
        network = self._wrap_for_processes(self.model)
        self.network = network if config.compile == "none" else torch.compile(network, mode=config.compile)

    def _build_data(self, data: Dataset | None) -> None:
        """The training images (self.dataset): config.dataset's, or `data` when given (checked
        against the shape the model was built for); an `InMemoryImages` moves to the device."""
        config = self.config
        size = self.image_shape[-1]
        if data is None:
            native = not config.dataset.startswith(FOLDER_PREFIX) and config.image_size in (None, size)
            data = load_dataset(config.dataset, root=config.data_root, train=True,
                                image_size=config.image_size, in_memory=config.data_on_device and native)
        elif tuple(data[0][0].shape) != self.image_shape:
            raise ValueError(f"the data's images are {tuple(data[0][0].shape)}, but {config.dataset} "
                             f"images are {self.image_shape}; pass images of that shape")
        if isinstance(data, InMemoryImages):
            data = data.to(self.device)  # once: 47 MB for MNIST, 154 MB for CIFAR-10
        self.dataset = data
        self.batches_per_epoch = len(self.dataset) // config.batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"the dataset has {len(self.dataset)} images, fewer than one batch of "
                             f"{config.batch_size}; use a smaller --batch-size")

    def _build_optimizer(self) -> None:
        """AdamW (self.optimizer), its learning-rate schedule (self.scheduler) and, for fp16,
        the gradient scaler (self.scaler)."""
        config = self.config
        self.optimizer = adamw(self.model.parameters(), config.lr, config.weight_decay, self.device)
        # The step the run ends at: config.steps, or for a run bounded by max_minutes the step
        # that the measured speed reaches in that time (None until it has been measured).
        self.planned_steps: int | None = None if config.max_minutes else config.steps
        # The closure reads self.planned_steps when it is called: a run bounded by --max-minutes
        # learns its length only after the warm-up (see `_plan_steps`).
        self.scheduler = LambdaLR(self.optimizer, lambda step: self.lr_factor(step))
        # fp16 has a narrow range: small gradients underflow to 0 unless the loss is scaled
        # up first (and the gradients scaled back down before the step). bf16 does not need it.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")

    def _start_from(self, source: str) -> dict:
        """Load the EMA weights of checkpoint `source` into the new network (fine-tuning).

        Only the weights come along: the optimizer, the learning-rate schedule, the step
        count and the EMA start afresh, as in a new run (the EMA from these weights).
        Raises ValueError when the checkpoint's network or noise process is not this run's."""
        start = load_checkpoint(source)
        path = start["path"]
        theirs, ours = start.get("model_config") or {}, self.model.config
        differ = [k for k in sorted(set(theirs) | set(ours)) if k != "dropout" and theirs.get(k) != ours.get(k)]
        if differ:
            was = ", ".join(f"{k} {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in differ)
            trained = start.get("train_config") or {}
            preset = f" (a {trained['model']!r} network)" if "model" in trained else ""
            raise ValueError(f"--init-from {source}: its network{preset} is not this run's ({was}); "
                             "pass the --model (and --class-conditional) it was trained with")
        process = start.get("diffusion_config") or {}
        differ = [k for k in ("timesteps", "schedule", "objective") if process.get(k) != getattr(self.config, k)]
        if differ:
            was = ", ".join(f"{k} {process.get(k)!r} there, {getattr(self.config, k)!r} here" for k in differ)
            raise ValueError(f"--init-from {source}: it learned another noise process ({was}); pass the "
                             "same --timesteps, --schedule and --objective")
        if "ema" not in start:
            raise CheckpointError(f"--init-from {source}: {path} holds no EMA weights; give a run's "
                                  "checkpoint.pt or ema.pt")
        self.model.load_state_dict(unwrap_state_dict(start["ema"]))
        return {"path": str(path), "step": start.get("step"), "total_steps": total_steps(start)}

    @classmethod
    def resume(cls, run_dir: str | os.PathLike, *, data=None, **overrides) -> Trainer:
        """Continue the run in `run_dir` from its checkpoint.pt, with its saved settings.

        Only the settings in RESUMABLE_FIELDS may change, for instance a larger `steps`.
        `data` is the same as the Trainer's: the images the run was started on, when they did
        not come from its dataset.
        """
        path = Path(run_dir).expanduser() / "checkpoint.pt"
        if not path.exists():
            raise FileNotFoundError(f"nothing to resume: {path} does not exist; drop --resume to "
                                    "start a new run there, or give the --run-dir of an existing run")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            raise TypeError(f"unknown TrainConfig fields: {', '.join(sorted(unknown))}")
        checkpoint = load_checkpoint(path)
        try:
            config = TrainConfig(**checkpoint["train_config"])
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"{path} holds no training settings this version can read "
                                  f"({err}); start a new run") from err
        changed = sorted(k for k, v in overrides.items() if getattr(config, k) != v)
        fixed = [k for k in changed if k not in RESUMABLE_FIELDS]
        if fixed:
            was = ", ".join(f"{k}={getattr(config, k)!r}" for k in fixed)
            raise ValueError(f"cannot change {', '.join(fixed)} when resuming (the run has {was}); "
                             "start a new run in another --run-dir to change them")
        config = dataclasses.replace(config, **{**overrides, "run_dir": str(run_dir)})
        if config.steps < checkpoint["step"]:
            raise ValueError(f"{path} is already at step {checkpoint['step']}, past --steps "
                             f"{config.steps}; pass a larger --steps to train further")
        return cls(config, checkpoint=checkpoint, data=data)

    # ------------------------------------------------------- many processes

    def _wrap_for_processes(self, model: UNet) -> torch.nn.Module:
        """`model` in DistributedDataParallel under torchrun, else `model` itself.

        DDP copies rank 0's weights to every process once, here, and from then on averages
        the gradients over the processes during each backward(), so that every process's
        optimizer takes the same step and the weights stay equal without being sent again.
        """
        if not self.dist.enabled:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    # ---------------------------------------------------------------- one step

    def lr_factor(self, step: int) -> float:
        """The learning rate after `step` optimizer steps, as a multiple of config.lr."""
        factor = linear_warmup(self.config.warmup_steps)(step)
        if self.config.lr_schedule == "cosine" and self.planned_steps is not None:
            factor *= cosine_decay(self.config.warmup_steps, self.planned_steps)(step)
        return factor

    # A run bounded by max_minutes measures its speed over steps PLAN_AFTER // 2 .. PLAN_AFTER
    # (or to the end of the warm-up, if later), when the first slow steps are behind it.
    PLAN_AFTER = 40

    def _plan_steps(self, mark: tuple[int, float]) -> None:
        """Fix planned_steps from the time the steps since `mark` = (step, elapsed) took."""
        seconds_per_step = (self.elapsed - mark[1]) / max(1, self.step - mark[0])
        left = self.config.max_minutes * 60.0 - self.elapsed
        self.planned_steps = min(self.config.steps, self.step + max(0, int(left / seconds_per_step)))

    def _time_is_up(self) -> bool:
        return self.config.max_minutes is not None and self.elapsed >= self.config.max_minutes * 60.0

    def predict(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """The network's output for (x_t, t) (and class labels, for a conditional model)
        under mixed precision.

        Autocast covers only the network: the forward process q_sample and the squared
        error stay float32, and `Diffusion.loss` casts the output back to float32.
        """
        x_t = x_t.contiguous(memory_format=self.memory_format)
        extra = () if labels is None else (labels,)
        if self.amp_dtype is None:
            return self.network(x_t, t, *extra)
        with torch.autocast(self.device.type, dtype=self.amp_dtype):
            return self.network(x_t, t, *extra)

    def train_step(self, x0: Tensor, labels: Tensor | None = None) -> Tensor:
        """One step of Algorithm 1 on a batch x0 [B, C, H, W] in [-1, 1]; returns the loss (0-dim).

        A class-conditional run also takes the batch's labels [B]: each is replaced by the
        null class with probability `p_uncond`, drawn per image from the noise generator
        after t and eps.

        Under torchrun x0 is this process's slice [B / N, C, H, W] of the global batch of B
        images. Every process draws t [B], eps [B, C, H, W] (and the drop mask [B]) for the
        whole global batch from the same noise generator and keeps its rows, so that the N
        processes together use exactly the noise that one process would.
        """
        cfg = self.config
        if cfg.class_conditional != (labels is not None):
            raise ValueError("a class-conditional run's train_step needs the batch's labels, and an "
                             "unconditional run's takes none")
        x0 = x0.to(self.device, non_blocking=True)
        batch = x0.shape[0] * self.dist.world_size  # the global batch
        t = torch.randint(0, self.diffusion.num_timesteps, (batch,), device=self.device,
                          generator=self.noise_generator)
        noise = torch.randn((batch, *x0.shape[1:]), device=self.device, generator=self.noise_generator)
        conditioning = {}
        if labels is not None:
            conditioning = dict(labels=labels.to(self.device, non_blocking=True),
                                null_label=self.model.num_classes)
            if cfg.p_uncond > 0:
                # One coin per image, after t and eps: the draw Diffusion.loss makes itself when
                # given the generator (and none when p_uncond is 0), so one process is unchanged.
                drop = torch.rand(batch, device=self.device, generator=self.noise_generator) < cfg.p_uncond
                conditioning["drop_mask"] = rank_slice(drop, self.dist)
        t, noise = rank_slice(t, self.dist), rank_slice(noise, self.dist)
        loss = self.diffusion.loss(self.predict, x0, t=t, noise=noise, weighting=cfg.loss_weighting,
                                   min_snr_gamma=cfg.min_snr_gamma, **conditioning)

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # under DDP: gradients averaged over the processes here
        if self.config.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)  # skipped by the scaler if fp16 gradients overflowed
        self.scaler.update()
        self.scheduler.step()
        self.ema.update_parameters(self.model)
        return loss.detach()  # stays on the device: reading it here would make the GPU wait

    def batches(self):
        """An endless iterator of (images [B, C, H, W], labels [B]), from the current data position
        (under torchrun this process's slices, [B / N, C, H, W] and [B / N])."""
        cfg = self.config
        sampler = EpochBatchSampler(len(self.dataset), cfg.batch_size, cfg.seed, self.epoch, self.position,
                                    rank=self.dist.rank, world_size=self.dist.world_size)
        if isinstance(self.dataset, InMemoryImages):
            yield from self._batches_on_device(sampler)
            return
        if cfg.num_workers is not None:
            workers = cfg.num_workers
        else:
            workers = min(4, os.cpu_count() or 1) if self.device.type == "cuda" else 0
        loader = DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=workers,
            pin_memory=self.device.type == "cuda",
            # The loader seeds its workers from this generator; without one it would draw
            # from the global generator and shift dropout's random stream.
            generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "workers", self.step)),
        )
        yield from loader

    def _batches_on_device(self, sampler: EpochBatchSampler):
        """The batches `sampler` names, cut from the images held on the device.

        Once per epoch the epoch's order (and, for a flipped dataset, one coin per image of
        it, seeded from the seed and the epoch, so a resumed run flips as the uninterrupted
        one would) is copied to the device; each step is then an index into it, a gather of
        uint8 images and one scaling kernel, with nothing sent from the host.
        """
        for epoch, position in sampler.epochs():
            order = sampler.epoch_batches(epoch).to(self.device)
            flips = None
            if self.dataset.flip:
                coins = torch.Generator().manual_seed(derive_seed(self.config.seed, "flip", epoch))
                draws = torch.rand(sampler.batches_per_epoch, sampler.batch_size, generator=coins) < 0.5
                flips = draws[:, sampler.rank_slice].to(self.device)
            for i in range(position, sampler.batches_per_epoch):
                yield self.dataset.batch(order[i], None if flips is None else flips[i])

    def _advance_data_position(self) -> None:
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0

    # -------------------------------------------------------------- the loop

    def train(self, progress: bool = True) -> dict:
        """Train up to `config.steps` (or `config.max_minutes`); log, sample and checkpoint.

        The step never waits for the device: the losses are summed on it and read once per
        log interval, and before anything is saved, so a GPU can run ahead of Python.

        Returns:
            {"step", "loss" (mean over the last log interval), "checkpoint", "ema",
            "samples" (the last grid), "elapsed" (seconds)}.
        Raises:
            TrainingDivergedError: the loss became NaN or infinite. Nothing is saved after
                that; the last checkpoint is left as it was.
            TrainingInterrupted: Ctrl-C (SIGINT) or SIGTERM arrived; the step under way was
                finished and a checkpoint written at it, from which `Trainer.resume`
                continues exactly as if nothing had happened.

        Under torchrun every process runs this loop in step with the others: they agree after
        each step on the time and on any signal (`distributed.agree_on_stop`), so all stop at
        the same step, and both exceptions are raised on every process. Only rank 0 writes and
        shows progress.
        """
        cfg = self.config
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._trim_log()
        batches = self.batches()
        bar = tqdm(total=self.planned_steps or cfg.steps, initial=self.step,
                   disable=not (progress and self.dist.is_main),
                   unit="step", desc=f"train {cfg.dataset}", dynamic_ncols=True)
        self._interval = {"first": self.step + 1, "loss": None, "steps": 0, "time": 0.0}
        record, grid = None, None
        plan_at = max(self.PLAN_AFTER, cfg.warmup_steps)
        mark = None  # (step, elapsed) where the speed measurement of a timed run starts
        signum = None  # the signal that stops the run (under torchrun, as all processes agreed)
        try:
            with _StopOnSignal() as stop:
                while self.step < (self.planned_steps or cfg.steps) and not self._time_is_up():
                    loss, seconds = self._timed_step(batches)
                    if self.dist.enabled:  # one tiny all-reduce per step
                        self.elapsed, signum = agree_on_stop(self.elapsed, stop.signum, self._host_group)
                    interval = self._interval
                    interval["loss"] = loss if interval["loss"] is None else interval["loss"] + loss
                    interval["steps"] += 1
                    interval["time"] += seconds
                    bar.update(1)
                    if self.planned_steps is None:
                        mark = self._plan_when_measured(mark, plan_at, bar)

                    last = self.step == (self.planned_steps or cfg.steps) or self._time_is_up()
                    if self.step % cfg.log_every == 0 or last:
                        record = self._write_log()
                        bar.set_postfix(loss=f"{record['loss']:.4f}",
                                        img_s=f"{record['images_per_sec']:.0f}")
                    if self.step % cfg.sample_every == 0 or last:
                        grid = self.save_samples()
                    if self.step % cfg.checkpoint_every == 0 or last:
                        self.save_checkpoint()
                    # One process reads its handler's flag here, as late as possible; many
                    # read only what they agreed on above, so that none stops alone.
                    if not self.dist.enabled:
                        signum = stop.signum
                    if signum is not None:
                        break
        finally:
            bar.close()
            batches.close()  # stops the loader's worker processes
        if not self.dist.enabled:
            signum = stop.signum  # also a signal that came after the last step's check
        return self._finish(signum, record, grid)

    def _timed_step(self, batches) -> tuple[Tensor, float]:
        """One train_step on the next batch of `batches`, counted (step, data position) and
        timed on the host clock: (the loss, still on the device; the seconds it took, which
        are added to self.elapsed)."""
        start = time.perf_counter()
        images, labels = next(batches)
        loss = self.train_step(images, labels) if self.config.class_conditional else self.train_step(images)
        self.step += 1
        self._advance_data_position()
        seconds = time.perf_counter() - start
        self.elapsed += seconds
        return loss, seconds

    def _plan_when_measured(self, mark: tuple[int, float] | None, plan_at: int, bar) -> tuple[int, float] | None:
        """For a run bounded by max_minutes, before its length is known: start the speed
        measurement at step plan_at // 2 (returns its mark, (step, elapsed)), and from step
        `plan_at` on, once PLAN_AFTER // 2 steps have been timed, fix planned_steps
        (`_plan_steps`) and show it on the progress bar."""
        if self.step >= plan_at // 2 and mark is None:
            mark = (self.step, self.elapsed)
        if self.step >= plan_at and self.step - mark[0] >= self.PLAN_AFTER // 2:
            self._plan_steps(mark)
            bar.total = self.planned_steps
            bar.refresh()
        return mark

    def _finish(self, signum: int | None, record: dict | None, grid: Path | None) -> dict:
        """The end of `train`: a checkpoint at the last step (unless one was just written);
        then TrainingInterrupted if signal `signum` stopped the run, else ema.pt and the result."""
        if self.last_checkpoint is None or self.last_checkpoint[1] != self.step:
            self.save_checkpoint()
        if signum is not None:
            raise TrainingInterrupted(signum, self.checkpoint_path, self.step)
        ema_path = self.save_ema()
        return {
            "step": self.step,
            "loss": record["loss"] if record else None,
            "checkpoint": str(self.checkpoint_path),
            "ema": str(ema_path),
            "samples": str(grid) if grid else None,
            "elapsed": self.elapsed,
        }

    def _check_finite(self) -> float | None:
        """The mean loss of the steps since the last log line, read from the device (the one
        place the loop waits for it); raises TrainingDivergedError if it is not finite.

        Under torchrun it is the mean over the global batch: the processes' sums are added
        up here, once per log line or checkpoint (never per step), and since every process
        gets the same number, all raise TrainingDivergedError together or none does.
        """
        interval = self._interval
        if interval["steps"] == 0:
            return None
        # A new tensor under torchrun: the sum may be read twice (a checkpoint, then the log line).
        total = mean_over_processes(interval["loss"], self.dist)
        mean = total.item() / interval["steps"]
        if not math.isfinite(mean):
            raise TrainingDivergedError(self._divergence_message(mean, interval["first"]))
        return mean

    def _write_log(self) -> dict:
        """Append the line of the interval that ends at this step to log.jsonl; start a new one.

        Every process computes the line (the loss is agreed on); only rank 0 writes it, with
        the global batch's images per second as rank 0 timed them."""
        interval = self._interval
        record = {
            "step": self.step,
            "loss": self._check_finite(),
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_sec": interval["steps"] * self.config.batch_size / max(interval["time"], 1e-9),
            "elapsed": round(self.elapsed, 3),
        }
        if self.dist.is_main:
            with open(self.run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        self._interval = {"first": self.step + 1, "loss": None, "steps": 0, "time": 0.0}
        return record

    def _divergence_message(self, loss: float, first: int) -> str:
        if self.last_checkpoint is None:
            kept = "no checkpoint had been saved yet"
        else:
            path, step = self.last_checkpoint
            kept = f"the last good checkpoint, {path} (step {step}), is left untouched"
        fix = ("try --precision bf16 or fp32, or " if self.precision == "fp16" else "try ")
        where = f"at step {first}" if first == self.step else f"in steps {first}-{self.step}"
        return (f"training diverged: the loss is {loss} {where}; {kept}; {fix}"
                f"a lower --lr (now {self.config.lr:g}) in a new --run-dir")

    def _trim_log(self) -> None:
        """Keep only log lines up to the current step: a resumed run rewrites what came after
        its checkpoint, and a new run starts a new log."""
        path = self.run_dir / "log.jsonl"
        if not path.exists():
            return
        keep = []
        if self.step > 0:
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    if json.loads(line)["step"] <= self.step:
                        keep.append(line + "\n")
        write_text_atomic(path, "".join(keep))  # a kill here leaves the old log whole

    @torch.no_grad()
    def sample(self, n: int | None = None, steps: int | None = None) -> Tensor:
        """n images [n, C, H, W] in [-1, 1] from the EMA model with DDIM (fast: `sample_steps`
        steps rather than T). The same starting noise every time, so grids from successive
        steps show the same images taking shape. A class-conditional model draws image i as
        class i mod num_classes, without guidance (w = 0)."""
        n = n or self.config.num_sample_images
        steps = min(steps or self.config.sample_steps, self.diffusion.num_timesteps)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(derive_seed(self.config.seed, "samples"))
        labels = None
        if self.model.num_classes is not None:
            labels = torch.arange(n, device=self.device) % self.model.num_classes
        return self.diffusion.sample(self.ema.module, (n, *self.image_shape), sampler="ddim",
                                     steps=steps, generator=generator, progress=False,
                                     device=self.device, labels=labels)

    def save_samples(self) -> Path | None:
        """Save a grid of EMA samples to run_dir/samples/step_NNNNNN.png (a conditional
        model's with one column per class). Under torchrun only rank 0 draws it (the other
        processes hold the same EMA) and the others return None."""
        if not self.dist.is_main:
            return None
        images = self.sample()
        nrow = self.model.num_classes or math.ceil(math.sqrt(images.shape[0]))
        path = self.run_dir / "samples" / f"step_{self.step:06d}.png"
        return viz.save_grid(images, path, nrow=nrow)

    # -------------------------------------------------------------- state

    def _rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state(), "noise": self.noise_generator.get_state(),
                 "device_type": self.device.type, "device": None}
        if self.device.type == "cuda":
            state["device"] = torch.cuda.get_rng_state(self.device)
        elif self.device.type == "mps":
            state["device"] = torch.mps.get_rng_state()
        return state

    def _set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if state["device_type"] != self.device.type:
            # Generator states differ between device types: continue with fresh streams.
            self.noise_generator.manual_seed(derive_seed(self.config.seed, "noise", self.step))
            return
        self.noise_generator.set_state(state["noise"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state["device"], self.device)
        elif self.device.type == "mps":
            torch.mps.set_rng_state(state["device"])

    def state_dict(self) -> dict:
        """Everything needed to continue the run exactly: a checkpoint."""
        return checkpoint_record(
            "checkpoint",
            step=self.step,
            data_position={"epoch": self.epoch, "position": self.position},
            elapsed=self.elapsed,
            planned_steps=self.planned_steps,
            init=self.init,
            model=self.model.state_dict(),
            ema=self.ema.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            rng=self._rng_state(),
            **self._settings(),
        )

    def _settings(self) -> dict:
        """What every file of the run records besides its weights: the run's settings and
        those that rebuild the network and the noise process (`checkpoint.load_model`)."""
        return {
            "train_config": dataclasses.asdict(self.config),
            "model_config": self.model.config,
            "diffusion_config": self.diffusion.config,
            "image_shape": list(self.image_shape),
        }

    def load_state_dict(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.ema.load_state_dict(checkpoint["ema"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        # The saved settings say how Adam ran where the checkpoint was written (fused there or
        # not); how it runs here is this device's choice (`adamw`). The state is the run's.
        for group in self.optimizer.param_groups:
            group["fused"], group["foreach"] = self.optimizer.defaults["fused"], self.optimizer.defaults["foreach"]
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.scaler.is_enabled() and checkpoint["scaler"]:
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.step = checkpoint["step"]
        self.init = checkpoint.get("init")
        self.epoch = checkpoint["data_position"]["epoch"]
        self.position = checkpoint["data_position"]["position"]
        self.elapsed = checkpoint["elapsed"]
        if self.config.max_minutes:  # the plan made when the speed was measured
            self.planned_steps = checkpoint.get("planned_steps")
        self._set_rng_state(checkpoint["rng"])
        self.last_checkpoint = (Path(checkpoint.get("path", self.checkpoint_path)), self.step)

    def save_checkpoint(self) -> Path:
        """Write run_dir/checkpoint.pt atomically (see `save_atomic`), after checking that the
        losses since the last log line are finite: a diverged run never overwrites a good one.

        Under torchrun every process calls it at the same step (the check is a collective),
        and rank 0 writes: the state is the same on all, and global (the data position and
        the noise generator are those of the whole batch), so any number of processes can
        resume from it."""
        if self._interval is not None:
            self._check_finite()
        if self.dist.is_main:
            save_atomic(self.state_dict(), self.checkpoint_path)
        self.last_checkpoint = (self.checkpoint_path, self.step)
        return self.checkpoint_path

    def save_ema(self) -> Path:
        """Write run_dir/ema.pt: the EMA weights with the configs that rebuild the model
        (under torchrun rank 0 writes it; every process returns its path)."""
        path = self.run_dir / "ema.pt"
        if not self.dist.is_main:
            return path
        weights = {k: v.detach().cpu().contiguous()
                   for k, v in unwrap_state_dict(self.ema.state_dict()).items()}
        release = checkpoint_record("ema", step=self.step, init=self.init, ema=weights, **self._settings())
        return save_atomic(release, path)




def _step_of(path: Path) -> str:
    """ " at step N" for the checkpoint at `path`, or "" if it cannot be read."""
    try:
        return f" at step {load_checkpoint(path)['step']}"
    except (ValueError, KeyError, OSError):
        return ""
