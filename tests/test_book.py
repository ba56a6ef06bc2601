"""The built book: every chapter page renders its math, figures and Colab link, without errors.

These tests read the HTML that `jupyter-book build . -W --keep-going` writes to _build/html.
If that build is missing or older than its sources, the module builds the book first, so a
plain `pytest` works on a fresh clone (the notebooks are executed during the build).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HTML = REPO / "_build" / "html"
CONFIG_FILES = ("_config.yml", "_toc.yml", "references.bib")
COLAB = "https://colab.research.google.com/github/liuximeng09/NaiveDiffusion/blob/main/"


def toc_files() -> list[str]:
    """The pages of _toc.yml in reading order (without extension), the root first."""
    text = (REPO / "_toc.yml").read_text()
    root = re.search(r"^root:\s*(\S+)", text, re.M)
    files = re.findall(r"^\s*-?\s*file:\s*(\S+)", text, re.M)
    return ([root.group(1)] if root else []) + files


CHAPTERS = [f for f in toc_files() if f.startswith("notebooks/")]


def source_of(page: str) -> Path:
    """The source file of a toc entry: a notebook or a markdown page."""
    for suffix in (".ipynb", ".md"):
        if (REPO / (page + suffix)).exists():
            return REPO / (page + suffix)
    raise FileNotFoundError(f"{page}.ipynb or {page}.md, listed in _toc.yml, does not exist")


def build_is_stale() -> bool:
    """True if some page's HTML is missing or older than its source, or than the config."""
    pages = toc_files()
    built = [HTML / (page + ".html") for page in pages]
    if not all(path.exists() for path in built):
        return True
    if any(source_of(page).stat().st_mtime > html.stat().st_mtime
           for page, html in zip(pages, built, strict=True)):
        return True
    newest_config = max((REPO / name).stat().st_mtime for name in CONFIG_FILES
                        if (REPO / name).exists())
    return newest_config > max(html.stat().st_mtime for html in built)


def jupyter_book() -> list[str]:
    exe = shutil.which("jupyter-book") or str(Path(sys.executable).with_name("jupyter-book"))
    return [exe]


@pytest.fixture(scope="module")
def book() -> Path:
    """The built HTML folder, building the book first when needed."""
    if build_is_stale():
        env = dict(os.environ)
        # The notebooks' figures come from the inline backend of the Jupyter kernel; a
        # non-interactive backend such as Agg (set for plain pytest runs) would drop them.
        env.pop("MPLBACKEND", None)
        result = subprocess.run(
            [*jupyter_book(), "build", ".", "-W", "--keep-going"],
            cwd=REPO, env=env, capture_output=True, text=True,
        )
        assert result.returncode == 0, (
            "jupyter-book build . -W --keep-going failed:\n" + result.stdout[-4000:]
            + result.stderr[-4000:]
        )
    return HTML


class PageParser(HTMLParser):
    """Collects what the tests look for in one HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.divs: list[set[str]] = []  # the classes of each open <div>
        self.math: list[str] = []  # text of elements with class "math"
        self.math_depth = 0
        self.output_images: list[str] = []  # <img> src inside cell outputs
        self.links: list[str] = []
        self.scripts: list[str] = []
        self.tracebacks = 0  # outputs rendered as a traceback
        self.stderr: list[str] = []  # text of stderr outputs
        self.stderr_depth = 0
        self.output_text: list[str] = []  # all text inside cell outputs
        self.citations: list[str] = []  # text of bibliography entries
        self.citation_depth = 0
        self.text: list[str] = []  # all text of the page

    def in_class(self, name: str) -> bool:
        return any(name in classes for classes in self.divs)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        if tag == "div":
            self.divs.append(classes)
            if {"output", "traceback"} <= classes:
                self.tracebacks += 1
            if {"output", "stderr"} <= classes:
                self.stderr_depth = len(self.divs)
                self.stderr.append("")
            if "citation" in classes:
                self.citation_depth = len(self.divs)
                self.citations.append("")
        if "math" in classes and tag in ("span", "div"):
            self.math_depth += 1
            self.math.append("")
        if tag == "img" and self.in_class("cell_output"):
            self.output_images.append(attrs.get("src") or "")
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag == "script" and attrs.get("src"):
            self.scripts.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "div" and self.divs:
            if len(self.divs) == self.stderr_depth:
                self.stderr_depth = 0
            if len(self.divs) == self.citation_depth:
                self.citation_depth = 0
            self.divs.pop()
        if tag in ("span", "div") and self.math_depth:
            self.math_depth -= 1

    def handle_data(self, data):
        self.text.append(data)
        if self.math_depth:
            self.math[-1] += data
        if self.stderr_depth:
            self.stderr[-1] += data
        if self.citation_depth:
            self.citations[-1] += data
        if self.in_class("cell_output"):
            self.output_text.append(data)


def parse(path: Path) -> PageParser:
    assert path.exists(), f"{path.relative_to(REPO)} was not built"
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_toc_lists_the_chapters_in_reading_order():
    assert toc_files()[0] == "intro"
    assert CHAPTERS, "_toc.yml lists no chapter under notebooks/"
    numbers = [int(re.match(r"notebooks/(\d+)_", c).group(1)) for c in CHAPTERS]
    assert numbers == sorted(numbers) and numbers[0] == 1
    for page in toc_files():
        source_of(page)  # raises if the file is missing


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_page(book, chapter):
    page = parse(book / (chapter + ".html"))

    # Rendered math: the \( ... \) and \[ ... \] blocks MathJax typesets, and MathJax itself.
    assert any(m.strip().startswith(("\\(", "\\[")) for m in page.math), "no math on the page"
    assert any("mathjax" in src.lower() for src in page.scripts), "MathJax is not loaded"

    # At least one figure produced by a code cell.
    figures = [src for src in page.output_images
               if src.startswith("data:image/png") or re.search(r"_images/.+\.png$", src)]
    assert figures, "no figure in any cell output"

    # The launch button (and badge) to open this very notebook in Colab.
    assert COLAB + chapter + ".ipynb" in page.links, "no Colab link to this notebook"

    # No cell failed: no traceback output, no error text in stderr or in any output.
    assert page.tracebacks == 0, "a cell output is a traceback"
    for text in page.stderr:
        assert "Traceback" not in text and not re.search(r"\b\w*Error\b", text), text[:500]
    assert "Traceback (most recent call last)" not in "".join(page.output_text)


def test_intro_page(book):
    page = parse(book / "intro.html")
    assert any(href.startswith("references.html#") for href in page.links), (
        "the introduction's citations do not link to the bibliography"
    )
    text = "".join(page.text)
    assert "pip install -r requirements.txt" in text
    assert "python -m naivediffusion train" in text


def test_bibliography_lists_ddpm(book):
    pages = [parse(book / (page + ".html")) for page in toc_files()]
    entries = [entry for page in pages for entry in page.citations]
    assert entries, "no bibliography in the book"
    ddpm = [e for e in entries if "Denoising diffusion probabilistic models" in e]
    assert ddpm, "the DDPM paper is not in the bibliography"
    assert all(name in ddpm[0] for name in ("Ho", "Jain", "Abbeel", "2020", "2006.11239"))
