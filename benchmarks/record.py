"""What every JSON record under benchmarks/results/ says about how it was made.

The Results appendix of the book prints each measured number beside the command, the hardware
and the date that made it; `provenance()` is where a benchmark gets them, and `write_record`
writes the record atomically (an interrupted write leaves the previous file whole).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys

import torch

from naivediffusion.checkpoint import write_text_atomic


def hardware() -> str:
    """"NVIDIA H100 80GB HBM3" with a GPU, else the CPU and its core count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"


def provenance(argv: list[str] | None = None) -> dict:
    """The command (this script and `argv`, by default the process's arguments), the date, the
    hardware, torch's threads and version, and the platform."""
    argv = sys.argv[1:] if argv is None else argv
    script = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "benchmarks"
    return {"command": " ".join(shlex.quote(a) for a in ["python", script, *argv]),
            "date": datetime.date.today().isoformat(), "hardware": hardware(),
            "threads": torch.get_num_threads(), "torch": str(torch.__version__),
            "platform": platform.platform()}


def write_record(path, record: dict) -> None:
    write_text_atomic(path, json.dumps(record, indent=1) + "\n")
