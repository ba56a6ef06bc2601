"""Datasets: the pixel scaling of Sec. 3.3, flips, data roots and clear errors."""

import hashlib
import os
import pickle
import socket
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from naivediffusion.data import (
    DATASETS,
    DatasetNotFoundError,
    dataset_info,
    default_data_root,
    load_dataset,
    scale_to_unit_interval,
)


def paper_scaling(raw: np.ndarray) -> torch.Tensor:
    """Integers 0..255 scaled linearly to [-1, 1] (Sec. 3.3), computed independently in numpy."""
    return torch.from_numpy(raw.astype(np.float32) / np.float32(127.5) - np.float32(1.0))


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): zero bytes, type 0x08 (uint8), rank, big-endian sizes."""
    data = path.read_bytes()
    zero, dtype, rank = struct.unpack(">HBB", data[:4])
    assert (zero, dtype) == (0, 0x08)
    shape = struct.unpack(f">{rank}I", data[4 : 4 + 4 * rank])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network fails the test instead of being caught as 'offline'."""

    def refuse(*args, **kwargs):
        raise AssertionError("the dataset tried to reach the network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def offline(monkeypatch):
    """The network is down: name resolution fails, as on a machine without internet."""

    def fail(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)


# ---------------------------------------------------------------------------
# The scaling map


def test_scaling_is_the_papers_linear_map():
    levels = torch.arange(256, dtype=torch.uint8)
    x = scale_to_unit_interval(levels)
    assert x.dtype == torch.float32
    assert x[0] == -1.0 and x[255] == 1.0
    torch.testing.assert_close(x.double(), levels.double() / 127.5 - 1, rtol=0, atol=1e-7)
    # Neighbouring levels are 2/255 apart, the bin width of the decoder of Eq. 13.
    torch.testing.assert_close(x.diff().double(), torch.full((255,), 2 / 255, dtype=torch.float64))


# ---------------------------------------------------------------------------
# MNIST: the real files under NAIVEDIFFUSION_DATA, read offline


def test_mnist_from_shared_data(no_network, monkeypatch):
    monkeypatch.delenv("NAIVEDIFFUSION_DOWNLOAD", raising=False)  # the user's default
    train = load_dataset("mnist")  # downloading is on by default; the files are there, so it is not used
    test = load_dataset("mnist", train=False, download=False)
    assert (len(train), len(test)) == (60000, 10000)

    x, label = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert isinstance(label, int) and label == 5
    assert test[0][1] == 7
    assert x.min() == -1.0 and x.max() == 1.0  # the first digit uses both ends of 0..255

    raw = read_idx(default_data_root() / "MNIST" / "raw" / "train-images-idx3-ubyte")
    assert raw.shape == (60000, 28, 28)
    for index in (0, 1, 59999):
        assert torch.equal(train[index][0], paper_scaling(raw[index])[None])


def test_mnist_resized_and_info():
    x, _ = load_dataset("mnist", train=False, image_size=32, download=False)[0]
    assert x.shape == (1, 32, 32)
    assert -1.0 <= x.min() and x.max() <= 1.0
    assert dataset_info("mnist") == (1, 28, 10)
    assert dataset_info("mnist", image_size=32) == (1, 32, 10)


def test_mnist_is_never_flipped():
    torch.manual_seed(0)
    dataset = load_dataset("mnist", download=False)
    first = dataset[0][0]
    assert all(torch.equal(dataset[0][0], first) for _ in range(20))


# ---------------------------------------------------------------------------
# Fashion-MNIST: tiny files in the real IDX layout torchvision reads


def make_fashion_mnist(root: Path, rng: np.random.Generator):
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    splits = {}
    for prefix, n in (("train", 5), ("t10k", 3)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        splits[prefix] = images, labels
    assert sorted(p.name for p in raw.iterdir()) == sorted(DATASETS["fashion-mnist"].files)
    return splits


def test_fashion_mnist_on_idx_files(tmp_path):
    splits = make_fashion_mnist(tmp_path, np.random.default_rng(0))
    for train, prefix in ((True, "train"), (False, "t10k")):
        images, labels = splits[prefix]
        dataset = load_dataset("fashion-mnist", root=tmp_path, train=train, download=False)
        assert len(dataset) == len(images)
        for index in range(len(images)):
            x, label = dataset[index]
            assert x.shape == (1, 28, 28)
            assert torch.equal(x, paper_scaling(images[index])[None])
            assert label == labels[index]
        assert dataset[0][0].min() == -1.0 and dataset[0][0].max() == 1.0

    resized = load_dataset("fashion-mnist", root=tmp_path, image_size=16, download=False)
    channels, size, _ = dataset_info("fashion-mnist", image_size=16)
    assert resized[0][0].shape == (channels, size, size) == (1, 16, 16)


# ---------------------------------------------------------------------------
# CIFAR-10: a tiny cifar-10-batches-py in the real pickle layout


def make_cifar10(root: Path, monkeypatch, rng: np.random.Generator):
    """Batches of 2 images each: dicts with "data" uint8 [N, 3072] (the R, G, B planes of
    a 32 x 32 image one after another) and "labels". torchvision checks each file's md5,
    so the class is told the md5s of these files."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def write(name, entry):
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        return [name, hashlib.md5((folder / name).read_bytes()).hexdigest()]

    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)
        batches[name] = data, [int(v) for v in rng.integers(0, 10, size=2)]
    # The first training and test images are black on the left half, white on the right.
    asymmetric = np.zeros((3, 32, 32), dtype=np.uint8)
    asymmetric[:, :, 16:] = 255
    asymmetric[1, :, 16:] = 200  # and the green plane differs, to catch a channel mix-up
    for name in ("data_batch_1", "test_batch"):
        batches[name][0][0] = asymmetric.reshape(-1)

    train_list = [write(name, {"data": batches[name][0], "labels": batches[name][1]})
                  for name in batches if name != "test_batch"]
    test_list = [write("test_batch", {"data": batches["test_batch"][0],
                                      "labels": batches["test_batch"][1]})]
    names = list(DATASETS["cifar10"].classes)
    meta_md5 = write("batches.meta", {"label_names": names, "num_vis": 3072})[1]
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "train_list", train_list)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "test_list", test_list)
    meta = {"filename": "batches.meta", "key": "label_names", "md5": meta_md5}
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "meta", meta)
    assert sorted(p.name for p in folder.iterdir()) == sorted(DATASETS["cifar10"].files)
    return batches, asymmetric


def test_cifar10_values_and_labels(tmp_path, monkeypatch):
    batches, _ = make_cifar10(tmp_path, monkeypatch, np.random.default_rng(0))
    train = load_dataset("cifar10", root=tmp_path, download=False, augment=False)
    test = load_dataset("cifar10", root=tmp_path, train=False, download=False)
    assert (len(train), len(test)) == (10, 2)
    assert train.classes == list(DATASETS["cifar10"].classes)

    train_images = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    for index in range(10):
        x, label = train[index]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert torch.equal(x, paper_scaling(train_images[index].reshape(3, 32, 32)))
        assert isinstance(label, int) and label == train_labels[index]
    assert test[1][1] == batches["test_batch"][1][1]
    assert dataset_info("cifar10") == (3, 32, 10)


def test_cifar10_flips_in_training_only(tmp_path, monkeypatch):
    _, asymmetric = make_cifar10(tmp_path, monkeypatch, np.random.default_rng(1))
    upright = paper_scaling(asymmetric)
    mirrored = upright.flip(-1)

    def orientations(dataset, draws=40):
        seen = []
        for _ in range(draws):
            x = dataset[0][0]
            assert torch.equal(x, upright) or torch.equal(x, mirrored)
            seen.append(torch.equal(x, mirrored))
        return seen

    torch.manual_seed(0)
    seen = orientations(load_dataset("cifar10", root=tmp_path, download=False))
    assert any(seen) and not all(seen)
    assert 5 < sum(seen) < 35  # a fair coin, not a rare event
    test = load_dataset("cifar10", root=tmp_path, train=False, download=False)
    assert not any(orientations(test))
    no_augment = load_dataset("cifar10", root=tmp_path, download=False, augment=False)
    assert not any(orientations(no_augment))


def test_cifar10_resized(tmp_path, monkeypatch):
    make_cifar10(tmp_path, monkeypatch, np.random.default_rng(2))
    x, _ = load_dataset("cifar10", root=tmp_path, image_size=64, download=False)[0]
    assert x.shape == (3, 64, 64)
    assert dataset_info("cifar10", image_size=64) == (3, 64, 10)


# ---------------------------------------------------------------------------
# A folder of images


def test_folder_of_images(tmp_path):
    folder = tmp_path / "pictures"
    (folder / "nested" / "deeper").mkdir(parents=True)
    Image.new("RGB", (60, 40), (255, 0, 128)).save(folder / "wide.png")
    Image.new("L", (30, 50), 0).save(folder / "nested" / "tall_gray.png")
    Image.new("RGBA", (17, 17), (10, 20, 30, 40)).save(folder / "nested" / "deeper" / "alpha.PNG")
    Image.new("RGB", (24, 24), (100, 150, 200)).save(folder / "nested" / "photo.jpg")
    # Black borders left and right of a white middle: a centre crop keeps only white.
    stripes = np.zeros((20, 40, 3), dtype=np.uint8)
    stripes[:, 6:34] = 255
    Image.fromarray(stripes).save(folder / "stripes.png")
    (folder / "notes.txt").write_text("not an image")

    dataset = load_dataset(f"folder:{folder}", image_size=16)
    assert len(dataset) == 5
    names = [p.name for p in dataset.files]
    assert "notes.txt" not in names and "alpha.PNG" in names
    for x, label in dataset:
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert label == 0
        assert -1.0 <= x.min() and x.max() <= 1.0

    by_name = {p.name: dataset[i][0] for i, p in enumerate(dataset.files)}
    solid = paper_scaling(np.array([255, 0, 128], dtype=np.uint8))
    assert torch.equal(by_name["wide.png"], solid[:, None, None].expand(3, 16, 16))
    assert torch.equal(by_name["tall_gray.png"], torch.full((3, 16, 16), -1.0))
    assert by_name["stripes.png"].min() > 0.9  # squashing instead of cropping would keep black

    assert dataset_info(f"folder:{folder}") == (3, 64, 1)
    assert load_dataset(f"folder:{folder}")[0][0].shape == (3, 64, 64)


def test_folder_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        load_dataset(f"folder:{missing}")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.md").write_text("no pictures here")
    with pytest.raises(DatasetNotFoundError, match="no images") as error:
        load_dataset(f"folder:{empty}")
    assert str(empty) in str(error.value)
    assert isinstance(error.value, FileNotFoundError)


# ---------------------------------------------------------------------------
# Where data is looked for


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("NAIVEDIFFUSION_DATA", str(tmp_path / "from_env"))
    assert default_data_root() == tmp_path / "from_env"

    monkeypatch.delenv("NAIVEDIFFUSION_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_root() == tmp_path / "xdg" / "naivediffusion" / "data"

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_root() == tmp_path / "home" / ".cache" / "naivediffusion" / "data"


def test_root_argument_beats_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NAIVEDIFFUSION_DATA", str(tmp_path / "from_env"))
    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset("mnist", root=tmp_path / "from_arg", download=False)
    assert str(tmp_path / "from_arg" / "MNIST" / "raw") in str(error.value)
    assert "from_env" not in str(error.value)

    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset("mnist", download=False)
    assert str(tmp_path / "from_env" / "MNIST" / "raw") in str(error.value)


# ---------------------------------------------------------------------------
# Errors that say what is wrong and how to fix it


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(ValueError, match="svhn") as error:
        load_dataset("svhn")
    for name in ("mnist", "fashion-mnist", "cifar10", "folder:PATH"):
        assert f'"{name}"' in str(error.value)
    with pytest.raises(ValueError, match="cifar10"):
        dataset_info("cifar100")


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_missing_data_without_download(tmp_path, name):
    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset(name, root=tmp_path, download=False)
    message = str(error.value)
    assert "\n" not in message
    assert str(tmp_path / DATASETS[name].folder) in message
    assert DATASETS[name].files[0] in message and "NAIVEDIFFUSION_DATA" in message
    assert isinstance(error.value.__cause__, RuntimeError)  # torchvision's error, kept


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_failed_download_is_explained(tmp_path, offline, monkeypatch, name):
    monkeypatch.delenv("NAIVEDIFFUSION_DOWNLOAD", raising=False)  # downloading on, as for users
    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset(name, root=tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert "could not be downloaded" in message and "Name or service not known" in message
    assert str(tmp_path / DATASETS[name].folder) in message
    assert "internet" in message
    assert error.value.__cause__ is not None


def test_the_tests_never_download():
    """The repository's conftest.py turns downloading off for every test and notebook."""
    assert os.environ.get("NAIVEDIFFUSION_DOWNLOAD") == "0"


@pytest.mark.parametrize("value", ["0", "false", "OFF"])
def test_download_switched_off_by_the_environment_fails_fast(tmp_path, no_network, monkeypatch,
                                                             value):
    """NAIVEDIFFUSION_DOWNLOAD=0 overrides download=True, the default the Trainer and the
    metrics use: a missing set raises the data-root message at once, without the network."""
    monkeypatch.setenv("NAIVEDIFFUSION_DOWNLOAD", value)
    start = time.perf_counter()
    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset("mnist", root=tmp_path)  # download=True by default
    assert time.perf_counter() - start < 2.0
    message = str(error.value)
    assert "\n" not in message
    assert f"downloading is off (NAIVEDIFFUSION_DOWNLOAD={value})" in message
    assert str(tmp_path / "MNIST" / "raw") in message and "NAIVEDIFFUSION_DATA" in message
    assert not (tmp_path / "MNIST").exists()  # nothing was fetched or created


@pytest.mark.parametrize("value", ["1", "yes", ""])
def test_other_values_of_the_download_switch_keep_downloading_on(tmp_path, offline, monkeypatch,
                                                                 value):
    monkeypatch.setenv("NAIVEDIFFUSION_DOWNLOAD", value)
    with pytest.raises(DatasetNotFoundError, match="could not be downloaded"):
        load_dataset("mnist", root=tmp_path)
