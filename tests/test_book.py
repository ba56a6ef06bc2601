"""The built book: every chapter page renders its math, figures and Colab link, without errors.

These tests read the HTML that `jupyter-book build . -W --keep-going` writes to _build/html.
If that build is missing or older than its sources (the pages, the config, or the package's
own modules, which every chapter runs), the module builds the book first, so a plain `pytest`
works on a fresh clone (the notebooks are executed during the build).
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


def toc_files(repo: Path = REPO) -> list[str]:
    """The pages of _toc.yml in reading order (without extension), the root first."""
    text = (repo / "_toc.yml").read_text()
    root = re.search(r"^root:\s*(\S+)", text, re.M)
    files = re.findall(r"^\s*-?\s*file:\s*(\S+)", text, re.M)
    return ([root.group(1)] if root else []) + files


CHAPTERS = [f for f in toc_files() if f.startswith("notebooks/")]


def source_of(page: str, repo: Path = REPO) -> Path:
    """The source file of a toc entry: a notebook or a markdown page."""
    for suffix in (".ipynb", ".md"):
        if (repo / (page + suffix)).exists():
            return repo / (page + suffix)
    raise FileNotFoundError(f"{page}.ipynb or {page}.md, listed in _toc.yml, does not exist")


def package_sources(repo: Path = REPO) -> list[Path]:
    """The package's Python files, which every chapter imports and runs."""
    return sorted((repo / "naivediffusion").rglob("*.py"))


def build_is_stale(repo: Path = REPO, html: Path = HTML) -> str | None:
    """Why the built book is out of date, or None if it is not.

    "pages": some page's HTML is missing or older than its source, or every page is older
    than the config. "package": some file of naivediffusion/ is newer than some page. The
    execution cache (_build/.jupyter_cache) keys a notebook by its code cells only, so a
    change in the package needs the cache cleared and every page rebuilt (see `book`).
    """
    pages = toc_files(repo)
    built = [html / (page + ".html") for page in pages]
    if not all(path.exists() for path in built):
        return "pages"
    if any(source_of(page, repo).stat().st_mtime > page_html.stat().st_mtime
           for page, page_html in zip(pages, built, strict=True)):
        return "pages"
    newest_config = max((repo / name).stat().st_mtime for name in CONFIG_FILES
                        if (repo / name).exists())
    if newest_config > max(path.stat().st_mtime for path in built):
        return "pages"
    oldest_page = min(path.stat().st_mtime for path in built)
    if any(source.stat().st_mtime > oldest_page for source in package_sources(repo)):
        return "package"
    return None


def jupyter_book() -> list[str]:
    exe = shutil.which("jupyter-book") or str(Path(sys.executable).with_name("jupyter-book"))
    return [exe]


@pytest.fixture(scope="module")
def book() -> Path:
    """The built HTML folder, building the book first when needed."""
    stale = build_is_stale()
    if stale:
        env = dict(os.environ)
        # The notebooks' figures come from the inline backend of the Jupyter kernel; a
        # non-interactive backend such as Agg (set for plain pytest runs) would drop them.
        env.pop("MPLBACKEND", None)
        extra = []
        if stale == "package":
            # Cached outputs were made with the old package: execute every chapter again.
            shutil.rmtree(REPO / "_build" / ".jupyter_cache", ignore_errors=True)
            extra = ["--all"]
        result = subprocess.run(
            [*jupyter_book(), "build", ".", "-W", "--keep-going", *extra],
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


def test_staleness_counts_the_package_sources(tmp_path):
    """A fake book in tmp_path: built pages newer than everything are fresh; touching a
    notebook, the config or a package module makes the build stale."""
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n"
                                       "- file: notebooks/01_a\n")
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "intro.md").write_text("# intro\n")
    (tmp_path / "notebooks" / "01_a.ipynb").write_text("{}")
    (tmp_path / "_config.yml").write_text("title: t\n")
    (tmp_path / "naivediffusion" / "sub").mkdir(parents=True)
    for name in ("__init__.py", "diffusion.py", "sub/part.py"):
        (tmp_path / "naivediffusion" / name).write_text("")
    html = tmp_path / "_build" / "html"
    (html / "notebooks").mkdir(parents=True)
    assert build_is_stale(tmp_path, html) == "pages"  # nothing built yet

    def set_time(path, seconds):
        os.utime(path, (seconds, seconds))

    sources = [tmp_path / "_toc.yml", tmp_path / "intro.md", tmp_path / "notebooks" / "01_a.ipynb",
               tmp_path / "_config.yml", *package_sources(tmp_path)]
    assert len(package_sources(tmp_path)) == 3
    for path in sources:
        set_time(path, 1_000)
    pages = [html / "intro.html", html / "notebooks" / "01_a.html"]
    for page in pages:
        page.write_text("<html></html>")
        set_time(page, 2_000)
    assert build_is_stale(tmp_path, html) is None

    set_time(tmp_path / "naivediffusion" / "diffusion.py", 1_500)  # older than every page
    assert build_is_stale(tmp_path, html) is None
    set_time(pages[0], 1_400)  # ... but newer than one of them
    assert build_is_stale(tmp_path, html) == "package"
    set_time(pages[0], 2_000)
    set_time(tmp_path / "naivediffusion" / "sub" / "part.py", 3_000)
    assert build_is_stale(tmp_path, html) == "package"
    set_time(tmp_path / "naivediffusion" / "sub" / "part.py", 1_000)
    set_time(tmp_path / "notebooks" / "01_a.ipynb", 3_000)
    assert build_is_stale(tmp_path, html) == "pages"
    set_time(tmp_path / "notebooks" / "01_a.ipynb", 1_000)
    set_time(tmp_path / "_config.yml", 3_000)
    assert build_is_stale(tmp_path, html) == "pages"


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


def test_results_page_renders_its_tables(book):
    """The Results appendix displays its records as Markdown tables: parsed as tables, not
    shown as text (myst-nb's default CommonMark has no tables)."""
    html = (book / "appendix" / "results.html").read_text()
    assert html.count("<table") >= 4
    assert "| --- |" not in html and "|---" not in html
