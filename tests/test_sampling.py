"""naivediffusion.sampling: the loops behind `Diffusion.sample`, `draw` (n images in batches, as
the command line draws them), the constants the command line and the benchmarks share, and
`unet.eval_mode`."""

import ast
import sys
from pathlib import Path

import pytest
import torch
from benchmark_module import load_benchmark
from torch.utils._python_dispatch import TorchDispatchMode

from naivediffusion import Diffusion, UNet, sampling
from naivediffusion.__main__ import build_parser
from naivediffusion.config import DEVICES, PRECISIONS, TrainConfig
from naivediffusion.unet import eval_mode

REPO = Path(__file__).resolve().parents[1]


def tiny_unet(num_classes=None) -> UNet:
    torch.manual_seed(0)
    return UNet(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                attention_resolutions=(4,), num_heads=2, dropout=0.0, image_size=8,
                num_classes=num_classes, min_group_channels=1)


@pytest.mark.parametrize("kwargs", [
    {"sampler": "ddpm"}, {"sampler": "ddim", "steps": 4, "eta": 1.0},
    {"sampler": "ddim", "steps": 3, "return_chain": True, "chain_every": 2},
])
def test_diffusion_sample_is_the_sampling_loop(kwargs):
    diffusion = Diffusion(timesteps=10)

    def model(x, t):
        return 0.3 * x + 0.01 * t[:, None, None, None]

    a = diffusion.sample(model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(3), progress=False, **kwargs)
    b = sampling.sample(diffusion, model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(3),
                        progress=False, **kwargs)
    if kwargs.get("return_chain"):
        (a, chain_a), (b, chain_b) = a, b
        assert chain_a["t"].tolist() == chain_b["t"].tolist() == [9, 0]
    assert torch.equal(a, b)


def test_the_default_ddim_steps():
    diffusion = Diffusion(timesteps=100)
    calls = []

    def model(x, t):
        calls.append(t[0].item())
        return torch.zeros_like(x)

    diffusion.sample(model, (1, 1, 2, 2), sampler="ddim", progress=False)
    assert len(calls) == sampling.DDIM_STEPS == 50
    assert calls == sampling.ddim_timesteps(diffusion, sampling.DDIM_STEPS).tolist()
    assert TrainConfig(dataset="mnist").sample_steps == sampling.DDIM_STEPS


@pytest.mark.parametrize("n, batch_size", [(5, 2), (4, 4), (3, 8)])
def test_draw_is_sample_in_batches_from_one_generator(n, batch_size):
    diffusion = Diffusion(timesteps=10)
    model = tiny_unet()
    got = sampling.draw(diffusion, model, n, (1, 8, 8), steps=3, batch_size=batch_size,
                        generator=torch.Generator().manual_seed(1), progress=False)
    generator = torch.Generator().manual_seed(1)
    expected = torch.cat([
        diffusion.sample(model, (min(batch_size, n - i), 1, 8, 8), sampler="ddim", steps=3,
                         eta=sampling.DEFAULT_ETA, generator=generator, progress=False)
        for i in range(0, n, batch_size)
    ])
    assert got.shape == (n, 1, 8, 8) and got.device.type == "cpu"
    assert torch.equal(got, expected)


def test_draw_with_labels_and_guidance():
    diffusion = Diffusion(timesteps=10)
    model = tiny_unet(num_classes=3)
    asked = []
    real = sampling.sample

    def spy(diffusion, model, shape, **kwargs):
        asked.append((kwargs["labels"].tolist(), kwargs["guidance_scale"], kwargs["null_label"]))
        return real(diffusion, model, shape, **kwargs)

    labels = torch.tensor([0, 1, 2, 0, 1])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampling, "sample", spy)
        images = sampling.draw(diffusion, model, 5, (1, 8, 8), steps=2, batch_size=3, labels=labels,
                               guidance=1.5, generator=torch.Generator().manual_seed(0), progress=False)
    assert images.shape == (5, 1, 8, 8)
    assert asked == [([0, 1, 2], 1.5, 3), ([0, 1], 1.5, 3)]


def test_draw_refuses_nothing_to_draw():
    with pytest.raises(ValueError, match="at least 1"):
        sampling.draw(Diffusion(timesteps=10), tiny_unet(), 0, (1, 8, 8))


def test_eval_mode_restores_the_mode_also_after_an_error():
    net = torch.nn.Sequential(torch.nn.Dropout(0.5)).train()
    with eval_mode(net):
        assert not net.training and not net[0].training
    assert net.training and net[0].training
    with pytest.raises(RuntimeError), eval_mode(net):
        raise RuntimeError("stop")
    assert net.training
    net.eval()
    with eval_mode(net):
        pass
    assert not net.training  # a network in eval mode stays so

    def function(x):
        return x

    with eval_mode(function) as same:  # a plain callable has no mode
        assert same is function


# ------------------------------------------------------------------ the command line and the benchmarks


def subcommand(name: str):
    parser = build_parser()
    return next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict)).choices[name]


@pytest.mark.parametrize("name", ["train", "sample", "evaluate", "train-classifier"])
def test_every_device_flag_offers_the_package_devices(name):
    flag = next(a for a in subcommand(name)._actions if "--device" in a.option_strings)
    assert tuple(flag.choices) == DEVICES


def test_train_help_reads_in_groups():
    text = subcommand("train").format_help()
    for group in ("essential:", "network:", "recipe:", "performance:", "run control:"):
        assert f"\n{group}\n" in text
    precision = next(a for a in subcommand("train")._actions if "--precision" in a.option_strings)
    assert tuple(precision.choices) == PRECISIONS


def test_benchmarks_use_the_package_not_the_command_line_internals():
    """A benchmark may run the command line's `main` as a whole, nothing else of it."""
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "naivediffusion.__main__":
                assert [alias.name for alias in node.names] == ["main"], path.name
            if isinstance(node, ast.ImportFrom) and node.module == "naivediffusion":
                assert "__main__" not in [alias.name for alias in node.names], path.name


def test_the_speed_benchmark_gives_torch_compile_back():
    speed = load_benchmark("speed")
    real = torch.compile
    with speed.compile_backend("inductor"):
        assert torch.compile is real
    with pytest.raises(RuntimeError), speed.compile_backend("aot_eager"):
        assert torch.compile is not real
        raise RuntimeError("stop")
    assert torch.compile is real


def test_the_speed_benchmark_imports_diffusers_only_when_asked(monkeypatch, capsys):
    speed = load_benchmark("speed")
    asked = []

    class Finder:  # sees every import of diffusers that is not already loaded
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "diffusers":
                asked.append(name)
                raise ImportError("no diffusers here")
            return None

    monkeypatch.delitem(sys.modules, "diffusers", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    assert speed.load_diffusers(wanted=False) is None and asked == []  # --no-diffusers
    assert capsys.readouterr().out == ""
    assert speed.load_diffusers(wanted=True) is None and asked == ["diffusers"]
    assert "diffusers is not installed" in capsys.readouterr().out


class HostReads(TorchDispatchMode):
    """Counts the operations that make the host wait for the device: reading a number back
    (`aten._local_scalar_dense`: .item(), int(tensor), if tensor) and data-dependent shapes."""

    READS = ("_local_scalar_dense", "nonzero", "masked_select", "unique")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in self.READS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("sampler, options", [
    ("ddim", dict(steps=5, eta=0.0)), ("ddim", dict(steps=5, eta=1.0)), ("ddpm", {}),
    ("dpm++2m", dict(steps=5)), ("dpm++2m-sde", dict(steps=5)),
    ("ddim", dict(steps=5, eta=1.0, labels=torch.tensor([1, 2]), guidance_scale=2.0, null_label=3)),
])
def test_the_sampling_loop_never_waits_for_the_device(sampler, options):
    """No number comes back from the device inside the loop (counted on the CPU, where the same
    operations would each make a GPU wait)."""
    classes = 3 if "labels" in options else None
    model = UNet.from_preset("mnist", base_channels=8, channel_mults=[1, 2], num_res_blocks=1,
                             attention_resolutions=[], num_classes=classes)
    with HostReads() as reads:
        Diffusion(timesteps=20).sample(model, (2, 1, 28, 28), sampler=sampler, progress=False, **options)
    assert reads.count == 0
    with HostReads() as reads:  # what the counter counts
        torch.ones(2)[0].item()
    assert reads.count == 1
