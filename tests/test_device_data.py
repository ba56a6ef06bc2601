"""Datasets held in memory as uint8 and batched on the device (data.InMemoryImages), the
Trainer's `data` argument, and the torch.compile modes.

The in-memory path must be a faster way to the same thing: the same pixels as the
torchvision dataset, the same batches in the same order as the DataLoader path, the same
resumed order, and flips that a resumed run repeats.
"""

import numpy as np
import pytest
import torch
from test_data import make_cifar10, paper_scaling
from test_train import tiny_config

from naivediffusion.__main__ import main
from naivediffusion.config import COMPILE_MODES, TrainConfig
from naivediffusion.data import InMemoryImages, load_dataset
from naivediffusion.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, la), (xb, lb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb)
        assert torch.equal(torch.as_tensor(la), torch.as_tensor(lb))


def test_in_memory_mnist_holds_the_same_pixels_and_labels(mnist_root):
    reference = load_dataset("mnist", root=mnist_root, download=False)
    memory = load_dataset("mnist", root=mnist_root, download=False, in_memory=True)
    assert isinstance(memory, InMemoryImages)
    assert memory.images.shape == (60_000, 1, 28, 28) and memory.images.dtype == torch.uint8
    assert len(memory) == len(reference) and not memory.flip
    indices = torch.tensor([0, 1, 59_999, 31_337, 12_345])
    images, labels = memory.batch(indices)
    assert images.dtype == torch.float32 and images.shape == (5, 1, 28, 28)
    for row, index in enumerate(indices.tolist()):
        x, label = reference[index]
        assert torch.equal(images[row], x) and labels[row].item() == label
        assert torch.equal(memory[index][0], x) and memory[index][1] == label
    assert images.min() == -1.0 and images.max() == 1.0


def test_in_memory_cifar10_keeps_channels_and_flips_only_training_images(tmp_path, monkeypatch):
    batches, asymmetric = make_cifar10(tmp_path, monkeypatch, np.random.default_rng(3))
    train = load_dataset("cifar10", root=tmp_path, download=False, in_memory=True)
    assert train.images.shape == (10, 3, 32, 32) and train.flip
    assert torch.equal(train[0][0], paper_scaling(asymmetric))  # R, G, B planes in place
    labels = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert train.labels.tolist() == labels
    assert not load_dataset("cifar10", root=tmp_path, train=False, download=False, in_memory=True).flip
    assert not load_dataset("cifar10", root=tmp_path, download=False, augment=False, in_memory=True).flip

    upright = paper_scaling(asymmetric)
    x, _ = train.batch(torch.tensor([0, 0]), flip_mask=torch.tensor([False, True]))
    assert torch.equal(x[0], upright) and torch.equal(x[1], upright.flip(-1))
    x, _ = train.batch(torch.tensor([0]))  # no mask: no flip
    assert torch.equal(x[0], upright)


def test_in_memory_refuses_what_it_cannot_hold(tmp_path, mnist_root):
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="folder of images is read file by file"):
        load_dataset(f"folder:{tmp_path}", in_memory=True)
    with pytest.raises(ValueError, match="native 28 x 28; drop image_size=32"):
        load_dataset("mnist", root=mnist_root, download=False, image_size=32, in_memory=True)
    with pytest.raises(ValueError, match="uint8"):
        InMemoryImages(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"labels must be \[N\] = \[2\]"):
        InMemoryImages(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


def test_device_batches_equal_the_dataloader_batches_across_an_epoch_and_a_resume(tmp_path):
    on_device = Trainer(tiny_config(tmp_path / "a", batch_size=64))
    loader = Trainer(tiny_config(tmp_path / "b", batch_size=64, data_on_device=False))
    assert isinstance(on_device.dataset, InMemoryImages)
    assert not isinstance(loader.dataset, InMemoryImages)
    assert_same_batches(take(on_device.batches(), 3), take(loader.batches(), 3))
    # From a saved data position two batches before an epoch's end, into the next epoch.
    for trainer in (on_device, loader):
        trainer.epoch, trainer.position = 4, on_device.batches_per_epoch - 2
    first, second = take(on_device.batches(), 4), take(loader.batches(), 4)
    assert_same_batches(first, second)
    assert not torch.equal(first[1][0], first[2][0])  # a new epoch, a new order


def test_device_flips_are_fair_coins_repeated_on_resume(tmp_path, monkeypatch):
    make_cifar10(tmp_path, monkeypatch, np.random.default_rng(4))
    config = TrainConfig.for_dataset(
        "cifar10", model="mnist", model_overrides={"base_channels": 8}, batch_size=2, timesteps=50,
        device="cpu", data_root=str(tmp_path), run_dir=str(tmp_path / "run"))
    trainer = Trainer(config)
    data = trainer.dataset
    assert isinstance(data, InMemoryImages) and data.flip and trainer.batches_per_epoch == 5
    order = {}  # (epoch, position) -> the images of that batch
    stream = trainer.batches()
    flipped = 0
    for step in range(40):
        x, labels = next(stream)
        order[divmod(step, 5)] = x
        for image, label in zip(x, labels, strict=True):
            matches = [i for i in range(10) if data.labels[i] == label and (
                torch.equal(image, data[i][0]) or torch.equal(image, data[i][0].flip(-1)))]
            assert matches  # every image is a training image, upright or mirrored
            flipped += not any(torch.equal(image, data[i][0]) for i in matches)
    assert 15 < flipped < 65  # of 80 images, about half mirrored
    # A Trainer resuming at epoch 3, position 2 cuts and flips the very same batches.
    trainer.epoch, trainer.position = 3, 2
    resumed = trainer.batches()
    for key in [(3, 2), (3, 3), (3, 4), (4, 0)]:
        assert torch.equal(next(resumed)[0], order[key])


def test_trainer_trains_on_data_it_is_given_and_checks_its_shape(tmp_path):
    images = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8)
    data = InMemoryImages(images, torch.randint(0, 10, (32,)))
    trainer = Trainer(tiny_config(tmp_path / "given", steps=3, data_root=str(tmp_path / "no_mnist")), data=data)
    assert trainer.dataset is data
    x, _ = next(trainer.batches())
    assert any(torch.equal(x[0], data[i][0]) for i in range(32))
    assert trainer.train(progress=False)["step"] == 3
    resumed = Trainer.resume(tmp_path / "given", steps=5, data=data)
    assert resumed.dataset is data and resumed.step == 3
    assert resumed.train(progress=False)["step"] == 5
    wrong = InMemoryImages(torch.zeros(32, 3, 32, 32, dtype=torch.uint8), torch.zeros(32, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"the data's images are \(3, 32, 32\), but mnist images are \(1, 28, 28\)"):
        Trainer(tiny_config(tmp_path / "wrong"), data=wrong)


def test_channels_last_is_the_cpu_default_and_learns_the_same(tmp_path):
    """NHWC memory is a faster layout for the same arithmetic: the same batches and noise give
    the same weights, within float rounding (the kernels sum in another order)."""
    images = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8)
    data = InMemoryImages(images, torch.randint(0, 10, (32,)))
    nhwc = Trainer(tiny_config(tmp_path / "nhwc"), data=data)
    nchw = Trainer(tiny_config(tmp_path / "nchw", channels_last=False), data=data)
    assert nhwc.memory_format == torch.channels_last and nchw.memory_format == torch.contiguous_format
    conv = next(p for p in nhwc.model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for trainer in (nhwc, nchw):
        batches = trainer.batches()
        losses = [trainer.train_step(next(batches)[0]).item() for _ in range(3)]
        trainer.losses = losses
    assert nhwc.losses == pytest.approx(nchw.losses, rel=1e-5)
    for a, b in zip(nhwc.ema.module.parameters(), nchw.ema.module.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert "channels_last" in TrainConfig.__dataclass_fields__
    with pytest.raises(ValueError, match="channels_last"):
        TrainConfig.for_dataset("mnist", channels_last="yes")


def test_compile_modes_are_checked_and_old_checkpoints_read():
    assert TrainConfig(dataset="mnist", compile=False).compile == "none"  # as saved before the modes
    assert TrainConfig(dataset="mnist", compile=True).compile == "default"
    assert set(COMPILE_MODES) >= {"none", "default", "reduce-overhead", "max-autotune"}
    with pytest.raises(ValueError, match="unknown compile mode 'fast'; choose one of none, default"):
        TrainConfig(dataset="mnist", compile="fast")


def test_cli_compile_flag(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--dataset", "mnist", "--run-dir", str(run_dir), "--compile", "fast"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'fast'" in capsys.readouterr().err
    assert not run_dir.exists()


def trace_compile(monkeypatch) -> list:
    """Make torch.compile trace with the aot_eager backend; returns the list of the modes asked for."""
    modes = []
    real_compile = torch.compile

    def compile_traced(model, mode=None, **kwargs):
        modes.append(mode)
        return real_compile(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_traced)
    return modes


def test_compiled_step_matches_the_eager_step(tmp_path, monkeypatch):
    """torch.compile changes how the step runs, not what it computes. The network is traced by
    TorchDynamo and its forward and backward graphs by AOTAutograd, as in every mode; only
    the last stage, inductor's C++/Triton code generation, is swapped for running the traced
    graphs as they are ("aot_eager"), which needs no compiler on the test machine."""
    modes = trace_compile(monkeypatch)
    eager = Trainer(tiny_config(tmp_path / "eager", steps=2, dropout=0.0))
    compiled = Trainer(tiny_config(tmp_path / "compiled", steps=2, dropout=0.0, compile="reduce-overhead"))
    assert modes == ["reduce-overhead"] and compiled.network is not compiled.model
    assert eager.network is eager.model
    for trainer in (eager, compiled):
        trainer.train(progress=False)
    for (name, a), b in zip(eager.model.state_dict().items(), compiled.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_cli_sample_compile_draws_the_same_images(tmp_path, monkeypatch):
    """`sample --compile MODE` compiles the network in that mode and changes no pixel (traced
    with the aot_eager backend, as above)."""
    run_dir = tmp_path / "run"
    Trainer(tiny_config(run_dir, steps=2)).train(progress=False)
    modes = trace_compile(monkeypatch)
    common = ["sample", "--checkpoint", str(run_dir / "ema.pt"), "--n", "4", "--steps", "3",
              "--batch-size", "4", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "a.png"), "--save-samples", str(tmp_path / "a.pt")]) == 0
    assert modes == []
    assert main([*common, "--compile", "reduce-overhead", "--out", str(tmp_path / "b.png"),
                 "--save-samples", str(tmp_path / "b.pt")]) == 0
    assert modes == ["reduce-overhead"]
    eager, compiled = (torch.load(tmp_path / f"{n}.pt", weights_only=True).int() for n in "ab")
    assert (eager - compiled).abs().max() <= 1  # uint8 pixels: at most one level of rounding apart
