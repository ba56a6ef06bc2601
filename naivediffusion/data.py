"""Datasets, scaled to [-1, 1] at the boundary.

DDPM assumes "image data consists of integers in {0, 1, ..., 255} scaled linearly
to [-1, 1]" (Ho et al. 2020, Sec. 3.3, the text around Eq. 13). That scaling
happens here, once, when an image leaves the dataset; `viz.to_uint8` undoes it
when an image is saved. Everything in between lives in [-1, 1].

    load_dataset("mnist")            # torchvision MNIST, 1 x 28 x 28
    load_dataset("fashion-mnist")    # torchvision FashionMNIST, 1 x 28 x 28
    load_dataset("cifar10")          # torchvision CIFAR10, 3 x 32 x 32, random flips
    load_dataset("folder:~/faces")   # any images PIL reads, 3 x 64 x 64 by default
    load_dataset("mnist", in_memory=True).to("cuda")  # all of it as uint8, batched on the GPU
    EpochBatchSampler(60_000, 128, seed=0)  # the batches' indices, in a resumable order

The torchvision sets are looked for under a data root (the `root` argument, else
the environment variable NAIVEDIFFUSION_DATA, else a cache folder) in
torchvision's own layout, and downloaded there when they are missing. Setting the
environment variable NAIVEDIFFUSION_DOWNLOAD=0 turns downloading off everywhere (the
tests and CI do, so a missing dataset fails at once with the data-root message instead
of reaching for the network); users download by default.
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from .distributed import check_global_batch

FOLDER_PREFIX = "folder:"
DOWNLOAD_ENV_VAR = "NAIVEDIFFUSION_DOWNLOAD"  # "0" (or "false", "no", "off"): never download
FOLDER_IMAGE_SIZE = 64  # default side length for a folder of images of any size


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset, and where torchvision keeps it."""

    channels: int
    image_size: int  # native side length (images are square)
    num_classes: int
    classes: tuple[str, ...]
    torchvision_class: str  # the class in torchvision.datasets that reads it
    folder: str  # its folder under the data root, in torchvision's layout
    files: tuple[str, ...]  # the files torchvision needs in that folder
    flip: bool  # random horizontal flips while training


_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

DATASETS = {
    "mnist": DatasetInfo(
        channels=1,
        image_size=28,
        num_classes=10,
        classes=tuple(str(digit) for digit in range(10)),
        torchvision_class="MNIST",
        folder="MNIST/raw",
        files=_IDX_FILES,
        flip=False,  # a mirrored digit is not a digit
    ),
    "fashion-mnist": DatasetInfo(
        channels=1,
        image_size=28,
        num_classes=10,
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        torchvision_class="FashionMNIST",
        folder="FashionMNIST/raw",
        files=_IDX_FILES,
        flip=False,
    ),
    "cifar10": DatasetInfo(
        channels=3,
        image_size=32,
        num_classes=10,
        classes=("airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"),
        torchvision_class="CIFAR10",
        folder="cifar-10-batches-py",
        files=tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"),
        flip=True,  # "We used random horizontal flips during training for CIFAR10" (Appendix B)
    ),
}

VALID_NAMES = (*DATASETS, FOLDER_PREFIX + "PATH")


class DatasetNotFoundError(FileNotFoundError):
    """The data is not on disk and could not be fetched; the message says where and what to do."""


def downloads_allowed() -> bool:
    """False when the environment variable NAIVEDIFFUSION_DOWNLOAD is "0", "false", "no" or
    "off" (any case); True otherwise, including when it is not set."""
    return os.environ.get(DOWNLOAD_ENV_VAR, "").strip().lower() not in ("0", "false", "no", "off")


def default_data_root() -> Path:
    """Where datasets live when no root is given.

    The environment variable NAIVEDIFFUSION_DATA if it is set (offline machines point
    it at a folder prepared in torchvision's layout), else
    `$XDG_CACHE_HOME/naivediffusion/data` (`~/.cache/naivediffusion/data`).
    """
    if os.environ.get("NAIVEDIFFUSION_DATA"):
        return Path(os.environ["NAIVEDIFFUSION_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "naivediffusion" / "data"


def dataset_info(name: str, image_size: int | None = None) -> tuple[int, int, int]:
    """(channels, image_size, num_classes) of the images `load_dataset(name, ...)` yields.

    A folder of images is 3 channels, `image_size` (default 64) and one class.
    """
    if name.startswith(FOLDER_PREFIX):
        return 3, image_size or FOLDER_IMAGE_SIZE, 1
    info = _lookup(name)
    return info.channels, image_size or info.image_size, info.num_classes


def scale_to_unit_interval(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [C, H, W] in 0..255 -> float32 in [-1, 1]: x / 127.5 - 1 (Sec. 3.3).

    0 maps to -1 and 255 to 1 exactly; the 256 levels stay 2/255 apart, the bin
    width of the discrete decoder of Eq. 13.
    """
    return x.to(torch.float32) / 127.5 - 1.0


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    train: bool = True,
    image_size: int | None = None,
    download: bool = True,
    augment: bool = True,
    in_memory: bool = False,
) -> Dataset:
    """A dataset of (image float32 [C, H, W] in [-1, 1], label int).

    name: "mnist", "fashion-mnist", "cifar10" or "folder:PATH".
    root: the data root for the torchvision sets (default: `default_data_root()`).
    train: the training split, else the test split (a folder has only one).
    image_size: side length; None keeps the native size of a torchvision set
        (28 or 32) and gives 64 for a folder.
    download: fetch a missing torchvision set from the internet. Files already on
        disk are used as they are, so this never re-downloads. NAIVEDIFFUSION_DOWNLOAD=0
        in the environment overrides it with False (see `downloads_allowed`).
    augment: random horizontal flips for the datasets the paper flips (CIFAR-10),
        in the training split only; False turns them off, e.g. for evaluation.
    in_memory: return an `InMemoryImages`, the whole split as one uint8 tensor, which
        `.to(device)` moves to a GPU to be batched there (a torchvision set at its native
        size only; its `flip` is set as `augment` would flip it).
    """
    if name.startswith(FOLDER_PREFIX):
        if in_memory:
            raise ValueError("a folder of images is read file by file; in_memory works for "
                             f"{', '.join(DATASETS)} only")
        return ImageFolder(name[len(FOLDER_PREFIX):], image_size or FOLDER_IMAGE_SIZE)

    info = _lookup(name)
    if in_memory and image_size not in (None, info.image_size):
        raise ValueError(f"in_memory keeps {name} at its native {info.image_size} x {info.image_size}; "
                         f"drop image_size={image_size} or in_memory")
    steps = []
    if image_size is not None and image_size != info.image_size:
        steps.append(transforms.Resize((image_size, image_size)))
    if info.flip and train and augment:
        steps.append(transforms.RandomHorizontalFlip())
    # PILToTensor keeps the integers 0..255, so the scaling below is exactly the paper's.
    steps += [transforms.PILToTensor(), transforms.Lambda(scale_to_unit_interval)]

    root = Path(root).expanduser() if root is not None else default_data_root()
    download = download and downloads_allowed()
    dataset_class = getattr(torchvision.datasets, info.torchvision_class)
    try:
        dataset = dataset_class(
            str(root), train=train, transform=transforms.Compose(steps), download=download
        )
    except (RuntimeError, OSError) as err:
        # torchvision raises RuntimeError for missing or corrupt files and a
        # RuntimeError or URLError (an OSError) when a download fails.
        raise DatasetNotFoundError(_missing_message(name, info, root, download, err)) from err
    if not in_memory:
        return dataset
    # torchvision has already read the whole split into memory: MNIST-style sets as a uint8
    # tensor [N, H, W], CIFAR-10 as a uint8 numpy array [N, H, W, C].
    images = torch.as_tensor(dataset.data)
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    return InMemoryImages(images.contiguous(), labels, flip=info.flip and train and augment)


class InMemoryImages(Dataset):
    """A whole dataset as one uint8 tensor, batched where it lives.

    MNIST's 60,000 training images are 47 MB as uint8 and CIFAR-10's 50,000 are 154 MB:
    small enough to keep on a GPU, where a batch is one index operation and one scaling
    kernel, with no worker processes, no PIL and no copy from the host each step.

    images: uint8 [N, C, H, W] in 0..255; labels: int64 [N].
    flip: random horizontal flips, applied by `batch` to the images its flip mask marks.

    Indexing gives what `load_dataset` gives otherwise, (float32 [C, H, W] in [-1, 1],
    int label), without flips, so it also serves a DataLoader.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, flip: bool = False):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W]; got {images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be [N] = [{images.shape[0]}]; got {tuple(labels.shape)}")
        self.images, self.labels, self.flip = images, labels.to(images.device, torch.int64), flip

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return scale_to_unit_interval(self.images[index]), int(self.labels[index])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: str | torch.device) -> "InMemoryImages":
        """The same images on `device` (self when they are already there)."""
        if self.images.device == torch.device(device):
            return self
        return InMemoryImages(self.images.to(device), self.labels.to(device), self.flip)

    def batch(self, indices: torch.Tensor, flip_mask: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images float32 [B, C, H, W] in [-1, 1], labels [B]) at `indices` [B], computed where
        the images live; the images where `flip_mask` [B] (bool) is True are mirrored left to
        right (only if `flip` is set). With both index tensors already on the images' device
        nothing waits for the host."""
        x = scale_to_unit_interval(self.images[indices])
        if self.flip and flip_mask is not None:
            x = torch.where(flip_mask[:, None, None, None], x.flip(-1), x)
        return x, self.labels[indices]

    def batches(self, sampler: "EpochBatchSampler", seed: int):
        """An endless iterator of the batches `sampler` names (`batch`), cut where the images live.

        Once per epoch the epoch's order (and, for a flipped dataset, one coin per image of
        it, seeded from `seed` and the epoch, so a resumed run flips as the uninterrupted
        one would) is copied to the device; each step is then an index into it, a gather of
        uint8 images and one scaling kernel, with nothing sent from the host.
        """
        for epoch, position in sampler.epochs():
            order = sampler.epoch_batches(epoch).to(self.device)
            flips = None
            if self.flip:
                coins = torch.Generator().manual_seed(derive_seed(seed, "flip", epoch))
                draws = torch.rand(sampler.batches_per_epoch, sampler.batch_size, generator=coins) < 0.5
                flips = draws[:, sampler.rank_slice].to(self.device)
            for i in range(position, sampler.batches_per_epoch):
                yield self.batch(order[i], None if flips is None else flips[i])


def _lookup(name: str) -> DatasetInfo:
    if name not in DATASETS:
        valid = ", ".join(f'"{n}"' for n in VALID_NAMES)
        raise ValueError(f'unknown dataset "{name}"; choose one of {valid}')
    return DATASETS[name]


def _missing_message(
    name: str, info: DatasetInfo, root: Path, download: bool, err: Exception
) -> str:
    where = root / info.folder
    if download:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = lines[-1] if lines else type(err).__name__
        problem = f"could not be downloaded ({reason})"
        fix = "connect to the internet and run again to download it, or put"
    elif not downloads_allowed():
        problem = f"downloading is off ({DOWNLOAD_ENV_VAR}={os.environ[DOWNLOAD_ENV_VAR]})"
        fix = f"unset {DOWNLOAD_ENV_VAR} to download it with internet access, or put"
    else:
        problem = "downloading is off"
        fix = "allow downloading with internet access, or put"
    return (
        f"{name} not found in {where} and {problem}; {fix} {', '.join(info.files)} "
        f"in that folder, or point NAIVEDIFFUSION_DATA (or --data-root) at a data root "
        f"that holds {info.folder}/."
    )


class ImageFolder(Dataset):
    """Every image PIL can read under `path` (subfolders included), label 0.

    Each image is converted to RGB (grayscale is repeated into three channels, an
    alpha channel is dropped), its shorter side resized to `image_size`, centre-
    cropped to a square and scaled to [-1, 1]. Files are read when indexed, in
    sorted order.
    """

    def __init__(self, path: str | os.PathLike, image_size: int = FOLDER_IMAGE_SIZE):
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise DatasetNotFoundError(
                f"folder {self.path} does not exist or is not a folder; "
                f'give an existing folder of images as "folder:PATH"'
            )
        Image.init()  # registers every format PIL knows, so its extensions are listed
        readable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
        self.files = sorted(
            p for p in self.path.rglob("*") if p.suffix.lower() in readable and p.is_file()
        )
        if not self.files:
            raise DatasetNotFoundError(
                f"no images in {self.path} or its subfolders; add image files "
                f"(.png, .jpg, ...) or pick another folder"
            )
        self.image_size = image_size
        self.transform = transforms.Compose([
            transforms.Resize(image_size),  # an int resizes the shorter side
            transforms.CenterCrop(image_size),
            transforms.PILToTensor(),
            transforms.Lambda(scale_to_unit_interval),
        ])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.files[index]) as image:
            return self.transform(image.convert("RGB")), 0


# ------------------------------------------------------ the order of the batches


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed for one random stream of a run, e.g. derive_seed(seed, "epoch", 3).

    Each stream (the order of epoch e, the noise of the loss, the sample grids) gets its
    own generator, so drawing more from one never shifts another.
    """
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class EpochBatchSampler(Sampler):
    """Batches of indices forever: epoch e visits the dataset in the order of a
    `torch.randperm` seeded from (seed, e), in `num_samples // batch_size` full batches
    (the incomplete last batch is dropped, so every step sees `batch_size` images).

    Starting at (epoch, position) continues an interrupted run exactly where it stopped,
    with no need to replay the batches before it.

    Under torchrun, `batch_size` is the global batch and process `rank` of `world_size`
    gets only its slice of each one: indices [rank * b, (rank + 1) * b) with
    b = batch_size // world_size. Every process computes the same order, so the slices
    together are exactly the batch that one process would have taken.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, epoch: int = 0, position: int = 0,
                 rank: int = 0, world_size: int = 1):
        if num_samples < batch_size:
            raise ValueError(f"the dataset has {num_samples} images, fewer than one batch of "
                             f"{batch_size}; use a smaller --batch-size")
        check_global_batch(batch_size, world_size)
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.epoch, self.position = epoch, position
        self.batches_per_epoch = num_samples // batch_size
        per_rank = batch_size // world_size
        self.rank_slice = slice(rank * per_rank, (rank + 1) * per_rank)

    def order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
        return torch.randperm(self.num_samples, generator=generator)

    def epoch_batches(self, epoch: int) -> torch.Tensor:
        """This process's batches of `epoch`: LongTensor [batches_per_epoch, batch_size / world_size],
        row i the rank's slice of global batch i."""
        order = self.order(epoch)[:self.batches_per_epoch * self.batch_size]
        return order.view(self.batches_per_epoch, self.batch_size)[:, self.rank_slice]

    def epochs(self):
        """(epoch, the first batch to take) from the start position on, forever."""
        epoch, position = self.epoch, self.position
        while True:
            yield epoch, position
            epoch, position = epoch + 1, 0

    def __iter__(self):
        for epoch, position in self.epochs():
            for batch in self.epoch_batches(epoch)[position:]:
                yield batch.tolist()


def batch_loader(dataset: Dataset, sampler: EpochBatchSampler, seed: int, device: torch.device,
                 num_workers: int | None = None) -> DataLoader:
    """A DataLoader of (images [B, C, H, W], labels [B]) from `dataset`, in the order of `sampler`.

    Its worker processes (`num_workers`; None: up to 4 for a CUDA device, else none) are
    seeded from `seed`: without a generator of its own the loader would draw their seeds from
    the global generator and shift dropout's random stream. For CUDA its batches are pinned.
    """
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1) if device.type == "cuda" else 0
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed))
