"""The chapters are stored as the book build expects them: no outputs (the build executes
them), and every cell with its own id (nbformat 4.5; a missing id is a validation warning
today and an error in future nbformat versions)."""

import json
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_stored_without_outputs_and_with_cell_ids(path):
    raw = json.loads(path.read_text())
    assert (raw["nbformat"], raw["nbformat_minor"]) >= (4, 5)
    ids = [cell.get("id") for cell in raw["cells"]]
    assert all(ids), f"{path.name}: cells {[i for i, c in enumerate(ids) if not c]} have no id"
    assert len(set(ids)) == len(ids), f"{path.name}: repeated cell ids"
    for index, cell in enumerate(raw["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name}: cell {index}"
    nbformat.validate(nbformat.reads(path.read_text(), as_version=4))


def test_every_chapter_is_checked():
    assert len(NOTEBOOKS) >= 7


def _colab_cell(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "".join(next(c for c in cells if c["cell_type"] == "code")["source"])


def test_every_chapter_opens_with_the_same_colab_cell():
    cells = {path.name: _colab_cell(path) for path in NOTEBOOKS}
    assert len(set(cells.values())) == 1, sorted(cells)
    assert "google.colab" in next(iter(cells.values()))


@pytest.mark.parametrize("imported", [False, True])
def test_the_colab_cell_replaces_an_older_install_every_time(monkeypatch, capsys, imported):
    """Run in a pretend Colab, the first cell removes the installed package and installs the
    code on GitHub (pip keeps an install whose version number is unchanged); it touches no other
    package (Colab's torch stays), and says when the kernel still holds the old modules."""
    import subprocess
    import sys
    import types

    commands = []
    monkeypatch.setattr(subprocess, "run", lambda args, check: commands.append((args, check)))
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    if imported:
        monkeypatch.setitem(sys.modules, "naivediffusion", types.ModuleType("naivediffusion"))
    else:
        monkeypatch.delitem(sys.modules, "naivediffusion", raising=False)
    exec(_colab_cell(NOTEBOOKS[0]), {})
    pip = [sys.executable, "-m", "pip", "-q"]
    assert commands == [([*pip, "uninstall", "-y", "naivediffusion"], True),
                        ([*pip, "install", "git+https://github.com/liuximeng09/NaiveDiffusion"], True)]
    assert ("Restart the session" in capsys.readouterr().out) == imported


def test_the_colab_cell_does_nothing_elsewhere(monkeypatch):
    import subprocess
    import sys

    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("ran a command outside Colab"))
    exec(_colab_cell(NOTEBOOKS[0]), {})


def test_the_results_page_reads_every_record():
    """Every JSON record that ships (beside the models, and the benchmarks' outputs) is read by
    the Results appendix, so that no measured number is left out of it."""
    root = Path(__file__).resolve().parents[1]
    page = "".join("".join(c["source"]) for c in json.loads((root / "appendix" / "results.ipynb").read_text())["cells"])
    records = [p.name for p in (root / "benchmarks" / "results").glob("*.json")]
    assert records, "no benchmark records"
    for name in records:
        assert name in page or name.startswith("gpu_"), f"appendix/results.ipynb does not show {name}"
    for name in (p.stem for p in (root / "naivediffusion" / "pretrained").glob("*.json")):
        assert f'pretrained_record("{name}")' in page, f"appendix/results.ipynb does not show {name}.json"
