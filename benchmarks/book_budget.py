"""The constants behind the book's compute budgets: what one network call of the shipped
`mnist-small` U-Net costs on this machine, per call and per image in it.

`naivediffusion.budget.estimate_seconds` turns a chapter's network calls (`chapter_work`)
into time with three numbers, fitted here by least squares over batch sizes:

    sampler step on B images:            a + b * B      (a DDIM step: one network call)
    training step on B images:         3 a + c * B      (forward, backward, AdamW)

Prints them with the fit's worst relative error, and with --out writes them as JSON
(benchmarks/results/book_budget.json is the record the package's constants come from;
tests/test_budget_viz.py checks that they agree). Then, with --chapters, the estimate for
every chapter under every budget. Run it on a quiet machine: it is a timing.

    python benchmarks/book_budget.py --out benchmarks/results/book_budget.json
    python benchmarks/book_budget.py --chapters          # the estimates only, from the constants
    python benchmarks/book_budget.py --chapters --out benchmarks/results/book_estimates.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from naivediffusion import Diffusion, budget
from naivediffusion.checkpoint import load_model, pretrained, write_text_atomic
from naivediffusion.train import adamw

FORWARD_BATCHES = (1, 4, 16, 64, 256)
TRAINING_BATCHES = (16, 64)


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: the first call allocates
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fit_line(xs, ys) -> tuple[float, float]:
    """y = intercept + slope * x by least squares on the relative error (weights 1 / y^2), so
    that a call on one image is fitted as well as a call on hundreds."""
    rows = [(1 / y**2, x, y) for x, y in zip(xs, ys, strict=True)]
    sw = sum(w for w, _, _ in rows)
    sx, sy = sum(w * x for w, x, _ in rows), sum(w * y for w, _, y in rows)
    sxx, sxy = sum(w * x * x for w, x, _ in rows), sum(w * x * y for w, x, y in rows)
    slope = (sw * sxy - sx * sy) / (sw * sxx - sx * sx)
    return (sy - slope * sx) / sw, slope


def measure(repeats: int) -> dict:
    model, diffusion, _ = load_model(pretrained("mnist"), device="cpu")
    model.eval()
    forward = {}
    steps = 10
    for size in FORWARD_BATCHES:
        # A DDIM step is one network call plus the sampler's own arithmetic on the batch, which
        # is what the chapters spend their calls on.
        def call(size=size):
            diffusion.sample(model, (size, 1, 28, 28), sampler="ddim", steps=steps, progress=False)

        forward[size] = median_seconds(call, max(3, repeats // 4)) / steps
    a, b = fit_line(list(forward), list(forward.values()))

    model.train()
    optimizer = adamw(model.parameters(), lr=1e-5, weight_decay=0.0, device=torch.device("cpu"))
    training = {}
    for size in TRAINING_BATCHES:
        x0 = torch.rand(size, 1, 28, 28) * 2 - 1

        def step(x0=x0):
            loss = Diffusion(objective=diffusion.objective).loss(model, x0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        training[size] = median_seconds(step, max(3, repeats // 4))
    c = statistics.fmean((seconds - 3 * a) / size for size, seconds in training.items())
    worst = max(abs(a + b * size - s) / s for size, s in forward.items())
    return {
        "forward_seconds": {str(k): v for k, v in forward.items()},
        "training_step_seconds": {str(k): v for k, v in training.items()},
        "seconds_per_call": a, "seconds_per_image": b, "seconds_per_training_image": c,
        "forward_fit_worst_relative_error": worst,
    }


def estimates() -> list[dict]:
    """Each chapter's work under each budget, from the package's constants: network calls
    (a training step counts 3), FLOPs (`budget.forward_flops`), minutes on the 2-core CPU and
    on a T4 (`budget.estimate_seconds`)."""
    rows = []
    for name, b in budget.BUDGETS.items():
        for chapter, work in budget.chapter_work(b).items():
            flops = sum((3 if w.train else 1) * w.images * budget.forward_flops(w.network) for w in work)
            rows.append({"chapter": chapter, "budget": name,
                         "calls": sum(w.calls * (3 if w.train else 1) for w in work),
                         "tflop": round(flops / 1e12, 1),
                         "cpu_minutes": round(budget.estimate_seconds(work) / 60, 2),
                         "t4_minutes": round(budget.estimate_seconds(work, "t4") / 60, 2)})
    return rows


def print_estimates(rows: list[dict]) -> None:
    print(f"{'chapter':<15} {'budget':<6} {'network calls':>14} {'TFLOP':>8} {'CPU min':>8} {'T4 min':>7}")
    for r in rows:
        print(f"{r['chapter']:<15} {r['budget']:<6} {r['calls']:14,} {r['tflop']:8.1f} "
              f"{r['cpu_minutes']:8.1f} {r['t4_minutes']:7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, help="write the measurement (with --chapters: the estimates) "
                        "to this JSON file")
    parser.add_argument("--chapters", action="store_true",
                        help="only print each chapter's estimate from the package's constants")
    args = parser.parse_args()
    if not args.chapters:
        result = measure(args.repeats)
        print(f"forward call: {result['seconds_per_call'] * 1e3:.2f} ms + "
              f"{result['seconds_per_image'] * 1e3:.3f} ms per image "
              f"(worst fit error {result['forward_fit_worst_relative_error']:.0%})")
        print(f"training step: 3 x the call + {result['seconds_per_training_image'] * 1e3:.3f} ms "
              "per image")
        if args.out:
            record = {
                "command": "python benchmarks/book_budget.py --out " + str(args.out),
                "date": datetime.date.today().isoformat(),
                "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
                "threads": torch.get_num_threads(), "torch": torch.__version__,
                "network": "pretrained:mnist (mnist-small)", **result,
            }
            write_text_atomic(args.out, json.dumps(record, indent=1) + "\n")
            print(f"wrote {args.out}")
    rows = estimates()
    print_estimates(rows)
    if args.chapters and args.out:
        record = {
            "command": "python benchmarks/book_budget.py --chapters --out " + str(args.out),
            "date": datetime.date.today().isoformat(),
            "assumptions": {"t4_flops_per_second": budget.T4_FLOPS,
                            "t4_seconds_per_call": budget.T4_SECONDS_PER_CALL,
                            "gpu_chapter_seconds": budget.GPU_CHAPTER_SECONDS,
                            "cpu": "the constants of benchmarks/results/book_budget.json"},
            "chapters": rows,
        }
        write_text_atomic(args.out, json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
