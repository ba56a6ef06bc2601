"""A training run's folder: the files the Trainer writes into it, what they hold, the guard
against a diverged run, and how a run stops on a signal.

    run_dir/log.jsonl                 every log_every steps, a line: {"step", "loss" (the mean
                                      since the last line), "lr", "images_per_sec", "elapsed"}
    run_dir/samples/step_NNNNNN.png   a grid of samples from the EMA weights
    run_dir/checkpoint.pt             the latest full state of the run (`Trainer.state_dict`)
    run_dir/ema.pt                    at the end: the EMA weights and the configs, the file to ship

The losses of the steps since the last log line are summed on the device and read once, when
the line is written or a checkpoint is about to be: a loss that turned NaN or infinite stops
the run there (TrainingDivergedError), and the last good checkpoint is never overwritten.
Under torchrun every process keeps a `RunFolder` and computes the same numbers; only rank 0
writes. What a checkpoint.pt holds, and how a Trainer continues from it, are `run_state` and
`restore_run_state`; ema.pt is `ema_release` (the format is `checkpoint`'s). Ctrl-C or
SIGTERM (`StopOnSignal`) lets the step under way finish and the run write its checkpoint,
then raises `TrainingInterrupted`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from . import viz
from .checkpoint import (
    checkpoint_record,
    load_checkpoint,
    save_atomic,
    unwrap_state_dict,
    write_text_atomic,
)
from .data import derive_seed
from .distributed import Distributed, mean_over_processes


class TrainingInterrupted(KeyboardInterrupt):
    """Training was stopped by Ctrl-C (SIGINT) or SIGTERM after writing a checkpoint."""

    def __init__(self, signum: int, checkpoint: Path, step: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; "
                         f"checkpoint written to {checkpoint}")
        self.signum, self.checkpoint, self.step = signum, checkpoint, step
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM, as shells report them


class StopOnSignal:
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



class TrainingDivergedError(ValueError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


def refuse_existing_run(run_dir: Path) -> None:
    """Raise ValueError if `run_dir` holds a checkpoint: a new run never overwrites another."""
    path = run_dir / "checkpoint.pt"
    if path.exists():
        raise ValueError(f"{run_dir} already holds a checkpoint{_step_of(path)}; pass --resume to "
                         "continue it (Trainer.resume in Python) or choose another --run-dir")


def _step_of(path: Path) -> str:
    """ " at step N" for the checkpoint at `path`, or "" if it cannot be read."""
    try:
        return f" at step {load_checkpoint(path)['step']}"
    except (ValueError, KeyError, OSError):
        return ""


def describe_run(trainer) -> str:
    """One line on what a Trainer is about to do: "training: mnist 1x28x28, UNet 'mnist' (...)"
    (or "resuming at step N: ..."), as `python -m naivediffusion train` prints it first."""
    cfg, dist = trainer.config, trainer.dist
    verb = f"resuming at step {trainer.step}" if trainer.step else "training"
    conditional = f", class-conditional (p_uncond {cfg.p_uncond:g})" if cfg.class_conditional else ""
    processes = f" on {dist.world_size} processes ({cfg.batch_size // dist.world_size} each)" if dist.enabled else ""
    return (f"{verb}: {cfg.dataset} {'x'.join(map(str, trainer.image_shape))}, UNet {cfg.model!r} "
            f"({trainer.model.count_parameters() / 1e6:.1f}M parameters{conditional}), {trainer.device.type} "
            f"{trainer.precision}, batch {cfg.batch_size}{processes}, {cfg.steps} steps -> {trainer.run_dir}")


class RunFolder:
    """The files of the run in `path`, written by rank 0 of `dist`.

    `precision` and `lr` are the run's, named in the advice of a divergence message.
    `last_checkpoint` is (path, step) of the last checkpoint written or resumed from.
    """

    def __init__(self, path: Path, dist: Distributed, precision: str, lr: float):
        self.path, self.dist = path, dist
        self.checkpoint_path = path / "checkpoint.pt"
        self.log_path = path / "log.jsonl"
        self.advice = ("try --precision bf16 or fp32, or " if precision == "fp16" else "try ")
        self.advice += f"a lower --lr (now {lr:g}) in a new --run-dir"
        self.last_checkpoint: tuple[Path, int] | None = None
        self.interval: dict | None = None  # the steps since the last log line, while a loop runs

    def start(self, step: int) -> None:
        """Before the loop's first step: make the folder and keep only the log lines up to
        `step` (a resumed run rewrites what came after its checkpoint, and a new run starts
        a new log); then count the steps after `step`."""
        if self.dist.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            if self.log_path.exists():
                keep = []
                if step > 0:
                    for line in self.log_path.read_text().splitlines():
                        with contextlib.suppress(ValueError):
                            if json.loads(line)["step"] <= step:
                                keep.append(line + "\n")
                write_text_atomic(self.log_path, "".join(keep))  # a kill here leaves the old log whole
        self._new_interval(step)

    def _new_interval(self, step: int) -> None:
        self.interval = {"first": step + 1, "loss": None, "steps": 0, "time": 0.0}

    def count(self, loss: Tensor, seconds: float) -> None:
        """Add a step's loss (0-dim, on the device, where it stays) and time to the interval."""
        interval = self.interval
        interval["loss"] = loss if interval["loss"] is None else interval["loss"] + loss
        interval["steps"] += 1
        interval["time"] += seconds

    def mean_loss(self, step: int) -> float | None:
        """The mean loss of the steps since the last log line, read from the device (the one
        place the loop waits for it); raises TrainingDivergedError if it is not finite.

        Under torchrun it is the mean over the global batch: the processes' sums are added
        up here, once per log line or checkpoint (never per step), and since every process
        gets the same number, all raise TrainingDivergedError together or none does.
        """
        interval = self.interval
        if interval["steps"] == 0:
            return None
        # A new tensor under torchrun: the sum may be read twice (a checkpoint, then the log line).
        total = mean_over_processes(interval["loss"], self.dist)
        mean = total.item() / interval["steps"]
        if not math.isfinite(mean):
            raise TrainingDivergedError(self._divergence_message(mean, interval["first"], step))
        return mean

    def _divergence_message(self, loss: float, first: int, step: int) -> str:
        if self.last_checkpoint is None:
            kept = "no checkpoint had been saved yet"
        else:
            path, saved = self.last_checkpoint
            kept = f"the last good checkpoint, {path} (step {saved}), is left untouched"
        where = f"at step {first}" if first == step else f"in steps {first}-{step}"
        return f"training diverged: the loss is {loss} {where}; {kept}; {self.advice}"

    def write_log(self, step: int, lr: float, batch_size: int, elapsed: float) -> dict:
        """Append the line of the interval that ends at `step` to log.jsonl; start a new one.

        Every process computes the line (the loss is agreed on); only rank 0 writes it, with
        the global batch's images per second as rank 0 timed them."""
        interval = self.interval
        record = {
            "step": step,
            "loss": self.mean_loss(step),
            "lr": lr,
            "images_per_sec": interval["steps"] * batch_size / max(interval["time"], 1e-9),
            "elapsed": round(elapsed, 3),
        }
        if self.dist.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self._new_interval(step)
        return record

    def save_grid(self, images: Tensor, step: int, columns: int | None = None) -> Path:
        """Save `images` [n, C, H, W] as samples/step_NNNNNN.png, `columns` wide (default: square)."""
        nrow = columns or math.ceil(math.sqrt(images.shape[0]))
        return viz.save_grid(images, self.path / "samples" / f"step_{step:06d}.png", nrow=nrow)

    def save_checkpoint(self, state: Callable[[], dict], step: int) -> Path:
        """Write checkpoint.pt atomically (see `save_atomic`) with `state()` (called on rank 0
        only), after checking the losses since the last log line (`mean_loss`; a collective
        under torchrun): a diverged run never overwrites a good checkpoint."""
        if self.interval is not None:
            self.mean_loss(step)
        if self.dist.is_main:
            save_atomic(state(), self.checkpoint_path)
        self.last_checkpoint = (self.checkpoint_path, step)
        return self.checkpoint_path

    def save_ema(self, release: Callable[[], dict]) -> Path:
        """Write ema.pt atomically with `release()` (called on rank 0 only); returns its path."""
        path = self.path / "ema.pt"
        return save_atomic(release(), path) if self.dist.is_main else path


# ------------------------------------------------------------ what checkpoint.pt and ema.pt hold


def _rng_state(device: torch.device, generator: torch.Generator) -> dict:
    """The random streams a run's checkpoint keeps: the global CPU generator's (the initial
    weights, dropout), `generator`'s (the run's noise, on `device`) and `device`'s own."""
    state = {"torch": torch.get_rng_state(), "noise": generator.get_state(),
             "device_type": device.type, "device": None}
    if device.type == "cuda":
        state["device"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["device"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state: dict, device: torch.device, generator: torch.Generator) -> bool:
    """Restore the streams of `_rng_state`. Generator states differ between device types: from
    a checkpoint of another type only the CPU's is restored, and the answer is False."""
    torch.set_rng_state(state["torch"])
    if state["device_type"] != device.type:
        return False
    generator.set_state(state["noise"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["device"], device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state["device"])
    return True


def _run_settings(trainer) -> dict:
    """What every file of a `Trainer`'s run records besides its weights: the run's settings
    and those that rebuild the network and the noise process (`checkpoint.load_model`)."""
    return {
        "train_config": dataclasses.asdict(trainer.config),
        "model_config": trainer.model.config,
        "diffusion_config": trainer.diffusion.config,
        "image_shape": list(trainer.image_shape),
    }


def run_state(trainer) -> dict:
    """checkpoint.pt: everything `trainer` (a `Trainer`) needs to continue its run exactly."""
    return checkpoint_record(
        "checkpoint",
        step=trainer.step,
        data_position={"epoch": trainer.epoch, "position": trainer.position},
        elapsed=trainer.elapsed,
        planned_steps=trainer.planned_steps,
        init=trainer.init,
        model=trainer.model.state_dict(),
        ema=trainer.ema.state_dict(),
        optimizer=trainer.optimizer.state_dict(),
        scheduler=trainer.scheduler.state_dict(),
        scaler=trainer.scaler.state_dict(),
        rng=_rng_state(trainer.device, trainer.noise_generator),
        **_run_settings(trainer),
    )


def restore_run_state(trainer, checkpoint: dict) -> None:
    """Put `trainer` where the run that wrote `checkpoint` (a `run_state`) stood."""
    trainer.model.load_state_dict(checkpoint["model"])
    trainer.ema.load_state_dict(checkpoint["ema"])
    optimizer = trainer.optimizer
    # The saved settings say how Adam ran where the checkpoint was written (fused there or
    # not); how it runs here is this device's choice (`train.adamw`). The state is the run's.
    # The choice goes in before the state is loaded: load_state_dict places each `step` by its
    # group's setting (a fused group's on the parameter's device, as float32; a non-fused
    # group's where it was saved, which on a GPU would leave it on the CPU for a fused kernel).
    saved = checkpoint["optimizer"]
    here = {"fused": optimizer.defaults["fused"], "foreach": optimizer.defaults["foreach"]}
    optimizer.load_state_dict({**saved, "param_groups": [{**group, **here} for group in saved["param_groups"]]})
    trainer.scheduler.load_state_dict(checkpoint["scheduler"])
    if trainer.scaler.is_enabled() and checkpoint["scaler"]:
        trainer.scaler.load_state_dict(checkpoint["scaler"])
    trainer.step = checkpoint["step"]
    trainer.init = checkpoint.get("init")
    trainer.epoch = checkpoint["data_position"]["epoch"]
    trainer.position = checkpoint["data_position"]["position"]
    trainer.elapsed = checkpoint["elapsed"]
    if trainer.config.max_minutes:  # the plan made when the speed was measured
        trainer.planned_steps = checkpoint.get("planned_steps")
    if not _set_rng_state(checkpoint["rng"], trainer.device, trainer.noise_generator):
        # Saved on another type of device: continue with fresh streams.
        trainer.noise_generator.manual_seed(derive_seed(trainer.config.seed, "noise", trainer.step))
    folder = trainer.folder
    folder.last_checkpoint = (Path(checkpoint.get("path", folder.checkpoint_path)), trainer.step)


def ema_release(trainer) -> dict:
    """ema.pt: the EMA weights of `trainer` (the plain UNet's names, on the CPU) and the
    settings that rebuild the model; the file to ship."""
    weights = {k: v.detach().cpu().contiguous() for k, v in unwrap_state_dict(trainer.ema.state_dict()).items()}
    return checkpoint_record("ema", step=trainer.step, init=trainer.init, ema=weights, **_run_settings(trainer))
