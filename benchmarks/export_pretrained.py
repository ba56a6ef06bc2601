"""Ship a finished training run as a package model: naivediffusion/pretrained/NAME.*

Copies the run's ema.pt to NAME.pt and its log.jsonl to NAME_log.jsonl, picks a few of its
sample grids (the first, the last and evenly spaced ones between) into NAME_grids/, and writes
NAME.json: what the file is, the command that trained it, the hardware, the training time,
the settings, the plan of a --max-minutes run and what else ran on the machine meanwhile.

    python benchmarks/export_pretrained.py runs/mnist --name mnist \\
        --command "python -m naivediffusion train --dataset mnist ..." \\
        --hardware "2-core CPU, 1 thread" --note "another 1-thread job ran beside it"
"""

import argparse
import datetime
import json
import platform
import shutil
from pathlib import Path

import torch

from naivediffusion.train import PRETRAINED_DIR, load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a finished run folder (with ema.pt, checkpoint.pt, log.jsonl)")
    parser.add_argument("--name", required=True, help="the shipped name, e.g. mnist")
    parser.add_argument("--command", required=True, help="the command that trained the run")
    parser.add_argument("--hardware", required=True, help="where it ran, e.g. '2-core CPU, 1 thread'")
    parser.add_argument("--note", default="", help="what else ran on the machine meanwhile, etc.")
    parser.add_argument("--grids", type=int, default=5, help="sample grids to ship (default: 5)")
    parser.add_argument("--out-dir", default=str(PRETRAINED_DIR), help="default: the package's pretrained/")
    args = parser.parse_args()

    run_dir, out = Path(args.run_dir), Path(args.out_dir)
    ema = load_checkpoint(run_dir / "ema.pt")
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    if len(grids) > args.grids:
        grids = [grids[round(i * (len(grids) - 1) / (args.grids - 1))] for i in range(args.grids)]

    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "ema.pt", out / f"{args.name}.pt")
    shutil.copyfile(run_dir / "log.jsonl", out / f"{args.name}_log.jsonl")
    grid_dir = out / f"{args.name}_grids"
    shutil.rmtree(grid_dir, ignore_errors=True)
    grid_dir.mkdir()
    for path in grids:
        shutil.copyfile(path, grid_dir / path.name)

    config = ema["train_config"]
    parameters = sum(v.numel() for v in ema["ema"].values() if v.is_floating_point())
    provenance = {
        "what": f"EMA weights of the {config['model']!r} U-Net ({parameters / 1e6:.2f}M parameters) "
                f"trained on {config['dataset']}",
        "step": ema["step"],
        "planned_steps": checkpoint.get("planned_steps"),
        "command": args.command,
        "hardware": args.hardware,
        "torch": str(torch.__version__),
        "platform": platform.platform(),
        "train_seconds": round(checkpoint["elapsed"], 1),
        "date": datetime.date.today().isoformat(),
        "note": args.note,
        "final_loss": log[-1]["loss"],
        "train_config": config,
        "log": f"{args.name}_log.jsonl: the run's log.jsonl",
        "grids": [f"{args.name}_grids/{path.name}" for path in grids],
    }
    (out / f"{args.name}.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"{run_dir} (step {ema['step']}, {checkpoint['elapsed']:.0f} s of training) -> "
          f"{out / args.name}.pt, .json, _log.jsonl and {len(grids)} grids")


if __name__ == "__main__":
    main()
