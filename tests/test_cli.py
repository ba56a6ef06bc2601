"""The command line end to end: `train` and `sample` on real MNIST with a tiny network,
and one line on stderr (no traceback, exit status 2) for each kind of bad input."""

import json
import math
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from benchmark_module import load_benchmark
from PIL import Image

from naivediffusion import viz
from naivediffusion.__main__ import build_parser, main

STEPS = 5
TINY = ["--base-channels", "8", "--timesteps", "50", "--batch-size", "8", "--device", "cpu",
        "--log-every", "1", "--num-sample-images", "4", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


def train_args(run_dir, *extra) -> list[str]:
    return ["train", "--dataset", "mnist", "--steps", str(STEPS), "--run-dir", str(run_dir),
            "--sample-every", "3", "--checkpoint-every", "3", *TINY, *extra]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 5-step run made by `naivediffusion train`."""
    path = tmp_path_factory.mktemp("cli") / "runs" / "tiny"
    assert main(train_args(path)) == 0
    return path


def grid_size(n: int, nrow: int, side: int = 28, padding: int = 2) -> tuple[int, int]:
    """(width, height) of a grid of n square tiles, nrow per row, `padding` pixels around each."""
    rows = math.ceil(n / nrow)
    return padding + nrow * (side + padding), padding + rows * (side + padding)


def assert_one_line_error(capsys, code: int, *words: str) -> str:
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# ------------------------------------------------------------------ train


def test_train_writes_the_run_folder(run_dir):
    assert {p.name for p in run_dir.iterdir()} == {"checkpoint.pt", "ema.pt", "log.jsonl", "samples"}
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        assert set(r) == {"step", "loss", "lr", "images_per_sec", "elapsed"}
        assert math.isfinite(r["loss"])
    # One line per step: its speed is the batch of 8 images over the time the step took, which
    # is also what "elapsed" (seconds of training steps, rounded to 1 ms) grew by.
    elapsed = [0.0] + [r["elapsed"] for r in records]
    for r, before, after in zip(records, elapsed[:-1], elapsed[1:], strict=True):
        assert after > before
        assert 8 / r["images_per_sec"] == pytest.approx(after - before, abs=1.5e-3), r
    grids = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert grids == ["step_000003.png", "step_000005.png"]  # every 3 steps, and the last
    assert Image.open(run_dir / "samples" / grids[0]).size == grid_size(4, 2)
    release = torch.load(run_dir / "ema.pt", weights_only=True)
    assert release["kind"] == "ema" and release["step"] == STEPS


def test_train_refuses_to_overwrite_a_run(run_dir, capsys):
    before = (run_dir / "checkpoint.pt").read_bytes()
    code = main(train_args(run_dir))
    assert_one_line_error(capsys, code, f"already holds a checkpoint at step {STEPS}", "--resume")
    assert (run_dir / "checkpoint.pt").read_bytes() == before


def test_train_resume_raises_the_step_count(tmp_path):
    path = tmp_path / "run"
    assert main(train_args(path)) == 0
    assert main(["train", "--resume", "--run-dir", str(path), "--steps", str(STEPS + 2),
                 "--no-progress"]) == 0
    records = [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 3))
    assert torch.load(path / "ema.pt", weights_only=True)["step"] == STEPS + 2


# ------------------------------------------------------------------ sample


def test_sample_writes_a_grid_and_uint8_samples(run_dir, tmp_path):
    out, raw = tmp_path / "grid.png", tmp_path / "samples.pt"
    assert main(["sample", "--checkpoint", str(run_dir / "ema.pt"), "--n", "5", "--steps", "4",
                 "--out", str(out), "--save-samples", str(raw), "--batch-size", "2",
                 "--no-progress"]) == 0
    assert Image.open(out).size == grid_size(5, 3)  # 3 per row: ceil(sqrt(5))
    samples = torch.load(raw, weights_only=True)
    assert samples.dtype == torch.uint8 and samples.shape == (5, 1, 28, 28)
    assert samples.float().std() > 0

    # the same seed (and batch size) draws the same images, from ema.pt or the run folder alike
    again = tmp_path / "again.pt"
    assert main(["sample", "--checkpoint", str(run_dir), "--n", "5", "--steps", "4", "--nrow", "5",
                 "--out", str(tmp_path / "row.png"), "--save-samples", str(again),
                 "--batch-size", "2", "--no-progress"]) == 0
    assert torch.equal(torch.load(again, weights_only=True), samples)
    assert Image.open(tmp_path / "row.png").size == grid_size(5, 5)


def test_sample_with_the_ddpm_sampler(run_dir, tmp_path):
    assert main(["sample", "--checkpoint", str(run_dir / "checkpoint.pt"), "--n", "2",
                 "--sampler", "ddpm", "--out", str(tmp_path / "g.png"), "--no-progress"]) == 0
    assert Image.open(tmp_path / "g.png").size == grid_size(2, 2)


def test_sample_ddpm_with_the_posterior_variance(run_dir, tmp_path):
    """The same network and seed under sigma^2 = beta and sigma^2 = beta-tilde: other images."""
    images = {}
    for variance in ("beta", "posterior"):
        saved = tmp_path / f"{variance}.pt"
        assert main(["sample", "--checkpoint", str(run_dir), "--n", "2", "--sampler", "ddpm",
                     "--variance", variance, "--device", "cpu", "--out", str(tmp_path / "g.png"),
                     "--save-samples", str(saved), "--no-progress"]) == 0
        images[variance] = torch.load(saved, weights_only=True)
    assert images["beta"].shape == images["posterior"].shape == (2, 1, 28, 28)
    assert not torch.equal(images["beta"], images["posterior"])


def test_sample_draws_with_the_default_eta_unless_told(run_dir, tmp_path, monkeypatch, capsys):
    """The default sampler is CLI_SAMPLER with SOLVER_STEPS steps (no eta); DDIM's noise level is
    DEFAULT_ETA when --eta is not given, else --eta; ddpm passes 0."""
    from naivediffusion import sampling
    from naivediffusion.sampling import CLI_SAMPLER, DEFAULT_ETA, SOLVER_STEPS

    asked = []
    real = sampling.sample

    def spy(diffusion, model, shape, **kwargs):
        asked.append((kwargs["sampler"], kwargs["eta"]))
        return real(diffusion, model, shape, **kwargs)

    monkeypatch.setattr(sampling, "sample", spy)
    common = ["--checkpoint", str(run_dir), "--n", "2", "--out", str(tmp_path / "g.png"), "--no-progress"]
    assert main(["sample", *common]) == 0
    assert f"{CLI_SAMPLER} {SOLVER_STEPS} steps" in capsys.readouterr().out
    assert main(["sample", *common, "--sampler", "ddim", "--steps", "3"]) == 0
    assert f"ddim 3 steps, eta {DEFAULT_ETA:g}" in capsys.readouterr().out
    assert main(["sample", *common, "--sampler", "ddim", "--steps", "3", "--eta", "0"]) == 0
    assert main(["sample", *common, "--sampler", "ddpm"]) == 0
    assert asked == [(CLI_SAMPLER, 0.0), ("ddim", DEFAULT_ETA), ("ddim", 0.0), ("ddpm", 0.0)]


def test_the_default_eta_changes_the_samples_of_a_seed(run_dir, tmp_path):
    """eta 0 draws only x_T; the default adds fresh noise at each step, so other images."""
    images = {}
    for eta in ("0", None):
        saved = tmp_path / f"{eta}.pt"
        assert main(["sample", "--checkpoint", str(run_dir), "--n", "2", "--sampler", "ddim", "--steps", "4",
                     "--out", str(tmp_path / "g.png"), "--save-samples", str(saved), "--no-progress",
                     *(["--eta", eta] if eta else [])]) == 0
        images[eta] = torch.load(saved, weights_only=True)
    assert not torch.equal(images["0"], images[None])


@pytest.mark.parametrize("flags, words", [
    (["--sampler", "ddim", "--eta", "1.5"], ["--eta must be from 0", "got 1.5"]),
    (["--sampler", "ddim", "--eta", "-0.1"], ["--eta must be from 0", "got -0.1"]),
    (["--eta", "0.5"], ["--eta applies to --sampler ddim", "dpm++2m-sde takes none"]),
    (["--sampler", "ddpm", "--eta", "1"], ["--eta applies to --sampler ddim", "--variance"]),
])
def test_bad_eta(run_dir, tmp_path, capsys, flags, words):
    out = tmp_path / "g.png"
    code = main(["sample", "--checkpoint", str(run_dir), "--n", "2", "--out", str(out), "--no-progress",
                 *flags])
    assert_one_line_error(capsys, code, *words)
    code = main(["evaluate", "--checkpoint", str(run_dir), "--metric", "fid", "--n", "2",
                 "--out", str(tmp_path / "m.json"), "--no-progress", *flags])
    assert_one_line_error(capsys, code, *words)
    assert not out.exists() and not (tmp_path / "m.json").exists()


def test_eta_with_bits_per_dim(run_dir, tmp_path, capsys):
    code = main(["evaluate", "--checkpoint", str(run_dir), "--metric", "bpd", "--eta", "1",
                 "--out", str(tmp_path / "m.json"), "--no-progress"])
    assert_one_line_error(capsys, code, "--eta applies to --metric fid")
    assert not (tmp_path / "m.json").exists()


def test_init_from_fine_tunes_a_finished_run(run_dir, tmp_path, capsys):
    fine = tmp_path / "fine"
    assert main(train_args(fine, "--init-from", str(run_dir / "ema.pt"))) == 0
    release = torch.load(fine / "ema.pt", weights_only=True)
    assert release["train_config"]["init_from"] == str(run_dir / "ema.pt")
    assert release["init"] == {"path": str(run_dir / "ema.pt"), "step": STEPS, "total_steps": STEPS}
    # A network of another width cannot start from it: one line, nothing written.
    other = tmp_path / "other"
    code = main(train_args(other, "--init-from", str(run_dir), "--base-channels", "16"))
    assert_one_line_error(capsys, code, "--init-from", "its network (a 'mnist-small' network) is not",
                          "base_channels 8 there, 16 here")
    assert not other.exists()


# ------------------------------------------------------------------ bad inputs


def test_unknown_dataset(tmp_path, capsys):
    code = main(["train", "--dataset", "mnsit", "--run-dir", str(tmp_path / "r"), *TINY])
    assert_one_line_error(capsys, code, "unknown dataset", "mnist", "cifar10")
    assert not (tmp_path / "r").exists()


def test_image_size_the_network_cannot_take(tmp_path, capsys):
    code = main(["train", "--dataset", "mnist", "--image-size", "30",
                 "--run-dir", str(tmp_path / "r"), *TINY])
    assert_one_line_error(capsys, code, "multiples of 4", "30x30", "32x32")


def test_missing_checkpoint(tmp_path, capsys):
    code = main(["sample", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "g.png")])
    assert_one_line_error(capsys, code, "no checkpoint at", "nope.pt")
    assert not (tmp_path / "g.png").exists()


def test_resume_without_a_checkpoint(tmp_path, capsys):
    code = main(["train", "--resume", "--run-dir", str(tmp_path / "empty"), "--no-progress"])
    assert_one_line_error(capsys, code, "nothing to resume")


def test_a_foreign_torch_file(tmp_path, capsys):
    torch.save({"state_dict": {"weight": torch.randn(3, 3)}}, tmp_path / "foreign.pt")
    code = main(["sample", "--checkpoint", str(tmp_path / "foreign.pt")])
    assert_one_line_error(capsys, code, "not a naivediffusion checkpoint")


def test_a_text_file_named_pt(tmp_path, capsys):
    (tmp_path / "notes.pt").write_text("these are my notes\n")
    code = main(["sample", "--checkpoint", str(tmp_path / "notes.pt")])
    assert_one_line_error(capsys, code, "not a naivediffusion checkpoint", "notes.pt")


class RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_that_runs_code(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": "naivediffusion", "payload": RunsCode(marker)}, f)
    code = main(["sample", "--checkpoint", str(tmp_path / "evil.pt")])
    assert_one_line_error(capsys, code, "refused")
    assert not marker.exists()


def test_a_checkpoint_of_another_model(run_dir, tmp_path, capsys):
    release = torch.load(run_dir / "ema.pt", weights_only=True)
    release["model_config"]["channel_mults"] = [1, 2]
    torch.save(release, tmp_path / "other.pt")
    code = main(["sample", "--checkpoint", str(tmp_path / "other.pt")])
    assert_one_line_error(capsys, code, "do not fit the model")


def test_ddpm_sampler_with_steps_is_respaced(run_dir, tmp_path, capsys):
    out = tmp_path / "g.png"
    assert main(["sample", "--checkpoint", str(run_dir), "--n", "2", "--sampler", "ddpm", "--steps", "10",
                 "--out", str(out), "--no-progress"]) == 0
    assert out.exists() and "ddpm 10 steps" in capsys.readouterr().out
    code = main(["sample", "--checkpoint", str(run_dir), "--sampler", "ddpm", "--steps", "0"])
    assert_one_line_error(capsys, code, "steps")


def test_train_without_a_dataset(tmp_path, capsys):
    code = main(["train", "--run-dir", str(tmp_path / "r"), "--no-progress"])
    assert_one_line_error(capsys, code, "--dataset is required", "--resume")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag", ["--n", "--batch-size"])
def test_sample_needs_at_least_one_image(run_dir, tmp_path, capsys, flag):
    code = main(["sample", "--checkpoint", str(run_dir), flag, "0", "--out", str(tmp_path / "g.png"),
                 "--no-progress"])
    assert_one_line_error(capsys, code, "--n and --batch-size must be at least 1")
    assert not (tmp_path / "g.png").exists()


def test_resume_refuses_a_changed_learning_rate(run_dir, capsys):
    before = (run_dir / "checkpoint.pt").read_bytes()
    code = main(["train", "--resume", "--run-dir", str(run_dir), "--lr", "0.5", "--no-progress"])
    assert_one_line_error(capsys, code, "cannot change lr when resuming", "another --run-dir")
    assert (run_dir / "checkpoint.pt").read_bytes() == before


def test_fp16_on_a_cpu(tmp_path, capsys):
    code = main(train_args(tmp_path / "r", "--precision", "fp16"))
    assert_one_line_error(capsys, code, "fp16 needs a CUDA GPU", "bf16")
    assert not (tmp_path / "r").exists()


@pytest.fixture
def no_network(monkeypatch):
    """Reaching for the network fails the test (the data must be looked for on disk only)."""

    def refuse(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_missing_data_fails_at_once_without_downloading(tmp_path, capsys, no_network):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(train_args(tmp_path / "r", "--data-root", str(empty)))
    assert_one_line_error(capsys, code, f"mnist not found in {empty / 'MNIST' / 'raw'}",
                          "downloading is off", "NAIVEDIFFUSION_DATA")
    assert not (tmp_path / "r").exists()


def test_a_diverged_run(tmp_path, capsys):
    run = tmp_path / "r"
    code = main(["train", "--dataset", "mnist", "--steps", "4", "--run-dir", str(run), "--lr", "1e30",
                 "--warmup-steps", "0", "--sample-every", "100", "--checkpoint-every", "100",
                 *TINY])
    line = assert_one_line_error(capsys, code, "training diverged", "--lr (now 1e+30)")
    assert "no checkpoint had been saved yet" in line
    assert not (run / "checkpoint.pt").exists() and not (run / "ema.pt").exists()


def test_evaluate_errors(run_dir, tmp_path, capsys):
    out = tmp_path / "m.json"
    code = main(["evaluate", "--checkpoint", str(tmp_path / "no.pt"), "--metric", "bpd",
                 "--out", str(out)])
    assert_one_line_error(capsys, code, "no checkpoint at", "no.pt")
    code = main(["evaluate", "--checkpoint", str(run_dir), "--metric", "bpd", "--n", "1",
                 "--device", "cpu", "--out", str(out), "--no-progress"])
    assert_one_line_error(capsys, code, "--n must be at least 2")
    code = main(["evaluate", "--checkpoint", str(run_dir), "--metric", "bpd", "--timesteps", "0",
                 "--device", "cpu", "--out", str(out), "--no-progress"])
    assert_one_line_error(capsys, code, "--timesteps must be from 1 to T=50")
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["evaluate", "--checkpoint", str(run_dir), "--metric", "bpd", "--n", "4",
                 "--data-root", str(empty), "--device", "cpu", "--out", str(out), "--no-progress"])
    assert_one_line_error(capsys, code, "mnist not found in", str(empty), "downloading is off")
    code = main(["evaluate", "--checkpoint", str(run_dir), "--metric", "bpd", "--n", "10001",
                 "--device", "cpu", "--out", str(out), "--no-progress"])
    assert_one_line_error(capsys, code, "asked for 10001 images, but the mnist test split has 10000")
    assert not out.exists()


# ------------------------------------------------------------------ help and entry point


def test_help_gives_every_flag_a_default():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert {"train", "sample", "evaluate"} <= set(subparsers.choices)
    for name, sub in subparsers.choices.items():
        text = sub.format_help()
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.option_strings[0] in text
            assert "default" in action.help or "required" in action.help, (name, action.dest)


def test_python_dash_m_entry_point(tmp_path):
    """A real process: `python -m naivediffusion` runs main() and returns its exit status."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-m", "naivediffusion", "sample", "--checkpoint", str(tmp_path / "no.pt")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: no checkpoint at") and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "naivediffusion", "--help"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0
    assert all(name in done.stdout for name in ("train", "sample", "evaluate"))


# ------------------------------------------------------------------ benchmarks/samplers.py


def test_the_sampler_benchmark_scores_the_images_that_sample_draws(run_dir, tmp_path, monkeypatch, capsys):
    samplers = load_benchmark("samplers")
    scored = []
    real = samplers.quality.sample_quality

    def spy(images, *args, **kwargs):
        scored.append(images)
        return real(images, *args, **kwargs)

    monkeypatch.setattr(samplers.quality, "sample_quality", spy)
    assert samplers.main(["--checkpoint", str(run_dir), "--n", "5", "--batch-size", "2",
                          "--samplers", "ddim:3:1,ddim:3:0,ddpm:posterior"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("DDIM", "DDPM"))]
    assert [row[:28].strip() for row in rows] == ["DDIM 3, eta 1", "DDIM 3, eta 0", "DDPM 50, sigma^2 = beta~"]
    assert "lowest score:" in out and len(scored) == 3
    # The same seed and batch size: the very images `sample` draws with those settings.
    for images, flags in zip(scored[:2], (["--eta", "1"], ["--eta", "0"]), strict=True):
        saved = tmp_path / "s.pt"
        assert main(["sample", "--checkpoint", str(run_dir), "--n", "5", "--sampler", "ddim", "--steps", "3",
                     "--batch-size", "2", "--out", str(tmp_path / "g.png"), "--save-samples", str(saved),
                     "--no-progress", *flags]) == 0
        assert torch.equal(torch.load(saved, weights_only=True), viz.to_uint8(images))
    assert not torch.equal(scored[0], scored[1])


def test_the_sampler_benchmark_draws_each_setting_per_seed_and_records_them(run_dir, tmp_path, capsys):
    samplers = load_benchmark("samplers")
    record = tmp_path / "samplers.json"
    assert samplers.main(["--checkpoint", str(run_dir), "--n", "4", "--batch-size", "4", "--seeds", "0,1",
                          "--samplers", "dpm++2m:3,dpm++2m-sde:3", "--json", str(record)]) == 0
    saved = json.loads(record.read_text())
    assert [(r["name"], r["seed"]) for r in saved["rows"]] == [
        ("DPM-Solver++(2M) 3", 0), ("DPM-Solver++(2M) SDE 3", 0), ("DPM-Solver++(2M) 3", 1), ("DPM-Solver++(2M) SDE 3", 1)]
    for name, summary in saved["summary"].items():
        mine = [r for r in saved["rows"] if r["name"] == name]
        assert summary["draws"] == 2 and summary["within_2x_floor"] == sum(r["fd"] <= 2 * r["fd_real"] for r in mine)
        assert summary["smudges"] == pytest.approx(sum(r["smudges"] for r in mine) / 2)
    assert saved["command"].startswith("python ") and "--seeds 0,1" in saved["command"] and saved["date"]
    assert "within 2x the floor in" in capsys.readouterr().out


@pytest.mark.parametrize("setting", ["ddim:0:1", "ddim:50:2", "ddim:50", "ddpm:sigma", "heun:50", "dpm++2m:0"])
def test_the_sampler_benchmark_refuses_a_bad_setting(setting, capsys):
    samplers = load_benchmark("samplers")
    with pytest.raises(SystemExit) as stop:
        samplers.main(["--samplers", f"ddim:50:0,{setting}"])
    assert stop.value.code == 2
    assert f"unknown sampler setting {setting!r}" in capsys.readouterr().err


# ------------------------------------------------------------------ benchmarks/targets.py


def test_the_targets_benchmark_reports_what_evaluate_measures(run_dir, tmp_path, capsys):
    targets = load_benchmark("targets")
    report = tmp_path / "targets.json"
    assert targets.main(["--checkpoint", str(run_dir), "--n", "6", "--seeds", "0,1", "--bpd-images", "4",
                         "--bpd-timesteps", "3", "--batch-size", "4", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    result = json.loads(report.read_text())["results"][0]
    # The second draw is exactly `evaluate --metric fid --seed 1`, run on its own.
    assert main(["evaluate", "--checkpoint", str(run_dir), "--metric", "fid", "--n", "6", "--seed", "1",
                 "--sampler", "ddim", "--batch-size", "4", "--out", str(tmp_path / "m.json"), "--no-progress"]) == 0
    alone = json.loads((tmp_path / "m.json").read_text())
    assert result["draws"][1]["fd"] == alone["fd"] and result["draws"][1]["smudges"] == alone["smudges"]
    assert set(result["bpd"]) == {"beta", "posterior"}
    assert "seed 1: score" in out and out.count(" met") + out.count("NOT met") >= 3


def test_the_targets_verdict():
    targets = load_benchmark("targets")
    draw = lambda fd, floor, smudges: {"fd": fd, "fd_real": floor, "smudges": smudges}
    result = {"draws": [draw(3.0, 2.0, 0.01), draw(5.0, 2.0, 0.02)],
              "bpd": {"beta": {"bpd": 1.9}, "posterior": {"bpd": 1.59}}}
    verdict = list(targets.verdict(result, 1000).values())
    assert verdict == [("1.5%", True), ("in 1 of 2 draws", False), ("1.590", True)]
    result["draws"][1] = draw(4.0, 2.0, 0.04)  # exactly 2x counts as within; 2.5% pooled does not pass
    result["bpd"]["posterior"]["bpd"] = 1.61
    verdict = list(targets.verdict(result, 1000).values())
    assert verdict == [("2.5%", False), ("in 2 of 2 draws", True), ("1.610", False)]


def test_the_targets_verdict_of_a_learned_variance_pairs_its_draws_by_seed():
    targets = load_benchmark("targets")
    draw = lambda seed, fd: {"seed": seed, "fd": fd, "fd_real": 2.0, "smudges": 0.0}
    baseline = {"checkpoint": "pretrained:mnist", "draws": [draw(0, 3.0), draw(1, 4.0), draw(2, 5.0)]}
    result = {"draws": [draw(2, 5.5), draw(0, 3.4), draw(1, 4.3)], "bpd": {"learned": {"bpd": 1.44}}}
    paired = targets.paired_scores(result["draws"], baseline)
    assert paired["differences"] == pytest.approx([0.5, 0.4, 0.3]) and paired["mean_difference"] == pytest.approx(0.4)
    bound, scores = targets.verdict(result, 1000, baseline=baseline).values()
    assert bound == ("1.440", True)
    assert scores[1] is False  # 0.4 worse, with a standard error of 0.06: worse
    result["draws"] = [draw(0, 3.4), draw(1, 3.5), draw(2, 5.2)]  # +0.4, -0.5, +0.2: not worse
    assert list(targets.verdict(result, 1000, baseline=baseline).values())[1][1] is True
    with pytest.raises(SystemExit, match="share a seed"):
        targets.paired_scores([draw(7, 1.0)], baseline)
