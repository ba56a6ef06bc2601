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
    assert ci.fd_images < cpu.fd_images < gpu.fd_images
    assert ci.bpd_images < cpu.bpd_images < gpu.bpd_images


@pytest.mark.parametrize("cuda, expected", [(True, "gpu"), (False, "cpu")])
def test_budget_defaults_to_the_hardware(monkeypatch, cuda, expected):
    monkeypatch.delenv("NAIVEDIFFUSION_BUDGET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert budget.get_budget().name == expected


def test_unknown_budget_names_the_choices(monkeypatch):
    monkeypatch.setenv("NAIVEDIFFUSION_BUDGET", "huge")
    with pytest.raises(ValueError, match="ci, cpu, gpu"):
        budget.get_budget()


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (True, False, "cuda"),
                                                 (False, True, "mps"), (False, False, "cpu")])
def test_pick_device_auto_prefers_cuda_then_mps(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert budget.pick_device("auto") == torch.device(expected)


def test_pick_device_refuses_what_is_not_there(monkeypatch):
    assert budget.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="auto, cpu, cuda, mps"):
        budget.pick_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        budget.pick_device("cuda")
    with pytest.raises(ValueError, match="MPS is not available"):
        budget.pick_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert budget.pick_device("cuda") == torch.device("cuda")


def test_to_uint8_inverts_the_data_scaling():
    pixels = torch.arange(256, dtype=torch.uint8)
    scaled = pixels.float() / 127.5 - 1  # the dataset boundary
    assert torch.equal(viz.to_uint8(scaled), pixels)
    assert viz.to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]  # clipped


def test_grid_layout_and_png(tmp_path):
    pixels = torch.randint(0, 256, (10, 1, 5, 7), dtype=torch.uint8)
    x = pixels.float() / 127.5 - 1  # images in [-1, 1] whose 0..255 values are known
    grid = viz.make_grid(x, nrow=4, padding=2)
    # 4 columns and ceil(10 / 4) = 3 rows of 5x7 tiles with 2-pixel gaps around each.
    assert grid.shape == (1, 2 + 3 * (5 + 2), 2 + 4 * (7 + 2)) and grid.dtype == torch.uint8
    white = torch.ones_like(grid, dtype=torch.bool)
    for i in range(10):
        row, col = divmod(i, 4)
        top, left = 2 + row * 7, 2 + col * 9
        assert torch.equal(grid[:, top:top + 5, left:left + 7], pixels[i]), i
        white[:, top:top + 5, left:left + 7] = False
    assert (grid[white] == 255).all()  # the gaps, and the two empty tiles of the last row
    path = viz.save_grid(torch.rand(4, 3, 8, 8) * 2 - 1, tmp_path / "sub" / "g.png")
    with Image.open(path) as image:
        assert image.size == (2 + 2 * 10, 2 + 2 * 10) and image.mode == "RGB"


def test_show_source_prints_outside_a_notebook(capsys):
    viz.show_source(viz.to_uint8)
    out = capsys.readouterr().out
    assert out.startswith("def to_uint8(")
