"""How fast the book's live sampler draws in a real browser: headless Chromium, single-threaded
WebAssembly, the pages' own test hook (?nd-autorun=1, data-ms).

    python benchmarks/browser.py                 # 1 and 16 digits, DDIM-20, on both chapters' pages
    python benchmarks/browser.py --repeats 5 --json benchmarks/results/browser_sampling.json

It serves the built book (_build/html, after .ci/build_book) on 127.0.0.1, or, when there is
none, a small site made of the same files: _static/nd_sampler*.js, what .ci/prepare_static puts
in _static/nd/, and each chapter's embedding cell (`assemble_site`). data-ms is the sampling
alone (the model's download and compilation are not in it), measured by the page itself; the
first draw of each page is a warm-up and not counted. The targets: one digit in at most 1 s,
16 digits in at most 5 s.

tests/test_browser.py drives the same pages with these helpers (`site_root`, `serve`,
`chromium`, `run_hook`).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import html
import importlib.machinery
import importlib.util
import json
import os
import shutil
import statistics
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PAGES = {"mnist": "notebooks/05_sampling", "mnist_conditional": "notebooks/07_guidance"}
SCRIPTS = ("nd_sampler.js", "nd_sampler_page.js")
TARGETS_MS = {1: 1000, 16: 5000}


def load_prepare_static():
    """.ci/prepare_static as a module (it is a script without the .py suffix)."""
    loader = importlib.machinery.SourceFileLoader("prepare_static", str(ROOT / ".ci" / "prepare_static"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("prepare_static", loader))
    loader.exec_module(module)
    return module


def embedding_cell(page: str) -> str:
    """The chapter's Markdown cell that holds the sampler's element, as the book renders it."""
    notebook = json.loads((ROOT / f"{page}.ipynb").read_text())
    cells = ["".join(c["source"]) for c in notebook["cells"]
             if c["cell_type"] == "markdown" and 'id="nd-sampler"' in "".join(c["source"])]
    if len(cells) != 1:
        raise ValueError(f"{page}.ipynb has {len(cells)} cells with the sampler's element; it needs one")
    return cells[0]


def assemble_site(out: Path) -> Path:
    """A small site of the same files the book publishes: _static/ (the sampler's scripts and
    .ci/prepare_static's _static/nd/), and for each chapter a page with its embedding cell and
    the scripts in its head, as Jupyter Book includes every .js file of _static/."""
    static = out / "_static"
    static.mkdir(parents=True, exist_ok=True)
    for name in SCRIPTS:
        (static / name).write_bytes((ROOT / "_static" / name).read_bytes())
    load_prepare_static().prepare(static / "nd")
    for page in PAGES.values():
        path = out / f"{page}.html"
        path.parent.mkdir(parents=True, exist_ok=True)
        head = "".join(f'<script src="../_static/{name}"></script>' for name in SCRIPTS)
        path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(page)}"
                        f"</title>{head}</head><body>{embedding_cell(page)}</body></html>")
    return out


def built_book(root: Path = ROOT) -> Path | None:
    """_build/html if it holds both pages with the sampler and the files it loads, else None."""
    site = root / "_build" / "html"
    pages_ok = all((site / f"{p}.html").is_file() and 'id="nd-sampler"' in (site / f"{p}.html").read_text()
                   for p in PAGES.values())
    files_ok = all((site / "_static" / "nd" / f"{m}.onnx").is_file() for m in PAGES)
    return site if pages_ok and files_ok else None


def site_root(scratch: Path) -> Path:
    """The built book when there is one, else a small site assembled in `scratch`."""
    return built_book() or assemble_site(scratch)


class _QuietHandler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".wasm": "application/wasm"}

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve(site: Path):
    """Serve `site` on 127.0.0.1 (a free port) from a thread; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def find_browser() -> tuple[str, str]:
    """(the browser, its driver): Debian's chromium and chromedriver (apt-get install chromium
    chromium-driver), or Chrome and the driver that GitHub's runners carry ($CHROMEWEBDRIVER)."""
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver") or shutil.which(
        "chromedriver", path=os.environ.get("CHROMEWEBDRIVER", ""))
    if not browser or not driver:
        raise FileNotFoundError("no Chromium and chromedriver found; install them with: "
                                "apt-get install chromium chromium-driver")
    return browser, driver


@contextlib.contextmanager
def chromium():
    """Headless Chromium driven by selenium through chromedriver (`find_browser`)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def run_hook(driver, url: str, timeout: float = 120.0) -> dict:
    """Open `url` (a page with the ?nd-autorun=1 hook) and wait until data-status is done or
    error; returns {"status", "line", "ms", "images" (uint8 [N, H, W]) when done}."""
    driver.get(url)
    deadline = time.monotonic() + timeout
    script = "const e = document.getElementById('nd-sampler'); return e ? e.dataset.status || '' : null;"
    while (status := driver.execute_script(script)) not in ("done", "error"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}: the sampler's data-status is {status!r} after {timeout:.0f} s")
        time.sleep(0.1)
    data = driver.execute_script(
        "const e = document.getElementById('nd-sampler'); return [e.dataset.shape || '', "
        "e.dataset.pixels || '', e.dataset.ms || '', e.innerText];")
    result = {"status": status, "line": data[3].strip().splitlines()[-1] if data[3].strip() else ""}
    if status == "done":
        shape = tuple(int(v) for v in data[0].split(","))
        result["images"] = np.frombuffer(base64.b64decode(data[1]), dtype=np.uint8).reshape(shape)
        result["ms"] = float(data[2])
    return result


def hook_url(base: str, model: str, seed: int, steps: int, n: int, label: int | None = None) -> str:
    query = f"nd-autorun=1&nd-seed={seed}&nd-steps={steps}&nd-n={n}"
    return f"{base}/{PAGES[model]}.html?{query}" + (f"&nd-label={label}" if label is not None else "")


def measure(driver, base: str, model: str, n: int, steps: int, repeats: int) -> dict:
    """data-ms of `repeats` draws (seeds 1..repeats) after one warm-up draw (seed 0)."""
    label = 7 if model == "mnist_conditional" else None
    times = []
    for seed in range(repeats + 1):
        result = run_hook(driver, hook_url(base, model, seed, steps, n, label))
        if result["status"] != "done":
            raise RuntimeError(f"{model}: the sampler failed: {result['line']}")
        if seed > 0:
            times.append(result["ms"])
    return {"model": model, "page": PAGES[model], "n": n, "steps": steps, "ms": times,
            "median_ms": statistics.median(times), "target_ms": TARGETS_MS.get(n),
            "met": statistics.median(times) <= TARGETS_MS[n] if n in TARGETS_MS else None}


def fp16_error(site: Path, model: str = "mnist") -> float:
    """The largest difference between the network's outputs with fp16 and with fp32 weights (ONNX
    Runtime, onnxruntime.transformers' converter, inputs and outputs kept fp32), on random x_t at
    four t. fp16 weights would halve the download; the page keeps fp32 unless this is under 1e-3."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.transformers.float16 import convert_float_to_float16

    path = site / "_static" / "nd" / f"{model}.onnx"
    half = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    full, reduced = ort.InferenceSession(str(path)), ort.InferenceSession(half.SerializeToString())
    rng, worst = np.random.default_rng(0), 0.0
    for t in (999, 500, 37, 0):
        feed = {"x": rng.standard_normal((16, 1, 28, 28)).astype(np.float32), "t": np.full(16, t, dtype=np.int64)}
        worst = max(worst, float(np.abs(full.run(None, feed)[0] - reduced.run(None, feed)[0]).max()))
    return worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default: 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed draws per case (default: 3)")
    parser.add_argument("--json", default=None, help="write the record here "
                        "(e.g. benchmarks/results/browser_sampling.json)")
    parser.add_argument("--beside", default="", help="what else ran on the machine meanwhile, for the record")
    parser.add_argument("--find-browser", action="store_true",
                        help="only print the browser and driver found (.ci/run checks with it)")
    args = parser.parse_args(argv)
    if args.find_browser:
        print(" ".join(find_browser()))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from record import provenance, write_record

    scratch = ROOT / "_build" / "browser_site"
    site = site_root(scratch)
    rows = []
    with serve(site) as base, chromium() as driver:
        version = driver.capabilities.get("browserVersion", "")
        for model in PAGES:
            for n in (1, 16):
                row = measure(driver, base, model, n, args.steps, args.repeats)
                rows.append(row)
                print(f"{model:18s} {n:2d} image(s), DDIM-{args.steps}: median {row['median_ms']:7.1f} ms "
                      f"(target {row['target_ms']} ms: {'met' if row['met'] else 'MISSED'}); "
                      f"draws {', '.join(f'{m:.0f}' for m in row['ms'])} ms")
    half = fp16_error(site)
    print(f"fp16 weights: the network's output moves by up to {half:.1e} (the page keeps fp32 unless < 1e-3)")
    package = json.loads((ROOT / "package.json").read_text())
    record = {**provenance(argv), "browser": f"headless Chromium {version}",
              "runtime": f"onnxruntime-web {package['dependencies']['onnxruntime-web']}, WebAssembly, 1 thread",
              "site": "the built book (_build/html)" if site == ROOT / "_build" / "html" else
                      "a small site of the book's files (benchmarks/browser.py assemble_site)",
              "session_options": "executionProviders wasm, graphOptimizationLevel all, fp32 weights "
                                 "(_static/nd_sampler_page.js)",
              "fp16_max_error": half, "ran_beside": args.beside, "results": rows}
    if args.json:
        write_record(args.json, record)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
