"""README.md is a front page: short, it links the published book and each chapter, its
set-up commands are the ones CI runs, its quick start runs, and its results table is exactly
the extract of the records that benchmarks/readme_table.py prints."""

import re
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_is_a_short_front_page_that_links_the_book():
    assert len(README.splitlines()) <= 160
    baseurl = re.search(r"^\s*baseurl:\s*(\S+)", (ROOT / "_config.yml").read_text(), re.M).group(1).rstrip("/")
    assert f"({baseurl}/)" in README
    pages = re.findall(r"^\s*-\s*file:\s*(\S+)", (ROOT / "_toc.yml").read_text(), re.M)
    for page in pages:
        if page.startswith(("notebooks/", "appendix/")):
            assert f"({baseurl}/{page}.html)" in README, page
    assert (ROOT / "assets" / "mnist_samples.png").exists() and "(assets/mnist_samples.png)" in README


def test_the_setup_commands_are_the_ones_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "```bash\npip install -r requirements.txt\npytest\n```" in README
    assert "pip install -q -r requirements.txt" in ci and "python -m pytest" in ci


def test_the_results_table_is_the_records_extract():
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "readme_table.py")], check=True,
                           capture_output=True, text=True).stdout
    assert table.strip() in README, "README's results table differs from the records: run " \
        "python benchmarks/readme_table.py and paste its output under ## Results"
    assert len([line for line in table.splitlines() if line.startswith("| ")]) - 2 <= 8


def test_the_quick_start_runs(tmp_path, monkeypatch):
    code = re.search(r"## Quick start\n\n```python\n(.*?)```", README, re.S).group(1)
    assert len(code.strip().splitlines()) <= 10
    monkeypatch.chdir(tmp_path)
    # The same code, with 4 images and 2 DDIM steps so that the test is quick.
    small = code.replace(", 64, ", ", 4, ").replace('info["image_shape"],', 'info["image_shape"], steps=2,')
    assert small != code
    runpy.run_path(str(_write(tmp_path / "quick.py", small)))
    assert (tmp_path / "digits.png").stat().st_size > 0


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
