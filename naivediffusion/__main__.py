"""The command line: ``python -m naivediffusion train | sample`` (or the ``naivediffusion`` script).

    python -m naivediffusion train --dataset mnist                  # about 10 minutes on a T4
    python -m naivediffusion train --resume --run-dir runs/mnist    # continue after a crash
    python -m naivediffusion sample --checkpoint runs/mnist/ema.pt --n 64 --out grid.png

Each subcommand is one function that adds its parser (`add_train_parser`, ...) and one
that runs it; `SUBCOMMANDS` lists the adders. Mistakes in the input (an unknown
dataset, a missing or foreign checkpoint, an image size the network cannot take, a
diverged run) end with exit status 2 and one line on stderr that says what to do.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from . import viz
from .budget import pick_device
from .train import DATASET_DEFAULTS, TrainConfig, Trainer, load_model

EXIT_USAGE = 2


def _per_dataset(what: str, name: str) -> str:
    """Help text for a flag whose default depends on the dataset."""
    values = {d: DATASET_DEFAULTS[d][name] for d in ("mnist", "cifar10")}
    shown = ", ".join(f"{v:g} for {d}" if isinstance(v, float) else f"{v} for {d}"
                      for d, v in values.items())
    return f"{what} (default: the dataset's, e.g. {shown})"


# ------------------------------------------------------------------ train


def add_train_parser(subparsers) -> None:
    defaults = TrainConfig(dataset="mnist")
    p = subparsers.add_parser(
        "train", help="train a model on a dataset",
        description="Train a DDPM. Flags left out take the dataset's defaults "
                    "(TrainConfig.for_dataset); CIFAR-10's are the paper's.",
    )
    p.add_argument("--dataset", help='"mnist", "fashion-mnist", "cifar10" or "folder:PATH" '
                   "(required for a new run)")
    p.add_argument("--run-dir", help="folder for the log, samples and checkpoints "
                   "(default: runs/DATASET)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its checkpoint.pt (its settings are "
                   "kept; --steps may be raised; default: off)")
    p.add_argument("--steps", type=int, help=_per_dataset("training steps", "steps"))
    p.add_argument("--batch-size", type=int, help=_per_dataset("images per step", "batch_size"))
    p.add_argument("--lr", type=float, help=_per_dataset("peak learning rate of AdamW", "lr"))
    p.add_argument("--warmup-steps", type=int, help=_per_dataset("steps of linear learning-rate warm-up", "warmup_steps"))
    p.add_argument("--grad-clip", type=float, help="max gradient norm, 0 for none "
                   f"(default: {defaults.grad_clip:g})")
    p.add_argument("--ema-decay", type=float, help=_per_dataset("decay of the EMA of the weights", "ema_decay"))
    p.add_argument("--model", help=f"UNet preset (default: the dataset's, {DATASET_DEFAULTS['mnist']['model']} "
                   f"for mnist and {DATASET_DEFAULTS['cifar10']['model']} for cifar10)")
    p.add_argument("--base-channels", type=int,
                   help="override the preset's base channel count, e.g. 8 for a tiny, fast "
                   "network (default: the preset's)")
    p.add_argument("--dropout", type=float, help="dropout rate (default: the preset's)")
    p.add_argument("--image-size", type=int, help="resize images to this side length "
                   "(default: the dataset's own size)")
    p.add_argument("--timesteps", type=int, help=f"T (default: {defaults.timesteps})")
    p.add_argument("--schedule", choices=("linear", "cosine"),
                   help=f"noise schedule (default: {defaults.schedule})")
    p.add_argument("--objective", choices=("eps", "x0", "v"),
                   help=f"what the network predicts (default: {defaults.objective})")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"),
                   help="auto: cuda, else mps, else cpu (default: auto)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: bf16 on GPUs that have it, fp16 on older GPUs such as the T4, "
                   "fp32 on CPU (default: auto)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the network: faster steps after a slow first one "
                   "(default: off)")
    p.add_argument("--seed", type=int, help=f"random seed; the same seed gives the same weights "
                   f"on a CPU (default: {defaults.seed})")
    p.add_argument("--log-every", type=int, help=_per_dataset("steps between lines of log.jsonl", "log_every"))
    p.add_argument("--sample-every", type=int, help=_per_dataset("steps between sample grids", "sample_every"))
    p.add_argument("--checkpoint-every", type=int, help=_per_dataset("steps between checkpoints", "checkpoint_every"))
    p.add_argument("--num-sample-images", type=int,
                   help=f"images per sample grid (default: {defaults.num_sample_images})")
    p.add_argument("--num-workers", type=int,
                   help="data loading processes (default: 0 on a CPU, up to 4 with CUDA)")
    p.add_argument("--data-root", help="folder of the datasets (default: $NAIVEDIFFUSION_DATA, "
                   "else ~/.cache/naivediffusion/data)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    p.set_defaults(run=run_train)


# Flags of `train` that map one to one onto TrainConfig fields.
_TRAIN_FIELDS = (
    "dataset", "run_dir", "steps", "batch_size", "lr", "warmup_steps", "grad_clip", "ema_decay",
    "model", "dropout", "image_size", "timesteps", "schedule", "objective", "device",
    "precision", "compile", "seed", "log_every", "sample_every", "checkpoint_every",
    "num_sample_images", "num_workers", "data_root",
)


def run_train(args) -> int:
    given = {name: getattr(args, name) for name in _TRAIN_FIELDS if getattr(args, name) is not None}
    if args.base_channels is not None:
        given["model_overrides"] = {"base_channels": args.base_channels}
    if args.resume:
        if args.run_dir is None and args.dataset is None:
            raise ValueError("--resume needs the --run-dir of the run to continue")
        run_dir = given.pop("run_dir", None) or TrainConfig.for_dataset(args.dataset).run_dir
        trainer = Trainer.resume(run_dir, **given)
    else:
        if args.dataset is None:
            raise ValueError("--dataset is required to start a run (e.g. --dataset mnist); "
                             "to continue one, pass --resume --run-dir DIR")
        trainer = Trainer(TrainConfig.for_dataset(given.pop("dataset"), **given))

    cfg = trainer.config
    millions = trainer.model.count_parameters() / 1e6
    verb = f"resuming at step {trainer.step}" if args.resume else "training"
    print(f"{verb}: {cfg.dataset} {'x'.join(map(str, trainer.image_shape))}, UNet {cfg.model!r} "
          f"({millions:.1f}M parameters), {trainer.device.type} {trainer.precision}, batch "
          f"{cfg.batch_size}, {cfg.steps} steps -> {trainer.run_dir}", flush=True)
    result = trainer.train(progress=not args.no_progress)
    print(f"done: step {result['step']} in {result['elapsed']:.0f} s; final loss "
          f"{result['loss']:.4f}" if result["loss"] is not None else f"done: step {result['step']}")
    print(f"EMA weights: {result['ema']}   checkpoint: {result['checkpoint']}"
          + (f"   samples: {result['samples']}" if result["samples"] else ""))
    return 0


# ------------------------------------------------------------------ sample


def add_sample_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sample", help="draw images from a trained model (its EMA weights)",
        description="Draw images with the EMA weights of a checkpoint and save them as a grid.",
    )
    p.add_argument("--checkpoint", required=True,
                   help="a run's ema.pt or checkpoint.pt, or the run folder (required)")
    p.add_argument("--n", type=int, default=64, help="number of images (default: 64)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim",
                   help="ddpm: Algorithm 2 over all T steps; ddim: Song et al. 2021 over --steps "
                   "(default: ddim)")
    p.add_argument("--steps", type=int, default=None,
                   help="DDIM steps (default: 50, or T if smaller; ddpm always runs all T)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 DDPM-like (default: 0)")
    p.add_argument("--out", default="grid.png", help="PNG file for the grid (default: grid.png)")
    p.add_argument("--nrow", type=int, default=None, help="images per row (default: sqrt of --n)")
    p.add_argument("--save-samples", metavar="PATH", default=None,
                   help="also save the images as one uint8 tensor [N, C, H, W] with torch.save "
                   "(default: not saved)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed and --batch-size draw the same images (default: 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="auto: cuda, else mps, else cpu (default: auto)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="images drawn at once (default: 256)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    p.set_defaults(run=run_sample)


def run_sample(args) -> int:
    if args.n < 1 or args.batch_size < 1:
        raise ValueError("--n and --batch-size must be at least 1")
    device = pick_device(args.device)
    model, diffusion, info = load_model(args.checkpoint, device=device, ema=True)
    if args.sampler == "ddim" and args.steps is None:
        args.steps = min(50, diffusion.num_timesteps)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    chunks = []
    for first in range(0, args.n, args.batch_size):
        size = min(args.batch_size, args.n - first)
        chunks.append(diffusion.sample(model, (size, *info["image_shape"]), sampler=args.sampler,
                                       steps=args.steps, eta=args.eta, generator=generator,
                                       progress=not args.no_progress, device=device).cpu())
    images = torch.cat(chunks)
    seconds = time.perf_counter() - start

    out = viz.save_grid(images, args.out, nrow=args.nrow or math.ceil(math.sqrt(args.n)))
    print(f"{args.n} samples from {info['path']} (step {info['step']}), {args.sampler} "
          f"{args.steps or diffusion.num_timesteps} steps, {seconds:.1f} s -> {out}")
    if args.save_samples:
        path = Path(args.save_samples)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(viz.to_uint8(images), path)
        print(f"uint8 tensor {list(images.shape)} -> {path}")
    return 0


# ------------------------------------------------------------------ evaluate


def add_evaluate_parser(subparsers) -> None:
    from . import metrics

    p = subparsers.add_parser(
        "evaluate", help="bits/dim or a sample-quality score of a trained model",
        description="Evaluate a checkpoint's EMA model: the variational bound in bits/dim on test "
        "images, or the Fréchet distance of its samples in the features of the package's classifier "
        "(with the same score for real images, the floor). Prints the numbers and writes them to JSON.",
    )
    metrics.add_evaluate_arguments(p)
    p.set_defaults(run=metrics.run_evaluate)


# ------------------------------------------------------------------ main

# One adder per subcommand; a new subcommand appends its own.
SUBCOMMANDS = [add_train_parser, add_sample_parser, add_evaluate_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="naivediffusion",
        description="Denoising diffusion (DDPM, Ho et al. 2020): train a model, draw samples.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 on success, 2 for a bad input)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as err:
        # The package's own errors (CheckpointError, TrainingDivergedError and a missing
        # dataset are among them) say what is wrong and how to fix it: one line, no traceback.
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; a training run continues from its last checkpoint with "
              "train --resume --run-dir DIR", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


