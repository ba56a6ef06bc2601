"""Sample quality: a Fréchet distance in the features of a small classifier, and smudges.

- **A Fréchet distance** between the features of generated and real images (the formula
  of FID, Heusel et al. 2017), here in the feature space of a small classifier that this
  package trains on the dataset and ships, so it runs offline. It is comparable only to
  itself (not to published Inception FIDs); `sample_quality` reports it next to the same
  score for real held-out images, the floor a perfect model would reach with that many
  images.
- **The fraction of smudges**: samples that the same classifier cannot name with at least
  50% probability (`smudge_fraction`), and of noisy samples, rougher than 99.9% of real test
  images (`noise_fraction`).

    scores = sample_quality(samples, "mnist")                # {"fd": ..., "fd_real": ...}
    smudges = smudge_fraction(samples, "mnist")

    python -m naivediffusion train-classifier --dataset mnist \\
        --out naivediffusion/assets/classifier_mnist.pt      # the shipped weights
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .budget import pick_device
from .checkpoint import save_atomic
from .data import FOLDER_PREFIX, dataset_info, load_dataset, scale_to_unit_interval
from .unet import eval_mode


class Classifier(nn.Module):
    """A small CNN whose penultimate features define the sample-quality score.

    Three 3x3 convolutions, each followed by BatchNorm, ReLU and 2x2 max-pooling
    (28 -> 14 -> 7 -> 3), averaged down to a 3 x 3 grid (which 28x28 inputs reach on their
    own and 32x32 ones, at 4 x 4, do not), then a hidden layer whose 128 outputs (after ReLU)
    are the features, and a linear layer to the logits. The features keep where
    strokes are, which a global average over positions would lose. About 130k
    parameters for 1-channel 28x28 images (MNIST, Fashion-MNIST); the same network
    takes 3-channel 32x32 ones (CIFAR-10).

    forward(x [N, C, H, W] in [-1, 1]) -> logits [N, num_classes]; features(x) -> [N, features].
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 widths: tuple[int, ...] = (32, 64, 64), features: int = 128) -> None:
        super().__init__()
        self.config = dict(in_channels=in_channels, num_classes=num_classes,
                           image_size=image_size, widths=tuple(widths), features=features)
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            # No bias: the BatchNorm that follows has its own.
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        layers += [nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(channels * 9, features),
                   nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features [N, F] of images [N, C, H, W] in [-1, 1]."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


CLASSIFIER_FORMAT = "naivediffusion-classifier"
CLASSIFIER_VERSION = 1
ASSETS = Path(__file__).resolve().parent / "assets"


def classifier_path(dataset: str) -> Path:
    """Where the package keeps the classifier weights for `dataset` (shipped for MNIST only)."""
    return ASSETS / f"classifier_{dataset.replace('-', '_')}.pt"


def train_classifier_command(dataset: str, out: str | None = None) -> str:
    """The command that trains (and saves) the classifier for `dataset`."""
    out = out or f"naivediffusion/assets/classifier_{dataset.replace('-', '_')}.pt"
    return f"python -m naivediffusion train-classifier --dataset {dataset} --out {out}"


def load_images(
    dataset: str,
    train: bool = False,
    n: int | None = None,
    seed: int = 0,
    root: str | None = None,
    image_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Real images of a dataset as one tensor, without augmentation.

    Args:
        train: the training split, else the test split.
        n: how many, drawn at random without replacement (fixed by `seed`); None: all,
            in the dataset's order.
        image_size: resize them to this side (None: the dataset's own size).
    Returns:
        (images float32 [n, C, H, W] in [-1, 1], labels LongTensor [n]).
    """
    data = load_dataset(dataset, root=root, train=train, image_size=image_size, augment=False)
    if n is not None:
        if not 1 <= n <= len(data):
            raise ValueError(f"asked for {n} images, but the {dataset} {'training' if train else 'test'} "
                             f"split has {len(data)}; ask for 1 to {len(data)}")
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        data = torch.utils.data.Subset(data, order[:n].tolist())
    images, labels = [], []
    for x, y in torch.utils.data.DataLoader(data, batch_size=1000):
        images.append(x)
        labels.append(torch.as_tensor(y))
    return torch.cat(images), torch.cat(labels)


def train_classifier(
    dataset: str = "mnist",
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    device: str = "auto",
    root: str | None = None,
    progress: bool = True,
) -> tuple[Classifier, dict]:
    """Train the feature network on a dataset's training split (cross-entropy, Adam).

    The learning rate falls from `lr` to 0 along a cosine over all steps. Two epochs on
    MNIST reach about 99% test accuracy in a few minutes on a laptop CPU.

    Returns:
        (classifier in eval mode, info) with info = {"dataset", "epochs", "batch_size",
        "lr", "seed", "test_accuracy", "train_seconds", "device"}.
    """
    torch.manual_seed(seed)
    device = pick_device(device)
    channels, image_size, num_classes = dataset_info(dataset)
    images, labels = load_images(dataset, train=True, root=root)
    test_images, test_labels = load_images(dataset, train=False, root=root)
    classifier = Classifier(channels, num_classes, image_size).to(device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    steps = epochs * math.ceil(len(images) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed)

    start = time.perf_counter()
    classifier.train()
    bar = tqdm(total=steps, disable=not progress, desc=f"classifier {dataset}")
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=generator).split(batch_size):
            x, y = images[batch].to(device), labels[batch].to(device)
            loss = F.cross_entropy(classifier(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    seconds = time.perf_counter() - start
    classifier.eval()
    info = dict(dataset=dataset, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                test_accuracy=accuracy(classifier, test_images, test_labels),
                train_seconds=round(seconds, 1), device=str(device))
    return classifier, info


@torch.no_grad()
def accuracy(classifier: Classifier, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """The fraction of `images` [N, C, H, W] that `classifier` puts in the class `labels` [N]."""
    device = next(classifier.parameters()).device
    correct = 0
    for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True):
        correct += (classifier(x.to(device)).argmax(1).cpu() == y).sum().item()
    return correct / len(labels)


def save_classifier(classifier: Classifier, path: str | Path, **metadata) -> Path:
    """Save the weights and the settings that rebuild the network, with `metadata`
    (plain data: dataset, accuracy, the command that trained it, ...), atomically
    (`checkpoint.save_atomic`: an interrupted save leaves the previous file whole)."""
    state = {k: v.detach().cpu().clone() for k, v in classifier.state_dict().items()}
    return save_atomic({"format": CLASSIFIER_FORMAT, "version": CLASSIFIER_VERSION,
                        "config": {**classifier.config, "widths": list(classifier.config["widths"])},
                        "state_dict": state, "metadata": metadata}, path)


def load_classifier(dataset: str = "mnist", path: str | Path | None = None,
                    device: str | torch.device = "cpu") -> Classifier:
    """The feature network for `dataset`: the weights shipped with the package, or `path`.

    Loaded with `torch.load(weights_only=True)` (tensors and plain data only). The
    metadata saved with it (dataset, test accuracy, the command that trained it, date,
    torch version) is in the returned network's `.metadata`.

    Raises:
        FileNotFoundError: no weights for this dataset; the message names the command
            that trains them (only MNIST's ship, since training needs the data).
    """
    if path is None and dataset.startswith(FOLDER_PREFIX):
        raise ValueError(f"no classifier for {dataset}: the score needs a network trained on a "
                         "labelled dataset (mnist, fashion-mnist or cifar10); pass path= to use "
                         "your own")
    path = Path(path).expanduser() if path is not None else classifier_path(dataset)
    if not path.is_file():
        raise FileNotFoundError(
            f"no classifier weights for {dataset} at {path}; train them (a few minutes on a CPU "
            f"for 28x28 images) with: {train_classifier_command(dataset, str(path))}")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{path} is not a naivediffusion classifier; write one with: "
                         f"{train_classifier_command(dataset, str(path))}")
    classifier = Classifier(**{**saved["config"], "widths": tuple(saved["config"]["widths"])})
    classifier.load_state_dict(saved["state_dict"])
    classifier.metadata = dict(saved.get("metadata", {}), path=str(path))
    return classifier.to(device).eval()


@torch.no_grad()
def classifier_features(classifier: Classifier, images: Tensor, batch_size: int = 500) -> Tensor:
    """Penultimate features [N, F] (float32, CPU) of images [N, C, H, W] in [-1, 1] or uint8."""
    expected = (classifier.config["in_channels"], classifier.config["image_size"],
                classifier.config["image_size"])
    if images.dim() != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(f"the classifier takes images [N, {', '.join(map(str, expected))}]; "
                         f"got {list(images.shape)}")
    if images.dtype == torch.uint8:
        images = scale_to_unit_interval(images)
    device = next(classifier.parameters()).device
    with eval_mode(classifier):
        features = [classifier.features(x.to(device).float()).cpu() for x in images.split(batch_size)]
    return torch.cat(features)


@torch.no_grad()
def class_probabilities(classifier: Classifier, images: Tensor, batch_size: int = 500) -> Tensor:
    """Softmax class probabilities [N, K] (float32, CPU) of images [N, C, H, W] in [-1, 1] or uint8."""
    if images.dtype == torch.uint8:
        images = scale_to_unit_interval(images)
    device = next(classifier.parameters()).device
    with eval_mode(classifier):
        probs = [classifier(x.to(device).float()).softmax(1).cpu() for x in images.split(batch_size)]
    return torch.cat(probs)


SMUDGE_THRESHOLD = 0.5


def smudge_fraction(samples: Tensor, dataset: str = "mnist", classifier: Classifier | None = None,
                    threshold: float = SMUDGE_THRESHOLD) -> float:
    """The fraction of samples that the classifier cannot name: top class probability below
    `threshold`. A clean digit gets well above 0.9 from a 99%-accurate classifier; a smudge
    that is no digit, or half of two, spreads its probability over several classes."""
    classifier = classifier or load_classifier(dataset)
    top = class_probabilities(classifier, samples).max(1).values
    return (top < threshold).float().mean().item()


def roughness(images: Tensor) -> Tensor:
    """Mean absolute difference between horizontally and vertically neighbouring pixels, [N],
    of images [N, C, H, W] in [-1, 1]. Digits are smooth strokes on a flat background (about
    0.14 for MNIST's test digits); leftover noise makes neighbours disagree."""
    images = images.float()
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1).mean(1)
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).mean(1)
    return (dx + dy) / 2


def noise_fraction(samples: Tensor, dataset: str = "mnist", quantile: float = 0.999,
                   root: str | None = None) -> float:
    """The fraction of samples rougher than all but 1 - `quantile` of the real test images:
    images that still hold noise. The classifier of `smudge_fraction` is often confident about
    pure speckle, which it never saw in training, so this catches what that misses."""
    if samples.dtype == torch.uint8:
        samples = scale_to_unit_interval(samples)
    real, _ = load_images(dataset, train=False, root=root)
    threshold = roughness(real).quantile(quantile)
    return (roughness(samples) > threshold).float().mean().item()


def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean [F] and covariance [F, F] (with 1 / (N - 1)) of features [N, F], in float64."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [N, F] with N >= 2; got {list(features.shape)}")
    features = features.to(torch.float64)
    mean = features.mean(0)
    centred = features - mean
    return mean, centred.T @ centred / (features.shape[0] - 1)


def _sqrt_psd(matrix: Tensor) -> Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (via eigh)."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance_from_statistics(stats1: tuple[Tensor, Tensor], stats2: tuple[Tensor, Tensor]) -> float:
    """The Fréchet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2):

        ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)),

    the formula of FID. (S1 S2)^(1/2) is not symmetric, but its trace is that of the
    symmetric (S1^(1/2) S2 S1^(1/2))^(1/2), whose eigenvalues eigh finds stably. float64.
    """
    mu1, s1 = (x.to(torch.float64) for x in stats1)
    mu2, s2 = (x.to(torch.float64) for x in stats2)
    root1 = _sqrt_psd(s1)
    middle = root1 @ s2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * trace_sqrt
    return max(distance.item(), 0.0)  # rounding can leave -1e-12 for identical sets


def frechet_distance(features1: Tensor, features2: Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to two sets of features [N1, F], [N2, F]."""
    return frechet_distance_from_statistics(feature_statistics(features1),
                                            feature_statistics(features2))


_REFERENCE_STATISTICS: dict[tuple, tuple[tuple[Tensor, Tensor], int]] = {}


def sample_quality(
    samples: Tensor,
    dataset: str = "mnist",
    reference: str = "test",
    n: int | None = None,
    classifier: Classifier | None = None,
    seed: int = 0,
    root: str | None = None,
) -> dict:
    """The Fréchet distance between samples and real images in the classifier's features,
    next to the same score for real images: the floor a perfect model would reach.

    The score of a finite set is biased upwards, more so for fewer images, so the floor
    uses as many real images as there are samples: images of the other split (training
    images when the reference is the test set), drawn at random with `seed`. The score
    is comparable only with itself (same classifier, same numbers of images), not with
    published Inception FIDs. With few images both numbers are also noisy: on MNIST, sets
    of 64 real training images score from about 20 to 55 against the test set, sets of
    1,000 about 1.6-2.6 (seeds 0, 1, 2: 1.79, 2.35, 2.54); use 1,000 or more for numbers to
    compare, and compare a model with its floor at the same seed.

    Args:
        samples: generated images [N, C, H, W] in [-1, 1] (or uint8 0..255), N >= 2.
        dataset: the dataset the model learned; its classifier must exist (`load_classifier`).
        reference: "test" or "train", the real images to compare with.
        n: reference images (None: the whole split, 10,000 for the MNIST test set).
        classifier: the feature network (default: `load_classifier(dataset)`).
    Returns:
        {"fd": samples vs reference, "fd_real": real images of the other split vs
        reference, "n_samples", "n_reference", "reference", "dataset"}.
    """
    if reference not in ("test", "train"):
        raise ValueError(f"reference must be 'test' or 'train'; got {reference!r}")
    default_classifier = classifier is None
    if default_classifier:
        classifier = load_classifier(dataset)
    # The reference statistics do not change between calls: keep them for the shipped network.
    key = (dataset, reference, n, seed, str(root))
    if default_classifier and key in _REFERENCE_STATISTICS:
        reference_stats, n_reference = _REFERENCE_STATISTICS[key]
    else:
        real, _ = load_images(dataset, train=reference == "train", n=n, seed=seed, root=root)
        reference_stats, n_reference = feature_statistics(classifier_features(classifier, real)), len(real)
        if default_classifier:
            _REFERENCE_STATISTICS[key] = reference_stats, n_reference
    held_out, _ = load_images(dataset, train=reference == "test", n=len(samples), seed=seed,
                              root=root)
    sample_stats = feature_statistics(classifier_features(classifier, samples))
    held_out_stats = feature_statistics(classifier_features(classifier, held_out))
    return {
        "fd": frechet_distance_from_statistics(sample_stats, reference_stats),
        "fd_real": frechet_distance_from_statistics(held_out_stats, reference_stats),
        "n_samples": len(samples),
        "n_reference": n_reference,
        "reference": reference,
        "dataset": dataset,
    }


def score_samples(samples: Tensor, dataset: str = "mnist", classifier: Classifier | None = None,
                  labels: Tensor | None = None, seed: int = 0, root: str | None = None) -> dict:
    """Every sample-quality number of `evaluate --metric fid` and the benchmarks, in one dict.

    `sample_quality`'s {"fd", "fd_real", "n_samples", "n_reference", "reference", "dataset"},
    and "smudges" (`smudge_fraction`), "noisy" (`noise_fraction`), "class_counts" (how many
    samples the classifier puts in each class); with the `labels` [N] the samples were asked
    for, "accuracy": the fraction classified as their label.
    """
    # Without a classifier, sample_quality keeps the reference statistics between calls.
    scores = sample_quality(samples, dataset, classifier=classifier, seed=seed, root=root)
    classifier = classifier or load_classifier(dataset)
    scores["smudges"] = smudge_fraction(samples, classifier=classifier)
    scores["noisy"] = noise_fraction(samples, dataset, root=root)
    classes = class_probabilities(classifier, samples).argmax(1)
    scores["class_counts"] = torch.bincount(classes, minlength=classifier.config["num_classes"]).tolist()
    if labels is not None:
        scores["accuracy"] = (classes == labels.cpu()).double().mean().item()
    return scores
