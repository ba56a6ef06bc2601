"""Ship a finished training run as a package model: naivediffusion/pretrained/NAME.*

Copies the run's ema.pt to NAME.pt and its log.jsonl to NAME_log.jsonl, picks a few of its
sample grids (the first, the last and evenly spaced ones between) into NAME_grids/, and writes
NAME.json: what the file is, the command that trained it, the hardware, the training time,
the settings, the plan of a --max-minutes run and what else ran on the machine meanwhile.

    python benchmarks/export_pretrained.py runs/mnist --name mnist \\
        --command "python -m naivediffusion train --dataset mnist ..." \\
        --hardware "2-core CPU, 1 thread" --note "another 1-thread job ran beside it"

A run that started from a shipped model (train --init-from pretrained:NAME) continues that
model's training. Pass `--previous naivediffusion/pretrained/NAME.json` (before this export
replaces it) and the new record covers all of it: "runs" lists every run in order, the log
holds the earlier runs' lines first (each line's "run" says which; "step" and "elapsed" count
on over all runs, "run_step" is the step within its run), and the grids keep the first and
last of the earlier record's, renamed by the total step, before this run's.
"""

import argparse
import datetime
import json
import platform
import shutil
import sys
from pathlib import Path

import torch

from naivediffusion.checkpoint import (
    PRETRAINED_DIR,
    load_checkpoint,
    write_atomic,
    write_text_atomic,
)


def fail(message: str) -> None:
    """A bad input: one line, exit status 2, nothing written."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run_record(ema: dict, checkpoint: dict, log: list[dict], args) -> dict:
    """One run's entry of "runs": what it did, how, where and for how long."""
    return {
        "step": ema["step"],
        "planned_steps": checkpoint.get("planned_steps"),
        "init": ema.get("init"),
        "command": args.command,
        "hardware": args.hardware,
        "torch": str(torch.__version__),
        "platform": platform.platform(),
        "train_seconds": round(checkpoint["elapsed"], 1),
        "date": datetime.date.today().isoformat(),
        "note": args.note,
        "final_loss": log[-1]["loss"],
        "train_config": ema["train_config"],
    }


def earlier_runs(previous: dict, previous_log: list[dict]) -> tuple[list[dict], list[dict]]:
    """The runs of an earlier record and its log lines, in the chained format (a record of a
    single run, from before "runs" existed, is its own first run)."""
    lines = [line if "run" in line else {**line, "run": 1, "run_step": line["step"]} for line in previous_log]
    if "runs" in previous:
        return previous["runs"], lines
    keys = ("step", "planned_steps", "command", "hardware", "torch", "platform", "train_seconds",
            "date", "note", "final_loss", "train_config")
    return [{**{key: previous.get(key) for key in keys}, "init": None}], lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a finished run folder (with ema.pt, checkpoint.pt, log.jsonl)")
    parser.add_argument("--name", required=True, help="the shipped name, e.g. mnist")
    parser.add_argument("--command", required=True, help="the command that trained the run")
    parser.add_argument("--hardware", required=True, help="where it ran, e.g. '2-core CPU, 1 thread'")
    parser.add_argument("--note", default="", help="what else ran on the machine meanwhile, etc.")
    parser.add_argument("--grids", type=int, default=5, help="sample grids of this run to ship (default: 5)")
    parser.add_argument("--previous", default=None,
                        help="the record (NAME.json) of the model the run started from with --init-from "
                             "(default: none; required for such a run)")
    parser.add_argument("--out-dir", default=str(PRETRAINED_DIR), help="default: the package's pretrained/")
    args = parser.parse_args()

    run_dir, out = Path(args.run_dir), Path(args.out_dir)
    ema = load_checkpoint(run_dir / "ema.pt")
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    if len(grids) > args.grids:
        grids = [grids[round(i * (len(grids) - 1) / (args.grids - 1))] for i in range(args.grids)]
    if ema.get("init") and args.previous is None:
        fail(f"{run_dir} started from {ema['init']['path']} (--init-from); pass --previous with that "
             "model's record (its .json) so that the shipped record covers all of its training")

    # Everything of an earlier record is read before anything is written: it may be the very
    # files this export replaces.
    runs, lines, grid_bytes = [], [], {}
    if args.previous:
        previous_path = Path(args.previous)
        previous = json.loads(previous_path.read_text())
        previous_log = [json.loads(line) for line in
                        (previous_path.parent / previous["log"].split(":")[0]).read_text().splitlines()]
        runs, lines = earlier_runs(previous, previous_log)
        if not ema.get("init") or ema["init"]["step"] != runs[-1]["step"]:
            fail(f"{run_dir} did not start (--init-from) from the model that {previous_path} "
                 f"records (at step {runs[-1]['step']} of its last run); pass the record of the "
                 "model it started from, or no --previous")
        kept = [previous["grids"][0], previous["grids"][-1]] if len(previous["grids"]) > 1 else previous["grids"]
        grid_bytes = {Path(name).name: (previous_path.parent / name).read_bytes() for name in kept}
    steps_before = sum(r["step"] for r in runs)
    seconds_before = sum(r["train_seconds"] for r in runs)
    run_number = len(runs) + 1
    lines += [{**line, "run": run_number, "run_step": line["step"], "step": steps_before + line["step"],
               "elapsed": round(seconds_before + line["elapsed"], 3)} if runs else line for line in log]
    runs.append(run_record(ema, checkpoint, log, args))
    for path in grids:
        grid_bytes[f"step_{steps_before + int(path.stem.removeprefix('step_')):06d}.png"] = path.read_bytes()

    out.mkdir(parents=True, exist_ok=True)
    # Each file is swapped in whole (checkpoint.write_atomic): an export that dies midway leaves the
    # shipped files as they were or replaced, never a half-written model or record.
    weights = (run_dir / "ema.pt").read_bytes()
    write_atomic(out / f"{args.name}.pt", lambda f: f.write(weights))
    write_text_atomic(out / f"{args.name}_log.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    grid_dir = out / f"{args.name}_grids"
    shutil.rmtree(grid_dir, ignore_errors=True)
    grid_dir.mkdir()
    for name, data in grid_bytes.items():
        (grid_dir / name).write_bytes(data)

    config = ema["train_config"]
    parameters = sum(v.numel() for v in ema["ema"].values() if v.is_floating_point())
    chained = len(runs) > 1
    last = runs[-1]
    provenance = {
        "what": f"EMA weights of the {config['model']!r} U-Net ({parameters / 1e6:.2f}M parameters) "
                f"trained on {config['dataset']}" + (f" in {len(runs)} runs, each from the last one's "
                                                     "weights" if chained else ""),
        # The last run's entry (its command, planned_steps, train_config, ...), with the steps
        # and the training time counted over all runs; "runs" has each.
        **{key: value for key, value in last.items() if key != "init"},
        "step": steps_before + last["step"],
        "train_seconds": round(seconds_before + last["train_seconds"], 1),
        "runs": runs,
        "log": f"{args.name}_log.jsonl: " + ("the runs' log.jsonl files in order; per line, \"run\" "
               "(1, 2, ...), \"run_step\" (the step within it), \"step\" and \"elapsed\" counted over "
               "all runs" if chained else "the run's log.jsonl"),
        "grids": [f"{args.name}_grids/{name}" for name in sorted(grid_bytes)],
    }
    write_text_atomic(out / f"{args.name}.json", json.dumps(provenance, indent=2) + "\n")
    print(f"{run_dir} (step {ema['step']}, {checkpoint['elapsed']:.0f} s of training"
          + (f"; {provenance['step']} steps and {provenance['train_seconds']:.0f} s over {len(runs)} runs"
             if chained else "") + f") -> {out / args.name}.pt, .json, _log.jsonl and {len(grid_bytes)} grids")


if __name__ == "__main__":
    main()
