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

A setting is ddim:STEPS:ETA (Song et al. 2021, Eq. 12 and 16: ETA 0 deterministic, 1 fresh
noise at every step, the posterior variance of each jump) or ddpm:VARIANCE (Algorithm 2 over
all T steps, VARIANCE beta or posterior). `sample` and `evaluate` draw with DDIM's --eta
default, chosen from what this script measured (README).
"""

import argparse
import datetime
import platform
import shlex
import sys
import time

import torch

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
    if parts[0] == "ddpm" and len(parts) == 2 and parts[1] in VARIANCES:
        return {"sampler": "ddpm", "steps": None, "eta": 0.0, "variance": parts[1]}
    raise ValueError(f"unknown sampler setting {text!r}: write ddim:STEPS:ETA (STEPS >= 1, 0 <= ETA <= 1), "
                     "e.g. ddim:50:1, or ddpm:beta or ddpm:posterior")


def name_of(setting: dict, num_timesteps: int) -> str:
    if setting["sampler"] == "ddim":
        return f"DDIM {setting['steps']}, eta {setting['eta']:g}"
    return f"DDPM {num_timesteps}, sigma^2 = {'beta' if setting['variance'] == 'beta' else 'beta~'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="pretrained:mnist",
                        help="a run's ema.pt or checkpoint.pt, or pretrained:NAME (default: pretrained:mnist)")
    parser.add_argument("--samplers", default=f"ddim:{DDIM_STEPS}:0,ddim:{DDIM_STEPS}:1",
                        help="comma-separated settings ddim:STEPS:ETA or ddpm:beta|posterior "
                        f"(default: ddim:{DDIM_STEPS}:0,ddim:{DDIM_STEPS}:1)")
    parser.add_argument("--n", type=int, default=1000, help="samples per setting (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of every setting (default: 0)")
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
    if args.n < 2 or args.batch_size < 1:
        parser.error("--n must be at least 2 and --batch-size at least 1")
    if args.write_provenance and not args.checkpoint.startswith(PRETRAINED_PREFIX):
        parser.error("--write-provenance needs a pretrained:NAME checkpoint")

    model, diffusion, info = load_model(args.checkpoint, device=args.device)
    if model.num_classes is not None:
        parser.error(f"{args.checkpoint} is class-conditional: benchmarks/guidance.py compares its samplers")
    dataset = info["train_config"]["dataset"]
    print(f"{args.checkpoint}: {info['total_steps']:,} training steps; {args.n} samples per setting, "
          f"seed {args.seed}, {torch.get_num_threads()} threads on {args.device}, torch {torch.__version__}")
    print(f"{'sampler':<28} {'FD':>7} {'floor':>6} {'smudges':>8} {'noisy':>6} {'seconds':>8}  samples per class")
    rows = []
    for setting in settings:
        variant = diffusion if setting["variance"] is None else Diffusion(
            **{**diffusion.config, "variance": setting["variance"]})
        start = time.perf_counter()
        images = draw(variant, model, args.n, info["image_shape"], sampler=setting["sampler"],
                      steps=setting["steps"], eta=setting["eta"], batch_size=args.batch_size,
                      generator=torch.Generator(device=args.device).manual_seed(args.seed), progress=False)
        seconds = time.perf_counter() - start
        # The package's classifier: its reference statistics are computed once.
        scores = quality.score_samples(images, dataset, seed=args.seed)
        counts = scores["class_counts"]
        row = {"name": name_of(setting, diffusion.num_timesteps), **setting,
               **{k: scores[k] for k in ("fd", "fd_real", "smudges", "noisy", "class_counts")},
               "seconds": round(seconds, 1)}
        rows.append(row)
        print(f"{row['name']:<28} {row['fd']:7.2f} {row['fd_real']:6.2f} {row['smudges']:8.1%} "
              f"{row['noisy']:6.1%} {row['seconds']:8.0f}  {counts}", flush=True)
    best = min(rows, key=lambda r: r["fd"])
    print(f"lowest score: {best['name']} ({best['fd']:.2f}, {best['fd'] / best['fd_real']:.1f}x the floor)")
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
