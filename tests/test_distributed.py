"""Training under torchrun: N processes with DistributedDataParallel take the steps of one.

The runs with two processes are the real command, `python -m torch.distributed.run
--standalone --nproc_per_node=2 -m naivediffusion train ...`, on the CPU (gloo), with the
tiny network of test_train (dropout 0, so the global random stream, which each process
draws from on its own, plays no part). Each is compared with the same run made in this
process with one. They agree within float tolerance, not bit for bit: the gradients are
summed in another order.
"""

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from test_train import tiny_config

from naivediffusion.__main__ import main
from naivediffusion.checkpoint import load_checkpoint
from naivediffusion.data import DATASETS, DatasetNotFoundError, EpochBatchSampler, load_dataset
from naivediffusion.distributed import (
    PROCESS_GROUP_TIMEOUT,
    Distributed,
    check_compile_for_processes,
    distributed_from_env,
    init_distributed,
    main_process_first,
)
from naivediffusion.train import Trainer, seed_dropout

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
# The flags that make tiny_config(..., dropout=0.0) on the command line.
TINY_FLAGS = ["--dataset", "mnist", "--model", "mnist", "--base-channels", "8", "--dropout", "0",
              "--timesteps", "50", "--batch-size", "8", "--steps", str(STEPS), "--log-every", "1",
              "--sample-every", "1000", "--checkpoint-every", "1000", "--num-sample-images", "4",
              "--device", "cpu", "--no-progress"]
# Float tolerance of the state after a few steps. The learning rate is still warming up
# (about 1e-6 per step); with 1e-3, Adam, which divides each gradient by its own size, would
# blow the rounding of gradients near 0 up to differences of about 2e-5 in the weights.
RTOL, ATOL = 1e-5, 1e-6


def torchrun_command(nproc: int, run_dir, *flags: str) -> tuple[list[str], dict]:
    """The command line and environment of `naivediffusion train` under torchrun."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "naivediffusion", "train", "--run-dir", str(run_dir),
               "--data-root", os.environ["NAIVEDIFFUSION_DATA"], *flags]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return command, env


def torchrun(nproc: int, run_dir, *flags: str) -> subprocess.CompletedProcess:
    """Run `naivediffusion train` under torchrun with `nproc` processes; check that it succeeded."""
    command, env = torchrun_command(nproc, run_dir, *flags)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def assert_close_state(a: dict, b: dict, path: str = "") -> None:
    """Every float tensor of two (nested) state dicts agrees within RTOL/ATOL, the rest exactly."""
    assert a.keys() == b.keys(), path
    for key in a:
        where = f"{path}.{key}"
        if isinstance(a[key], dict):
            assert_close_state(a[key], b[key], where)
        elif isinstance(a[key], torch.Tensor) and a[key].is_floating_point():
            assert torch.allclose(a[key], b[key], rtol=RTOL, atol=ATOL), \
                (where, (a[key] - b[key]).abs().max().item())
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), where
        else:
            assert a[key] == b[key], where


def max_difference(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())


def assert_same_run(one: dict, many: dict) -> None:
    """Two checkpoints of the same run, made by one process and by many."""
    assert many["step"] == one["step"] and many["data_position"] == one["data_position"]
    # The noise of the loss is drawn for the global batch by every process: the same stream.
    assert torch.equal(many["rng"]["noise"], one["rng"]["noise"])
    assert_close_state(one["model"], many["model"])
    assert_close_state(one["ema"], many["ema"])
    assert_close_state(one["optimizer"]["state"], many["optimizer"]["state"])
    assert many["scheduler"]["last_epoch"] == one["scheduler"]["last_epoch"]
    ignore = {"run_dir", "sample_steps"}  # sample_steps has no flag (it only draws the grids)
    assert ({k: v for k, v in many["train_config"].items() if k not in ignore}
            == {k: v for k, v in one["train_config"].items() if k not in ignore})


def log_lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: the tiny run with one process, made here, and its initial weights."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    trainer = Trainer(tiny_config(run_dir, dropout=0.0))
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train(progress=False)
    return run_dir, initial


# ------------------------------------------------------------------ two processes


def test_two_processes_take_the_steps_of_one(one_process, tmp_path):
    reference, initial = one_process
    run_dir = tmp_path / "two"
    done = torchrun(2, run_dir, *TINY_FLAGS)
    one, two = load_checkpoint(reference / "checkpoint.pt"), load_checkpoint(run_dir / "checkpoint.pt")
    assert_same_run(one, two)
    assert_close_state(load_checkpoint(reference / "ema.pt")["ema"], load_checkpoint(run_dir / "ema.pt")["ema"])
    # The steps moved the weights far more than the two runs differ (a wrong slice of the
    # batch or of the noise would give differences as large as the steps).
    moved = max_difference(one["model"], initial)
    assert max_difference(two["model"], one["model"]) < 1e-3 * moved

    # Rank 0 alone wrote: one log line per step, the loss of the whole global batch.
    lines, expected = log_lines(run_dir), log_lines(reference)
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    for line, want in zip(lines, expected, strict=True):
        assert line["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert line["lr"] == pytest.approx(want["lr"])
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "ema.pt", "log.jsonl", "samples"]
    assert [p.name for p in (run_dir / "samples").iterdir()] == [f"step_{STEPS:06d}.png"]
    # ... and printed: the start and end lines once each.
    assert done.stdout.count("training: ") == 1 and done.stdout.count("done: step 4") == 1
    assert "on 2 processes (4 each)" in done.stdout


def test_resume_with_another_number_of_processes(one_process, tmp_path):
    """A checkpoint holds the global state (data position, noise generator), so a run
    that one process began, two continue, as if one had gone on."""
    reference, _ = one_process
    run_dir = tmp_path / "split"
    Trainer(tiny_config(run_dir, dropout=0.0, steps=2)).train(progress=False)
    done = torchrun(2, run_dir, "--resume", "--steps", str(STEPS), "--no-progress")
    assert "resuming at step 2" in done.stdout
    assert_same_run(load_checkpoint(reference / "checkpoint.pt"), load_checkpoint(run_dir / "checkpoint.pt"))
    assert [line["step"] for line in log_lines(run_dir)] == list(range(1, STEPS + 1))


def test_a_class_conditional_run_on_two_processes_and_resumed_on_one(tmp_path):
    """A class-conditional run on two processes, continued in one, as one process makes it.
    (The network starts blind to labels, its residual branches being zero at first, so
    these few steps cannot show how the label drop mask was sliced: the next test does.)"""
    settings = dict(dropout=0.0, class_conditional=True, p_uncond=0.5)
    reference = Trainer(tiny_config(tmp_path / "one", **settings))
    reference.train(progress=False)
    torchrun(2, tmp_path / "two", *TINY_FLAGS, "--class-conditional", "--p-uncond", "0.5")
    one, two = load_checkpoint(tmp_path / "one" / "checkpoint.pt"), load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    assert two["train_config"]["class_conditional"] and two["model_config"]["num_classes"] == 10
    assert_same_run(one, two)

    Trainer.resume(tmp_path / "one", steps=STEPS + 2).train(progress=False)
    Trainer.resume(tmp_path / "two", steps=STEPS + 2).train(progress=False)
    assert_same_run(load_checkpoint(tmp_path / "one" / "checkpoint.pt"),
                    load_checkpoint(tmp_path / "two" / "checkpoint.pt"))


def test_sigterm_stops_every_process_at_the_same_step(tmp_path):
    """torchrun passes a SIGTERM on to each process; they agree on the step to stop at, and
    rank 0 writes the checkpoint of that step and prints the one line that says so."""
    run_dir = tmp_path / "run"
    command, env = torchrun_command(2, run_dir, *TINY_FLAGS, "--steps", "100000")  # the last --steps counts
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run_dir / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"training ended or hung before 3 steps: {process.communicate()[1][-3000:]}")
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # to torchrun, which sends it on
    out, err = process.communicate(timeout=120)
    step = load_checkpoint(run_dir / "checkpoint.pt")["step"]
    assert log_lines(run_dir)[-1]["step"] == step  # the stop step was finished, logged, saved
    stops = [line for line in err.splitlines() if "interrupted by SIGTERM" in line]
    assert len(stops) == 1 and f"at step {step};" in stops[0] and "--nproc_per_node=2" in stops[0], err[-3000:]
    # No process failed with a traceback; the one there may be is torchrun's own, saying that
    # it was sent a signal.
    assert err.count("Traceback") <= 1 and "[rank" not in err, err[-3000:]


# ------------------------------------------------------------------ preparing the data
#
# Two processes started here (torch.multiprocessing, "spawn"), each with the environment torchrun
# gives its process, on a gloo group. Their "download" of MNIST is a slow local copy of the real
# files (no network), so two processes downloading at once would be seen: the copy logs who made it.

# The longest a two-process test may take before it counts as hung (each takes about 10 s).
HANG_S = 50


def _join_processes(target, args_of_rank, world_size: int = 2) -> list[int]:
    """Start `world_size` processes running target(rank, world_size, *args_of_rank(rank)); their
    exit codes. Fails (after killing them) if any is still running after HANG_S seconds."""
    context = torch.multiprocessing.get_context("spawn")
    processes = [context.Process(target=target, args=(rank, world_size, *args_of_rank(rank)))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + HANG_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    assert not hung, f"rank(s) {hung} still running after {HANG_S} s: hung"
    return [process.exitcode for process in processes]


def _join_group(rank: int, world_size: int, store: str) -> None:
    """This process as rank `rank` of a torchrun launch of `world_size`, in a gloo group (the
    Trainer finds the group made and reuses it). Downloading is allowed here whatever the
    tests' environment says (conftest turns it off): the only "download" is `_fake_download`'s."""
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank),
                      NAIVEDIFFUSION_DOWNLOAD="1", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=world_size, timeout=PROCESS_GROUP_TIMEOUT)


def _fake_download(rank: int, log: Path, source: Path | None):
    """In place of torchvision's download of one MNIST file: log it, then copy the file from the
    real MNIST folder `source`, half now and half a moment later (a reader that does not wait
    finds a half-written file), or, with no `source`, fail as a download without network does."""
    def download_and_extract_archive(url, download_root, filename=None, md5=None, **kwargs):
        name = (filename or url.rsplit("/", 1)[-1]).removesuffix(".gz")
        with open(log, "a") as file:
            file.write(f"{rank} {name}\n")
        time.sleep(0.2)
        if source is None:
            raise URLError("[Errno -3] Temporary failure in name resolution")
        data = (source / name).read_bytes()
        with open(Path(download_root) / name, "wb") as file:
            file.write(data[:len(data) // 2])
            file.flush()
            time.sleep(0.2)
            file.write(data[len(data) // 2:])

    return download_and_extract_archive


def _train_on_an_empty_root(rank, world_size, store, root, log, source, run_dir, result):
    _join_group(rank, world_size, store)
    torchvision.datasets.mnist.download_and_extract_archive = _fake_download(rank, log, Path(source))
    trainer = Trainer(tiny_config(run_dir, data_root=root, steps=2, dropout=0.0))
    images = trainer.dataset.images  # data_on_device: all of MNIST as one uint8 tensor
    record = {"rank": rank, "images": len(images),
              "digest": hashlib.sha256(images.cpu().numpy().tobytes()).hexdigest()}
    record["step"] = trainer.train(progress=False)["step"]
    Path(result).write_text(json.dumps(record))
    torch.distributed.destroy_process_group()


def _cli_with_a_failing_download(rank, world_size, store, root, log, run_dir, stderr):
    _join_group(rank, world_size, store)
    torchvision.datasets.mnist.download_and_extract_archive = _fake_download(rank, log, None)
    flags = [*TINY_FLAGS, "--steps", "2", "--data-root", root]
    with open(stderr, "w") as err, contextlib.redirect_stderr(err):
        code = main(["train", "--run-dir", run_dir, *flags])
    sys.exit(code)


def _one_rank_fails(rank, world_size, store, failing_rank, order, result):
    _join_group(rank, world_size, store)
    try:
        with main_process_first(distributed_from_env()):
            with open(order, "a") as file:
                file.write(f"{rank}\n")
            if rank == failing_rank:
                raise DatasetNotFoundError(f"rank {rank} finds no data")
        outcome = "ok"
    except (ValueError, FileNotFoundError) as err:
        outcome = f"{type(err).__name__}: {err}"
    Path(result).write_text(outcome)


def test_rank_0_downloads_the_data_while_the_others_wait(tmp_path, mnist_root):
    """On an empty data root, rank 0 alone downloads (each file once); the other rank waits,
    then reads the same images from disk, and both train."""
    root, log = tmp_path / "data", tmp_path / "downloads.log"
    root.mkdir()
    source = mnist_root / DATASETS["mnist"].folder

    def args(rank):
        return (str(tmp_path / "store"), str(root), log, str(source), str(tmp_path / "run"),
                str(tmp_path / f"rank{rank}.json"))

    assert _join_processes(_train_on_an_empty_root, args) == [0, 0]
    downloads = log.read_text().splitlines()
    assert sorted(downloads) == sorted(f"0 {name}" for name in DATASETS["mnist"].files), downloads
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    real = load_dataset("mnist", root=mnist_root, in_memory=True, download=False).images
    assert ranks[0]["images"] == ranks[1]["images"] == len(real) == 60_000
    assert ranks[0]["digest"] == ranks[1]["digest"] == hashlib.sha256(real.numpy().tobytes()).hexdigest()
    assert ranks[0]["step"] == ranks[1]["step"] == 2
    assert [line["step"] for line in log_lines(tmp_path / "run")] == [1, 2]


def test_when_rank_0_cannot_download_every_process_stops_with_one_line(tmp_path):
    root, log = tmp_path / "data", tmp_path / "downloads.log"
    root.mkdir()

    def args(rank):
        return (str(tmp_path / "store"), str(root), log, str(tmp_path / "run"), tmp_path / f"rank{rank}.err")

    assert _join_processes(_cli_with_a_failing_download, args) == [2, 2]
    # Rank 0 tried each mirror of the first file; rank 1 never tried.
    assert {line.split()[0] for line in log.read_text().splitlines()} == {"0"}
    zero, one = ((tmp_path / f"rank{rank}.err").read_text().strip().splitlines() for rank in (0, 1))
    assert len(zero) == 1 and zero[0].startswith("error (rank 0 of 2): mnist not found in "), zero
    assert "could not be downloaded (" in zero[0] and "name resolution" in zero[0], zero
    assert one == ["error (rank 1 of 2): rank 0 could not prepare the data, so this process stops too; "
                   "rank 0's error says why"]
    assert not (tmp_path / "run").exists()


def test_when_another_rank_cannot_load_every_process_stops(tmp_path):
    """Rank 0's body ran first; rank 1's failed: rank 1 raises its own error, rank 0 a line that
    names rank 1, and neither waits for the other at the first step."""
    def args(rank):
        return (str(tmp_path / "store"), 1, tmp_path / "order", tmp_path / f"rank{rank}.txt")

    assert _join_processes(_one_rank_fails, args) == [0, 0]
    assert (tmp_path / "order").read_text().split() == ["0", "1"]
    assert (tmp_path / "rank1.txt").read_text() == "DatasetNotFoundError: rank 1 finds no data"
    assert (tmp_path / "rank0.txt").read_text() == ("ValueError: rank 1 of 2 could not prepare the data, so "
                                                   "this process stops too; rank 1's error says why")


def test_one_process_prepares_the_data_alone():
    ran = []
    with main_process_first(Distributed()):  # no process group: nothing to wait for
        ran.append(True)
    assert ran == [True]
    with pytest.raises(DatasetNotFoundError, match="gone"), main_process_first(Distributed()):
        raise DatasetNotFoundError("gone")


# ------------------------------------------------------------------ no processes


def test_each_rank_takes_its_rows_of_the_global_noise_and_drop_mask(tmp_path, monkeypatch):
    """What the network sees on rank 0 and rank 1 of two, put together, is what it sees in
    one process: the same x_t (so the same t and eps) and the same labels left after the
    drop. Ranks are simulated by setting `trainer.dist`; train_step itself never talks to
    the other processes (DDP does, inside backward(), and here there is no DDP)."""
    trainer = Trainer(tiny_config(tmp_path / "run", class_conditional=True, p_uncond=0.5, dropout=0.0))
    seen, real = [], trainer.network

    def spy(x_t, t, labels):
        seen.append((x_t.detach().clone(), t.clone(), labels.clone()))
        return real(x_t, t, labels)

    monkeypatch.setattr(trainer, "network", spy)
    x0 = torch.rand(8, 1, 28, 28) * 2 - 1
    labels = torch.arange(8)
    state = trainer.noise_generator.get_state()
    trainer.train_step(x0, labels)  # one process: the whole global batch of 8
    for rank in (0, 1):
        trainer.noise_generator.set_state(state)  # every rank's generator is at the same point
        monkeypatch.setattr(trainer, "dist", Distributed(world_size=2, rank=rank, local_rank=rank))
        rows = slice(4 * rank, 4 * rank + 4)
        trainer.train_step(x0[rows], labels[rows])
    whole, *parts = seen
    dropped = whole[2] == 10
    assert dropped.any() and not dropped.all()  # the mask matters in this batch
    for i, what in enumerate(("x_t", "t", "labels")):
        assert torch.equal(torch.cat([part[i] for part in parts]), whole[i]), what


def test_each_rank_reads_its_slice_of_the_global_batch():
    one = iter(EpochBatchSampler(100, 8, seed=3, epoch=1, position=2))
    ranks = [iter(EpochBatchSampler(100, 8, seed=3, epoch=1, position=2, rank=r, world_size=4))
             for r in range(4)]
    for _ in range(15):  # across the end of an epoch
        slices = [next(rank) for rank in ranks]
        assert all(len(s) == 2 for s in slices)
        assert sum(slices, []) == next(one)


def test_the_environment_of_torchrun(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed_from_env() == Distributed() and not Distributed().enabled
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: nothing distributed
    assert distributed_from_env() == Distributed()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    where = distributed_from_env()
    assert (where.world_size, where.rank, where.local_rank, where.enabled, where.is_main) == (4, 3, 1, True, False)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK=4 .* WORLD_SIZE=4"):
        distributed_from_env()
    monkeypatch.delenv("RANK")
    with pytest.raises(ValueError, match="torchrun"):
        distributed_from_env()


def test_a_global_batch_that_does_not_split_evenly(tmp_path, monkeypatch, capsys):
    # As torchrun would set them for rank 0 of 3; the check comes before any process group.
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match=r"--batch-size 8 .* 3 processes.* not divisible by 3.* 6 or 9"):
        Trainer(tiny_config(tmp_path / "run"))
    assert main(["train", "--run-dir", str(tmp_path / "cli"), *TINY_FLAGS]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()  # one line, naming the process, no traceback
    assert len(lines) == 1 and lines[0].startswith("error (rank 0 of 3): --batch-size 8 "), err
    assert "multiple of 3" in lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "cli").exists()


def test_the_process_group_waits_longer_than_a_compile(monkeypatch):
    """The group's timeout is set, not left to torch's default (10 minutes for NCCL), so a rank
    still compiling its first step is not given up on by the others."""
    joined = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kwargs: joined.append((backend, kwargs)))
    assert init_distributed(Distributed(world_size=2, rank=1), torch.device("cpu")) == torch.device("cpu")
    [(backend, kwargs)] = joined
    assert backend == "gloo" and kwargs["timeout"] == PROCESS_GROUP_TIMEOUT
    assert PROCESS_GROUP_TIMEOUT.total_seconds() >= 30 * 60


def test_each_rank_draws_its_own_dropout_masks(tmp_path):
    """Rank 0 keeps the stream a single process has; other ranks take their own, also after a
    resume (where every rank restores the checkpoint's generator state, which rank 0 saved)."""
    torch.manual_seed(7)
    expected = torch.rand(8)
    streams = {}
    for rank in (0, 1, 2):
        torch.manual_seed(7)
        seed_dropout(7, rank)
        streams[rank] = torch.rand(8)
    assert torch.equal(streams[0], expected)  # one process is unchanged
    assert not torch.equal(streams[1], streams[0]) and not torch.equal(streams[2], streams[1])

    trainer = Trainer(tiny_config(tmp_path / "run", steps=2))
    trainer.train(progress=False)
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    after = {}
    for rank in (0, 1, 1):
        trainer.dist = Distributed(world_size=2, rank=rank, local_rank=rank)
        trainer.load_state_dict(checkpoint)
        after.setdefault(rank, []).append(torch.rand(8))
    assert not torch.equal(after[0][0], after[1][0])  # the ranks' masks differ after a resume
    assert torch.equal(after[1][0], after[1][1])  # and each rank's stream is its seed's


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_compile_with_cuda_graphs_is_refused_under_torchrun(tmp_path, monkeypatch, capsys, mode):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match=f"--compile {mode} records CUDA graphs.* use --compile default"):
        Trainer(tiny_config(tmp_path / "run", compile=mode))
    assert main(["train", "--run-dir", str(tmp_path / "cli"), *TINY_FLAGS, "--batch-size", "8",
                 "--compile", mode]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "max-autotune-no-cudagraphs" in lines[0], lines
    assert not (tmp_path / "run").exists() and not (tmp_path / "cli").exists()
    check_compile_for_processes(mode, world_size=1)  # one process: allowed
    for fine in ("none", "default", "max-autotune-no-cudagraphs"):
        check_compile_for_processes(fine, world_size=2)
