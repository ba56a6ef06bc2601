"""Tests of naivediffusion.train: settings, EMA, batching, checkpoints, resume, the NaN guard.

Every run uses a tiny network (the "mnist" preset with 8 base channels), T = 50 and a
few steps of batch 8 on real MNIST, so each takes a second or two on a CPU.
"""

import dataclasses
import itertools
import json
import math
import os
import pickle

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from naivediffusion import Diffusion, UNet
from naivediffusion.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model,
    save_atomic,
    unwrap_state_dict,
)
from naivediffusion.config import TrainConfig, resolve_precision
from naivediffusion.data import EpochBatchSampler
from naivediffusion.runfolder import TrainingDivergedError
from naivediffusion.train import (
    EMA,
    Trainer,
    adamw,
    ema_update_fn,
    lr_factor,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(run_dir, **overrides) -> TrainConfig:
    settings = dict(
        model="mnist", steps=4, batch_size=8, timesteps=50, model_overrides={"base_channels": 8},
        log_every=1, sample_every=1000, checkpoint_every=1000, num_sample_images=4,
        sample_steps=5, device="cpu", data_root=os.environ["NAIVEDIFFUSION_DATA"],
        run_dir=str(run_dir),
    )
    return TrainConfig.for_dataset("mnist", **{**settings, **overrides})


def assert_same_state(a: dict, b: dict) -> None:
    """Every tensor of two (nested) state dicts is equal, bit for bit."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_state(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished 4-step run: its folder holds checkpoint.pt and ema.pt."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    Trainer(tiny_config(run_dir)).train(progress=False)
    return run_dir


# ------------------------------------------------------------------ settings


def test_cifar10_defaults_are_the_papers():
    config = TrainConfig.for_dataset("cifar10")
    assert (config.model, config.lr, config.batch_size, config.warmup_steps) == ("ddpm-cifar10", 2e-4, 128, 5000)
    assert (config.grad_clip, config.ema_decay, config.dropout, config.steps) == (1.0, 0.9999, 0.1, 800_000)
    assert (config.timesteps, config.schedule, config.objective) == (1000, "linear", "eps")
    assert config.weight_decay == 0.0  # AdamW without weight decay is the paper's Adam


def test_mnist_defaults_and_overrides():
    config = TrainConfig.for_dataset("mnist", steps=7, lr=1e-3, device="cuda")  # the GPU recipe
    assert config.model == "mnist" and config.ema_warmup
    assert (config.steps, config.lr) == (7, 1e-3)
    assert config.run_dir == os.path.join("runs", "mnist")
    assert TrainConfig.for_dataset("fashion-mnist", device="cuda").model == "mnist"


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match="unknown dataset 'mnsit'.*mnist.*cifar10"):
        TrainConfig.for_dataset("mnsit")


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="precision"):
        TrainConfig.for_dataset("mnist", precision="fp8")
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig.for_dataset("mnist", ema_decay=1.0)


def test_config_goes_through_a_weights_only_checkpoint(tmp_path):
    config = TrainConfig.for_dataset("mnist", model_overrides={"channel_mults": [1, 2]})
    torch.save(dataclasses.asdict(config), tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    assert TrainConfig(**loaded) == config


def test_precision_auto_is_fp32_on_cpu_and_fp16_needs_cuda():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", torch.device("cpu"))


@pytest.mark.parametrize("capability, auto", [((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_bf16_is_refused_on_a_gpu_that_would_emulate_it(monkeypatch, capability, auto):
    """A T4 (7.5) has no bf16 arithmetic: an explicit bf16 names fp16, the choice auto makes."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda")
    assert resolve_precision("auto", cuda) == auto
    assert resolve_precision("fp16", cuda) == "fp16"
    if auto == "bf16":
        assert resolve_precision("bf16", cuda) == "bf16"
    else:
        with pytest.raises(ValueError, match=r"compute capability 7\.5.*use fp16") as refused:
            resolve_precision("bf16", cuda)
        assert "\n" not in str(refused.value)  # one line, as the command line prints it


# ------------------------------------------------------- the pieces of a step


def test_ema_warmup_follows_its_formula():
    """After the first update copies the weights, update n (n = 1, 2, ...) uses the decay
    min(decay, (1 + n) / (10 + n)); for decay 0.9 the cap takes over from n = 81 on."""
    model = torch.nn.Linear(1, 1, bias=False)
    ema = AveragedModel(model, multi_avg_fn=ema_update_fn(0.9, warmup=True), use_buffers=True)
    expected, capped = None, 0
    for n in range(150):
        w = 2.0 + math.cos(0.3 * n)
        with torch.no_grad():
            model.weight.fill_(w)
        ema.update_parameters(model)
        if expected is None:
            expected = w
        else:
            capped += (1 + n) / (10 + n) > 0.9
            d = min(0.9, (1 + n) / (10 + n))
            expected = d * expected + (1 - d) * w
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-5), n
    assert capped == 150 - 81  # the last 69 updates ran at the cap: without it they would fail
    # without the warm-up the decay is 0.9 from the second update on
    ema = AveragedModel(model, multi_avg_fn=ema_update_fn(0.9, warmup=False), use_buffers=True)
    with torch.no_grad():
        model.weight.fill_(0.0)
        ema.update_parameters(model)
        model.weight.fill_(1.0)
        ema.update_parameters(model)
    assert ema.module.weight.item() == pytest.approx(0.1)


def test_the_trainers_ema_is_averagedmodel_with_the_rule(tmp_path):
    """EMA takes the very values of AveragedModel with ema_update_fn, update for update (float
    weights and an integer buffer), keeps the same state, and continues from a loaded state."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))  # num_batches_tracked: int
    reference = AveragedModel(model, multi_avg_fn=ema_update_fn(0.99), use_buffers=True)
    ema = EMA(model, 0.99)
    for n in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].num_batches_tracked += 1
        reference.update_parameters(model)
        ema.update_parameters(model)
        for (name, a), b in zip(reference.state_dict().items(), ema.state_dict().values(), strict=True):
            assert torch.equal(a, b), (n, name)
        if n == 14:  # a resumed run: a new EMA from the saved state
            ema = EMA(model, 0.99)
            ema.load_state_dict(reference.state_dict())
            assert ema.updates == 15


def test_a_training_step_never_waits_for_the_device(tmp_path):
    """No number comes back from the device in train_step (counted on the CPU with a dispatch
    mode: .item(), int(tensor), data-dependent shapes), the EMA update included."""
    from test_sampling import HostReads

    trainer = Trainer(tiny_config(tmp_path / "run", dropout=0.1, class_conditional=True, p_uncond=0.5))
    x0, labels = torch.rand(8, 1, 28, 28) * 2 - 1, torch.arange(8)
    trainer.train_step(x0, labels)  # the first update copies the weights
    with HostReads() as reads:
        trainer.train_step(x0, labels)
        trainer.train_step(x0, labels)
    assert reads.count == 0
    assert int(trainer.ema.n_averaged) == trainer.ema.updates == 3


def test_linear_warmup():
    assert [lr_factor(s, warmup_steps=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(0, warmup_steps=0) == 1.0


def test_epoch_batch_sampler_is_reproducible_and_resumable():
    sampler = EpochBatchSampler(num_samples=23, batch_size=5, seed=3)
    stream = iter(sampler)
    batches = [next(stream) for _ in range(3 * 4)]  # 4 full batches per epoch, 3 dropped images
    assert all(len(b) == 5 for b in batches)
    epochs = [sum(batches[4 * e:4 * e + 4], []) for e in range(3)]
    for indices in epochs:
        assert len(set(indices)) == 20 and set(indices) <= set(range(23))
    assert epochs[0] != epochs[1]  # a new order every epoch
    again = iter(EpochBatchSampler(23, 5, seed=3))
    assert [next(again) for _ in range(12)] == batches
    # starting at (epoch 1, position 2) continues exactly there
    resumed = iter(EpochBatchSampler(23, 5, seed=3, epoch=1, position=2))
    assert [next(resumed) for _ in range(6)] == batches[6:12]
    other_seed = iter(EpochBatchSampler(23, 5, seed=4))
    assert next(other_seed) != batches[0]
    with pytest.raises(ValueError, match="fewer than one batch"):
        EpochBatchSampler(4, 5, seed=0)


# ----------------------------------------------------------------- training


def test_run_folder_contents(trained_run):
    assert sorted(p.name for p in trained_run.iterdir()) == ["checkpoint.pt", "ema.pt", "log.jsonl", "samples"]
    assert [p.name for p in (trained_run / "samples").iterdir()] == ["step_000004.png"]
    assert not list(trained_run.glob("*.tmp"))
    checkpoint = load_checkpoint(trained_run / "checkpoint.pt")
    assert checkpoint["step"] == 4 and checkpoint["kind"] == "checkpoint"
    assert checkpoint["data_position"] == {"epoch": 0, "position": 4}
    for key in ("model", "ema", "optimizer", "scheduler", "scaler", "rng", "train_config",
                "model_config", "diffusion_config"):
        assert key in checkpoint, key
    assert checkpoint["model_config"]["base_channels"] == 8
    assert checkpoint["diffusion_config"]["timesteps"] == 50
    assert checkpoint["image_shape"] == [1, 28, 28]


def first_batches(trainer: Trainer, n: int) -> list[torch.Tensor]:
    batches = trainer.batches()
    try:
        return [next(batches)[0] for _ in range(n)]
    finally:
        batches.close()


def test_the_ema_is_updated_after_the_optimizer_step(tmp_path):
    """The first EMA update copies the weights: after one step it must hold the weights that
    step produced, not those before it; the second averages the two steps' weights."""
    trainer = Trainer(tiny_config(tmp_path / "run", steps=2, warmup_steps=0))
    decay = trainer.config.ema_decay
    weights = lambda: {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    ema = lambda: unwrap_state_dict(trainer.ema.state_dict())
    first, second = first_batches(trainer, 2)
    before = weights()
    trainer.train_step(first)
    after_one = weights()
    moved = [k for k in before if not torch.equal(before[k], after_one[k])]
    assert "conv_out.weight" in moved  # the zero-initialised output layer learns first
    assert_same_state(ema(), after_one)
    trainer.train_step(second)
    after_two = weights()
    d = min(decay, 2 / 11)  # update n = 1 of the warm-up
    for key in moved:
        expected = d * after_one[key] + (1 - d) * after_two[key]
        assert torch.allclose(ema()[key], expected, rtol=1e-5, atol=1e-7), key


def gradients_the_optimizer_sees(trainer: Trainer, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradients at the moment of the optimizer step (a step pre-hook), by parameter name."""
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    seen = {}

    def record(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    seen[names[id(p)]] = p.grad.detach().clone()

    handle = trainer.optimizer.register_step_pre_hook(record)
    try:
        trainer.train_step(batch)
    finally:
        handle.remove()
    return seen


def global_norm(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(g.double().square().sum().item() for g in grads.values()))


def test_gradient_clipping_bounds_the_global_norm_and_0_turns_it_off(tmp_path):
    clip = 1e-3
    raw_trainer = Trainer(tiny_config(tmp_path / "off", steps=1, grad_clip=0.0))
    clipped_trainer = Trainer(tiny_config(tmp_path / "on", steps=1, grad_clip=clip))
    (batch,) = first_batches(raw_trainer, 1)
    raw = gradients_the_optimizer_sees(raw_trainer, batch)
    clipped = gradients_the_optimizer_sees(clipped_trainer, batch)  # same seed: same weights, t, eps
    assert raw.keys() == clipped.keys() and raw
    # grad_clip = 0: the gradients are left as they are, far above the bound below.
    assert global_norm(raw) > 100 * clip
    # Clipped: the global norm (over all parameters together) is at most grad_clip, and the
    # gradient is rescaled as a whole, not clamped element by element.
    assert global_norm(clipped) <= clip * (1 + 1e-5)
    assert global_norm(clipped) == pytest.approx(clip, rel=1e-3)
    scale = clip / global_norm(raw)
    for name in raw:
        assert torch.allclose(clipped[name], raw[name] * scale, rtol=1e-4, atol=1e-12), name


def test_seed_makes_a_cpu_run_reproducible(tmp_path):
    states = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        trainer = Trainer(tiny_config(tmp_path / name, steps=2, seed=seed))
        trainer.train(progress=False)
        states.append(trainer.state_dict())
    assert_same_state(states[0]["model"], states[1]["model"])
    assert_same_state(states[0]["ema"], states[1]["ema"])
    assert not torch.equal(states[0]["model"]["conv_in.weight"], states[2]["model"]["conv_in.weight"])


def test_resume_gives_identical_weights(tmp_path):
    """N steps straight == N/2 steps, a checkpoint, a new process's worth of state, N/2 more."""
    # One grid half-way in both runs: sampling must not disturb any random stream.
    straight = Trainer(tiny_config(tmp_path / "straight", steps=6, sample_every=3))
    straight.train(progress=False)

    first = Trainer(tiny_config(tmp_path / "split", steps=3, sample_every=3))
    first.train(progress=False)
    torch.manual_seed(12345)  # whatever happens in between must not matter
    second = Trainer.resume(tmp_path / "split", steps=6)
    assert second.step == 3
    second.train(progress=False)

    a, b = straight.state_dict(), second.state_dict()
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["ema"], b["ema"])
    assert_same_state(a["optimizer"]["state"], b["optimizer"]["state"])
    assert a["data_position"] == b["data_position"]
    lines = (tmp_path / "split" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]


def test_resume_runs_adam_as_this_device_does(trained_run, tmp_path):
    """A checkpoint written where AdamW was not fused (another device, an older version)
    resumes with this device's fused AdamW, and its optimizer state."""
    checkpoint = load_checkpoint(trained_run / "checkpoint.pt")
    for group in checkpoint["optimizer"]["param_groups"]:
        group["fused"], group["foreach"] = None, False
    trainer = Trainer(tiny_config(tmp_path / "run"))
    trainer.load_state_dict(checkpoint)
    assert all(g["fused"] is True for g in trainer.optimizer.param_groups)
    assert_same_state(trainer.optimizer.state_dict()["state"], checkpoint["optimizer"]["state"])


def test_resume_puts_adams_steps_where_the_fused_kernel_needs_them(trained_run, tmp_path):
    """A non-fused optimizer's `step` counters stay where they were saved when loaded as they
    are: on a GPU, on the CPU, where the fused kernel cannot read them. Loaded into this
    device's fused AdamW, every counter is on its parameter's device as float32 (on the CPU the
    device cannot differ, so the counters are saved as float64 here: the dtype shows the move)."""
    checkpoint = load_checkpoint(trained_run / "checkpoint.pt")
    for group in checkpoint["optimizer"]["param_groups"]:
        group["fused"], group["foreach"] = None, False
    for state in checkpoint["optimizer"]["state"].values():
        state["step"] = state["step"].double()
    trainer = Trainer(tiny_config(tmp_path / "run"))
    trainer.load_state_dict(checkpoint)
    for param in trainer.model.parameters():
        step = trainer.optimizer.state[param]["step"]
        assert step.device == param.device and step.dtype == torch.float32
    trainer.train_step(torch.rand(4, 1, 28, 28) * 2 - 1)  # the fused kernel runs on it


def test_fp16_skips_a_step_with_an_infinite_gradient_and_resumes_its_scale(tmp_path, monkeypatch):
    """The fp16 path (a CUDA-only choice) run on the CPU with GradScaler("cpu"): an infinite
    gradient skips the optimizer step and halves the scale, and a resumed run has that scale."""
    import naivediffusion.train as train_module

    monkeypatch.setattr(train_module, "resolve_precision", lambda precision, device: "fp16")
    trainer = Trainer(tiny_config(tmp_path / "run", steps=2))
    assert trainer.precision == "fp16" and trainer.scaler.is_enabled()
    x0 = torch.rand(8, 1, 28, 28) * 2 - 1
    trainer.train_step(x0)
    scale = trainer.scaler.get_scale()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    weight = next(trainer.model.parameters())
    hook = weight.register_hook(lambda grad: torch.full_like(grad, math.inf))
    trainer.train_step(x0)
    hook.remove()
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())  # skipped
    assert trainer.scaler.get_scale() == scale / 2
    trainer.step = 2
    trainer.save_checkpoint()
    resumed = Trainer.resume(tmp_path / "run", steps=3)
    assert resumed.scaler.is_enabled() and resumed.scaler.get_scale() == scale / 2
    resumed.train_step(x0)  # a finite step goes through again
    assert not all(torch.equal(before[k], v) for k, v in resumed.model.state_dict().items())


def test_bf16_autocast_trains_float32_weights(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "bf16", steps=1, precision="bf16"))
    result = trainer.train(progress=False)
    assert torch.isfinite(torch.tensor(result["loss"]))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_new_run_refuses_a_folder_with_a_checkpoint(trained_run):
    with pytest.raises(ValueError, match="already holds a checkpoint at step 4; pass --resume"):
        Trainer(tiny_config(trained_run))


def test_resume_keeps_what_the_run_learned(trained_run, tmp_path):
    with pytest.raises(ValueError, match="cannot change lr when resuming"):
        Trainer.resume(trained_run, lr=1.0)
    with pytest.raises(ValueError, match="already at step 4, past --steps 2"):
        Trainer.resume(trained_run, steps=2)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        Trainer.resume(tmp_path / "nowhere")


# ------------------------------------------------------------- checkpoints


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    Trainer(tiny_config(run_dir, steps=1)).train(progress=False)
    before = (run_dir / "checkpoint.pt").read_bytes()

    def crash(src, dst):
        raise OSError("killed between writing the temporary file and renaming it")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        Trainer.resume(run_dir, steps=2).train(progress=False)
    monkeypatch.undo()
    assert (run_dir / "checkpoint.pt").read_bytes() == before
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 1
    assert not list(run_dir.glob("*.tmp"))


def test_save_atomic_replaces_the_file(tmp_path):
    path = save_atomic({"a": torch.zeros(2)}, tmp_path / "x.pt")
    save_atomic({"a": torch.ones(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


class RunsCode:
    """Unpickling this object calls a function: here, one that creates a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_checkpoint_that_runs_code_is_refused(tmp_path, writer):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    payload = {"format": "naivediffusion", "version": 1, "x": RunsCode(marker)}
    if writer == "pickle":
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match="refused: it contains code objects"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(path)
    assert not marker.exists()
    # the same file loaded the unsafe way would have run the code: the test can fail
    with open(path, "rb") as f:
        (pickle.load(f) if writer == "pickle" else torch.load(f, weights_only=False))
    assert marker.exists()


def test_files_that_are_not_checkpoints(tmp_path, trained_run):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt or ema.pt in the folder"):
        load_checkpoint(tmp_path)
    (tmp_path / "text.pt").write_text("hello, I am not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a naivediffusion checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    torch.save({"state_dict": {"w": torch.zeros(3)}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a naivediffusion checkpoint.*state_dict"):
        load_checkpoint(tmp_path / "foreign.pt")
    data = (trained_run / "ema.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_checkpoint(tmp_path / "truncated.pt")


def test_load_model_rebuilds_the_ema_network(trained_run):
    checkpoint = load_checkpoint(trained_run / "checkpoint.pt")
    ema_weights = unwrap_state_dict(checkpoint["ema"])
    for source in ("checkpoint.pt", "ema.pt", ""):
        model, diffusion, info = load_model(trained_run / source)
        assert isinstance(model, UNet) and not model.training
        assert isinstance(diffusion, Diffusion) and diffusion.num_timesteps == 50
        assert info["step"] == 4 and info["image_shape"] == [1, 28, 28]
        assert_same_state(model.state_dict(), ema_weights)
    raw, _, _ = load_model(trained_run / "checkpoint.pt", ema=False)
    assert_same_state(raw.state_dict(), checkpoint["model"])
    assert not torch.equal(raw.state_dict()["conv_in.weight"], ema_weights["conv_in.weight"])


def test_load_model_accepts_compiled_prefixes_and_rejects_misfits(trained_run, tmp_path):
    release = load_checkpoint(trained_run / "ema.pt")
    release.pop("path")
    compiled = dict(release, ema={"module._orig_mod." + k: v for k, v in release["ema"].items()})
    torch.save(compiled, tmp_path / "compiled.pt")
    model, _, _ = load_model(tmp_path / "compiled.pt")
    assert_same_state(model.state_dict(), release["ema"])

    other = dict(release, model_config={**release["model_config"], "base_channels": 16})
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="do not fit the model"):
        load_model(tmp_path / "other.pt")


# ------------------------------------------------------------------ NaN guard


def test_nan_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    Trainer(tiny_config(run_dir, steps=2)).train(progress=False)
    checkpoint_bytes = (run_dir / "checkpoint.pt").read_bytes()
    ema_bytes = (run_dir / "ema.pt").read_bytes()

    calls = []
    real_loss = Diffusion.loss

    def loss_that_diverges(self, *args, **kwargs):
        calls.append(1)
        loss = real_loss(self, *args, **kwargs)
        return loss * float("nan") if len(calls) == 1 else loss  # step 3, the first one resumed

    monkeypatch.setattr(Diffusion, "loss", loss_that_diverges)
    # checkpoint_every=1: without the guard, step 3 would overwrite checkpoint.pt
    trainer = Trainer.resume(run_dir, steps=6, checkpoint_every=1)
    with pytest.raises(TrainingDivergedError, match=r"loss is nan at step 3.*checkpoint\.pt \(step 2\)"):
        trainer.train(progress=False)
    assert (run_dir / "checkpoint.pt").read_bytes() == checkpoint_bytes
    assert (run_dir / "ema.pt").read_bytes() == ema_bytes


# ------------------------------------------------------------- fine-tuning


def test_init_from_starts_from_the_ema_weights_with_a_new_optimizer(trained_run, tmp_path):
    source = load_checkpoint(trained_run / "ema.pt")
    trainer = Trainer(tiny_config(tmp_path / "fine", steps=2, init_from=str(trained_run / "ema.pt")))
    assert trainer.init == {"path": str(trained_run / "ema.pt"), "step": 4, "total_steps": 4}
    assert trainer.step == 0 and not trainer.optimizer.state
    assert trainer.optimizer.param_groups[0]["lr"] == lr_factor(0, trainer.config.warmup_steps) * trainer.config.lr
    assert_same_state(unwrap_state_dict(trainer.model.state_dict()), source["ema"])
    assert_same_state(unwrap_state_dict(trainer.ema.state_dict()), source["ema"])  # the EMA starts there too
    fresh = Trainer(tiny_config(tmp_path / "fresh", steps=2))
    assert not torch.equal(fresh.model.conv_in.weight, trainer.model.conv_in.weight)

    trainer.train(progress=False)
    assert load_checkpoint(tmp_path / "fine" / "ema.pt")["init"] == trainer.init
    resumed = Trainer.resume(tmp_path / "fine", steps=3)  # the resumed run still knows its start
    assert resumed.init == trainer.init and resumed.step == 2
    _, _, info = load_model(tmp_path / "fine" / "ema.pt")
    assert info["step"] == 2 and info["total_steps"] == 6 and info["init"] == trainer.init
    # A third run counts all the steps behind its weights.
    third = Trainer(tiny_config(tmp_path / "third", steps=1, init_from=str(tmp_path / "fine")))
    assert third.init["total_steps"] == 6
    third.train(progress=False)
    assert load_model(tmp_path / "third")[2]["total_steps"] == 7
    assert load_model(trained_run)[2]["total_steps"] == 4  # a run from random weights: its own


def test_init_from_refuses_another_network_or_noise_process(trained_run, tmp_path):
    ema = str(trained_run / "ema.pt")
    with pytest.raises(ValueError, match=r"its network \(a 'mnist' network\) is not this run's \(base_channels 8 there, 16 here\)"):
        Trainer(tiny_config(tmp_path / "a", init_from=ema, model_overrides={"base_channels": 16}))
    with pytest.raises(ValueError, match=r"another noise process \(timesteps 50 there, 60 here\)"):
        Trainer(tiny_config(tmp_path / "b", init_from=ema, timesteps=60))
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        Trainer(tiny_config(tmp_path / "c", init_from=str(tmp_path / "missing.pt")))
    with pytest.raises(ValueError, match="init_from must name a checkpoint"):
        tiny_config(tmp_path / "d", init_from="")
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_export_chains_the_record_of_a_run_that_started_from_a_shipped_model(tmp_path):
    """benchmarks/export_pretrained.py: a model trained in two runs ships one record of both."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "export_pretrained.py"
    out = tmp_path / "pretrained"

    def export(run_dir, *extra):
        return subprocess.run([sys.executable, str(script), str(run_dir), "--name", "m", "--out-dir", str(out),
                               "--command", f"train {run_dir.name}", "--hardware", "test", "--grids", "2", *extra],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})

    first = tmp_path / "first"
    Trainer(tiny_config(first, steps=4, sample_every=2, log_every=2)).train(progress=False)
    assert export(first).returncode == 0
    second = tmp_path / "second"
    Trainer(tiny_config(second, steps=3, sample_every=3, log_every=1, init_from=str(out / "m.pt"))).train(progress=False)

    refused = export(second)  # without the earlier record: one line, nothing replaced
    assert refused.returncode == 2 and refused.stderr.startswith("error: ") and "--previous" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert json.loads((out / "m.json").read_text())["step"] == 4

    done = export(second, "--previous", str(out / "m.json"))
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "m.json").read_text())
    assert record["step"] == 7 and [run["step"] for run in record["runs"]] == [4, 3]
    assert record["runs"][0]["init"] is None and record["runs"][1]["init"]["step"] == 4
    assert record["command"] == "train second" and record["runs"][0]["command"] == "train first"
    assert record["train_seconds"] == pytest.approx(sum(run["train_seconds"] for run in record["runs"]))
    lines = [json.loads(line) for line in (out / "m_log.jsonl").read_text().splitlines()]
    assert [(r["run"], r["run_step"], r["step"]) for r in lines] == [
        (1, 2, 2), (1, 4, 4), (2, 1, 5), (2, 2, 6), (2, 3, 7)]
    assert all(a["elapsed"] < b["elapsed"] for a, b in itertools.pairwise(lines))
    # the earlier record's first and last grid, then this run's, named by the step over all runs
    assert record["grids"] == ["m_grids/step_000002.png", "m_grids/step_000004.png", "m_grids/step_000007.png"]
    assert all((out / name).is_file() for name in record["grids"])
    assert torch.equal(load_checkpoint(out / "m.pt")["ema"]["conv_in.weight"],
                       load_checkpoint(second / "ema.pt")["ema"]["conv_in.weight"])


def test_the_fused_adamw_takes_the_steps_of_the_plain_one(tmp_path):
    """`adamw` only changes how Adam's arithmetic runs: fused on the CPU (as on CUDA), with
    the same weights after a few steps as the for-loop AdamW, to float rounding."""
    trainer = Trainer(tiny_config(tmp_path / "run", steps=1))
    assert trainer.optimizer.defaults["fused"] is True  # the Trainer uses it on the CPU
    torch.manual_seed(0)
    fused_net = UNet.from_preset("mnist-small", base_channels=8)
    plain_net = UNet.from_preset("mnist-small", base_channels=8)
    plain_net.load_state_dict(fused_net.state_dict())
    initial = [p.detach().clone() for p in fused_net.parameters()]
    fused = adamw(fused_net.parameters(), 1e-2, 0.01, "cpu")
    plain = torch.optim.AdamW(plain_net.parameters(), lr=1e-2, weight_decay=0.01, foreach=False)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in fused_net.parameters()]
        for net, optimizer in ((fused_net, fused), (plain_net, plain)):
            for p, g in zip(net.parameters(), grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
    pairs = zip(fused_net.named_parameters(), plain_net.parameters(), initial, strict=True)
    for (name, a), b, start in pairs:
        assert not torch.equal(a, start), name  # every tensor moved ...
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name  # ... and both alike


def test_init_from_a_fixed_variance_into_a_learned_one(trained_run, tmp_path):
    """Fine-tuning the shipped kind of model into Improved DDPM's: every weight is copied, the
    new output channel starts at zero (f = 1/2), and the mean's outputs are unchanged."""
    source = load_checkpoint(trained_run / "ema.pt")["ema"]
    trainer = Trainer(tiny_config(tmp_path / "learned", steps=2, variance="learned",
                                  init_from=str(trained_run / "ema.pt")))
    weights = unwrap_state_dict(trainer.model.state_dict())
    assert weights["conv_out.weight"].shape[0] == 2 and trainer.model.config["out_channels"] == 2
    for name, value in source.items():
        if name.startswith("conv_out."):
            assert torch.equal(weights[name][:1], value)
            assert torch.count_nonzero(weights[name][1:]) == 0
        else:
            assert torch.equal(weights[name], value), name
    trainer.train(progress=False)
    model, diffusion, info = load_model(tmp_path / "learned" / "ema.pt")
    assert diffusion.variance == "learned" and model.config["out_channels"] == 2
    assert info["init"]["path"] == str(trained_run / "ema.pt")
    # The other way is refused in one line: a learned variance's network has outputs to spare.
    with pytest.raises(ValueError, match="only a fixed variance's network can start a learned one"):
        Trainer(tiny_config(tmp_path / "back", init_from=str(tmp_path / "learned")))


def test_resume_of_a_learned_variance_run_gives_identical_weights(tmp_path):
    straight = Trainer(tiny_config(tmp_path / "straight", steps=4, variance="learned"))
    straight.train(progress=False)
    first = Trainer(tiny_config(tmp_path / "split", steps=2, variance="learned"))
    first.train(progress=False)
    second = Trainer.resume(tmp_path / "split", steps=4)
    assert second.diffusion.variance == "learned"
    second.train(progress=False)
    a, b = straight.state_dict(), second.state_dict()
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["optimizer"]["state"], b["optimizer"]["state"])
