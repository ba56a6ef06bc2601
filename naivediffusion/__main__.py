"""The command line: ``python -m naivediffusion train | sample`` (or the ``naivediffusion`` script).

    python -m naivediffusion train --dataset mnist                  # about 10 minutes on a T4
    python -m naivediffusion train --resume --run-dir runs/mnist    # continue after a crash
    torchrun --nproc_per_node=4 -m naivediffusion train --dataset cifar10   # 4 GPUs, one global batch
    python -m naivediffusion sample --checkpoint runs/mnist/ema.pt --n 64 --out grid.png

Each subcommand is one function that adds its parser (`add_train_parser`, ...) and one
that runs it; `SUBCOMMANDS` lists the adders. Mistakes in the input (an unknown
dataset, a missing or foreign checkpoint, an image size the network cannot take, a
diverged run) end with exit status 2 and one line on stderr that says what to do.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from . import viz
from .budget import pick_device
from .checkpoint import PRETRAINED_PREFIX, load_model, pretrained_names, write_text_atomic
from .config import COMPILE_MODES, CPU_DEFAULTS, DATASET_DEFAULTS, TrainConfig
from .data import load_dataset
from .diffusion import VARIANCES, Diffusion
from .distributed import distributed_from_env, end_distributed
from .likelihood import bits_per_dim
from .quality import (
    class_probabilities,
    classifier_path,
    load_classifier,
    noise_fraction,
    sample_quality,
    save_classifier,
    smudge_fraction,
    train_classifier,
)
from .runfolder import TrainingDivergedError
from .train import Trainer, TrainingInterrupted

EXIT_USAGE = 2


def _per_dataset(what: str, name: str) -> str:
    """Help text for a flag whose default depends on the dataset (and, for MNIST, on whether
    a GPU is there: see TrainConfig.for_dataset)."""
    values = {"mnist with a GPU": DATASET_DEFAULTS["mnist"][name],
              "mnist on a CPU": CPU_DEFAULTS["mnist"][name],
              "cifar10": DATASET_DEFAULTS["cifar10"][name]}
    shown = ", ".join(f"{v:g} for {d}" if isinstance(v, float) else f"{v} for {d}"
                      for d, v in values.items())
    return f"{what} (default: the dataset's, e.g. {shown})"


# ------------------------------------------------------------------ train


def add_train_parser(subparsers) -> None:
    defaults = TrainConfig(dataset="mnist")
    p = subparsers.add_parser(
        "train", help="train a model on a dataset",
        description="Train a DDPM. Flags left out take the dataset's defaults "
                    "(TrainConfig.for_dataset); CIFAR-10's are the paper's. MNIST and "
                    "Fashion-MNIST on a machine without a GPU default to a network, batch and "
                    "learning rate sized for a CPU (the mnist-small preset); --model mnist "
                    "gives the full recipe there too. Under torchrun --nproc_per_node=N, the N "
                    "processes train one model with DistributedDataParallel: --batch-size is the "
                    "global batch (a multiple of N), each process takes 1/N of it, only rank 0 "
                    "writes files, and --resume works with any N.",
    )
    p.add_argument("--dataset", help='"mnist", "fashion-mnist", "cifar10" or "folder:PATH" '
                   "(required for a new run)")
    p.add_argument("--run-dir", help="folder for the log, samples and checkpoints "
                   "(default: runs/DATASET)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its checkpoint.pt (its settings are "
                   "kept; --steps may be raised; default: off)")
    p.add_argument("--steps", type=int, help=_per_dataset("training steps", "steps"))
    p.add_argument("--batch-size", type=int, help=_per_dataset("images per step (under torchrun: over "
                                                               "all processes together)", "batch_size"))
    p.add_argument("--lr", type=float, help=_per_dataset("peak learning rate of AdamW", "lr"))
    p.add_argument("--warmup-steps", type=int, help=_per_dataset("steps of linear learning-rate warm-up", "warmup_steps"))
    p.add_argument("--lr-schedule", choices=("constant", "cosine"),
                   help=_per_dataset("learning rate after the warm-up: constant, or a cosine decay "
                                     "to 0 at the end of the run", "lr_schedule"))
    p.add_argument("--loss-weighting", choices=("none", "min-snr"),
                   help=_per_dataset("weight of each timestep's error: none (L_simple, Eq. 14) or "
                                     "min-snr (Min-SNR-gamma, Hang et al. 2023)", "loss_weighting"))
    p.add_argument("--min-snr-gamma", type=float,
                   help=f"gamma of --loss-weighting min-snr (default: {defaults.min_snr_gamma:g})")
    p.add_argument("--max-minutes", type=float,
                   help="stop after this many minutes of training steps, with a final checkpoint "
                   "and ema.pt as if --steps were reached; the learning-rate schedule plans for "
                   "the step the measured speed reaches by then (default: no limit)")
    p.add_argument("--init-from", metavar="CHECKPOINT",
                   help="fine-tune: start from the EMA weights of this checkpoint (a run's checkpoint.pt "
                        "or ema.pt, or pretrained:NAME) with a new optimizer and schedule; it must "
                        "have this run's network and noise process (default: random weights)")
    p.add_argument("--class-conditional", action="store_true", default=None,
                   help="learn to draw a chosen class (sample --label K), with classifier-free "
                   "guidance (sample --guidance W) (default: off)")
    p.add_argument("--p-uncond", type=float,
                   help="with --class-conditional: probability that each training image's label "
                   f"is dropped, so the network also learns unconditional eps (default: {defaults.p_uncond:g})")
    p.add_argument("--grad-clip", type=float, help="max gradient norm, 0 for none "
                   f"(default: {defaults.grad_clip:g})")
    p.add_argument("--ema-decay", type=float, help=_per_dataset("decay of the EMA of the weights", "ema_decay"))
    p.add_argument("--model", help=_per_dataset("UNet preset", "model"))
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
    p.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                   help="torch.compile the network in MODE, one of " + ", ".join(COMPILE_MODES) +
                   " (the flag alone: default; reduce-overhead also replays the kernels as CUDA "
                   "graphs on a GPU): faster steps after slow first ones (default: none)")
    p.add_argument("--data-on-host", dest="data_on_device", action="store_false", default=None,
                   help="read the images through a DataLoader instead of holding the whole "
                   "dataset on the device as uint8 (default: on the device, except folders and "
                   "resized images)")
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
    "dataset", "run_dir", "steps", "batch_size", "lr", "warmup_steps", "lr_schedule",
    "loss_weighting", "min_snr_gamma", "max_minutes", "class_conditional", "p_uncond", "grad_clip", "ema_decay",
    "model", "dropout", "image_size", "timesteps", "schedule", "objective", "device",
    "precision", "compile", "seed", "log_every", "sample_every", "checkpoint_every",
    "num_sample_images", "num_workers", "data_root", "data_on_device", "init_from",
)


def run_train(args) -> int:
    """Train (or resume) the run the flags describe. Under torchrun every process runs this;
    rank 0 alone prints, and all leave the process group together at the end."""
    given = {name: getattr(args, name) for name in _TRAIN_FIELDS if getattr(args, name) is not None}
    if args.base_channels is not None:
        given["model_overrides"] = {"base_channels": args.base_channels}
    if args.p_uncond is not None and not args.class_conditional and not args.resume:
        raise ValueError("--p-uncond only applies to a class-conditional model; add --class-conditional")
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
    main_process = trainer.dist.is_main
    millions = trainer.model.count_parameters() / 1e6
    verb = f"resuming at step {trainer.step}" if args.resume else "training"
    conditional = (f", class-conditional (p_uncond {cfg.p_uncond:g})" if cfg.class_conditional else "")
    processes = (f" on {trainer.dist.world_size} processes ({cfg.batch_size // trainer.dist.world_size} each)"
                 if trainer.dist.enabled else "")
    if main_process:
        print(f"{verb}: {cfg.dataset} {'x'.join(map(str, trainer.image_shape))}, UNet {cfg.model!r} "
              f"({millions:.1f}M parameters{conditional}), {trainer.device.type} {trainer.precision}, batch "
              f"{cfg.batch_size}{processes}, {cfg.steps} steps -> {trainer.run_dir}", flush=True)
    try:
        result = trainer.train(progress=not args.no_progress)
    except RuntimeError as err:
        if trainer.dist.enabled and _lost_another_process(err):
            raise ValueError(f"another process of this run failed, so this one stops too: its error is "
                             f"printed above, and torchrun's report names it ({_first_line(err)})") from err
        raise
    except (TrainingInterrupted, TrainingDivergedError) as stop:
        # Every process stopped at the same step with the same error: they leave together, and
        # rank 0 alone says why (main prints it); the others end with the same exit status.
        end_distributed()
        if main_process:
            raise
        return stop.exit_code if isinstance(stop, TrainingInterrupted) else EXIT_USAGE
    end_distributed()
    if main_process:
        print(f"done: step {result['step']} in {result['elapsed']:.0f} s; final loss "
              f"{result['loss']:.4f}" if result["loss"] is not None else f"done: step {result['step']}")
        print(f"EMA weights: {result['ema']}   checkpoint: {result['checkpoint']}"
              + (f"   samples: {result['samples']}" if result["samples"] else ""))
    return 0


def _lost_another_process(err: RuntimeError) -> bool:
    """Whether `err` is torch.distributed saying that another process of the run is gone: gloo
    finds the connection closed, nccl raises a DistError. The process that failed has printed
    its own error; this one should only say why it stops."""
    if isinstance(err, torch.distributed.DistError):
        return True
    return "Connection closed by peer" in str(err) or "Connection reset by peer" in str(err)


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


# ------------------------------------------------------------------ sample

_CHECKPOINT_HELP = ("a run's ema.pt or checkpoint.pt, the run folder, or a model shipped with the "
                    f"package: {', '.join(PRETRAINED_PREFIX + n for n in pretrained_names())} (required)")


def add_sample_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sample", help="draw images from a trained model (its EMA weights)",
        description="Draw images with the EMA weights of a checkpoint and save them as a grid.",
    )
    p.add_argument("--checkpoint", required=True,
                   help=_CHECKPOINT_HELP)
    p.add_argument("--n", type=int, default=64,
                   help="number of images, or with --label the number of each class (default: 64)")
    p.add_argument("--label", action="append", metavar="K",
                   help="class-conditional models: draw class K (an index, e.g. 7 for the digit 7); "
                   "repeat it or give a range such as 0-9 to draw --n of each, one row per class "
                   "(default: no label, any class)")
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="classifier-free guidance weight w >= 0 with --label: eps = (1 + w) eps(x, c) "
                   "- w eps(x); 0 is plain conditional sampling; s = 1 + w in other codebases "
                   "(default: 0)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim",
                   help="ddpm: Algorithm 2 over all T steps; ddim: Song et al. 2021 over --steps "
                   "(default: ddim)")
    p.add_argument("--steps", type=int, default=None,
                   help="DDIM steps (default: 50, or T if smaller; ddpm always runs all T)")
    p.add_argument("--eta", type=float, default=None, help=_ETA_HELP)
    p.add_argument("--variance", choices=VARIANCES, default=None, help=_VARIANCE_HELP)
    p.add_argument("--out", default="grid.png", help="PNG file for the grid (default: grid.png)")
    p.add_argument("--nrow", type=int, default=None, help="images per row (default: sqrt of --n)")
    p.add_argument("--save-samples", metavar="PATH", default=None,
                   help="also save the images as one uint8 tensor [N, C, H, W] with torch.save, and "
                   "with --label their labels [N] beside it as PATH's stem + .labels.pt (default: not saved)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed and --batch-size draw the same images (default: 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="auto: cuda, else mps, else cpu (default: auto)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="images drawn at once (default: 256)")
    p.add_argument("--compile", nargs="?", const="default", default="none", choices=COMPILE_MODES,
                   metavar="MODE",
                   help="torch.compile the network in MODE, one of " + ", ".join(COMPILE_MODES) +
                   " (the flag alone: default; reduce-overhead replays each call as a CUDA graph "
                   "on a GPU); pays off for many images drawn with one batch size (default: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    p.set_defaults(run=run_sample)


def parse_labels(values: list[str], num_classes: int) -> list[int]:
    """The classes named by --label values such as "7" or "0-9", in order, checked against
    the model's `num_classes`."""
    labels = []
    for value in values:
        first, dash, last = value.partition("-")
        try:
            span = range(int(first), int(last) + 1) if dash else [int(first)]
        except ValueError:
            raise ValueError(f"--label {value!r} is not a class index or a range such as 0-9") from None
        if not span:
            raise ValueError(f"--label {value} is an empty range; write it low-high, e.g. 0-9")
        for label in span:
            if not 0 <= label < num_classes:
                raise ValueError(f"--label {label} is not a class of this model, which has classes "
                                 f"0-{num_classes - 1}")
            labels.append(label)
    return labels


def _conditioning(args, model, info, guidance_needs_label: bool = True) -> tuple[list[int] | None, float]:
    """Check --label and --guidance against the model: (the classes to draw or None, w).
    `evaluate` has no --label (it draws every class in turn): guidance_needs_label=False."""
    label = getattr(args, "label", None)
    asked = [flag for flag, value in (("--label", label), ("--guidance", args.guidance))
             if value is not None]
    if model.num_classes is None:
        if asked:
            raise ValueError(f"{' and '.join(asked)} {'need' if len(asked) > 1 else 'needs'} a "
                             f"class-conditional model, but {info['path']} "
                             "was trained without --class-conditional; drop them, or train one with "
                             "train --class-conditional")
        return None, 0.0
    guidance = 0.0 if args.guidance is None else args.guidance
    if not guidance >= 0:
        raise ValueError(f"--guidance must be at least 0 (0 is plain conditional sampling); got {args.guidance}")
    if args.guidance is not None and label is None and guidance_needs_label:
        raise ValueError("--guidance needs --label: guidance pushes samples towards a class")
    return (parse_labels(label, model.num_classes) if label else None), guidance


def draw(diffusion, model, info, n: int, args, generator, labels: torch.Tensor | None = None,
         guidance: float = 0.0) -> torch.Tensor:
    """n samples [n, C, H, W] on the CPU, args.batch_size at a time (labels [n] or None)."""
    chunks = []
    for first in range(0, n, args.batch_size):
        size = min(args.batch_size, n - first)
        part = None if labels is None else labels[first:first + size].to(generator.device)
        chunks.append(diffusion.sample(
            model, (size, *info["image_shape"]), sampler=args.sampler, steps=args.steps, eta=args.eta,
            generator=generator, progress=not args.no_progress, device=generator.device, labels=part,
            guidance_scale=guidance if part is not None else None,
            null_label=model.num_classes).cpu())
    return torch.cat(chunks)


# DDIM's noise level when --eta is not given. The deterministic eta = 0 is DDIM's own default
# and the one the book's chapters teach with; on the shipped MNIST models, fresh noise at every
# step (eta = 1, the posterior variance of each jump) gave the lower sample-quality score at 50
# steps in every draw measured (benchmarks/samplers.py, README), so `sample` and `evaluate`
# draw with it.
DEFAULT_ETA = 1.0
_ETA_HELP = (f"DDIM noise, from 0 (deterministic) to 1 (fresh noise at every step, the posterior "
             f"variance of each jump; all T steps at eta 1 are DDPM with sigma^2 = beta-tilde) "
             f"(default: {DEFAULT_ETA:g}, measured best for the shipped models)")


def sampler_words(args, diffusion) -> str:
    """How `sample` and `evaluate` drew: "ddim 50 steps, eta 1" or "ddpm 1000 steps, sigma^2 = beta"."""
    noise = f"eta {args.eta:g}" if args.sampler == "ddim" else f"sigma^2 = {diffusion.variance}"
    return f"{args.sampler} {args.steps or diffusion.num_timesteps} steps, {noise}"


def resolve_eta(args) -> float:
    """The DDIM noise level of `sample` and `evaluate`: --eta, checked, else DEFAULT_ETA (0 for
    --sampler ddpm, whose noise --variance sets)."""
    if args.sampler == "ddpm":
        if args.eta is not None:
            raise ValueError("--eta applies to --sampler ddim; the ddpm sampler's noise is set by --variance")
        return 0.0
    eta = DEFAULT_ETA if args.eta is None else args.eta
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"--eta must be from 0 (deterministic DDIM) to 1 (fresh noise at every step); got {eta:g}")
    return eta


_VARIANCE_HELP = (
    "the reverse steps' fixed variance sigma_t^2 for bits/dim and the ddpm sampler: beta (beta_t) or "
    "posterior (beta-tilde_t of Eq. 7). Training's L_simple has no sigma, so the same network takes "
    "either (Sec. 3.2: similar samples); posterior gives a tighter bound (default: the checkpoint's)")


def _load(args, device):
    """The EMA model, its diffusion and info, for `sample` and `evaluate`: `load_model`, with
    the reverse variance that --variance names (the network is the same for either)."""
    model, diffusion, info = load_model(args.checkpoint, device=device, ema=True)
    if args.variance is not None:
        if args.sampler == "ddim" and getattr(args, "metric", "fid") == "fid":
            raise ValueError("--variance applies to --sampler ddpm and --metric bpd; DDIM's noise "
                             "is set by --eta")
        diffusion = Diffusion(**{**diffusion.config, "variance": args.variance})
    return model, diffusion, info


def run_sample(args) -> int:
    if args.n < 1 or args.batch_size < 1:
        raise ValueError("--n and --batch-size must be at least 1")
    args.eta = resolve_eta(args)
    device = pick_device(args.device)
    model, diffusion, info = _load(args, device)
    classes, guidance = _conditioning(args, model, info)
    if args.compile != "none":
        # The sampler calls the network with the same shapes at every step (a last, smaller
        # batch compiles once more); the compiled module still answers model.num_classes.
        model = torch.compile(model, mode=args.compile)
    if args.sampler == "ddim" and args.steps is None:
        args.steps = min(50, diffusion.num_timesteps)
    labels = None if classes is None else torch.tensor(classes).repeat_interleave(args.n)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    images = draw(diffusion, model, info, len(labels) if labels is not None else args.n, args, generator,
                  labels, guidance)
    seconds = time.perf_counter() - start

    # With labels, one row per class (N of each); else a square grid.
    nrow = args.nrow or (args.n if classes else math.ceil(math.sqrt(args.n)))
    out = viz.save_grid(images, args.out, nrow=nrow)
    what = "" if classes is None else f" of class{'es' if len(classes) > 1 else ''} {','.join(map(str, classes))} (guidance w={guidance:g})"
    print(f"{len(images)} samples{what} from {info['path']} (step {info['step']}), "
          f"{sampler_words(args, diffusion)}, {seconds:.1f} s -> {out}")
    if args.save_samples:
        path = Path(args.save_samples)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(viz.to_uint8(images), path)
        print(f"uint8 tensor {list(images.shape)} -> {path}")
        if labels is not None:
            label_path = labels_path(path)
            torch.save(labels, label_path)
            print(f"labels {list(labels.shape)} -> {label_path}")
    return 0


def labels_path(samples_path: str | Path) -> Path:
    """Where `sample --save-samples PATH --label ...` writes the labels: PATH's stem + .labels.pt."""
    path = Path(samples_path)
    return path.with_name(path.stem + ".labels.pt")


# ------------------------------------------------------------------ evaluate




def add_train_classifier_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-classifier", help="train the classifier behind the sample-quality score",
        description="Train and save the feature network of quality.sample_quality (the package "
        "ships MNIST's; this makes it for another dataset, or again).")
    parser.add_argument("--dataset", default="mnist",
                        help='"mnist", "fashion-mnist" or "cifar10" (default: mnist)')
    parser.add_argument("--out", default=None,
                        help="where to save the weights (default: the package's "
                        "naivediffusion/assets/classifier_DATASET.pt)")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the training set (default: 2)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default: 128)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of Adam (default: 0.002)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                        help="auto: cuda, else mps, else cpu (default: auto)")
    parser.add_argument("--data-root", default=None, help="folder of the datasets "
                        "(default: $NAIVEDIFFUSION_DATA, else ~/.cache/naivediffusion/data)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    parser.set_defaults(run=run_train_classifier)


def run_train_classifier(args) -> int:
    """Train the classifier, print its test accuracy, save it with the command that made it."""
    if args.epochs < 1 or args.batch_size < 1:
        raise ValueError("--epochs and --batch-size must be at least 1")
    out = args.out or str(classifier_path(args.dataset))
    command = (f"python -m naivediffusion train-classifier --dataset {args.dataset} "
               f"--epochs {args.epochs} --batch-size {args.batch_size} --lr {args.lr:g} "
               f"--seed {args.seed} --device {args.device} --out {shlex.quote(out)}")
    classifier, info = train_classifier(args.dataset, epochs=args.epochs, batch_size=args.batch_size,
                                        lr=args.lr, seed=args.seed, device=args.device,
                                        root=args.data_root, progress=not args.no_progress)
    path = save_classifier(
        classifier, out, **info, command=command, threads=torch.get_num_threads(),
        date=datetime.date.today().isoformat(), torch_version=str(torch.__version__),
        parameters=sum(p.numel() for p in classifier.parameters()),
    )
    print(f"{args.dataset} classifier: test accuracy {info['test_accuracy']:.4f}, trained in "
          f"{info['train_seconds']:.0f} s on {info['device']} -> {path} "
          f"({path.stat().st_size / 1024:.0f} KiB)")
    return 0


def add_evaluate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="bits/dim or a sample-quality score of a trained model",
        description="Evaluate a checkpoint's EMA model: the variational bound in bits/dim on test "
        "images, or the Fréchet distance of its samples in the features of the package's classifier "
        "(with the same score for real images, the floor) and the fraction of smudges. Prints the "
        "numbers and writes them to JSON.",
    )
    parser.add_argument("--checkpoint", required=True,
                        help=_CHECKPOINT_HELP)
    parser.add_argument("--metric", choices=("bpd", "fid"), required=True,
                        help="bpd: the variational bound on test images in bits/dim (Eq. 5); "
                        "fid: Fréchet distance of samples to test images in the features of the "
                        "package's classifier, with the real-data floor (not Inception FID) (required)")
    parser.add_argument("--n", type=int, default=1000,
                        help="test images (bpd) or samples (fid) (default: 1000)")
    parser.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim",
                        help="fid: ddpm runs all T steps, ddim --steps (default: ddim)")
    parser.add_argument("--steps", type=int, default=None, help="fid: DDIM steps (default: 50)")
    parser.add_argument("--eta", type=float, default=None, help="fid: " + _ETA_HELP)
    parser.add_argument("--variance", choices=VARIANCES, default=None, help=_VARIANCE_HELP)
    parser.add_argument("--guidance", type=float, default=None, metavar="W",
                        help="fid of a class-conditional model: the guidance weight w >= 0; it draws "
                        "the classes in turn and also reports the fraction classified as the class "
                        "asked for (default: 0)")
    parser.add_argument("--timesteps", type=int, default=None,
                        help="bpd: terms of the bound to evaluate, an unbiased stratified estimate "
                        "when fewer than T (default: all T)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per model call (default: 256)")
    parser.add_argument("--classifier", default=None,
                        help="fid: classifier weights (default: the package's for the dataset)")
    parser.add_argument("--data-root", default=None, help="folder of the datasets "
                        "(default: the checkpoint's, else $NAIVEDIFFUSION_DATA)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                        help="auto: cuda, else mps, else cpu (default: auto)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed of the test images, noise and samples (default: 0)")
    parser.add_argument("--out", default="metrics.json", help="JSON file for the numbers (default: metrics.json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    parser.set_defaults(run=run_evaluate)


def run_evaluate(args) -> int:
    """Load the checkpoint's EMA model, compute the metric, print it, write it to JSON."""
    if args.n < 2 or args.batch_size < 1:
        raise ValueError("--n must be at least 2 and --batch-size at least 1")
    if args.metric == "fid":
        args.eta = resolve_eta(args)
    elif args.eta is not None:
        raise ValueError("--eta applies to --metric fid (bits/dim follows the reverse process, whose "
                         "noise --variance sets)")
    device = pick_device(args.device)
    model, diffusion, info = _load(args, device)
    if args.guidance is not None and args.metric != "fid":
        raise ValueError("--guidance applies to --metric fid (bits/dim is of the unconditional model)")
    _, guidance = _conditioning(args, model, info, guidance_needs_label=False)
    train_config = info.get("train_config") or {}
    dataset = train_config.get("dataset")
    if dataset is None:
        raise ValueError(f"{info['path']} does not say which dataset the model learned")
    root = args.data_root or train_config.get("data_root")
    image_size = train_config.get("image_size")
    result = {"metric": args.metric, "checkpoint": str(info["path"]), "step": info["step"],
              "total_steps": info["total_steps"],
              "dataset": dataset, "n": args.n, "seed": args.seed, "device": str(device)}
    start = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(args.seed)

    if args.metric == "bpd":
        T = diffusion.num_timesteps
        if args.timesteps is not None and not 1 <= args.timesteps <= T:
            raise ValueError(f"--timesteps must be from 1 to T={T}; got {args.timesteps}")
        test = load_dataset(dataset, root=root, train=False, image_size=image_size, augment=False)
        if args.n > len(test):
            raise ValueError(f"--n {args.n} is more than the {len(test)} test images of {dataset}")
        order = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))
        x0 = torch.stack([test[i][0] for i in order[:args.n].tolist()]).to(device)
        bpd, terms = bits_per_dim(diffusion, model, x0, timesteps=args.timesteps,
                                  batch_size=args.batch_size, generator=generator,
                                  progress=not args.no_progress, return_terms=True)
        bpd = bpd.double().cpu()
        result.update(
            bpd=bpd.mean().item(), bpd_standard_error=(bpd.std() / math.sqrt(len(bpd))).item(),
            timesteps=len(terms["t"]), num_timesteps=T, diffusion_config=diffusion.config,
            terms={"prior": terms["prior"].mean().item(), "decoder": terms["decoder"].mean().item(),
                   "t": terms["t"].tolist(), "weights": terms["weights"].tolist(),
                   "vb": terms["vb"].double().mean(1).cpu().tolist()},
        )
        how = "all" if args.timesteps in (None, T) else "a stratified estimate from"
        summary = (f"bits/dim {result['bpd']:.4f} +- {result['bpd_standard_error']:.4f} on {args.n} "
                   f"{dataset} test images ({how} {len(terms['t'])} of T={T} terms; prior "
                   f"{result['terms']['prior']:.2e}, decoder L_0 {result['terms']['decoder']:.4f}; "
                   f"variance {diffusion.variance})")
    else:
        classifier = load_classifier(dataset, args.classifier, device=device)
        steps = args.steps if args.sampler == "ddim" else None
        if args.sampler == "ddim" and steps is None:
            steps = min(50, diffusion.num_timesteps)
        args.steps = steps
        # A class-conditional model draws the classes in turn, image i of class i mod K.
        labels = None if model.num_classes is None else torch.arange(args.n) % model.num_classes
        samples = draw(diffusion, model, info, args.n, args, generator, labels, guidance)
        scores = sample_quality(samples, dataset, classifier=classifier, seed=args.seed, root=root)
        scores["smudges"] = smudge_fraction(samples, classifier=classifier)
        scores["noisy"] = noise_fraction(samples, dataset, root=root)
        classes = class_probabilities(classifier, samples).argmax(1)
        scores["class_counts"] = torch.bincount(classes, minlength=classifier.config["num_classes"]).tolist()
        if labels is not None:
            scores["guidance"] = guidance
            scores["accuracy"] = (classes == labels).double().mean().item()
        result.update(
            sampler=args.sampler, steps=steps or diffusion.num_timesteps, eta=args.eta,
            variance=diffusion.variance, **scores,
            score="Fréchet distance in the features of the naivediffusion classifier (not Inception FID)",
            classifier={k: classifier.metadata.get(k) for k in ("path", "test_accuracy", "command")},
        )
        summary = (f"Fréchet distance (classifier features) {scores['fd']:.3f} for {args.n} samples "
                   f"({sampler_words(args, diffusion)}) vs {scores['n_reference']} {dataset} "
                   f"test images; real-data floor ({args.n} training images) {scores['fd_real']:.3f}; "
                   f"smudges (top class probability < 0.5) {scores['smudges']:.1%}; noisy (rougher "
                   f"than 99.9% of test digits) {scores['noisy']:.1%}; samples per class "
                   f"{scores['class_counts']}")
        if labels is not None:
            summary += (f"; guidance w={guidance:g}: {scores['accuracy']:.1%} classified as the class "
                        "asked for")

    result["seconds"] = round(time.perf_counter() - start, 1)
    out = write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(f"{summary}; {result['seconds']:.0f} s -> {out}")
    return 0


# ------------------------------------------------------------------ main

# One adder per subcommand; a new subcommand appends its own.
SUBCOMMANDS = [add_train_parser, add_sample_parser, add_evaluate_parser, add_train_classifier_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="naivediffusion",
        description="Denoising diffusion (DDPM, Ho et al. 2020): train a model, draw samples.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def _which_process() -> str:
    """" (rank R of N)" under torchrun, where each process prints its own errors, else ""."""
    try:
        where = distributed_from_env()
    except ValueError:
        return ""
    return f" (rank {where.rank} of {where.world_size})" if where.enabled else ""


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 on success, 2 for a bad input)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as err:
        # The package's own errors (CheckpointError, TrainingDivergedError and a missing
        # dataset are among them) say what is wrong and how to fix it: one line, no traceback.
        # Under torchrun the line names the process that failed; torchrun then stops the others.
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error{_which_process()}: {message}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingInterrupted as stop:
        where = distributed_from_env()  # under torchrun, the same command continues it
        launcher = f"torchrun --nproc_per_node={where.world_size}" if where.enabled else "python"
        print(f"{stop}; continue with: {launcher} -m naivediffusion train --resume --run-dir "
              f"{shlex.quote(str(stop.checkpoint.parent))}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("interrupted; a training run continues from its last checkpoint with "
              "train --resume --run-dir DIR", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


