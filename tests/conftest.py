"""Fixtures for the unit tests (environment variables are set in ../conftest.py)."""

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def mnist_root() -> Path:
    """The folder that holds real MNIST in torchvision's layout (MNIST/raw/...)."""
    root = Path(os.environ["NAIVEDIFFUSION_DATA"])
    if not (root / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        pytest.fail(f"real MNIST not found under {root}; set NAIVEDIFFUSION_DATA to the data folder")
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks gain nothing from threads, and on a busy 2-core machine OpenMP threads
    that wait for each other make a step up to 100 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
