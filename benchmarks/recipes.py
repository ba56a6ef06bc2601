"""Which training recipe converges fastest: the same steps and seed, several recipes, three numbers.

Each recipe is a set of `TrainConfig` fields on top of one base (dataset, network, batch,
steps, seed). For each, this trains a run with the package's `Trainer`, then scores its EMA
model:

- the Fréchet distance in the package classifier's features of `--n` DDIM samples, next to
  its real-data floor at the same n (`quality.sample_quality`);
- the fraction of smudges: samples whose top class probability under the package classifier
  is below 0.5 (`quality.smudge_fraction`);
- the fraction of noisy samples, rougher than 99.9% of real test digits (`quality.noise_fraction`):
  the classifier is confident about many images of pure speckle, so the smudge fraction misses
  them;
- bits/dim on `--bpd-images` test images, a stratified estimate from `--bpd-timesteps` terms.

A grid of each recipe's first 64 samples is saved beside the JSON file.

It prints numbers and writes them to JSON; it is not a test. The defaults in
`naivediffusion/config.py` cite what it measured.

    python benchmarks/recipes.py                                   # the CPU comparison
    python benchmarks/recipes.py --steps 3000 --model mnist --batch-size 128 --device cuda
    python benchmarks/recipes.py --recipe old:lr=5e-4,lr_schedule=constant,loss_weighting=none \\
        --recipe new:lr=1e-3,lr_schedule=cosine,loss_weighting=min-snr
"""

import argparse
import ast
import tempfile
import time
from pathlib import Path

import torch
from record import provenance, write_record

from naivediffusion import viz
from naivediffusion.config import TrainConfig
from naivediffusion.likelihood import bits_per_dim
from naivediffusion.quality import (
    load_classifier,
    load_images,
    score_samples,
)
from naivediffusion.sampling import DDIM_STEPS, draw
from naivediffusion.train import Trainer

# The recipes compared by default: the MNIST recipe before this version (eps, L_simple, constant
# 5e-4), the cosine decay with a larger rate, Min-SNR on top of it, and v-prediction instead of eps
# (the CPU default).
RECIPES = {
    "eps, l-simple, constant 5e-4": dict(objective="eps", loss_weighting="none", lr_schedule="constant", lr=5e-4),
    "eps, l-simple, cosine 1e-3": dict(objective="eps", loss_weighting="none", lr_schedule="cosine", lr=1e-3),
    "eps, min-snr, cosine 1e-3": dict(objective="eps", loss_weighting="min-snr", lr_schedule="cosine", lr=1e-3),
    "v, l-simple, cosine 1e-3": dict(objective="v", loss_weighting="none", lr_schedule="cosine", lr=1e-3),
}


def parse_recipe(text: str) -> tuple[str, dict]:
    """ "name:field=value,field=value" -> (name, {field: value}); values as Python literals."""
    name, _, fields = text.partition(":")
    settings = {}
    for item in filter(None, fields.split(",")):
        key, _, value = item.partition("=")
        try:
            settings[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            settings[key] = value  # a bare word such as min-snr
    return name, settings


def score(trainer: Trainer, n: int, sample_steps: int, bpd_images: int, bpd_timesteps: int,
          seed: int, grid_path: str) -> dict:
    model, diffusion, device = trainer.ema.module, trainer.diffusion, trainer.device
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = draw(diffusion, model, n, trainer.image_shape, sampler="ddim", steps=sample_steps, eta=0.0,
                   batch_size=250, generator=generator, progress=False)
    classifier = load_classifier(trainer.config.dataset)
    quality = score_samples(samples, trainer.config.dataset, classifier, seed=seed)
    viz.save_grid(samples[:64], grid_path, nrow=8)
    x0, _ = load_images(trainer.config.dataset, train=False, n=bpd_images, seed=seed)
    bpd = bits_per_dim(diffusion, model, x0.to(device), timesteps=bpd_timesteps,
                       generator=torch.Generator(device=device).manual_seed(seed))
    return {
        **{k: quality[k] for k in ("fd", "fd_real", "smudges", "noisy")},
        "bpd": bpd.mean().item(), "bpd_se": (bpd.std() / bpd.numel() ** 0.5).item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist", help="default: mnist")
    parser.add_argument("--model", default="mnist-small", help="UNet preset (default: mnist-small)")
    parser.add_argument("--batch-size", type=int, default=64, help="default: 64")
    parser.add_argument("--steps", type=int, default=800, help="training steps per recipe (default: 800)")
    parser.add_argument("--warmup-steps", type=int, default=100, help="default: 100")
    parser.add_argument("--device", default="cpu", help="default: cpu")
    parser.add_argument("--seed", type=int, default=0, help="default: 0")
    parser.add_argument("--n", type=int, default=500, help="samples scored per recipe (default: 500)")
    parser.add_argument("--sample-steps", type=int, default=DDIM_STEPS, help=f"DDIM steps (default: {DDIM_STEPS})")
    parser.add_argument("--bpd-images", type=int, default=128, help="test images for bits/dim (default: 128)")
    parser.add_argument("--bpd-timesteps", type=int, default=50, help="terms of the bound (default: 50)")
    parser.add_argument("--recipe", action="append", metavar="NAME:FIELD=VALUE,...",
                        help="a recipe to compare (repeatable; default: the built-in list)")
    parser.add_argument("--out", default="recipes.json", help="JSON file (default: recipes.json)")
    args = parser.parse_args()
    recipes = dict(map(parse_recipe, args.recipe)) if args.recipe else RECIPES

    print(f"{args.dataset}, UNet {args.model!r}, batch {args.batch_size}, {args.steps} steps, seed "
          f"{args.seed}, {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"scores: {args.n} DDIM-{args.sample_steps} samples; bits/dim on {args.bpd_images} test "
          f"images from {args.bpd_timesteps} terms")
    print(f"{'recipe':30s} {'loss':>7s} {'FD':>7s} {'floor':>6s} {'smudges':>8s} {'noisy':>6s} "
          f"{'bits/dim':>14s} {'train s':>8s}",
          flush=True)
    results = {}
    for name, settings in recipes.items():
        with tempfile.TemporaryDirectory() as run_dir:
            config = TrainConfig.for_dataset(
                args.dataset, model=args.model, batch_size=args.batch_size, steps=args.steps,
                warmup_steps=args.warmup_steps, device=args.device, seed=args.seed, run_dir=run_dir,
                sample_every=10**9, checkpoint_every=10**9, log_every=max(1, args.steps // 10),
                **settings)
            trainer = Trainer(config)
            start = time.perf_counter()
            result = trainer.train(progress=False)
            seconds = time.perf_counter() - start
            grid = str(Path(args.out).with_suffix("")) + f"_{len(results)}.png"
            numbers = score(trainer, args.n, args.sample_steps, args.bpd_images, args.bpd_timesteps,
                            args.seed, grid)
        numbers.update(loss=result["loss"], train_seconds=round(seconds, 1), settings=settings, grid=grid)
        results[name] = numbers
        print(f"{name:30s} {numbers['loss']:7.4f} {numbers['fd']:7.2f} {numbers['fd_real']:6.2f} "
              f"{numbers['smudges']:8.3f} {numbers['noisy']:6.3f} {numbers['bpd']:8.3f} ± {numbers['bpd_se']:.3f} "
              f"{seconds:8.0f}", flush=True)
    write_record(args.out, {**provenance(), "args": vars(args), "results": results})
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
