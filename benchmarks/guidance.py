"""The guidance trade-off of a class-conditional model: accuracy on the asked-for class and
sample quality against the guidance weight w, next to the unconditional model.

For each w, draws n DDIM samples (every class equally often, the same seed for each w, and
by default the noise level eta of `sample`),
and prints the fraction the package classifier calls the asked-for class, the Fréchet
distance in its features, the smudge fraction, and the real-data floor; then the same
score for the unconditional model at the same n. The recommended weight is the smallest w
whose accuracy is at least --target-accuracy and whose score is no worse than the
unconditional model's (else the w of the best accuracy).

    python benchmarks/guidance.py --checkpoint pretrained:mnist_conditional \\
        --unconditional pretrained:mnist --n 1000 --write-provenance

--write-provenance records the numbers and the recommendation in the shipped model's
NAME.json (only for a pretrained:NAME checkpoint), which chapter 7 reads. When only the
unconditional model has changed, --unconditional-only keeps the per-weight rows stored
there (they depend on --checkpoint alone), re-measures the unconditional score at the same
n, steps, eta and seed, and re-derives the recommendation:

    python benchmarks/guidance.py --unconditional-only --write-provenance
"""

import argparse
import datetime
import platform
import shlex
import sys
import time

import torch

from naivediffusion import quality
from naivediffusion.checkpoint import (
    PRETRAINED_PREFIX,
    load_model,
    pretrained_record,
    update_pretrained_record,
)
from naivediffusion.sampling import DDIM_STEPS, DEFAULT_ETA
from naivediffusion.sampling import draw as draw_batches


def draw(diffusion, model, info, n, args, labels=None, w=0.0):
    """n DDIM samples on the CPU, as `sample` draws them, from the seed and eta of args."""
    return draw_batches(diffusion, model, n, info["image_shape"], sampler="ddim", steps=args.steps,
                        eta=args.eta, batch_size=args.batch_size,
                        generator=torch.Generator().manual_seed(args.seed), labels=labels, guidance=w,
                        progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="pretrained:mnist_conditional")
    parser.add_argument("--unconditional", default="pretrained:mnist")
    parser.add_argument("--weights", default="0,0.5,1,2,3,5,7", help="comma-separated w values")
    parser.add_argument("--n", type=int, default=1000, help="samples per weight (default: 1000)")
    parser.add_argument("--steps", type=int, default=DDIM_STEPS, help=f"DDIM steps (default: {DDIM_STEPS})")
    parser.add_argument("--eta", type=float, default=DEFAULT_ETA,
                        help=f"DDIM noise of every draw, 0 to 1 (default: {DEFAULT_ETA:g}, as `sample`)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--target-accuracy", type=float, default=0.98)
    parser.add_argument("--write-provenance", action="store_true")
    parser.add_argument("--unconditional-only", action="store_true",
                        help="keep the per-weight rows stored by --write-provenance; re-measure "
                        "only the unconditional model (needs --write-provenance)")
    args = parser.parse_args()
    weights = [float(w) for w in args.weights.split(",")]
    if not 0.0 <= args.eta <= 1.0:  # as `sample --eta` checks it
        parser.error(f"--eta must be from 0 (deterministic DDIM) to 1 (fresh noise at every step); "
                     f"got {args.eta:g}")
    if args.write_provenance and not args.checkpoint.startswith(PRETRAINED_PREFIX):
        parser.error("--write-provenance needs a pretrained:NAME checkpoint")
    name = args.checkpoint[len(PRETRAINED_PREFIX):]
    if args.unconditional_only:
        if not args.write_provenance:
            parser.error("--unconditional-only updates the stored measurement: add --write-provenance")
        stored = pretrained_record(name).get("guidance_measurement")
        if stored is None:
            parser.error(f"{name}.json holds no guidance measurement yet: run without --unconditional-only")
        stored.setdefault("eta", 0.0)  # measurements from before --eta drew deterministically
        for flag in ("n", "steps", "seed", "eta"):
            if stored[flag] != getattr(args, flag):
                parser.error(f"the stored rows were measured with --{flag} {stored[flag]}, not "
                             f"{getattr(args, flag)}: pass --{flag} {stored[flag]}")

    model, diffusion, info = load_model(args.checkpoint)
    if model.num_classes is None:
        sys.exit(f"error: {args.checkpoint} is not a class-conditional model")
    dataset = info["train_config"]["dataset"]
    classifier = quality.load_classifier(dataset)
    asked = torch.arange(args.n) % model.num_classes
    print(f"{args.checkpoint} (step {info['step']}), {args.n} samples per weight, DDIM {args.steps} "
          f"steps at eta {args.eta:g}, {torch.get_num_threads()} threads")
    results = {}
    if args.unconditional_only:
        results, floor = stored["results"], stored["fd_real"]
        weights = [float(w) for w in results]
        print(f"per-weight rows as stored by `{stored['command']}` on {stored['date']}:")
        for w, r in results.items():
            print(f"w = {float(w):4g}: accuracy {r['accuracy']:.4f}  FD {r['fd']:7.3f}  "
                  f"smudges {r['smudges']:.3f}  ({r['seconds']:.0f} s)")
    for w in [] if args.unconditional_only else weights:
        start = time.perf_counter()
        images = draw(diffusion, model, info, args.n, args, asked, w)
        scores = quality.score_samples(images, dataset, classifier, labels=asked, seed=args.seed)
        results[f"{w:g}"] = {**{k: scores[k] for k in ("accuracy", "fd", "smudges")},
                             "seconds": round(time.perf_counter() - start, 1)}
        floor = scores["fd_real"]
        r = results[f"{w:g}"]
        print(f"w = {w:4g}: accuracy {r['accuracy']:.4f}  FD {r['fd']:7.3f}  smudges {r['smudges']:.3f}  "
              f"({r['seconds']:.0f} s)", flush=True)

    plain, plain_diffusion, plain_info = load_model(args.unconditional)
    images = draw(plain_diffusion, plain, plain_info, args.n, args)
    fd_unconditional = quality.sample_quality(images, dataset, classifier=classifier, seed=args.seed)["fd"]
    print(f"unconditional {args.unconditional} ({plain_info['total_steps']} steps): FD {fd_unconditional:.3f}; "
          f"real-data floor ({args.n} training images): {floor:.3f}")

    good = [w for w in weights if results[f"{w:g}"]["accuracy"] >= args.target_accuracy
            and results[f"{w:g}"]["fd"] <= fd_unconditional]
    if good:
        recommended, rule = min(good), (f"the smallest w with accuracy >= {args.target_accuracy:g} and "
                                        "a score no worse than the unconditional model's")
    else:
        recommended = max(weights, key=lambda w: results[f"{w:g}"]["accuracy"])
        rule = f"no w met accuracy >= {args.target_accuracy:g} with a score no worse than the " \
               "unconditional model's; the w of the best accuracy"
    print(f"recommended: w = {recommended:g} ({rule})")

    if args.write_provenance:
        recommended_guidance = {"w": recommended, "rule": rule}
        command = "python benchmarks/guidance.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        measured = {"date": datetime.date.today().isoformat(), "threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": str(torch.__version__)}
        # Which unconditional model the reference score came from, and how it was measured.
        reference = {"command": command, "step": plain_info["step"], "total_steps": plain_info["total_steps"],
                     **measured}
        if args.unconditional_only:
            # The rows keep their own command and date; the reference says where it came from.
            measurement = {**stored, "fd_unconditional": fd_unconditional,
                           "unconditional": args.unconditional, "unconditional_measurement": reference}
        else:
            measurement = {
                "command": command, "n": args.n, "steps": args.steps, "eta": args.eta, "seed": args.seed,
                "results": results, "fd_unconditional": fd_unconditional,
                "unconditional": args.unconditional, "fd_real": floor, **measured,
                "unconditional_measurement": reference,
            }
        path = update_pretrained_record(name, recommended_guidance=recommended_guidance,
                                        guidance_measurement=measurement)
        print(f"-> {path}")


if __name__ == "__main__":
    main()
