"""Print how long each chapter took to execute in a book build, from its execution cache.

    python .ci/book_times.py _build/.jupyter_cache [--json OUT]

myst-nb records each notebook's execution time in the jupyter-cache database it executes into.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

from jupyter_cache import get_cache


def chapter_seconds(cache_dir: Path) -> dict[str, float]:
    records = get_cache(str(cache_dir)).list_cache_records()
    return {Path(r.uri).stem: float(r.data.get("execution_seconds") or 0.0)
            for r in sorted(records, key=lambda r: Path(r.uri).stem)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache", type=Path)
    parser.add_argument("--json", type=Path, help="also write the times to this JSON file")
    args = parser.parse_args()
    seconds = chapter_seconds(args.cache)
    if not seconds:
        raise SystemExit(f"no executed notebook in {args.cache}; build the book first")
    for name, value in seconds.items():
        print(f"   {name:<22} {value:6.0f} s")
    print(f"   {'all chapters':<22} {sum(seconds.values()):6.0f} s")
    if args.json:
        record = {"budget": os.environ.get("NAIVEDIFFUSION_BUDGET", "cpu"),
                  "date": datetime.date.today().isoformat(),
                  "hardware": f"{platform.machine()}, {os.cpu_count()} CPU cores",
                  "chapter_seconds": seconds, "total_seconds": sum(seconds.values())}
        args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
