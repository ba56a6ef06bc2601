"""Every setting of a training run: `TrainConfig`, and its defaults per dataset.

Plain data, so that a checkpoint holds the settings of its run and `Trainer.resume`
(train.py) rebuilds them.

    config = TrainConfig.for_dataset("mnist", steps=2000, run_dir="runs/mnist")
    Trainer(config).train()
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .budget import pick_device
from .checkpoint import CheckpointError
from .data import FOLDER_PREFIX
from .diffusion import WEIGHTINGS, check_p_uncond
from .sampling import DDIM_STEPS

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")
LR_SCHEDULES = ("constant", "cosine")
# torch.compile's modes, and "none". "reduce-overhead" records the compiled network's kernels
# into CUDA graphs and replays them with one launch each step: the cure for a step bound by
# launching ~1,000 small kernels, and it needs what the loop already gives it, one batch shape.
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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
    variance: str = "beta"  # "learned": Improved DDPM's hybrid loss L_simple + vlb_weight * L_vlb
    vlb_weight: float = 0.001  # lambda of the hybrid loss (Nichol & Dhariwal 2021, Sec. 3.1)
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
    # "none" on the CPU too: benchmarks/speed.py measured the CPU's default network (mnist-small,
    # batch 64) compiled in mode "default" slower per step than eager, after most of a minute of
    # compiling (benchmarks/results/speed_cpu_mnist-small.json).
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
        if not self.vlb_weight >= 0:
            raise ValueError(f"vlb_weight must be at least 0 (Improved DDPM uses 0.001); got {self.vlb_weight}")
        if not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be positive (the paper uses 5); got {self.min_snr_gamma}")
        if self.init_from is not None and not (isinstance(self.init_from, str) and self.init_from):
            raise ValueError(f"init_from must name a checkpoint (a path or pretrained:NAME); got {self.init_from!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be positive (or None for no time limit); got {self.max_minutes}")
        check_p_uncond(self.p_uncond)
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
    """Whether a run with this `device` setting trains on the CPU ("cuda" and "mps" never do,
    whether or not the machine has them)."""
    return device in ("auto", "cpu") and pick_device(device).type == "cpu"


# Settings a resumed run may change: where and how fast it runs, not what it learns.
RESUMABLE_FIELDS = frozenset({
    "steps", "device", "precision", "compile", "num_workers", "data_root", "run_dir", "data_on_device",
    "channels_last",
    "log_every", "sample_every", "checkpoint_every", "num_sample_images", "sample_steps",
})


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
    if precision == "bf16" and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:  # before Ampere: no bf16 arithmetic, only a slow emulation of it
            raise ValueError(f"--precision bf16: this GPU (compute capability {major}.{minor}, e.g. a "
                             "T4) has no native bf16 and would emulate it very slowly; use fp16 "
                             "(what --precision auto picks here)")
    return precision


def _dataset_slug(name: str) -> str:
    if name.startswith(FOLDER_PREFIX):
        return Path(name[len(FOLDER_PREFIX):]).expanduser().name or "folder"
    return name


def resumed_config(checkpoint: dict, run_dir, **overrides) -> TrainConfig:
    """The settings saved in `checkpoint` (a run's checkpoint.pt, as `load_checkpoint` reads it),
    for continuing the run in `run_dir` with `overrides`.

    Only the settings in RESUMABLE_FIELDS may change, and `steps` may not be below the step
    the checkpoint is at.
    """
    path = checkpoint["path"]
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
    return config
