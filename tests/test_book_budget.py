"""The chapters' compute budgets: the published build (`cpu`) stays inside its time, every size a
chapter spends compute on comes from the `Budget`, and a chapter that is cheap under the `gpu`
budget's sizes runs under them on the CPU with all of its asserts.

The `ci` budget runs under nbval (pytest) and the `cpu` budget in the published build
(.ci/build_book), so every chapter's asserts run under both in CI. Under `gpu` the asserts
whose outcome depends on a sample size are argued in a comment beside them where running
them on a CPU is not cheap.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient
from torch.utils.flop_counter import FlopCounterMode

from naivediffusion import UNet, budget

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
RECORD = REPO / "benchmarks" / "results" / "book_budget.json"

# The published build on a 2-core CPU: about 3 minutes a chapter, about 10 for the book
# (the network work counted here; loading data, classifier features and plots come on top).
CHAPTER_CEILING_SECONDS = 150
BOOK_CEILING_SECONDS = 480


def code_of(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


@pytest.mark.parametrize("chapter", sorted(budget.chapter_work(budget.BUDGETS["cpu"])))
def test_cpu_budget_of_each_chapter_stays_under_its_ceiling(chapter):
    work = budget.chapter_work(budget.BUDGETS["cpu"])[chapter]
    seconds = budget.estimate_seconds(work)
    calls = sum(w.calls * (3 if w.train else 1) for w in work)
    assert 0 < seconds <= CHAPTER_CEILING_SECONDS, (chapter, calls, seconds)


def test_cpu_budget_of_the_book_stays_under_its_ceiling():
    work = budget.chapter_work(budget.BUDGETS["cpu"])
    assert sum(budget.estimate_seconds(w) for w in work.values()) <= BOOK_CEILING_SECONDS


@pytest.mark.parametrize("chapter", sorted(budget.chapter_work(budget.BUDGETS["gpu"])))
def test_gpu_budget_of_each_chapter_fits_a_colab_t4(chapter):
    """The `gpu` budget's FLOPs, recounted from the presets on the meta device, at the stated
    T4 throughput, stay under GPU_CHAPTER_SECONDS (about 10 minutes a chapter)."""
    work = budget.chapter_work(budget.BUDGETS["gpu"])[chapter]
    flops = 0
    for w in work:
        with torch.device("meta"):
            model = UNet.from_preset(w.network)
        size, channels = model.config["image_size"], model.config["in_channels"]
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, channels, size, size, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"))
        flops += (3 if w.train else 1) * w.images * counter.get_total_flops()
    assert flops <= budget.GPU_CHAPTER_SECONDS * budget.T4_FLOPS, (chapter, flops / 1e12)
    seconds = budget.estimate_seconds(work, "t4")
    assert flops / budget.T4_FLOPS <= seconds <= budget.GPU_CHAPTER_SECONDS, (chapter, seconds)


def test_the_work_grows_with_the_budget():
    ci, cpu, gpu = (budget.chapter_work(budget.BUDGETS[n]) for n in ("ci", "cpu", "gpu"))
    for chapter in cpu:
        costs = [budget.estimate_seconds(w[chapter]) for w in (ci, cpu, gpu)]
        assert costs == sorted(costs), (chapter, costs)


def test_an_estimate_counts_calls_images_and_training():
    one = budget.Work("mnist-small", calls=10, images=40)
    assert math.isclose(budget.estimate_seconds([one]), 10 * budget.CPU_SECONDS_PER_CALL
                        + 40 * budget.CPU_SECONDS_PER_IMAGE)
    step = budget.Work("mnist-small", calls=1, images=64, train=True)
    assert math.isclose(budget.estimate_seconds([step]), 3 * budget.CPU_SECONDS_PER_CALL
                        + 64 * budget.CPU_SECONDS_PER_TRAINING_IMAGE)
    # A T4: launch-bound calls plus the FLOPs counted on the meta device.
    flops = budget.forward_flops("mnist-small")
    assert 0.05e9 < flops < 0.5e9  # about 0.14 GFLOP per 28x28 image
    assert budget.forward_flops("mnist") > 2 * flops
    assert math.isclose(budget.estimate_seconds([one], "t4"),
                        10 * budget.T4_SECONDS_PER_CALL + 40 * flops / budget.T4_FLOPS)
    with pytest.raises(ValueError, match="cpu or t4"):
        budget.estimate_seconds([one], "tpu")


def test_the_cpu_constants_are_the_measured_ones():
    """budget.py's constants come from benchmarks/book_budget.py's record (rounded)."""
    record = json.loads(RECORD.read_text())
    for constant, key in [(budget.CPU_SECONDS_PER_CALL, "seconds_per_call"),
                          (budget.CPU_SECONDS_PER_IMAGE, "seconds_per_image"),
                          (budget.CPU_SECONDS_PER_TRAINING_IMAGE, "seconds_per_training_image")]:
        assert math.isclose(constant, record[key], rel_tol=0.05), (key, constant, record[key])


def test_a_chapter_opening_states_its_time():
    line = budget.describe_cost("06_evaluation", budget.BUDGETS["cpu"])
    assert line.startswith("budget 'cpu': ") and "2-core CPU" in line and "Colab T4" in line
    assert re.search(r"about \d+ min with the 'gpu' budget", line)
    assert "the same under every budget" in budget.describe_cost("01_forward_process")
    for path in NOTEBOOKS:  # every chapter states its time in its opening cells
        assert f'describe_cost("{path.stem}"' in code_of(path), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_sizes_come_from_the_budget(path):
    """No chapter picks a size by the budget's name: a size is a field of Budget, which
    `chapter_work` counts. (A chapter may still choose *what* to run by the name.)"""
    code = code_of(path)
    assert not re.search(r'\{\s*"ci"\s*:', code), "a size chosen from a dict keyed by budget names"
    assert not re.search(r'\b\d[\d_]*\s+if\s+budget\.name\s*[!=]=\s*"\w+"\s*else\s+\d', code), (
        "a size chosen by the budget's name in a conditional expression")
    assert re.search(r'\b\d[\d_]*\s+if\s+budget\.name\s*[!=]=\s*"\w+"\s*else\s+\d',
                     'pool_size = 10_000 if budget.name == "ci" else 60_000')  # what it catches
    fields = set(re.findall(r"\bbudget\.(\w+)", code)) - {"name", "describe_cost"}
    assert fields <= set(budget.Budget.__dataclass_fields__), fields
    if path.stem not in budget.chapter_work(budget.BUDGETS["cpu"]):
        # Its work does not depend on the budget, so it runs the same under all three.
        assert not fields, f"{path.name} uses {fields} but chapter_work does not count it"


def test_chapter_5_runs_under_the_gpu_sizes(monkeypatch, tmp_path):
    """Chapter 5 under the `gpu` budget's sizes is cheap on a CPU (16 images per run): run it
    whole, so that every assert of it holds under all three budgets."""
    monkeypatch.setenv(budget.ENV_VAR, "gpu")
    monkeypatch.delenv("MPLBACKEND", raising=False)
    notebook = nbformat.read(REPO / "notebooks" / "05_sampling.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "budget: gpu" in printed and f"DDPM samples: {budget.BUDGETS['gpu'].ddpm_images} image" in printed
    assert os.environ[budget.ENV_VAR] == "gpu"
