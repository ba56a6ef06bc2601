"""benchmarks/gpu_runbook.sh refuses bad input before it spends any of a GPU lease, its steps'
time limits fit its budget, and benchmarks/speed.py keeps what it measured when its step is cut
short.

(Its steps themselves are checked by running `bash benchmarks/gpu_runbook.sh --dry-run`,
which takes minutes; see README.)
"""

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from benchmark_module import load_benchmark

REPO = Path(__file__).resolve().parents[1]
RUNBOOK = REPO / "benchmarks" / "gpu_runbook.sh"
SPEED = REPO / "benchmarks" / "speed.py"


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


def run(*args, cwd, env=None):
    return subprocess.run(["bash", str(RUNBOOK), *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_unknown_option_is_one_line_and_exit_2(tmp_path):
    done = run("--fast", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == ("gpu_runbook.sh: unknown option --fast; use --dry-run, --wheels DIR, "
                                   "--data DIR or an output folder")
    assert not (tmp_path / "out").exists()


def test_missing_wheels_stop_before_any_step(tmp_path):
    out = tmp_path / "out"
    done = run("--wheels", str(tmp_path / "nowhere"), str(out), cwd=tmp_path)
    assert done.returncode == 2
    assert f"wheel folder {tmp_path / 'nowhere'} does not exist" in done.stdout
    assert "fetch_gpu_wheels.sh" in done.stdout
    assert "== " not in (out / "runbook.log").read_text()  # no step started
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "nbval-0.11.0-py2.py3-none-any.whl").write_bytes(b"")
    done = run("--wheels", str(tmp_path / "wheels"), str(out), cwd=tmp_path)
    assert done.returncode == 2 and "no ipykernel wheel in" in done.stdout


def test_help_lists_the_files_it_writes(tmp_path):
    done = run("--help", cwd=tmp_path)
    assert done.returncode == 0
    for name in ("runbook.log", "env.txt", "speed_mnist.json", "speed_cifar10.json", "pretrained.tar",
                 "targets.json", "nbval.txt", "--data DIR", "pack_gpu_data.sh"):
        assert name in done.stdout
    # The whole header, to its last line.
    assert done.stdout.rstrip().endswith("# code is the number of steps that failed, ran out of time or were skipped.")


def runbook_shares():
    """The runbook's LIMIT table ({step: seconds}), RESERVE, default budget, and the names of
    the steps it runs or skips, read from the script's text."""
    text = RUNBOOK.read_text()
    block = re.search(r"^declare -A LIMIT=\($(.*?)^\)$", text, re.S | re.M)[1]
    entries = [line for line in block.splitlines() if line.strip()]
    shares = {m[1]: int(m[2]) for m in (re.match(r"\s*\[([\w-]+)\]=(\d+)\s*(#.*)?$", line) for line in entries)
              if m}
    assert len(shares) == len(entries), block  # every line of the table is one share
    reserve = int(re.search(r"^RESERVE=(\d+)\b", text, re.M)[1])
    budget = int(re.search(r"^default_budget=(\d+)$", text, re.M)[1])
    assert "budget=${RUNBOOK_SECONDS:-$((default_budget * scale))}" in text
    used = re.findall(r"^\s*(?:if\s+)?(?:step|skip)\s+([\w-]+)\s", text, re.M)
    return shares, reserve, budget, used


def test_step_limits_add_up_to_at_most_the_budget():
    """Each step has a share of the budget, set in one place; they fit the default budget with
    the seconds spent between steps, so that no step is starved by the ones before it."""
    shares, reserve, budget, used = runbook_shares()
    assert budget == 530 and reserve > 0
    assert set(used) == set(shares), "every step, run or skipped, has a share, and every share a step"
    assert all(seconds >= 5 for seconds in shares.values())  # a step with less is skipped at once
    assert sum(shares.values()) + reserve <= budget, (sum(shares.values()), reserve, budget)


def test_missing_mnist_stops_before_any_step(tmp_path):
    """The data folder beside the repository does not travel to a GPU machine: without MNIST
    the run must stop at once, not spend the lease on steps that cannot read it."""
    out = tmp_path / "out"
    done = run("--dry-run", "--data", str(tmp_path / "nowhere"), str(out), cwd=tmp_path)
    assert done.returncode == 2
    assert f"no folder {tmp_path / 'nowhere'}/MNIST/raw" in done.stdout and "pack_gpu_data.sh" in done.stdout
    empty = tmp_path / "empty"
    (empty / "MNIST" / "raw").mkdir(parents=True)
    for args, env in (((), {"NAIVEDIFFUSION_DATA": str(empty)}), (("--data", str(empty)), {})):
        done = run("--dry-run", *args, str(out), cwd=tmp_path, env=env)
        assert done.returncode == 2, args
        assert "no MNIST file train-images-idx3-ubyte in" in done.stdout
        assert "== " not in (out / "runbook.log").read_text()  # no step started


def test_data_folder_is_unpacked_and_used(tmp_path):
    """--data DIR with gzipped files (as pack_gpu_data.sh writes them) passes the check; with a
    budget of 0 seconds every step is then skipped at once."""
    data = tmp_path / "gpu_data" / "MNIST" / "raw"
    data.mkdir(parents=True)
    for name in MNIST_FILES:
        (data / f"{name}.gz").write_bytes(gzip.compress(b"not really MNIST"))
    out = tmp_path / "out"
    done = run("--dry-run", "--data", str(tmp_path / "gpu_data"), str(out), cwd=tmp_path,
               env={"RUNBOOK_SECONDS": "0", "NAIVEDIFFUSION_DATA": str(tmp_path / "elsewhere")})
    log = (out / "runbook.log").read_text()
    assert "no MNIST" not in done.stdout
    assert f"MNIST from {tmp_path / 'gpu_data'}" in (out / "env.txt").read_text()
    # Every step is skipped and counted, export and targets too (no model was trained).
    shares, *_ = runbook_shares()
    steps = [name for name in shares if not name.startswith("wheels")]  # no --wheels given
    for name in steps:
        assert f"== {name}: skipped, " in log, name
    assert "== speed-mnist-bf16: skipped, the budget of 0 s is spent" in log
    assert "== export: skipped, train-mnist left no " in log
    assert log.rstrip().splitlines()[-1].startswith("== done in ")
    assert f": 0 steps ran, 0 failed, {len(steps)} skipped; results in {out}" in log
    assert done.returncode == len(steps)
    # nbval.txt holds the nbval step's own part of the log only.
    assert (out / "nbval.txt").read_text().strip() == "== nbval: skipped, the budget of 0 s is spent"


def test_pack_gpu_data_gzips_the_four_files(tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        (raw / name).write_bytes(name.encode() * 100)
    pack = RUNBOOK.parent / "pack_gpu_data.sh"
    done = subprocess.run(["bash", str(pack), str(tmp_path / "packed")], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "NAIVEDIFFUSION_DATA": str(tmp_path / "data")})
    assert done.returncode == 0, done.stderr
    for name in MNIST_FILES:
        assert gzip.decompress((tmp_path / "packed" / "MNIST" / "raw" / f"{name}.gz").read_bytes()) == name.encode() * 100
    (raw / MNIST_FILES[0]).unlink()
    done = subprocess.run(["bash", str(pack), str(tmp_path / "again")], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "NAIVEDIFFUSION_DATA": str(tmp_path / "data")})
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert f"no {raw / MNIST_FILES[0]}" in done.stderr and not (tmp_path / "again").exists()


def test_speed_without_diffusers_never_imports_it_and_writes_its_rows(tmp_path):
    """`speed.py --no-diffusers` (as the runbook's mnist steps run it) with a diffusers on the
    path that fails on import: it runs, and its JSON holds the row it measured."""
    fake = tmp_path / "fake"
    (fake / "diffusers").mkdir(parents=True)
    (fake / "diffusers" / "__init__.py").write_text('raise RuntimeError("diffusers was imported")\n')
    path = os.pathsep.join([str(fake), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path}
    trap = subprocess.run([sys.executable, "-c", "import diffusers"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert "diffusers was imported" in trap.stderr  # the trap is set
    out = tmp_path / "out" / "speed.json"
    out.parent.mkdir()
    done = subprocess.run([sys.executable, str(SPEED), "--dry-run", "--device", "cpu", "--model", "mnist-small",
                           "--compile", "none", "--no-diffusers", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["complete"] is True and result["diffusers"] is None
    assert [row["name"] for row in result["rows"]] == ["naivediffusion (compile=none)"]
    assert result["rows"][0]["seconds_per_step"] > 0 and set(result["flops_per_step"]) == {"naivediffusion"}
    assert list(out.parent.iterdir()) == [out]  # no temporary file left beside it


class Stopped(Exception):
    """Stands for the kill at a step's time limit."""


def test_speed_keeps_the_rows_of_a_run_stopped_part_way(tmp_path, monkeypatch):
    """speed.py rewrites its JSON after each compile mode's rows (and the sampler, which it
    measures before the next mode compiles): a run stopped while the second mode compiles
    leaves the first mode's rows, marked incomplete, in a whole file."""
    speed = load_benchmark("speed")
    out = tmp_path / "speed.json"
    timed = []
    real_time_rounds = speed.time_rounds

    def time_rounds(group, *args):
        timed.append([c.name for c in group])
        if len(timed) == 2:  # the second mode: its warm-up would compile it
            assert json.loads(out.read_text())["sampling"] is not None  # written before it
            raise Stopped
        real_time_rounds(group, *args)

    sampled = {"n": 8, "ddim_steps": 50, "network_calls_s": 1.0, "sample_s": 1.1, "overhead": 0.1}
    monkeypatch.setattr(speed, "time_rounds", time_rounds)
    monkeypatch.setattr(speed, "sampling_overhead", lambda *args: dict(sampled))
    monkeypatch.setattr(sys, "argv", ["speed.py", "--dry-run", "--device", "cpu", "--model", "mnist-small",
                                      "--compile", "none,reduce-overhead", "--data-on-host", "--no-diffusers",
                                      "--sampling", "1000", "--json", str(out)])
    with pytest.raises(Stopped):
        speed.main()
    first = ["naivediffusion (compile=none)", "naivediffusion (compile=none, data on host)"]
    assert timed == [first, ["naivediffusion (compile=reduce-overhead)"]]
    result = json.loads(out.read_text())
    assert result["complete"] is False
    assert [row["name"] for row in result["rows"]] == first
    assert all(row["compile"] == "none" and len(row["rounds"]) == 1 for row in result["rows"])
    assert result["sampling"] == sampled
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left beside it
