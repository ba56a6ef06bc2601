"""Training: L_simple (Eq. 14, Algorithm 1) at scale, with the engineering around it.

Algorithm 1 of DDPM is four lines: draw x_0, draw t and eps, take a gradient step
on ||eps - eps_theta(x_t, t)||^2, repeat. Turning it into a run that gives good
samples, survives a crashed session and can be repeated bit for bit needs more:

- `TrainConfig` (`config`): every setting, with per-dataset defaults (CIFAR-10: the paper's).
- AdamW with a linear learning-rate warm-up and gradient clipping (Appendix B).
- An exponential moving average (EMA) of the weights, which is what we sample from.
- Mixed precision (bf16, or fp16 with a gradient scaler), channels_last and
  `torch.compile` (with CUDA graphs in mode "reduce-overhead") on a GPU.
- The dataset held on the device as uint8 and batched there, so a GPU step never
  waits for the host.
- Batches in a reproducible, resumable order (`data.EpochBatchSampler`); checkpoints
  written atomically and loaded with `torch.load(weights_only=True)`, so a checkpoint
  cannot run code (`checkpoint`).
- A guard that stops training at the first non-finite loss, a clean stop on Ctrl-C or
  SIGTERM, and the run folder's files (`runfolder`).
- Many processes under torchrun, one global batch (`distributed`).

    config = TrainConfig.for_dataset("mnist", steps=2000, run_dir="runs/mnist")
    Trainer(config).train()                          # runs/mnist/{log.jsonl, samples/, checkpoint.pt, ema.pt}
    Trainer.resume("runs/mnist", steps=4000).train()  # continue the same run
    model, diffusion, info = checkpoint.load_model("runs/mnist/ema.pt")
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .budget import pick_device
from .checkpoint import load_checkpoint, load_init_weights
from .config import TrainConfig, resolve_precision, resumed_config
from .data import (
    FOLDER_PREFIX,
    EpochBatchSampler,
    InMemoryImages,
    batch_loader,
    dataset_info,
    derive_seed,
    load_dataset,
)
from .diffusion import Diffusion
from .distributed import (
    agree_on_stop,
    check_compile_for_processes,
    check_global_batch,
    distributed_from_env,
    host_group,
    init_distributed,
    main_process_first,
    rank_slice,
    wrap_for_processes,
)
from .runfolder import (
    RunFolder,
    StopOnSignal,
    TrainingInterrupted,
    ema_release,
    refuse_existing_run,
    restore_run_state,
    run_state,
)
from .unet import UNet

# ------------------------------------------------------- the pieces of a step


def seed_dropout(seed: int, rank: int, *keys) -> None:
    """Give this process a stream of dropout masks of its own.

    Dropout draws from torch's global generator, which every process seeds alike so that the
    initial weights agree. Rank 0, like a single process, keeps that stream; every other rank
    takes its own, from the run's seed, its rank and `keys` (after a resume every process has
    restored rank 0's saved state, so the step is a key there). So N processes drop different
    units in their slices of a batch, as one process does across its rows. With dropout on, N
    processes therefore do not take exactly the steps of one process (with dropout 0 they do).
    """
    if rank > 0:
        torch.manual_seed(derive_seed(seed, "dropout", rank, *keys))


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


def ema_decay(decay: float, n: int, warmup: bool = True) -> float:
    """The decay of the average's update after n updates: min(decay, (1 + n) / (10 + n)) with the
    warm-up, else `decay`.

    The warm-up (as in TensorFlow's ExponentialMovingAverage with num_updates) lets the
    average forget the random initial weights quickly: with d = 0.9999 from the start it
    would still hold 37% of them after 10,000 steps, and early samples would be noise.
    """
    return min(decay, (1 + n) / (10 + n)) if warmup else decay


def ema_update_fn(decay: float, warmup: bool = True):
    """The averaging rule for `torch.optim.swa_utils.AveragedModel`:
    ema <- d * ema + (1 - d) * weights, with d = `ema_decay(decay, n, warmup)` after n updates."""

    @torch.no_grad()
    def update(ema_params: list[Tensor], params: list[Tensor], num_averaged: Tensor) -> None:
        d = ema_decay(decay, int(num_averaged), warmup)
        if ema_params[0].is_floating_point():
            torch._foreach_lerp_(ema_params, params, 1.0 - d)  # ema += (1 - d) * (w - ema)
        else:  # integer buffers (counters) are copied, not averaged
            torch._foreach_copy_(ema_params, params)

    return update


class EMA(AveragedModel):
    """The Trainer's average of the weights: an `AveragedModel` with `ema_update_fn`'s rule and
    the same state (`module.*` and the update count `n_averaged`), whose update never waits
    for the device. AveragedModel reads its count back from the device twice per update and the
    rule once more; here the count is also kept on the host (`updates`, read from the state once
    when a checkpoint is loaded), and each update only launches work."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        super().__init__(model, multi_avg_fn=ema_update_fn(decay, warmup), use_buffers=True)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        averaged = [t.detach() for t in (*self.module.parameters(), *self.module.buffers())]
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if self.updates == 0:  # the first update copies the weights
            torch._foreach_copy_(averaged, current)
        else:
            floats = [i for i, t in enumerate(averaged) if t.is_floating_point()]
            others = [i for i, t in enumerate(averaged) if not t.is_floating_point()]
            weight = 1.0 - ema_decay(self.decay, self.updates, self.warmup)
            torch._foreach_lerp_([averaged[i] for i in floats], [current[i] for i in floats], weight)
            if others:  # integer buffers (counters) are copied, not averaged
                torch._foreach_copy_([averaged[i] for i in others], [current[i] for i in others])
        self.n_averaged.add_(1)
        self.updates += 1

    def load_state_dict(self, state_dict, *args, **kwargs):
        result = super().load_state_dict(state_dict, *args, **kwargs)
        self.updates = int(self.n_averaged)
        return result


def lr_factor(step: int, warmup_steps: int, schedule: str = "constant", total_steps: int | None = None) -> float:
    """The learning rate after `step` optimizer steps, as a multiple of the peak `lr`.

    A linear warm-up to 1 over `warmup_steps` (Appendix B: 5,000 steps for CIFAR-10), then
    constant, or for schedule "cosine" half a cosine from 1 down to 0 at `total_steps`
    (Loshchilov & Hutter 2017, without restarts; constant while total_steps is not yet known).
    A small learning rate at the end of a run averages out the noise of the last updates,
    which the EMA alone does only over its ~1/(1 - decay) steps.
    """
    warm = 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)
    if schedule != "cosine" or total_steps is None or step < warmup_steps:
        return warm
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------ the trainer


class Trainer:
    """Everything a run needs, built from a `TrainConfig`; `train()` runs it.

    Writes into config.run_dir (`runfolder`) a log line every `log_every` steps, a grid of EMA
    samples every `sample_every`, checkpoint.pt every `checkpoint_every` and at the end, and
    ema.pt at the end. A new Trainer refuses a run_dir that already holds a checkpoint;
    `Trainer.resume` continues it.

    Under torchrun (WORLD_SIZE > 1) it joins the process group and wraps the network in
    DistributedDataParallel. `config.batch_size` is then the global batch: each of the N
    processes reads its slice of it and of one global draw of t, eps (and the label drop
    mask), and only rank 0 writes the files above; the logged loss is the mean over the
    global batch. Every process holds the same weights, EMA and optimizer state after each
    step, and a checkpoint resumes with any number of processes (rank 0 alone downloads data).

    `data` replaces the dataset that config.dataset names (its images must have the shape
    that dataset's have): any Dataset of (image in [-1, 1], label), or an `InMemoryImages`,
    which is batched on the device. The benchmarks time the real `train_step` on synthetic
    images this way.
    """

    def __init__(self, config: TrainConfig, *, checkpoint: dict | None = None, data: Dataset | None = None):
        self.config = config
        self.run_dir = Path(config.run_dir).expanduser()
        if checkpoint is None:
            refuse_existing_run(self.run_dir)
        self.dist = distributed_from_env()
        check_global_batch(config.batch_size, self.dist.world_size)  # before anything is built
        check_compile_for_processes(config.compile, self.dist.world_size)
        self.device = pick_device(config.device)
        if self.dist.enabled:
            self.device = init_distributed(self.dist, self.device)
        self.precision = resolve_precision(config.precision, self.device)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        if self.device.type == "cuda":
            # TF32 matrix multiplies: float32 range with a 10-bit mantissa, much faster on
            # Ampere and later, and accurate enough for training.
            torch.set_float32_matmul_precision("high")
        # Channels-last (NHWC) memory where it was measured faster: CUDA and the CPU (TrainConfig).
        nhwc = config.channels_last if config.channels_last is not None else self.device.type in ("cuda", "cpu")
        self.memory_format = torch.channels_last if nhwc else torch.contiguous_format
        self.folder = RunFolder(self.run_dir, self.dist, self.precision, config.lr)
        torch.manual_seed(config.seed)  # the initial weights (and rank 0's dropout from here on)

        self._build_model(fine_tune=checkpoint is None)
        seed_dropout(config.seed, self.dist.rank)
        self.diffusion = Diffusion(config.timesteps, config.schedule, config.objective, config.variance)
        self.step = 0
        self.epoch, self.position = 0, 0  # where the next batch comes from
        self.elapsed = 0.0  # seconds spent in training steps, over all sessions of the run
        # The group on which processes agree on host numbers: which of them could load the
        # data (see `_build_data`), then once per step when to stop (see `agree_on_stop`).
        self._host_group = host_group(self.dist)
        self._build_data(data)
        self._build_optimizer()
        # t and eps of the loss come from their own generator, dropout from the global one.
        self.noise_generator = torch.Generator(device=self.device).manual_seed(derive_seed(config.seed, "noise"))
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
        overrides["out_channels"] = 2 * channels if config.variance == "learned" else None  # variance.py
        self.model = UNet.from_preset(config.model, **overrides)
        self.model.check_size(size, size)
        # What the weights started from: None for random ones, else {"path", "step",
        # "total_steps"} of config.init_from (kept in the checkpoints, so a resumed run knows).
        self.init = None
        if config.init_from is not None and fine_tune:
            # Only the weights come along: the optimizer, the schedule, the step count and the
            # EMA start afresh, as in a new run (the EMA from these weights).
            process = {k: getattr(config, k) for k in ("timesteps", "schedule", "objective")}
            weights, self.init = load_init_weights(config.init_from, self.model.config, process)
            self.model.load_state_dict(weights)
        self.model.to(self.device, memory_format=self.memory_format)
        self.ema = EMA(self.model, config.ema_decay, config.ema_warmup)
        self.ema.eval()  # it is only ever sampled from
        # What train_step calls: the model, under torchrun wrapped in DDP (made after the EMA's
        # copy, so the copy carries none of DDP's hooks), then maybe compiled (DDP first, as
        # torch.compile expects). self.model stays the plain UNet the optimizer and EMA see.
        network = wrap_for_processes(self.model, self.dist, self.device)
        self.network = network if config.compile == "none" else torch.compile(network, mode=config.compile)

    def _build_data(self, data: Dataset | None) -> None:
        """The training images (self.dataset): config.dataset's, or `data` when given (checked
        against the shape the model was built for); an `InMemoryImages` moves to the device.
        Under torchrun rank 0 loads (downloads) config.dataset while the others wait, then they
        load it from disk; if one cannot, all stop with one line (`main_process_first`)."""
        config = self.config
        size = self.image_shape[-1]
        if data is None:
            native = not config.dataset.startswith(FOLDER_PREFIX) and config.image_size in (None, size)
            with main_process_first(self.dist, self._host_group):
                data = load_dataset(config.dataset, root=config.data_root, train=True,
                                    image_size=config.image_size, in_memory=config.data_on_device and native)
        elif tuple(data[0][0].shape) != self.image_shape:
            raise ValueError(f"the data's images are {tuple(data[0][0].shape)}, but {config.dataset} "
                             f"images are {self.image_shape}; pass images of that shape")
        if isinstance(data, InMemoryImages):
            data = data.to(self.device)  # once: 47 MB for MNIST, 154 MB for CIFAR-10
        self.dataset = data
        self.batches_per_epoch = self._sampler().batches_per_epoch  # it refuses fewer than one batch

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
        self.scheduler = LambdaLR(self.optimizer, lambda step: lr_factor(
            step, config.warmup_steps, config.lr_schedule, self.planned_steps))
        # fp16 has a narrow range: small gradients underflow to 0 unless the loss is scaled
        # up first (and the gradients scaled back down before the step). bf16 does not need it.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    @classmethod
    def resume(cls, run_dir: str | os.PathLike, *, data=None, **overrides) -> Trainer:
        """Continue the run in `run_dir` from its checkpoint.pt, with its saved settings.

        Only the settings in `config.RESUMABLE_FIELDS` may change, for instance a larger `steps`.
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
        return cls(resumed_config(checkpoint, run_dir, **overrides), checkpoint=checkpoint, data=data)

    # ---------------------------------------------------------------- one step

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
        if labels is not None:
            labels = labels.to(self.device, non_blocking=True)
            if cfg.p_uncond > 0:
                # One coin per image, after t and eps: the draw Diffusion.loss makes itself when
                # given the generator (and none when p_uncond is 0), so one process is unchanged.
                # A dropped label becomes the null class, num_classes.
                drop = torch.rand(batch, device=self.device, generator=self.noise_generator) < cfg.p_uncond
                labels = labels.masked_fill(rank_slice(drop, self.dist), self.model.num_classes)
        t, noise = rank_slice(t, self.dist), rank_slice(noise, self.dist)
        # The labels are dropped already, so the loss drops none (its p_uncond is 0).
        loss = self.diffusion.loss(self.predict, x0, labels, t=t, noise=noise, weighting=cfg.loss_weighting,
                                   min_snr_gamma=cfg.min_snr_gamma, vlb_weight=cfg.vlb_weight)

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
        sampler, seed = self._sampler(), self.config.seed
        if isinstance(self.dataset, InMemoryImages):
            yield from self.dataset.batches(sampler, seed)  # cut on the device
        else:
            yield from batch_loader(self.dataset, sampler, derive_seed(seed, "workers", self.step),
                                    self.device, self.config.num_workers)

    def _sampler(self) -> EpochBatchSampler:
        """The order of the batches from the current data position, under torchrun this
        process's slices of them."""
        return EpochBatchSampler(len(self.dataset), self.config.batch_size, self.config.seed, self.epoch,
                                 self.position, rank=self.dist.rank, world_size=self.dist.world_size)

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
        self.folder.start(self.step)  # the folder, its log trimmed to this step
        batches = self.batches()
        bar = tqdm(total=self.planned_steps or cfg.steps, initial=self.step,
                   disable=not (progress and self.dist.is_main),
                   unit="step", desc=f"train {cfg.dataset}", dynamic_ncols=True)
        record, grid = None, None
        plan_at = max(self.PLAN_AFTER, cfg.warmup_steps)
        mark = None  # (step, elapsed) where the speed measurement of a timed run starts
        signum = None  # the signal that stops the run (under torchrun, as all processes agreed)
        try:
            with StopOnSignal() as stop:
                while self.step < (self.planned_steps or cfg.steps) and not self._time_is_up():
                    loss, seconds = self._timed_step(batches)
                    if self.dist.enabled:  # one tiny all-reduce per step
                        self.elapsed, signum = agree_on_stop(self.elapsed, stop.signum, self._host_group)
                    self.folder.count(loss, seconds)
                    bar.update(1)
                    if self.planned_steps is None:
                        mark = self._plan_when_measured(mark, plan_at, bar)

                    last = self.step == (self.planned_steps or cfg.steps) or self._time_is_up()
                    if self.step % cfg.log_every == 0 or last:
                        record = self.folder.write_log(self.step, self.optimizer.param_groups[0]["lr"],
                                                       cfg.batch_size, self.elapsed)
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
        if self.folder.last_checkpoint is None or self.folder.last_checkpoint[1] != self.step:
            self.save_checkpoint()
        if signum is not None:
            raise TrainingInterrupted(signum, self.folder.checkpoint_path, self.step)
        ema_path = self.save_ema()
        return {"step": self.step, "loss": record["loss"] if record else None, "elapsed": self.elapsed,
                "checkpoint": str(self.folder.checkpoint_path), "ema": str(ema_path),
                "samples": str(grid) if grid else None}

    @torch.no_grad()
    def sample(self, n: int | None = None, steps: int | None = None) -> Tensor:
        """n images [n, C, H, W] in [-1, 1] from the EMA model with DDIM (fast: `sample_steps`
        steps rather than T). The same starting noise every time, so grids from successive
        steps show the same images taking shape. A class-conditional model draws image i as
        class i mod num_classes, without guidance (w = 0)."""
        n = n or self.config.num_sample_images
        steps = min(steps or self.config.sample_steps, self.diffusion.num_timesteps)
        generator = torch.Generator(device=self.device).manual_seed(derive_seed(self.config.seed, "samples"))
        classes = self.model.num_classes
        labels = None if classes is None else torch.arange(n, device=self.device) % classes
        return self.diffusion.sample(self.ema.module, (n, *self.image_shape), sampler="ddim",
                                     steps=steps, generator=generator, progress=False,
                                     device=self.device, labels=labels)

    def save_samples(self) -> Path | None:
        """Save a grid of EMA samples to run_dir/samples/step_NNNNNN.png (a conditional
        model's with one column per class). Under torchrun only rank 0 draws it (the other
        processes hold the same EMA) and the others return None."""
        if not self.dist.is_main:
            return None
        return self.folder.save_grid(self.sample(), self.step, columns=self.model.num_classes)

    # -------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """Everything needed to continue the run exactly: a checkpoint (`runfolder.run_state`)."""
        return run_state(self)

    def load_state_dict(self, checkpoint: dict) -> None:
        """Continue the run where `checkpoint` (a `state_dict`) left it."""
        restore_run_state(self, checkpoint)
        seed_dropout(self.config.seed, self.dist.rank, self.step)

    def save_checkpoint(self) -> Path:
        """Write run_dir/checkpoint.pt atomically, after checking that the losses since the last
        log line are finite: a diverged run never overwrites a good one (`RunFolder`).

        Under torchrun every process calls it at the same step (the check is a collective),
        and rank 0 writes: the state is the same on all, and global (the data position and
        the noise generator are those of the whole batch), so any number of processes can
        resume from it."""
        return self.folder.save_checkpoint(self.state_dict, self.step)

    def save_ema(self) -> Path:
        """Write run_dir/ema.pt: the EMA weights with the configs that rebuild the model
        (under torchrun rank 0 writes it; every process returns its path)."""
        return self.folder.save_ema(lambda: ema_release(self))
