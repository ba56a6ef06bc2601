"""Ctrl-C, SIGTERM and kill -9 during training: what is saved, and that resume continues exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train import assert_same_state, tiny_config

from naivediffusion.checkpoint import load_checkpoint
from naivediffusion.runfolder import TrainingInterrupted
from naivediffusion.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ctrl_c_saves_the_current_step_and_resume_is_exact(tmp_path, monkeypatch):
    # A cosine decay from step 1 on, so a resume that lost the schedule's position would show.
    settings = dict(steps=6, warmup_steps=1, lr=1e-3, lr_schedule="cosine", sample_every=3)
    straight = Trainer(tiny_config(tmp_path / "straight", **settings))
    straight.train(progress=False)

    interrupted = Trainer(tiny_config(tmp_path / "split", **settings))
    real_step, calls = interrupted.train_step, []

    def step_then_ctrl_c(x0):
        calls.append(1)
        loss = real_step(x0)
        if len(calls) == 3:  # as if Ctrl-C were pressed during the third step
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(interrupted, "train_step", step_then_ctrl_c)
    with pytest.raises(TrainingInterrupted) as stop:
        interrupted.train(progress=False)
    assert (stop.value.step, stop.value.exit_code) == (3, 130)  # the step under way was finished
    assert isinstance(stop.value, KeyboardInterrupt)  # a notebook sees an ordinary interrupt
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt")["step"] == 3
    assert not (tmp_path / "split" / "ema.pt").exists()  # only a finished run exports one
    # Python's own handler is back once train() has returned.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    torch.manual_seed(12345)
    resumed = Trainer.resume(tmp_path / "split")
    resumed.train(progress=False)
    a, b = straight.state_dict(), resumed.state_dict()
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["ema"], b["ema"])
    assert_same_state(a["optimizer"]["state"], b["optimizer"]["state"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 6


def _start_training(tmp_path, *flags):
    command = [sys.executable, "-m", "naivediffusion", "train", "--dataset", "mnist",
               "--run-dir", str(tmp_path / "run"), "--model", "mnist", "--base-channels", "8",
               "--batch-size", "8", "--timesteps", "50", "--steps", "100000", "--log-every", "1",
               "--sample-every", "100000", "--device", "cpu", "--no-progress", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, process, seconds=120):
    deadline = time.monotonic() + seconds
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            out, err = process.communicate()
            pytest.fail(f"training ended or hung before the condition held: {err[-2000:]}")
        time.sleep(0.2)


def test_sigterm_writes_a_checkpoint_and_exits_143(tmp_path):
    process = _start_training(tmp_path, "--checkpoint-every", "100000")
    log = tmp_path / "run" / "log.jsonl"
    _wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 3, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted by SIGTERM at step" in lines[0] and "--resume" in lines[0]
    step = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"]
    assert step >= 3 and f"at step {step};" in lines[0]
    # The log holds every step up to the checkpoint, and resume continues from it.
    assert json.loads(log.read_text().splitlines()[-1])["step"] >= step - 1
    trainer = Trainer.resume(tmp_path / "run", steps=step + 2)
    assert trainer.step == step
    assert trainer.train(progress=False)["step"] == step + 2


def test_kill_9_loses_at_most_the_steps_since_the_last_checkpoint(tmp_path):
    process = _start_training(tmp_path, "--checkpoint-every", "2")
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    log = tmp_path / "run" / "log.jsonl"
    _wait_for(lambda: checkpoint.exists() and len(log.read_text().splitlines()) >= 5, process)
    process.kill()  # SIGKILL: no handler runs
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    saved = load_checkpoint(checkpoint)  # atomic writes: never half a file
    logged = json.loads(log.read_text().splitlines()[-1])["step"]
    assert saved["step"] % 2 == 0 and logged - saved["step"] <= 2
    trainer = Trainer.resume(tmp_path / "run", steps=saved["step"] + 2)
    assert trainer.train(progress=False)["step"] == saved["step"] + 2
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, saved["step"] + 3))  # the lost steps were rewritten, once
