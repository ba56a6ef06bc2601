"""benchmarks/gpu_runbook.sh refuses bad input before it spends any of a GPU lease.

(Its steps themselves are checked by running `bash benchmarks/gpu_runbook.sh --dry-run`,
which takes minutes; see README.)
"""

import gzip
import os
import subprocess
from pathlib import Path

RUNBOOK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_runbook.sh"


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
    assert "exit code is the\n# number of steps" in done.stdout  # the whole header, to its last line


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
    assert "== speed mnist bf16: skipped, the budget of 0 s is spent" in log
    assert done.returncode >= 1  # the skipped steps count as failed
    assert f"MNIST from {tmp_path / 'gpu_data'}" in (out / "env.txt").read_text()


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
