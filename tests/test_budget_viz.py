"""The compute budget and the image helpers."""

import pytest
import torch
from PIL import Image

from naivediffusion import budget, viz


def test_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("NAIVEDIFFUSION_BUDGET", "cpu")
    assert budget.get_budget().name == "cpu"
    monkeypatch.setenv("NAIVEDIFFUSION_BUDGET", "ci")
    assert budget.get_budget().name == "ci"
    assert budget.get_budget("gpu").name == "gpu"  # an explicit name wins
    # Budgets grow: ci < cpu < gpu in training steps and evaluation images.
    ci, cpu, gpu = (budget.BUDGETS[n] for n in ("ci", "cpu", "gpu"))
    assert ci.train_steps < cpu.train_steps < gpu.train_steps
    assert ci.eval_images < cpu.eval_images < gpu.eval_images


def test_budget_defaults_to_the_hardware(monkeypatch):
    monkeypatch.delenv("NAIVEDIFFUSION_BUDGET", raising=False)
    expected = "gpu" if torch.cuda.is_available() else "cpu"
    assert budget.get_budget().name == expected


def test_unknown_budget_names_the_choices(monkeypatch):
    monkeypatch.setenv("NAIVEDIFFUSION_BUDGET", "huge")
    with pytest.raises(ValueError, match="ci, cpu, gpu"):
        budget.get_budget()


def test_pick_device():
    assert budget.pick_device("cpu") == torch.device("cpu")
    assert budget.pick_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="auto, cpu, cuda, mps"):
        budget.pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            budget.pick_device("cuda")


def test_to_uint8_inverts_the_data_scaling():
    pixels = torch.arange(256, dtype=torch.uint8)
    scaled = pixels.float() / 127.5 - 1  # the dataset boundary
    assert torch.equal(viz.to_uint8(scaled), pixels)
    assert viz.to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]  # clipped


def test_grid_layout_and_png(tmp_path):
    x = torch.rand(10, 1, 5, 7) * 2 - 1
    grid = viz.make_grid(x, nrow=4, padding=2)
    # 4 columns and ceil(10 / 4) = 3 rows of 5x7 tiles with 2-pixel gaps around each.
    assert grid.shape == (1, 2 + 3 * (5 + 2), 2 + 4 * (7 + 2))
    assert torch.equal(grid[:, 2:7, 2:9], viz.to_uint8(x[0]))
    assert torch.equal(grid[:, 2 + 7:2 + 7 + 5, 2 + 9:2 + 9 + 7], viz.to_uint8(x[5]))
    path = viz.save_grid(torch.rand(4, 3, 8, 8) * 2 - 1, tmp_path / "sub" / "g.png")
    with Image.open(path) as image:
        assert image.size == (2 + 2 * 10, 2 + 2 * 10) and image.mode == "RGB"


def test_show_source_prints_outside_a_notebook(capsys):
    viz.show_source(viz.to_uint8)
    out = capsys.readouterr().out
    assert out.startswith("def to_uint8(")
