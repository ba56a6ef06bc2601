"""Does a model meet the targets set for the shipped MNIST model? Three numbers, one command.

The targets: at most 1 in 50 DDIM-50 samples a smudge (top class probability under the
package's classifier below 0.5); the package's score (the Fréchet distance in that
classifier's features) of 1,000 samples within 2x of its real-data floor; the variational
bound at most 1.6 bits/dim on the MNIST test set. A model with a learned variance
(`pretrained:mnist_learned`) has its own two: a bound of at most 1.45 bits/dim under its learned
variance, and DDIM-50 scores no worse than those of the model it was fine-tuned from, drawn with
the same seeds (`--baseline`, that model's record: the same seed gives both the same noise). At n = 1,000 the score moves from draw to draw
by more than its floor does, mostly with how many samples fall in each class, so it is measured
over several seeds and each draw is printed; the smudges are pooled over all of them.

Every number comes from `python -m naivediffusion evaluate`, run here in-process, exactly as
the command line runs it (each call's JSON is kept in the output). The bound is measured with
both fixed variances (beta and beta-tilde); the target is checked on the lower. Prints numbers;
it is not a test.

    python benchmarks/targets.py                                  # pretrained:mnist on this machine
    python benchmarks/targets.py --checkpoint runs/mnist/ema.pt --checkpoint pretrained:mnist \\
        --device cuda --json targets.json                         # a new model beside the shipped one
    python benchmarks/targets.py --checkpoint pretrained:mnist_learned \
        --baseline benchmarks/results/targets_mnist.json --json benchmarks/results/targets_mnist_learned.json
    python benchmarks/targets.py --dry-run                        # toy sizes, to check that it runs
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from record import provenance, write_record

from naivediffusion.__main__ import main as naivediffusion_main
from naivediffusion.checkpoint import load_model
from naivediffusion.config import DEVICES
from naivediffusion.sampling import DDIM_STEPS

MAX_SMUDGES = 0.02  # at most 1 in 50 samples
MAX_FD_OVER_FLOOR = 2.0
MAX_BPD = 1.6
MAX_LEARNED_BPD = 1.45  # under the model's own learned variance


def evaluate(args: list[str], scratch: Path) -> dict:
    """`python -m naivediffusion evaluate ARGS`, in this process; its JSON result."""
    out = scratch / "metrics.json"
    with contextlib.redirect_stdout(io.StringIO()):  # its summary line; the numbers are printed below
        code = naivediffusion_main(["evaluate", *args, "--no-progress", "--out", str(out)])
    if code != 0:
        raise SystemExit(f"evaluate {' '.join(args)} failed with exit code {code}")
    return json.loads(out.read_text())


def measure(checkpoint: str, args, scratch: Path) -> dict:
    common = ["--checkpoint", checkpoint, "--device", args.device, "--batch-size", str(args.batch_size)]
    result = {"checkpoint": checkpoint, "bpd": {}, "draws": []}
    learned = load_model(checkpoint)[1].variance == "learned"
    for variance in ("beta", "posterior", "learned") if learned else ("beta", "posterior"):
        run = evaluate([*common, "--metric", "bpd", "--n", str(args.bpd_images), "--timesteps",
                        str(args.bpd_timesteps), "--seed", "0", "--variance", variance], scratch)
        result["bpd"][variance] = run
        print(f"  bits/dim, sigma^2 = {dict(posterior='beta~').get(variance, variance)}: {run['bpd']:.3f} +- "
              f"{run['bpd_standard_error']:.3f} ({args.bpd_images} test images, {run['timesteps']} terms)",
              flush=True)
    for seed in args.seeds:
        run = evaluate([*common, "--metric", "fid", "--n", str(args.n), "--sampler", "ddim", "--steps",
                        str(args.steps), "--seed", str(seed)], scratch)
        result["draws"].append(run)
        print(f"  seed {seed}: score {run['fd']:.2f}, floor {run['fd_real']:.2f} ({run['fd'] / run['fd_real']:.1f}x), "
              f"smudges {run['smudges']:.1%}, samples per class {run['class_counts']}", flush=True)
    result["step"] = result["draws"][0]["total_steps"]  # --seeds is never empty
    return result


def verdict(result: dict, n: int, steps: int = DDIM_STEPS, baseline: dict | None = None) -> dict:
    """The targets, each with the number that decides it and whether it is met: the three of the
    shipped model, or for a learned variance its bound and its scores against `baseline`'s draws."""
    draws = result["draws"]
    smudges = sum(d["smudges"] for d in draws) / len(draws)
    within = sum(d["fd"] <= MAX_FD_OVER_FLOOR * d["fd_real"] for d in draws)
    if "learned" not in result["bpd"]:
        bpd = min(result["bpd"][v]["bpd"] for v in ("beta", "posterior"))
        return {
            f"smudges <= {MAX_SMUDGES:.0%} (pooled over {len(draws) * n} DDIM-{steps} samples)": (f"{smudges:.1%}", smudges <= MAX_SMUDGES),
            f"score <= {MAX_FD_OVER_FLOOR:g}x floor at n = {n}": (f"in {within} of {len(draws)} draws", within == len(draws)),
            f"bits/dim <= {MAX_BPD:g} (the lower fixed variance)": (f"{bpd:.3f}", bpd <= MAX_BPD),
        }
    bpd = result["bpd"]["learned"]["bpd"]
    targets = {f"bits/dim <= {MAX_LEARNED_BPD:g} (its learned variance)": (f"{bpd:.3f}", bpd <= MAX_LEARNED_BPD)}
    if baseline is not None:
        paired = paired_scores(draws, baseline)
        worse = paired["mean_difference"] > 2 * paired["standard_error"]
        targets[f"DDIM-{steps} score no worse than {baseline['checkpoint']} (paired draws)"] = (
            f"{paired['mean_difference']:+.2f} +- {paired['standard_error']:.2f} over {paired['draws']}", not worse)
    return targets


def paired_scores(draws: list[dict], baseline: dict) -> dict:
    """The scores of `draws` minus those of `baseline`'s draws with the same seed (the same noise):
    their mean and its standard error; "no worse" means a mean under 2 standard errors above 0."""
    theirs = {d["seed"]: d["fd"] for d in baseline["draws"]}
    differences = [d["fd"] - theirs[d["seed"]] for d in draws if d["seed"] in theirs]
    if len(differences) < 2:
        raise SystemExit("--baseline: fewer than two of its draws share a seed with these; use the same --seeds")
    mean = sum(differences) / len(differences)
    spread = (sum((x - mean) ** 2 for x in differences) / (len(differences) - 1)) ** 0.5
    return {"differences": differences, "mean_difference": mean,
            "standard_error": spread / len(differences) ** 0.5, "draws": len(differences)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append",
                        help="a run's ema.pt, checkpoint.pt or run folder, or pretrained:NAME; give it "
                        "again to compare models (default: pretrained:mnist)")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="one draw of --n samples per seed (default: 0,1,2,3,4)")
    parser.add_argument("--n", type=int, default=1000, help="samples per draw (default: 1000, the target's)")
    parser.add_argument("--steps", type=int, default=DDIM_STEPS,
                        help="DDIM steps of the draws, at the command line's default eta (default: "
                        f"{DDIM_STEPS}, the command line's and the target's for the smudges)")
    parser.add_argument("--bpd-images", type=int, default=1000, help="test images for bits/dim (default: 1000)")
    parser.add_argument("--bpd-timesteps", type=int, default=100,
                        help="terms of the bound, a stratified estimate of all T (default: 100)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per model call (default: 256)")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    parser.add_argument("--baseline", metavar="PATH", help="a record of this script for the model a learned "
                        "variance was fine-tuned from; its draws pair with these by seed")
    parser.add_argument("--dry-run", action="store_true",
                        help="toy sizes (20 samples, 2 seeds, 8 test images, 3 terms): checks that it runs")
    args = parser.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds must be integers separated by commas, e.g. 0,1,2; got {args.seeds!r}")
    if args.dry_run:
        args.n, args.seeds, args.bpd_images, args.bpd_timesteps = 20, args.seeds[:2], 8, 3
    if args.n < 2 or args.steps < 1 or args.bpd_images < 1 or args.bpd_timesteps < 1 or not args.seeds:
        parser.error("--n must be at least 2, --steps, --bpd-images and --bpd-timesteps at least 1, "
                     "and --seeds not empty")
    checkpoints = args.checkpoint or ["pretrained:mnist"]
    baseline = None
    if args.baseline:
        try:
            baseline = json.loads(Path(args.baseline).read_text())["results"][0]
        except (OSError, ValueError, KeyError, IndexError) as error:
            parser.error(f"--baseline {args.baseline}: not a record of this script ({error})")

    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for checkpoint in checkpoints:
            print(f"{checkpoint}: {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
            start = time.perf_counter()
            result = measure(checkpoint, args, Path(scratch))
            result["seconds"] = round(time.perf_counter() - start, 1)
            result["targets"] = verdict(result, args.n, args.steps, baseline)
            if baseline is not None and "learned" in result["bpd"]:
                result["paired_with_baseline"] = paired_scores(result["draws"], baseline)
            results.append(result)
    print()
    if args.dry_run:
        print("(--dry-run: toy sizes; 'met' below means nothing)")
    for result in results:
        print(f"{result['checkpoint']} ({result['step']:,} training steps, measured in {result['seconds']:.0f} s):")
        for target, (number, met) in result["targets"].items():
            print(f"  {target:<58} {number:<18} {'met' if met else 'NOT met'}")
    if args.json:
        write_record(args.json, {**provenance(), "args": vars(args), "results": results})
        print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
