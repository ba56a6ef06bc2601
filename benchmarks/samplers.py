"""Which sampler draws the best samples from a trained model, at what cost.

For each sampler setting, draws n samples from the same seed, exactly as
`python -m naivediffusion sample` draws them, and prints the package's sample-quality score
(the Fréchet distance in its classifier's features, next to the real-data floor at the same n),
the fraction of smudges and of noisy samples, how the samples spread over the classes, and the
seconds it took. Prints numbers; it is not a test.

    python benchmarks/samplers.py --checkpoint pretrained:mnist --n 1000 \\
        --samplers ddim:50:0,ddim:50:0.5,ddim:50:1,ddim:100:0,ddim:100:1

--write-provenance records the rows in the shipped model's NAME.json (only for a
pretrained:NAME checkpoint), which chapter 6 reads.

--seeds 0,1,2,3,4 draws every setting once per seed (a single score at n = 1000 moves from draw to
draw by more than its floor), and --json PATH writes the rows and, per setting, how many draws
scored within twice their floor, as a record for the book's Results appendix:

    python benchmarks/samplers.py --n 1000 --seeds 0,1,2,3,4 \
        --samplers ddim:20:1,dpm++2m:20,dpm++2m-sde:20 --json benchmarks/results/samplers_mnist.json

A setting is ddim:STEPS:ETA (Song et al. 2021, Eq. 12 and 16: ETA 0 deterministic, 1 fresh
noise at every step, the posterior variance of each jump) or ddpm:VARIANCE (Algorithm 2 over
all T steps, VARIANCE beta or posterior) or dpm++2m:STEPS / dpm++2m-sde:STEPS (DPM-Solver++(2M),
Lu et al. 2022, deterministic or stochastic, on DDIM's timesteps). `sample` and `evaluate` draw with DDIM's --eta
default, chosen from what this script measured (README).
"""

import argparse
import datetime
import platform
import shlex
import statistics
import sys
import time

import torch
from record import provenance, write_record

from naivediffusion import quality
from naivediffusion.checkpoint import PRETRAINED_PREFIX, load_model, update_pretrained_record
from naivediffusion.config import DEVICES
from naivediffusion.diffusion import VARIANCES, Diffusion
from naivediffusion.sampling import DDIM_STEPS, draw


def parse_setting(text: str) -> dict:
    """'ddim:50:1' -> {sampler, steps, eta, variance}; 'ddpm:posterior' likewise; else ValueError."""
    parts = text.strip().split(":")
    if parts[0] == "ddim" and len(parts) == 3:
        try:
            steps, eta = int(parts[1]), float(parts[2])
        except ValueError:
            steps = eta = None
        if steps is not None and steps >= 1 and 0 <= eta <= 1:
            return {"sampler": "ddim", "steps": steps, "eta": eta, "variance": None}
    if parts[0] in ("dpm++2m", "dpm++2m-sde") and len(parts) == 2 and parts[1].isdigit() and int(parts[1]) >= 1:
        return {"sampler": parts[0], "steps": int(parts[1]), "eta": 0.0, "variance": None}
    if parts[0] == "ddpm" and len(parts) == 2 and parts[1] in VARIANCES:
        return {"sampler": "ddpm", "steps": None, "eta": 0.0, "variance": parts[1]}
    raise ValueError(f"unknown sampler setting {text!r}: write ddim:STEPS:ETA (STEPS >= 1, 0 <= ETA <= 1), "
                     "e.g. ddim:50:1, dpm++2m:STEPS, dpm++2m-sde:STEPS, or ddpm:beta or ddpm:posterior")


def name_of(setting: dict, num_timesteps: int) -> str:
    if setting["sampler"] == "ddim":
        return f"DDIM {setting['steps']}, eta {setting['eta']:g}"
    if setting["sampler"].startswith("dpm"):
        return f"{'DPM-Solver++(2M) SDE' if setting['sampler'].endswith('sde') else 'DPM-Solver++(2M)'} {setting['steps']}"
    return f"DDPM {num_timesteps}, sigma^2 = {'beta' if setting['variance'] == 'beta' else 'beta~'}"


def summarize(rows: list[dict]) -> dict:
    """Per setting (in the order first drawn): its draws, how many scored within twice their
    real-data floor, the smudges pooled over them, and the median seconds per draw."""
    summary = {}
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = [r for r in rows if r["name"] == name]
        summary[name] = {"draws": len(mine), "within_2x_floor": sum(r["fd"] <= 2 * r["fd_real"] for r in mine),
                         "fd_over_floor": [r["fd"] / r["fd_real"] for r in mine],
                         "smudges": sum(r["smudges"] for r in mine) / len(mine),
                         "median_seconds": statistics.median(r["seconds"] for r in mine)}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="pretrained:mnist",
                        help="a run's ema.pt or checkpoint.pt, or pretrained:NAME (default: pretrained:mnist)")
    parser.add_argument("--samplers", default=f"ddim:{DDIM_STEPS}:0,ddim:{DDIM_STEPS}:1",
                        help="comma-separated settings ddim:STEPS:ETA or ddpm:beta|posterior "
                        f"(default: ddim:{DDIM_STEPS}:0,ddim:{DDIM_STEPS}:1)")
    parser.add_argument("--n", type=int, default=1000, help="samples per setting (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of every setting (default: 0)")
    parser.add_argument("--seeds", help="several draws: comma-separated seeds, each drawn with every "
                        "setting (overrides --seed), e.g. 0,1,2,3,4")
    parser.add_argument("--json", metavar="PATH", help="write every row, and per setting how many draws "
                        "scored within 2x their floor and the pooled smudges, to this JSON record")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="images drawn at once; with the same seed, `sample` and `evaluate` at "
                        "this batch size draw the same images (default: 256)")
    parser.add_argument("--device", default="cpu", choices=[d for d in DEVICES if d != "auto"])
    parser.add_argument("--write-provenance", action="store_true",
                        help="record the rows as 'sampler_measurement' in the shipped model's NAME.json "
                        "(needs a pretrained:NAME checkpoint)")
    argv_used = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    try:
        settings = [parse_setting(text) for text in args.samplers.split(",")]
    except ValueError as err:
        parser.error(str(err))
    try:
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    except ValueError:
        parser.error(f"--seeds must be integers separated by commas; got {args.seeds!r}")
    if args.write_provenance and len(seeds) > 1:
        parser.error("--write-provenance records one draw: give --seed, not --seeds")
    if args.n < 2 or args.batch_size < 1:
        parser.error("--n must be at least 2 and --batch-size at least 1")
    if args.write_provenance and not args.checkpoint.startswith(PRETRAINED_PREFIX):
        parser.error("--write-provenance needs a pretrained:NAME checkpoint")

    model, diffusion, info = load_model(args.checkpoint, device=args.device)
    if model.num_classes is not None:
        parser.error(f"{args.checkpoint} is class-conditional: benchmarks/guidance.py compares its samplers")
    dataset = info["train_config"]["dataset"]
    print(f"{args.checkpoint}: {info['total_steps']:,} training steps; {args.n} samples per setting, "
          f"seeds {','.join(map(str, seeds))}, {torch.get_num_threads()} threads on {args.device}, "
          f"torch {torch.__version__}")
    print(f"{'sampler':<28} {'seed':>4} {'FD':>7} {'floor':>6} {'smudges':>8} {'noisy':>6} {'seconds':>8}  "
          "samples per class")
    rows = []
    for setting, seed in ((setting, seed) for seed in seeds for setting in settings):
        variant = diffusion if setting["variance"] is None else Diffusion(
            **{**diffusion.config, "variance": setting["variance"]})
        start = time.perf_counter()
        images = draw(variant, model, args.n, info["image_shape"], sampler=setting["sampler"],
                      steps=setting["steps"], eta=setting["eta"], batch_size=args.batch_size,
                      generator=torch.Generator(device=args.device).manual_seed(seed), progress=False)
        seconds = time.perf_counter() - start
        # The package's classifier: its reference statistics are computed once.
        scores = quality.score_samples(images, dataset, seed=seed)
        counts = scores["class_counts"]
        row = {"name": name_of(setting, diffusion.num_timesteps), **setting, "seed": seed,
               **{k: scores[k] for k in ("fd", "fd_real", "smudges", "noisy", "class_counts")},
               "seconds": round(seconds, 1)}
        rows.append(row)
        print(f"{row['name']:<28} {seed:4} {row['fd']:7.2f} {row['fd_real']:6.2f} {row['smudges']:8.1%} "
              f"{row['noisy']:6.1%} {row['seconds']:8.0f}  {counts}", flush=True)
    best = min(rows, key=lambda r: r["fd"] / r["fd_real"])
    print(f"lowest score: {best['name']}, seed {best['seed']} ({best['fd']:.2f}, "
          f"{best['fd'] / best['fd_real']:.1f}x the floor)")
    summary = summarize(rows)
    for name, numbers in summary.items():
        print(f"summary: {name:<28} within 2x the floor in {numbers['within_2x_floor']} of {numbers['draws']} draws; "
              f"smudges {numbers['smudges']:.1%} over all; median {numbers['median_seconds']:.0f} s per draw")
    if args.json:
        write_record(args.json, {**provenance(argv_used), "checkpoint": args.checkpoint,
                                 "total_steps": info["total_steps"], "n": args.n, "seeds": seeds,
                                 "batch_size": args.batch_size, "device": args.device,
                                 "rows": rows, "summary": summary})
        print(f"-> {args.json}")
    if args.write_provenance:
        path = update_pretrained_record(args.checkpoint[len(PRETRAINED_PREFIX):], sampler_measurement={
            "command": "python benchmarks/samplers.py " + " ".join(shlex.quote(a) for a in argv_used),
            "total_steps": info["total_steps"], "n": args.n, "seed": args.seed,
            "batch_size": args.batch_size, "date": datetime.date.today().isoformat(),
            "threads": torch.get_num_threads(), "device": args.device, "platform": platform.platform(),
            "torch": str(torch.__version__), "rows": rows,
        })
        print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
