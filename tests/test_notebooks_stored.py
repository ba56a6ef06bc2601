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
