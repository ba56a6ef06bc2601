"""benchmarks/gpu_runbook.sh refuses bad input before it spends any of a GPU lease.

(Its steps themselves are checked by running `bash benchmarks/gpu_runbook.sh --dry-run`,
which takes minutes; see README.)
"""

import subprocess
from pathlib import Path

RUNBOOK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_runbook.sh"


def run(*args, cwd):
    return subprocess.run(["bash", str(RUNBOOK), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_unknown_option_is_one_line_and_exit_2(tmp_path):
    done = run("--fast", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == ("gpu_runbook.sh: unknown option --fast; use --dry-run, --wheels DIR "
                                   "or an output folder")
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
    for name in ("runbook.log", "env.txt", "speed_mnist.json", "speed_cifar10.json", "pretrained.tar", "nbval.txt"):
        assert name in done.stdout
