"""The command line: ``python -m naivediffusion train | sample | evaluate | train-classifier |
export`` (or the ``naivediffusion`` script; `export` lives in export.py).

    python -m naivediffusion train --dataset mnist                  # about 10 minutes on a T4
    python -m naivediffusion train --resume --run-dir runs/mnist    # continue after a crash
    torchrun --nproc_per_node=4 -m naivediffusion train --dataset cifar10   # 4 GPUs, one global batch
    python -m naivediffusion sample --checkpoint runs/mnist/ema.pt --n 64 --out grid.png
    python -m naivediffusion evaluate --checkpoint runs/mnist/ema.pt --metric fid --n 1000
    python -m naivediffusion train-classifier --dataset fashion-mnist   # the quality score's features

Each subcommand is one function that adds its parser (`add_train_parser`, ...) and one
that runs it; `SUBCOMMANDS` lists the adders. The flags' choices come from the package's
constants (`config.DEVICES`, `sampling.SAMPLERS`, ...), and drawing images is
`sampling.draw`, the same function the benchmarks use. Mistakes in the input (an unknown
dataset, a missing or foreign checkpoint, an image size the network cannot take, a
diverged run) end with exit status 2 and one line on stderr that says what to do.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import export, sampling, viz
from .budget import pick_device
from .checkpoint import PRETRAINED_PREFIX, load_model, pretrained_names, write_text_atomic
from .config import (
    COMPILE_MODES,
    CPU_DEFAULTS,
    DATASET_DEFAULTS,
    DEVICES,
    LR_SCHEDULES,
    PRECISIONS,
    TrainConfig,
)
from .data import DATASETS, VALID_NAMES
from .diffusion import OBJECTIVES, VARIANCES, WEIGHTINGS, Diffusion
from .distributed import distributed_from_env, end_distributed, lost_another_process
from .likelihood import bits_per_dim
from .quality import (
    classifier_path,
    load_classifier,
    load_images,
    save_classifier,
    score_samples,
    train_classifier,
)
from .runfolder import TrainingDivergedError, TrainingInterrupted, describe_run
from .sampling import DDIM_STEPS, DEFAULT_ETA, SAMPLERS, STEPPED_SAMPLERS, draw
from .schedule import SCHEDULES
from .train import Trainer

EXIT_USAGE = 2

_DEVICE_HELP = "auto: cuda, else mps, else cpu (default: auto)"
_NO_PROGRESS_HELP = "no progress bar (default: shown)"


def _quoted(names) -> str:
    """'"a", "b" or "c"': the names as a help text lists them."""
    names = [f'"{name}"' for name in names]
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]


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
    _add_essential_flags(p.add_argument_group("essential", "what to train, where, and for how long"))
    _add_network_flags(p.add_argument_group("network", "the U-Net and what it learns to draw"), defaults)
    _add_recipe_flags(p.add_argument_group("recipe", "the noise process and the optimisation"), defaults)
    _add_performance_flags(p.add_argument_group("performance", "where and how fast the steps run"))
    _add_run_control_flags(p.add_argument_group("run control", "what the run writes and shows"), defaults)
    p.set_defaults(run=run_train)


def _add_essential_flags(g) -> None:
    g.add_argument("--dataset", help=f"{_quoted(VALID_NAMES)} (required for a new run)")
    g.add_argument("--run-dir", help="folder for the log, samples and checkpoints "
                   "(default: runs/DATASET)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its checkpoint.pt (its settings are "
                   "kept; --steps may be raised; default: off)")
    g.add_argument("--steps", type=int, help=_per_dataset("training steps", "steps"))
    g.add_argument("--max-minutes", type=float,
                   help="stop after this many minutes of training steps, with a final checkpoint "
                   "and ema.pt as if --steps were reached; the learning-rate schedule plans for "
                   "the step the measured speed reaches by then (default: no limit)")
    g.add_argument("--init-from", metavar="CHECKPOINT",
                   help="fine-tune: start from the EMA weights of this checkpoint (a run's checkpoint.pt "
                        "or ema.pt, or pretrained:NAME) with a new optimizer and schedule; it must "
                        "have this run's network and noise process (default: random weights)")


def _add_network_flags(g, defaults: TrainConfig) -> None:
    g.add_argument("--model", help=_per_dataset("UNet preset", "model"))
    g.add_argument("--base-channels", type=int,
                   help="override the preset's base channel count, e.g. 8 for a tiny, fast "
                   "network (default: the preset's)")
    g.add_argument("--dropout", type=float, help="dropout rate (default: the preset's)")
    g.add_argument("--image-size", type=int, help="resize images to this side length "
                   "(default: the dataset's own size)")
    g.add_argument("--class-conditional", action="store_true", default=None,
                   help="learn to draw a chosen class (sample --label K), with classifier-free "
                   "guidance (sample --guidance W) (default: off)")
    g.add_argument("--p-uncond", type=float,
                   help="with --class-conditional: probability that each training image's label "
                   f"is dropped, so the network also learns unconditional eps (default: {defaults.p_uncond:g})")


def _add_recipe_flags(g, defaults: TrainConfig) -> None:
    g.add_argument("--timesteps", type=int, help=f"T (default: {defaults.timesteps})")
    g.add_argument("--schedule", choices=SCHEDULES, help=f"noise schedule (default: {defaults.schedule})")
    g.add_argument("--objective", choices=OBJECTIVES,
                   help=f"what the network predicts (default: {defaults.objective})")
    g.add_argument("--variance", choices=VARIANCES, help="the reverse variance: beta, posterior, or learned "
                   "(Improved DDPM: the loss L_simple + --vlb-weight * L_vlb) (default: beta)")
    g.add_argument("--vlb-weight", type=float, help=f"lambda of --variance learned (default: {defaults.vlb_weight:g})")
    g.add_argument("--batch-size", type=int, help=_per_dataset("images per step (under torchrun: over "
                                                               "all processes together)", "batch_size"))
    g.add_argument("--lr", type=float, help=_per_dataset("peak learning rate of AdamW", "lr"))
    g.add_argument("--warmup-steps", type=int, help=_per_dataset("steps of linear learning-rate warm-up", "warmup_steps"))
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                   help=_per_dataset("learning rate after the warm-up: constant, or a cosine decay "
                                     "to 0 at the end of the run", "lr_schedule"))
    g.add_argument("--loss-weighting", choices=WEIGHTINGS,
                   help=_per_dataset("weight of each timestep's error: none (L_simple, Eq. 14) or "
                                     "min-snr (Min-SNR-gamma, Hang et al. 2023)", "loss_weighting"))
    g.add_argument("--min-snr-gamma", type=float,
                   help=f"gamma of --loss-weighting min-snr (default: {defaults.min_snr_gamma:g})")
    g.add_argument("--grad-clip", type=float, help="max gradient norm, 0 for none "
                   f"(default: {defaults.grad_clip:g})")
    g.add_argument("--ema-decay", type=float, help=_per_dataset("decay of the EMA of the weights", "ema_decay"))
    g.add_argument("--seed", type=int, help=f"random seed; the same seed gives the same weights "
                   f"on a CPU (default: {defaults.seed})")


def _add_performance_flags(g) -> None:
    g.add_argument("--device", choices=DEVICES, help=_DEVICE_HELP)
    g.add_argument("--precision", choices=PRECISIONS,
                   help="auto: bf16 on GPUs that have it, fp16 on older GPUs such as the T4, "
                   "fp32 on CPU (default: auto)")
    g.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                   help="torch.compile the network in MODE, one of " + ", ".join(COMPILE_MODES) +
                   " (the flag alone: default; reduce-overhead also replays the kernels as CUDA "
                   "graphs on a GPU): faster steps after slow first ones (default: none)")
    g.add_argument("--data-on-host", dest="data_on_device", action="store_false", default=None,
                   help="read the images through a DataLoader instead of holding the whole "
                   "dataset on the device as uint8 (default: on the device, except folders and "
                   "resized images)")
    g.add_argument("--num-workers", type=int,
                   help="data loading processes (default: 0 on a CPU, up to 4 with CUDA)")


def _add_run_control_flags(g, defaults: TrainConfig) -> None:
    g.add_argument("--log-every", type=int, help=_per_dataset("steps between lines of log.jsonl", "log_every"))
    g.add_argument("--sample-every", type=int, help=_per_dataset("steps between sample grids", "sample_every"))
    g.add_argument("--checkpoint-every", type=int, help=_per_dataset("steps between checkpoints", "checkpoint_every"))
    g.add_argument("--num-sample-images", type=int,
                   help=f"images per sample grid (default: {defaults.num_sample_images})")
    g.add_argument("--data-root", help="folder of the datasets (default: $NAIVEDIFFUSION_DATA, "
                   "else ~/.cache/naivediffusion/data)")
    g.add_argument("--no-progress", action="store_true", help=_NO_PROGRESS_HELP)




def run_train(args) -> int:
    """Train (or resume) the run the flags describe. Under torchrun every process runs this;
    rank 0 alone prints, and all leave the process group together at the end."""
    # The flags given that are TrainConfig fields (--base-channels is a preset override).
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
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

    main_process = trainer.dist.is_main
    if main_process:
        print(describe_run(trainer), flush=True)
    try:
        result = trainer.train(progress=not args.no_progress)
    except RuntimeError as err:
        if trainer.dist.enabled and lost_another_process(err):
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


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


# ------------------------------------------------------------------ sample and evaluate: shared

_CHECKPOINT_HELP = ("a run's ema.pt or checkpoint.pt, the run folder, or a model shipped with the "
                    f"package: {', '.join(PRETRAINED_PREFIX + n for n in pretrained_names())} (required)")
_ETA_HELP = (f"DDIM noise, from 0 (deterministic) to 1 (fresh noise at every step, the posterior "
             f"variance of each jump; all T steps at eta 1 are DDPM with sigma^2 = beta-tilde) "
             f"(default: {DEFAULT_ETA:g}, measured best for the shipped models)")
_VARIANCE_HELP = (
    "the reverse steps' variance sigma_t^2 for bits/dim and the ddpm sampler: beta (beta_t), "
    "posterior (beta-tilde_t of Eq. 7), or the network's own, learned (a model trained with --variance "
    "learned, which also takes either fixed one) (default: the checkpoint's)")


def _add_drawing_flags(p, only: str = "") -> None:
    """The flags `sample` and `evaluate` share: the checkpoint, the sampler and its noise, the
    device. `only` ("fid: ") prefixes the help of the flags that apply to one metric only."""
    p.add_argument("--checkpoint", required=True, help=_CHECKPOINT_HELP)
    p.add_argument("--sampler", choices=SAMPLERS, default=sampling.CLI_SAMPLER,
                   help=f"{only}ddpm: Algorithm 2 over all T steps; ddim: Song et al. 2021 over --steps; "
                   "dpm++2m: DPM-Solver++(2M) (Lu et al. 2022) over --steps, dpm++2m-sde its stochastic "
                   f"form (default: {sampling.CLI_SAMPLER}, as good as ddim with {DDIM_STEPS} steps, measured)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"{only}steps (network calls) (default: {sampling.SOLVER_STEPS} for dpm++2m and dpm++2m-sde, "
                   f"{DDIM_STEPS} for ddim, or T if smaller; ddpm: all T, or respaced to --steps)")
    p.add_argument("--eta", type=float, default=None, help=only + _ETA_HELP)
    p.add_argument("--variance", choices=VARIANCES, default=None, help=_VARIANCE_HELP)
    p.add_argument("--device", choices=DEVICES, default="auto", help=_DEVICE_HELP)
    p.add_argument("--no-progress", action="store_true", help=_NO_PROGRESS_HELP)


def _load(args, device):
    """The EMA model, its diffusion and info, for `sample` and `evaluate`: `load_model`, with
    the reverse variance that --variance names (the network is the same for either)."""
    model, diffusion, info = load_model(args.checkpoint, device=device, ema=True)
    if args.variance is not None:
        if args.sampler != "ddpm" and getattr(args, "metric", "fid") == "fid":
            noise = "DDIM's noise is set by --eta" if args.sampler == "ddim" else f"{args.sampler} has none"
            raise ValueError(f"--variance applies to --sampler ddpm and --metric bpd; {noise}")
        diffusion = Diffusion(**{**diffusion.config, "variance": args.variance})
    return model, diffusion, info


def resolve_eta(args) -> float:
    """The DDIM noise level of `sample` and `evaluate`: --eta, checked, else DEFAULT_ETA (0 for
    --sampler ddpm, whose noise --variance sets)."""
    if args.sampler != "ddim":
        if args.eta is not None:
            noise = ("the ddpm sampler's noise is set by --variance" if args.sampler == "ddpm" else
                     f"{args.sampler} takes none" + (" (dpm++2m-sde is its stochastic form)"
                                                      if args.sampler == "dpm++2m" else ""))
            raise ValueError(f"--eta applies to --sampler ddim; {noise}")
        return 0.0
    eta = DEFAULT_ETA if args.eta is None else args.eta
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"--eta must be from 0 (deterministic DDIM) to 1 (fresh noise at every step); got {eta:g}")
    return eta


def _ddim_steps(args, diffusion) -> int | None:
    """--steps, or for the fewer-step samplers without it SOLVER_STEPS or DDIM_STEPS (or T)."""
    if args.sampler in STEPPED_SAMPLERS and args.steps is None:
        return min(DDIM_STEPS if args.sampler == "ddim" else sampling.SOLVER_STEPS, diffusion.num_timesteps)
    return args.steps


def sampler_words(args, diffusion) -> str:
    """How `sample` and `evaluate` drew: "ddim 50 steps, eta 1" or "ddpm 1000 steps, sigma^2 = beta"."""
    noise = {"ddim": f", eta {args.eta:g}", "ddpm": f", sigma^2 = {diffusion.variance}"}.get(args.sampler, "")
    return f"{args.sampler} {args.steps or diffusion.num_timesteps} steps{noise}"


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


def _draw(diffusion, model, info, n: int, args, generator, labels=None, guidance: float = 0.0):
    """`sampling.draw` with the flags of `sample` and `evaluate`."""
    return draw(diffusion, model, n, info["image_shape"], sampler=args.sampler, steps=args.steps,
                eta=args.eta, batch_size=args.batch_size, generator=generator, labels=labels,
                guidance=guidance, progress=not args.no_progress)


# ------------------------------------------------------------------ sample


def add_sample_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sample", help="draw images from a trained model (its EMA weights)",
        description="Draw images with the EMA weights of a checkpoint and save them as a grid.",
    )
    _add_drawing_flags(p)
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
    p.add_argument("--out", default="grid.png", help="PNG file for the grid (default: grid.png)")
    p.add_argument("--nrow", type=int, default=None, help="images per row (default: sqrt of --n)")
    p.add_argument("--save-samples", metavar="PATH", default=None,
                   help="also save the images as one uint8 tensor [N, C, H, W] with torch.save, and "
                   "with --label their labels [N] beside it as PATH's stem + .labels.pt (default: not saved)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed and --batch-size draw the same images (default: 0)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="images drawn at once (default: 256)")
    p.add_argument("--compile", nargs="?", const="default", default="none", choices=COMPILE_MODES,
                   metavar="MODE",
                   help="torch.compile the network in MODE, one of " + ", ".join(COMPILE_MODES) +
                   " (the flag alone: default; reduce-overhead replays each call as a CUDA graph "
                   "on a GPU); pays off for many images drawn with one batch size (default: none)")
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
    args.steps = _ddim_steps(args, diffusion)
    labels = None if classes is None else torch.tensor(classes).repeat_interleave(args.n)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    images = _draw(diffusion, model, info, len(labels) if labels is not None else args.n, args, generator,
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


def add_evaluate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="bits/dim or a sample-quality score of a trained model",
        description="Evaluate a checkpoint's EMA model: the variational bound in bits/dim on test "
        "images, or the Fréchet distance of its samples in the features of the package's classifier "
        "(with the same score for real images, the floor) and the fraction of smudges. Prints the "
        "numbers and writes them to JSON.",
    )
    _add_drawing_flags(parser, only="fid: ")
    parser.add_argument("--metric", choices=tuple(METRICS), required=True,
                        help="bpd: the variational bound on test images in bits/dim (Eq. 5); "
                        "fid: Fréchet distance of samples to test images in the features of the "
                        "package's classifier, with the real-data floor (not Inception FID) (required)")
    parser.add_argument("--n", type=int, default=1000,
                        help="test images (bpd) or samples (fid) (default: 1000)")
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
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed of the test images, noise and samples (default: 0)")
    parser.add_argument("--out", default="metrics.json", help="JSON file for the numbers (default: metrics.json)")
    parser.set_defaults(run=run_evaluate)


@dataclass
class _Evaluation:
    """What both metrics of `evaluate` start from: the EMA model and where its data is."""

    model: torch.nn.Module
    diffusion: Diffusion
    info: dict
    device: torch.device
    dataset: str
    root: str | None
    image_size: int | None
    guidance: float


def _load_for_evaluation(args) -> _Evaluation:
    """The flags checked against --metric, the checkpoint's EMA model, and its dataset."""
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
    return _Evaluation(model, diffusion, info, device, dataset,
                       root=args.data_root or train_config.get("data_root"),
                       image_size=train_config.get("image_size"), guidance=guidance)


def run_evaluate(args) -> int:
    """Load the checkpoint's EMA model, compute the metric, print it, write it to JSON."""
    if args.n < 2 or args.batch_size < 1:
        raise ValueError("--n must be at least 2 and --batch-size at least 1")
    ev = _load_for_evaluation(args)
    result = {"metric": args.metric, "checkpoint": str(ev.info["path"]), "step": ev.info["step"],
              "total_steps": ev.info["total_steps"],
              "dataset": ev.dataset, "n": args.n, "seed": args.seed, "device": str(ev.device)}
    start = time.perf_counter()
    generator = torch.Generator(device=ev.device).manual_seed(args.seed)
    numbers, summary = METRICS[args.metric](args, ev, generator)
    result.update(numbers)
    result["seconds"] = round(time.perf_counter() - start, 1)
    out = write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(f"{summary}; {result['seconds']:.0f} s -> {out}")
    return 0


def _evaluate_bpd(args, ev: _Evaluation, generator) -> tuple[dict, str]:
    """`evaluate --metric bpd`: the bound on --n test images, its terms, and the line to print."""
    diffusion, T = ev.diffusion, ev.diffusion.num_timesteps
    if args.timesteps is not None and not 1 <= args.timesteps <= T:
        raise ValueError(f"--timesteps must be from 1 to T={T}; got {args.timesteps}")
    x0, _ = load_images(ev.dataset, n=args.n, seed=args.seed, root=ev.root, image_size=ev.image_size)
    x0 = x0.to(ev.device)
    bpd, terms = bits_per_dim(diffusion, ev.model, x0, timesteps=args.timesteps,
                              batch_size=args.batch_size, generator=generator,
                              progress=not args.no_progress, return_terms=True)
    bpd = bpd.double().cpu()
    numbers = dict(
        bpd=bpd.mean().item(), bpd_standard_error=(bpd.std() / math.sqrt(len(bpd))).item(),
        timesteps=len(terms["t"]), num_timesteps=T, diffusion_config=diffusion.config,
        terms={"prior": terms["prior"].mean().item(), "decoder": terms["decoder"].mean().item(),
               "t": terms["t"].tolist(), "weights": terms["weights"].tolist(),
               "vb": terms["vb"].double().mean(1).cpu().tolist()},
    )
    how = "all" if args.timesteps in (None, T) else "a stratified estimate from"
    summary = (f"bits/dim {numbers['bpd']:.4f} +- {numbers['bpd_standard_error']:.4f} on {args.n} "
               f"{ev.dataset} test images ({how} {len(terms['t'])} of T={T} terms; prior "
               f"{numbers['terms']['prior']:.2e}, decoder L_0 {numbers['terms']['decoder']:.4f}; "
               f"variance {diffusion.variance})")
    return numbers, summary


def _evaluate_fid(args, ev: _Evaluation, generator) -> tuple[dict, str]:
    """`evaluate --metric fid`: --n samples scored against the data, and the line to print."""
    classifier = load_classifier(ev.dataset, args.classifier, device=ev.device)
    args.steps = _ddim_steps(args, ev.diffusion)  # ddpm: all T unless --steps (respaced)
    # A class-conditional model draws the classes in turn, image i of class i mod K.
    labels = None if ev.model.num_classes is None else torch.arange(args.n) % ev.model.num_classes
    samples = _draw(ev.diffusion, ev.model, ev.info, args.n, args, generator, labels, ev.guidance)
    scores = score_samples(samples, ev.dataset, classifier, labels, seed=args.seed, root=ev.root)
    if labels is not None:
        scores["guidance"] = ev.guidance
    numbers = dict(
        sampler=args.sampler, steps=args.steps or ev.diffusion.num_timesteps, eta=args.eta,
        variance=ev.diffusion.variance, **scores,
        score="Fréchet distance in the features of the naivediffusion classifier (not Inception FID)",
        classifier={k: classifier.metadata.get(k) for k in ("path", "test_accuracy", "command")},
    )
    summary = (f"Fréchet distance (classifier features) {scores['fd']:.3f} for {args.n} samples "
               f"({sampler_words(args, ev.diffusion)}) vs {scores['n_reference']} {ev.dataset} "
               f"test images; real-data floor ({args.n} training images) {scores['fd_real']:.3f}; "
               f"smudges (top class probability < 0.5) {scores['smudges']:.1%}; noisy (rougher "
               f"than 99.9% of test digits) {scores['noisy']:.1%}; samples per class "
               f"{scores['class_counts']}")
    if labels is not None:
        summary += (f"; guidance w={ev.guidance:g}: {scores['accuracy']:.1%} classified as the class "
                    "asked for")
    return numbers, summary


# Each metric of `evaluate --metric`: (args, loaded model, generator) -> (numbers, summary).
METRICS = {"bpd": _evaluate_bpd, "fid": _evaluate_fid}


# ------------------------------------------------------------------ train-classifier


def add_train_classifier_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-classifier", help="train the classifier behind the sample-quality score",
        description="Train and save the feature network of quality.sample_quality (the package "
        "ships MNIST's; this makes it for another dataset, or again).")
    parser.add_argument("--dataset", default="mnist", help=f"{_quoted(DATASETS)} (default: mnist)")
    parser.add_argument("--out", default=None,
                        help="where to save the weights (default: the package's "
                        "naivediffusion/assets/classifier_DATASET.pt)")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the training set (default: 2)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default: 128)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of Adam (default: 0.002)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help=_DEVICE_HELP)
    parser.add_argument("--data-root", default=None, help="folder of the datasets "
                        "(default: $NAIVEDIFFUSION_DATA, else ~/.cache/naivediffusion/data)")
    parser.add_argument("--no-progress", action="store_true", help=_NO_PROGRESS_HELP)
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


# ------------------------------------------------------------------ main

# One adder per subcommand; a new subcommand appends its own.
SUBCOMMANDS = [add_train_parser, add_sample_parser, add_evaluate_parser, add_train_classifier_parser,
               export.add_parser]


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


