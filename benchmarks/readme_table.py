"""README's results table: a short extract of the book's Results appendix, from the same records.

    python benchmarks/readme_table.py        # prints the table that README.md holds

tests/test_readme.py checks that README.md holds exactly this table, so the front page never
states a number that its records do not.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import naivediffusion as nd

RESULTS = Path(__file__).resolve().parent / "results"
RESULTS_PAGE = "https://liuximeng09.github.io/NaiveDiffusion/appendix/results.html"


def record(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def bounds(result: dict, variances: tuple[str, ...]) -> str:
    """"b1 ± se1; b2 ± se2": the bits/dim of a targets record's result under each variance."""
    return "; ".join(f"{result['bpd'][v]['bpd']:.3f} ± {result['bpd'][v]['bpd_standard_error']:.3f}"
                     for v in variances)


def rows() -> list[tuple[str, str]]:
    """(what, number) for each row, from the records that exist."""
    shipped = nd.pretrained_record("mnist")
    out = [("`pretrained:mnist` (`mnist-small`, 0.41M parameters, v-prediction) trained on a CPU",
            f"{shipped['step']:,} steps in {sum(r['train_seconds'] for r in shipped['runs']) / 3600:.1f} hours")]
    row = next(r for r in shipped["sampler_measurement"]["rows"] if r["steps"] == 50 and r["eta"] == 1)
    out.append(("its Fréchet distance in the package classifier's features, 1,000 DDIM-50 samples "
                "(real-data floor); its smudges (no digit the classifier can name)",
                f"{row['fd']:.2f} ({row['fd_real']:.2f}); {row['smudges']:.1%}"))
    targets = record("targets_mnist.json")
    if targets is not None:
        out.append(("its bits/dim on the MNIST test set, with its own reverse variance beta_t; "
                    "with beta-tilde_t (a second model on the same network)",
                    bounds(targets["results"][0], ("beta", "posterior"))))
    samplers = record("samplers_mnist.json")
    if samplers is not None:
        name, numbers = min(samplers["summary"].items(), key=lambda kv: statistics.median(kv[1]["fd_over_floor"]))
        out.append((f"its best sampler at 20 network calls ({name}): score within 2x the floor",
                    f"in {numbers['within_2x_floor']} of {numbers['draws']} draws"))
    conditional = nd.pretrained_record("mnist_conditional")
    w = conditional["recommended_guidance"]["w"]
    result = conditional["guidance_measurement"]["results"][f"{w:g}"]
    out.append((f"`pretrained:mnist_conditional` at guidance w = {w:g}: the digit asked for",
                f"{result['accuracy']:.1%} of 1,000"))
    learned = record("targets_mnist_learned.json")
    if learned is not None:
        out.append(("`pretrained:mnist_learned` (chapter 9, a learned reverse variance): bits/dim under it; "
                    "under beta-tilde_t", bounds(learned["results"][0], ("learned", "posterior"))))
    browser = record("browser_sampling.json")
    if browser is not None:
        times = {(r["model"], r["n"]): r["median_ms"] for r in browser["results"]}
        out.append(("DDIM-20 in the reader's browser (headless Chromium, WebAssembly, 1 thread): 1 digit; 16 digits",
                    f"{times['mnist', 1] / 1000:.2f} s; {times['mnist', 16] / 1000:.1f} s"))
    build = record("book_build.json")
    out.append(("the published book (budget `cpu`) built and executed on 2 CPU cores",
                f"{build['total_seconds'] / 60:.0f} minutes"))
    return out


def table() -> str:
    lines = ["| measured | |", "| --- | --- |"] + [f"| {what} | {number} |" for what, number in rows()]
    return "\n".join(lines) + f"\n\nEvery number with its command, hardware and date: [Results]({RESULTS_PAGE}).\n"


if __name__ == "__main__":
    print(table(), end="")
