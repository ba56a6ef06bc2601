"""The exported ONNX network and its tables (naivediffusion/export.py), for the book's live sampler."""

import json

import numpy as np
import onnxruntime
import pytest
import torch

from naivediffusion import __main__ as cli
from naivediffusion import sampling
from naivediffusion.checkpoint import load_model, pretrained_names
from naivediffusion.export import MAX_BYTES, PAGE_STEPS, MeanOutput, export_onnx

MODELS = ["mnist", "mnist_conditional"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    return {name: export_onnx(f"pretrained:{name}", out) for name in MODELS}


def test_the_shipped_models_are_the_ones_exported():
    assert set(MODELS) <= set(pretrained_names())


@pytest.mark.parametrize("name", MODELS)
def test_onnx_equals_pytorch_at_several_t(exported, name, one_thread):
    """Random x_t, every batch size the page uses (1, 2 for guidance, 16, 32), t across 0..T-1."""
    graph, _ = exported[name]
    model, diffusion, info = load_model(f"pretrained:{name}")
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    for batch, t in [(1, 999), (2, 500), (16, 37), (32, 0)]:
        x = torch.randn(batch, *info["image_shape"], generator=generator)
        times = torch.full((batch,), t, dtype=torch.long)
        feeds = {"x": x.numpy(), "t": times.numpy()}
        with torch.no_grad():
            if model.num_classes is None:
                expected = model(x, times)
            else:
                labels = torch.randint(0, model.num_classes + 1, (batch,), generator=generator)
                feeds["labels"] = labels.numpy()
                expected = model(x, times, labels)
        (output,) = session.run(None, feeds)
        assert output.shape == tuple(expected.shape)
        assert np.abs(output - expected.numpy()).max() < 1e-4, (batch, t)


@pytest.mark.parametrize("name", MODELS)
def test_the_tables_are_what_the_sampler_needs(exported, name):
    graph, tables_path = exported[name]
    tables = json.loads(tables_path.read_text())
    model, diffusion, info = load_model(f"pretrained:{name}")
    assert graph.stat().st_size <= MAX_BYTES
    # float64 values survive JSON exactly, all T of them.
    assert torch.equal(torch.tensor(tables["alphas_cumprod"], dtype=torch.float64), diffusion.alphas_cumprod)
    assert tables["timesteps"] == diffusion.num_timesteps == len(tables["alphas_cumprod"])
    assert tables["objective"] == diffusion.objective
    assert tables["image_shape"] == info["image_shape"]
    assert tables["num_classes"] == tables["null_class"] == model.num_classes
    assert tables["out_channels"] == info["image_shape"][0]
    assert tables["defaults"]["eta"] == sampling.DEFAULT_ETA
    assert tables["defaults"]["steps"] == PAGE_STEPS and tables["defaults"]["clip"] is True
    assert tables["provenance"]["source"] == f"pretrained:{name}"
    assert "command" in tables["provenance"]


def test_a_learned_variance_output_is_cut_to_the_mean_channels():
    class TwoC(torch.nn.Module):
        config = {"in_channels": 1, "out_channels": 2, "num_classes": None}

        def forward(self, x, t):
            return torch.cat([x + 1, x - 1], dim=1)

    x = torch.randn(3, 1, 4, 4)
    assert torch.equal(MeanOutput(TwoC())(x, torch.zeros(3, dtype=torch.long)), x + 1)


def test_the_export_subcommand(tmp_path, capsys):
    assert cli.main(["export", "--checkpoint", "pretrained:mnist", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "mnist.onnx").stat().st_size > 100_000
    assert json.loads((tmp_path / "mnist.json").read_text())["name"] == "mnist"
    assert not list(tmp_path.glob("*.tmp"))  # written atomically, nothing left over


@pytest.mark.parametrize("argv, words", [
    (["--checkpoint", "pretrained:nothing"], "no pretrained model 'nothing'"),
    (["--checkpoint", "pretrained:mnist", "--format", "tflite"], "unknown --format 'tflite'"),
])
def test_the_export_subcommand_refuses_bad_input_in_one_line(tmp_path, capsys, argv, words):
    assert cli.main(["export", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


def test_the_browser_benchmark_measures_what_fp16_weights_would_change(tmp_path):
    from benchmark_module import load_benchmark

    browser = load_benchmark("browser")
    export_onnx("pretrained:mnist", tmp_path / "_static" / "nd")
    error = browser.fp16_error(tmp_path)
    assert 0 < error < 0.1  # a real, small difference: fp16 keeps about three decimal digits
