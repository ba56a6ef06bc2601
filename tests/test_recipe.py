"""Tests of the training recipe: Min-SNR weighting, the cosine learning-rate decay, runs bounded
by --max-minutes, the CPU defaults, and models named "pretrained:NAME"."""

import json
import math

import pytest
import torch
from test_train import tiny_config  # the tiny run of test_train.py: 8 base channels, T = 50

from naivediffusion import Diffusion
from naivediffusion import checkpoint as checkpoint_module
from naivediffusion import train as train_module
from naivediffusion.__main__ import main
from naivediffusion.checkpoint import (
    load_checkpoint,
    load_model,
    pretrained,
    pretrained_names,
    pretrained_record,
    update_pretrained_record,
)
from naivediffusion.config import CPU_DEFAULTS, DATASET_DEFAULTS, TrainConfig, runs_on_cpu
from naivediffusion.quality import load_images, noise_fraction, roughness, smudge_fraction
from naivediffusion.train import Trainer, lr_factor

pytestmark = pytest.mark.usefixtures("one_thread")


def linear_snr(T: int = 1000) -> torch.Tensor:
    """SNR(t) of the paper's linear schedule, computed here from its definition."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    return abar / (1 - abar)


# ------------------------------------------------------------------ Min-SNR


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_min_snr_weight_of_each_objective_is_its_formula(objective):
    diffusion = Diffusion(1000, objective=objective)
    t = torch.tensor([0, 10, 50, 100, 200, 500, 999])
    snr = linear_snr()[t]
    gamma = 5.0
    expected = {"eps": torch.minimum(snr, torch.tensor(gamma)) / snr,
                "x0": torch.minimum(snr, torch.tensor(gamma)),
                "v": torch.minimum(snr, torch.tensor(gamma)) / (snr + 1)}[objective]
    weight = diffusion.loss_weight(t, "min-snr", gamma)
    assert weight.shape == (7,)
    torch.testing.assert_close(weight.double(), expected, rtol=1e-5, atol=0)
    # The clamp bites where the SNR is above gamma (small t) and nowhere else.
    assert snr[0] > gamma > snr[-1]
    assert torch.equal(diffusion.loss_weight(t, "none"), torch.ones(7))


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_min_snr_puts_min_snr_gamma_on_the_x0_error(objective):
    """The derivation: each objective's error is a multiple of the x0 error, so Min-SNR's
    weight makes every objective's weighted error min(SNR, gamma) ||x0 - x0_hat||^2."""
    torch.manual_seed(1)
    diffusion = Diffusion(1000, objective=objective)
    x0, noise = torch.rand(6, 1, 4, 4) * 2 - 1, torch.randn(6, 1, 4, 4)
    t = torch.tensor([0, 3, 30, 300, 600, 999])
    x_t = diffusion.q_sample(x0, t, noise)
    output = torch.randn(6, 1, 4, 4)  # any prediction
    error = ((diffusion.target(x0, noise, t) - output) ** 2).flatten(1).mean(1)
    x0_error = ((x0 - diffusion.predict_x0(x_t, t, output)) ** 2).flatten(1).mean(1)
    weighted = diffusion.loss_weight(t, "min-snr", 5.0) * error
    expected = linear_snr()[t].clamp(max=5.0).float() * x0_error
    torch.testing.assert_close(weighted, expected, rtol=2e-3, atol=1e-6)


def test_loss_without_weighting_is_exactly_l_simple_and_min_snr_weights_each_image():
    torch.manual_seed(2)
    diffusion = Diffusion(100)
    x0, noise = torch.rand(5, 1, 4, 4) * 2 - 1, torch.randn(5, 1, 4, 4)
    t = torch.tensor([0, 1, 10, 50, 99])
    model = lambda x, t: 0.3 * x  # a fixed, imperfect "network"
    x_t = diffusion.q_sample(x0, t, noise)
    per_image = ((noise - 0.3 * x_t) ** 2).flatten(1).mean(1)
    assert torch.equal(diffusion.loss(model, x0, t=t, noise=noise),
                       torch.mean((noise - 0.3 * x_t) ** 2))
    snr = diffusion.alphas_cumprod / (1 - diffusion.alphas_cumprod)
    weights = (snr[t].clamp(max=2.0) / snr[t]).float()
    torch.testing.assert_close(diffusion.loss(model, x0, t=t, noise=noise, weighting="min-snr",
                                              min_snr_gamma=2.0),
                               (weights * per_image).mean())


def test_bad_weighting_settings_name_the_allowed_values():
    with pytest.raises(ValueError, match="unknown loss weighting 'snr'; choose one of none, min-snr"):
        TrainConfig.for_dataset("mnist", loss_weighting="snr")
    with pytest.raises(ValueError, match="min_snr_gamma must be positive"):
        TrainConfig.for_dataset("mnist", min_snr_gamma=0)
    with pytest.raises(ValueError, match="unknown lr schedule 'step'; choose one of constant, cosine"):
        TrainConfig.for_dataset("mnist", lr_schedule="step")
    with pytest.raises(ValueError, match="max_minutes must be positive"):
        TrainConfig.for_dataset("mnist", max_minutes=-1)
    with pytest.raises(ValueError, match="min_snr_gamma must be positive"):
        Diffusion(10).loss_weight(torch.tensor([1]), "min-snr", 0.0)


# ------------------------------------------------------------------ learning rate


def test_cosine_decay_runs_from_one_to_zero_after_the_warmup():
    def factor(step):
        return lr_factor(step, warmup_steps=10, schedule="cosine", total_steps=110)

    assert [factor(s) for s in (0, 9, 10)] == [0.1, 1.0, 1.0]  # the warm-up, then the top
    assert factor(60) == pytest.approx(0.5)
    assert factor(35) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert factor(110) == pytest.approx(0.0, abs=1e-12) and factor(500) == factor(110)
    values = [factor(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_a_cosine_run_logs_the_scheduled_learning_rates(tmp_path):
    config = tiny_config(tmp_path / "run", steps=6, warmup_steps=2, lr=1e-3, lr_schedule="cosine")
    Trainer(config).train(progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # The line of step s shows the rate set after s optimizer steps: warm-up times cosine.
    cosine = [1.0 if s < 2 else 0.5 * (1 + math.cos(math.pi * (s - 2) / 4)) for s in range(1, 7)]
    expected = [1e-3 * min(1, (s + 1) / 2) * c for s, c in zip(range(1, 7), cosine, strict=True)]
    assert [line["lr"] for line in lines] == pytest.approx(expected)
    assert lines[-1]["lr"] == 0.0


# ------------------------------------------------------------------ --max-minutes


class FakeClock:
    """Stands in for time.perf_counter inside the training loop: every step takes exactly
    `step_seconds`, however busy the machine is."""

    def __init__(self, step_seconds: float):
        self.now, self.step_seconds, self.calls = 0.0, step_seconds, 0

    def perf_counter(self) -> float:
        self.calls += 1
        if self.calls % 2 == 0:  # the loop reads the clock before and after each step
            self.now += self.step_seconds
        return self.now


def test_max_minutes_ends_the_run_with_a_checkpoint_and_ema(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "PLAN_AFTER", 4)  # measure the speed over steps 2..4
    monkeypatch.setattr(train_module, "time", FakeClock(step_seconds=0.5))
    config = tiny_config(tmp_path / "run", steps=100_000, max_minutes=0.5, warmup_steps=0,
                         lr_schedule="cosine")
    trainer = Trainer(config)
    assert trainer.planned_steps is None  # unknown until the speed is measured
    result = trainer.train(progress=False)
    # 30 s at 0.5 s a step: the plan made at step 4 ends the run at step 60, as --steps would.
    assert trainer.planned_steps == 60 == result["step"]
    assert trainer.elapsed == pytest.approx(30.0)
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert checkpoint["planned_steps"] == 60 and checkpoint["step"] == 60
    assert load_checkpoint(tmp_path / "run" / "ema.pt")["step"] == 60
    # The schedule knew the end: the last logged rate is the cosine's last value, near zero.
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert lines[-1]["lr"] == pytest.approx(config.lr * lr_factor(60, 0, "cosine", 60), abs=1e-15) == 0.0
    assert lines[29]["step"] == 30 and lines[29]["lr"] == pytest.approx(config.lr / 2)  # half-way


def test_max_minutes_stops_a_run_that_slows_down_when_the_time_is_up(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "PLAN_AFTER", 4)
    clock = FakeClock(step_seconds=0.5)
    monkeypatch.setattr(train_module, "time", clock)
    trainer = Trainer(tiny_config(tmp_path / "run", steps=100_000, max_minutes=0.5, warmup_steps=0))
    real_step = trainer.train_step

    def slower(x0):
        if trainer.step >= 10:
            clock.step_seconds = 2.0  # from step 11 on, 2 s a step
        return real_step(x0)

    monkeypatch.setattr(trainer, "train_step", slower)
    result = trainer.train(progress=False)
    assert trainer.planned_steps == 60 and result["step"] < 60  # ended by the clock, not the plan
    assert trainer.elapsed >= 30.0 and load_checkpoint(tmp_path / "run" / "ema.pt")["step"] == result["step"]


def test_a_resumed_timed_run_keeps_its_plan(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "PLAN_AFTER", 4)
    monkeypatch.setattr(train_module, "time", FakeClock(step_seconds=0.5))
    config = tiny_config(tmp_path / "run", steps=100_000, max_minutes=0.1, warmup_steps=0,
                         lr_schedule="cosine", checkpoint_every=2)
    first = Trainer(config)
    first.train(progress=False)
    resumed = Trainer.resume(tmp_path / "run")
    assert resumed.planned_steps == first.planned_steps == 12
    assert resumed.scheduler.get_last_lr()[0] == pytest.approx(first.scheduler.get_last_lr()[0])


# ------------------------------------------------------------------ defaults


def test_cpu_defaults_unless_a_model_is_named():
    cpu = TrainConfig.for_dataset("mnist", device="cpu")
    assert (cpu.model, cpu.batch_size) == (CPU_DEFAULTS["mnist"]["model"], CPU_DEFAULTS["mnist"]["batch_size"])
    assert cpu.model == "mnist-small" and cpu.objective == "v"
    full = TrainConfig.for_dataset("mnist", device="cpu", model="mnist")
    assert (full.batch_size, full.steps, full.lr) == (128, 10_000, DATASET_DEFAULTS["mnist"]["lr"])
    assert TrainConfig.for_dataset("mnist", device="cuda").model == "mnist"
    assert TrainConfig.for_dataset("fashion-mnist", device="cpu").model == "mnist-small"
    assert TrainConfig.for_dataset("cifar10", device="cpu").model == "ddpm-cifar10"


@pytest.mark.parametrize("cuda, mps", [(False, False), (True, False), (False, True)])
def test_runs_on_cpu_on_every_kind_of_machine(monkeypatch, cuda, mps):
    """"auto" runs on the CPU only where there is no GPU; "cpu" always, "cuda" and "mps" never,
    even where they are missing (pick_device would refuse them), and an unknown name is no CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert runs_on_cpu("auto") is (not cuda and not mps)
    assert runs_on_cpu() is (not cuda and not mps)
    assert runs_on_cpu("cpu") is True
    assert runs_on_cpu("cuda") is False and runs_on_cpu("mps") is False
    assert runs_on_cpu("tpu") is False


def test_bad_recipe_flags_exit_2_and_write_nothing(tmp_path, capsys):
    for flags, message in ((["--max-minutes", "0"], "max_minutes must be positive"),
                           (["--min-snr-gamma", "-1"], "min_snr_gamma must be positive")):
        run_dir = tmp_path / "run"
        assert main(["train", "--dataset", "mnist", "--run-dir", str(run_dir), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert not run_dir.exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--dataset", "mnist", "--loss-weighting", "snr"])
    assert exit_info.value.code == 2
    assert "'none', 'min-snr'" in capsys.readouterr().err


# ------------------------------------------------------------------ shipped models


def test_pretrained_models_by_name(tmp_path, capsys):
    assert "mnist" in pretrained_names()
    model, diffusion, info = load_model("pretrained:mnist")
    assert info["path"] == str(pretrained("mnist")) and info["image_shape"] == [1, 28, 28]
    with pytest.raises(FileNotFoundError, match="no pretrained model 'mnsit'; the package ships: pretrained:mnist"):
        load_model("pretrained:mnsit")
    assert main(["sample", "--checkpoint", "pretrained:mnsit", "--out", str(tmp_path / "g.png")]) == 2
    assert "pretrained:mnist" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()
    assert main(["sample", "--checkpoint", "pretrained:mnist", "--n", "2", "--steps", "3",
                 "--no-progress", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file()


def test_help_lists_the_shipped_models(capsys):
    for command in ("sample", "evaluate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "pretrained:mnist" in capsys.readouterr().out



def test_a_benchmark_records_a_measurement_beside_a_shipped_model(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "PRETRAINED_DIR", tmp_path)
    (tmp_path / "toy.pt").write_bytes(b"weights")
    (tmp_path / "toy.json").write_text(json.dumps({"step": 7, "note": "kept"}))
    assert pretrained_record("toy") == {"step": 7, "note": "kept"}
    path = update_pretrained_record("toy", sampler_measurement={"rows": [1, 2]}, step=8)
    assert path == tmp_path / "toy.json"
    assert pretrained_record("toy") == {"step": 8, "note": "kept", "sampler_measurement": {"rows": [1, 2]}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.json", "toy.pt"]  # no temporary left
    with pytest.raises(FileNotFoundError, match="the package ships: pretrained:toy"):
        update_pretrained_record("yot", step=9)
    assert json.loads(path.read_text())["step"] == 8


# ------------------------------------------------------------------ smudges and noise


def test_smudge_fraction_counts_samples_the_classifier_cannot_name():
    class Fixed(torch.nn.Module):
        """Logits that make the first image certain and the others split between 3 classes."""

        def forward(self, x):
            logits = torch.zeros(len(x), 10)
            logits[0, 4] = 10.0
            logits[1:, :3] = 5.0
            return logits

    probe = torch.nn.Linear(1, 1)  # gives the stub a device
    fixed = Fixed()
    fixed.register_module("probe", probe)
    assert smudge_fraction(torch.zeros(4, 1, 28, 28), classifier=fixed) == 0.75
    real, _ = load_images("mnist", train=False, n=500, seed=0)
    assert smudge_fraction(real) < 0.02  # the shipped classifier names real digits


def test_noise_fraction_flags_noise_and_passes_real_digits():
    real, _ = load_images("mnist", train=False, n=1000, seed=3)
    assert noise_fraction(real) <= 0.005
    noise = torch.rand(50, 1, 28, 28) * 2 - 1
    assert noise_fraction(noise) == 1.0
    speckled = (real[:50] + 0.3 * torch.randn(50, 1, 28, 28)).clamp(-1, 1)  # digits in noise
    assert noise_fraction(speckled) == 1.0
    assert torch.allclose(roughness(torch.ones(2, 1, 5, 5)), torch.zeros(2))
    checker = (torch.arange(25).reshape(1, 1, 5, 5) % 2) * 2.0 - 1  # every neighbour differs by 2
    assert roughness(checker).item() == pytest.approx(2.0)
