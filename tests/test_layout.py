"""CONTRIBUTING.md's module table is true: every module of the package in one row, with its
size in lines to within 10%, and every module within the size limits the table states."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "naivediffusion"
ROW = re.compile(r"^\| `(?P<module>[\w.]+\.py)` \| (?P<lines>\d+) \| (?P<idea>[^|]+) \| (?P<chapter>[^|]+) \|$")


def table() -> dict[str, int]:
    rows = [ROW.match(line) for line in (ROOT / "CONTRIBUTING.md").read_text().splitlines()]
    found = [(m["module"], int(m["lines"])) for m in rows if m]
    assert len({name for name, _ in found}) == len(found), "a module has two rows"
    return dict(found)


def test_the_table_lists_every_module_with_its_size():
    rows = table()
    modules = {path.name: len(path.read_text().splitlines()) for path in PACKAGE.glob("*.py")}
    assert sorted(rows) == sorted(modules)
    for name, lines in modules.items():
        assert abs(rows[name] - lines) <= 0.1 * lines, (name, rows[name], lines)


# The CLI holds four subcommands' argument parsers and runners; it is the one module above the
# aim of 600 lines (every function in it is short).
MODULE_LINES = {"__main__.py": 700}


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_modules_classes_and_functions_stay_readable(path):
    source = path.read_text()
    assert len(source.splitlines()) <= MODULE_LINES.get(path.name, 600)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            assert node.end_lineno - node.lineno + 1 <= 400, (path.name, node.name)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body[1:] if ast.get_docstring(node) else node.body
            code = body[-1].end_lineno - body[0].lineno + 1 if body else 0
            assert code <= 60, (path.name, node.name, code)
