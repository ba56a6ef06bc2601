"""The book's live sampler (_static/nd_sampler.js): the same source under Node against the Python
sampler, and the published pages in a real browser.

Both need the files that .ci/prepare_static writes (the exported models, ONNX Runtime Web from
npm). The browser tests serve the built book, _build/html, which .ci/run builds before pytest;
when there is none (pytest alone), they serve a small site assembled from the same files
(`benchmarks/browser.py`'s `assemble_site`: _static/nd_sampler*.js, .ci/prepare_static's
_static/nd/, and each chapter's own embedding cell with the scripts Jupyter Book would add), so
they run either way and test the same JavaScript, models and runtime.
"""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from benchmark_module import load_benchmark

from naivediffusion import quality, sampling
from naivediffusion.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[1]
browser = load_benchmark("browser")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The exported models and tables, and ONNX Runtime Web in node_modules (npm ci if missing)."""
    out = tmp_path_factory.mktemp("nd")
    prepare_static = browser.load_prepare_static()
    prepare_static.prepare(out)
    return out


def run_node_sampler(models, tmp_path, name, n, steps, eta, seed, labels=None, guidance=0.0):
    """The JavaScript sampler under Node, given the noise torch draws for `sampling.sample` from
    `seed`: x_T, then one array per step that adds noise (all but the last when eta > 0)."""
    shape = (n, 1, 28, 28)
    generator = torch.Generator().manual_seed(seed)
    draws = 1 + (steps - 1 if eta > 0 else 0)
    noise = torch.cat([torch.randn(shape, generator=generator).flatten() for _ in range(draws)])
    noise.numpy().astype(np.float32).tofile(tmp_path / "noise.bin")
    spec = {"onnx": str(models / f"{name}.onnx"), "tables": str(models / f"{name}.json"),
            "noise": str(tmp_path / "noise.bin"), "n": n, "steps": steps, "eta": eta,
            "guidance": guidance, "labels": labels, "out": str(tmp_path / "images.bin"),
            "timestep_counts": [1, 2, 3, 7, 19, 20, 50, 333, 999, 1000]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run(["node", str(ROOT / "tests" / "js" / "run_sampler.js"), str(tmp_path / "spec.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    images = np.fromfile(tmp_path / "images.bin", dtype=np.float32).reshape(shape)
    timesteps = json.loads((tmp_path / "images.bin.json").read_text())["timesteps"]
    return images, timesteps


@pytest.mark.parametrize("name, labels, guidance", [
    ("mnist", None, 0.0),                     # unconditional
    ("mnist_conditional", [3, 7, 0], 0.0),    # conditional, no guidance (one call per step)
    ("mnist_conditional", [3, 7, 0], 2.0),    # guided: cond and null labels in one batched call
])
def test_the_javascript_sampler_equals_the_python_sampler(models, tmp_path, one_thread, name, labels, guidance):
    n, steps, eta, seed = 3, 20, 1.0, 11
    js, timesteps = run_node_sampler(models, tmp_path, name, n, steps, eta, seed, labels, guidance)
    model, diffusion, info = load_model(f"pretrained:{name}")
    python = sampling.sample(
        diffusion, model, (n, *info["image_shape"]), sampler="ddim", steps=steps, eta=eta,
        generator=torch.Generator().manual_seed(seed), progress=False,
        labels=None if labels is None else torch.tensor(labels),
        guidance_scale=None if labels is None else guidance, null_label=model.num_classes).numpy()
    assert np.abs(js - python).max() < 1e-3
    assert python.std() > 0.3  # images, not a constant that both sides might agree on
    for count, visited in timesteps.items():
        assert visited == sampling.ddim_timesteps(diffusion, int(count)).tolist(), count


# ------------------------------------------------------------------ in a real browser


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """(driver, base URL) of the book's site served on 127.0.0.1, in headless Chromium."""
    site = browser.site_root(tmp_path_factory.mktemp("site"))
    with browser.serve(site) as base, browser.chromium() as driver:
        yield driver, base


@pytest.fixture(scope="module")
def classifier():
    return quality.load_classifier("mnist")


def digits(classifier, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(top class, its probability) of uint8 images [N, H, W]."""
    probs = quality.class_probabilities(classifier, torch.from_numpy(images.copy())[:, None])
    return probs.argmax(1), probs.max(1).values


def test_chapter_5_draws_digits_in_the_browser(page, classifier):
    driver, base = page
    result = browser.run_hook(driver, browser.hook_url(base, "mnist", seed=1, steps=20, n=8))
    assert result["status"] == "done", result["line"]
    images = result["images"]
    assert images.shape == (8, 28, 28) and result["ms"] > 0
    _, confidence = digits(classifier, images)
    # Digits: the classifier names (nearly) all of them; noise or blank images it cannot.
    assert (confidence >= quality.SMUDGE_THRESHOLD).sum() >= 7, confidence
    assert 10 < images.mean() < 120  # strokes on a dark background, not all black or white


def test_chapter_7_draws_the_digit_asked_for(page, classifier):
    driver, base = page
    for label in (2, 7):
        result = browser.run_hook(driver, browser.hook_url(base, "mnist_conditional", seed=4, steps=20,
                                                           n=8, label=label))
        assert result["status"] == "done", result["line"]
        assert result["images"].shape == (8, 28, 28)
        classes, _ = digits(classifier, result["images"])
        assert (classes == label).sum() >= 7, (label, classes)


def test_a_page_whose_model_cannot_load_says_so(page, tmp_path):
    """No model files: one visible line, data-status error, and the rest of the page stays."""
    driver, _ = page
    static = tmp_path / "_static"
    static.mkdir()
    for name in browser.SCRIPTS:
        (static / name).write_bytes((ROOT / "_static" / name).read_bytes())
    head = "".join(f'<script src="_static/{name}"></script>' for name in browser.SCRIPTS)
    (tmp_path / "page.html").write_text(f"<html><head>{head}</head><body><p id='figure'>figure</p>"
                                        '<div id="nd-sampler" data-model="missing"></div></body></html>')
    with browser.serve(tmp_path) as base:
        result = browser.run_hook(driver, f"{base}/page.html?nd-autorun=1&nd-seed=0&nd-steps=2")
        assert result["status"] == "error"
        assert result["line"].startswith("The live sampler could not run here")
        assert driver.find_element("id", "figure").text == "figure"
