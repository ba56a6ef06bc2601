"""The chapters read as a book, not a lab notebook (see CONTRIBUTING.md, "The book"): each
teaches one idea in at most about 3,500 words, ends with what it added and 3-5 exercises with
their hints or solutions folded away, hides its install and plotting code, and carries no dates
or machine details (those belong to the Results appendix)."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MAX_WORDS = 3_600  # "at most about 3,500"


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def prose_words(path: Path) -> int:
    """Words of the Markdown cells, without fenced code and display math."""
    words = 0
    for cell in cells(path):
        if cell["cell_type"] == "markdown":
            text = re.sub(r"```.*?```|\$\$.*?\$\$", "", source(cell), flags=re.S)
            words += len(text.split())
    return words


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_a_chapter_is_at_most_about_3500_words(path):
    assert prose_words(path) <= MAX_WORDS, prose_words(path)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_a_chapter_ends_with_what_it_added_and_exercises(path):
    text = "\n".join(source(c) for c in cells(path) if c["cell_type"] == "markdown")
    added, exercises = text.find("## What we added to naivediffusion"), text.find("## Exercises")
    assert 0 <= added < exercises, "'## What we added to naivediffusion' then '## Exercises'"
    section = text[exercises:]
    numbered = re.findall(r"^\d+\.\s", section, re.M)
    assert 3 <= len(numbered) <= 5, f"{len(numbered)} exercises"
    assert section.count("{dropdown}") >= len(numbered), "each exercise has a hint or solution in a dropdown"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_install_cell_removed_and_plotting_cells_hidden(path):
    code = [c for c in cells(path) if c["cell_type"] == "code"]
    assert "remove-cell" in code[0]["metadata"].get("tags", []), "the Colab install cell is remove-cell"
    for cell in code:
        text = source(cell)
        plots = "plt.show()" in text or "plt.subplots" in text
        if plots and "assert" not in text:
            tags = cell["metadata"].get("tags", [])
            assert "hide-input" in tags or "remove-input" in tags, text[:120]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_no_dates_or_machine_details_in_a_chapter(path):
    for cell in cells(path):
        text = source(cell)
        assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), text[:200]
        if cell["cell_type"] == "markdown":
            assert not re.search(r"\b\d+ threads?\b|\bthreads?\b.*\bcores?\b", text), text[:200]
