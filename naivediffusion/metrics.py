"""Evaluation: bits/dim from the variational bound, and a sample-quality score.

Two numbers describe a trained diffusion model (Ho et al. 2020, Sec. 4, Table 1):

- **Bits per dimension** — the variational bound L of Eq. 5 on the negative
  log-likelihood of test images, divided by the number of dimensions D and by
  ln 2: an upper bound on how many bits an ideal code built from the model needs
  per pixel and channel. The paper reports 3.70-3.75 on CIFAR-10.
- **A Fréchet distance** between the features of generated and real images
  (the formula of FID), here in the feature space of a small classifier that this
  package trains on the dataset and ships, so it runs offline. It is comparable
  only to itself (not to published Inception FIDs); `sample_quality` reports it
  next to the same score for real held-out images, the floor a perfect model
  would reach with that many images.

    bpd = bits_per_dim(diffusion, model, x0)                 # [N], all T terms
    bpd, terms = bits_per_dim(diffusion, model, x0, timesteps=100, return_terms=True)
    scores = sample_quality(samples, "mnist")                # {"fd": ..., "fd_real": ...}

    python -m naivediffusion.metrics train-classifier --dataset mnist \\
        --out naivediffusion/assets/classifier_mnist.pt      # the shipped weights
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .budget import pick_device
from .data import FOLDER_PREFIX, dataset_info, load_dataset, scale_to_unit_interval
from .diffusion import Diffusion

LN2 = math.log(2.0)
BIN_WIDTH = 2.0 / 255.0  # the 256 levels 0..255 scaled to [-1, 1] are 2/255 apart


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums of many small terms; MPS has no float64, so float32 there."""
    return torch.float32 if device.type == "mps" else torch.float64


# ============================================================ bits per dimension


def quantize(x: Tensor) -> Tensor:
    """Put values in [-1, 1] on the 256-level grid of the data: k / 127.5 - 1, k = 0..255.

    Values outside [-1, 1] go to the nearest end. Returns a float tensor shaped like x.
    """
    levels = ((x.float() + 1.0) * 127.5).round().clamp(0, 255)
    return scale_to_unit_interval(levels).to(x.dtype if x.is_floating_point() else torch.float32)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats, elementwise.

    0.5 * (logvar2 - logvar1 + (exp(logvar1) + (mean1 - mean2)^2) / exp(logvar2) - 1).
    The arguments broadcast against each other; every L_{t-1} of Eq. 5 is a sum of these.
    """
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _log_diff_ndtr(lower: Tensor, upper: Tensor) -> Tensor:
    """log(Phi(upper) - Phi(lower)) for lower < upper, without cancellation; Phi is the
    exact CDF of N(0, 1) (torch.special.ndtr), not the tanh approximation of the DDPM code.

    Phi(b) - Phi(a) = Phi(b) (1 - Phi(a)/Phi(b)), so the log is log Phi(b) + log1p(-exp(
    log Phi(a) - log Phi(b))); log_ndtr keeps its precision far into the lower tail. In
    the upper tail the mirror image Phi(-a) - Phi(-b) is used, so both tails stay exact.
    """
    mirror = lower + upper > 0
    a = torch.where(mirror, -upper, lower)
    b = torch.where(mirror, -lower, upper)
    log_b = torch.special.log_ndtr(b)
    log_a = torch.special.log_ndtr(a)
    # exp(-80) ~ 2e-35 changes nothing; the clamp keeps subnormal numbers, which CPUs
    # handle a hundred times slower, out of exp and log1p.
    return log_b + torch.log1p(-torch.exp((log_a - log_b).clamp(min=-80.0)))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log p(x) for the discrete decoder of Eq. 13, elementwise, in nats.

    Each data value x on the 256-level grid in [-1, 1] owns the bin [x - 1/255, x + 1/255]
    (width 2/255), except that the bin of -1 reaches down to -inf and that of 1 up to +inf,
    so the 256 probabilities sum to 1. p(x) is the mass of N(mean, exp(log_scale)^2) in it.

    Args:
        x: data on the grid (see `quantize`), any shape.
        mean, log_scale: the Gaussian's mean and log standard deviation, broadcast to x.
    Returns:
        log-probabilities shaped like x (always <= 0).
    """
    inv_scale = torch.exp(-log_scale)
    upper = torch.where(x > 1.0 - 1e-3, torch.full_like(x, math.inf),
                        (x + BIN_WIDTH / 2 - mean) * inv_scale)
    lower = torch.where(x < -1.0 + 1e-3, torch.full_like(x, -math.inf),
                        (x - BIN_WIDTH / 2 - mean) * inv_scale)
    log_probs = _log_diff_ndtr(lower, upper)
    # When the bin is so narrow next to the scale that both CDF values round to the same
    # number, the mass is the density at the centre times the bin width (as PixelCNN++).
    log_density = (-0.5 * ((x - mean) * inv_scale) ** 2 - log_scale - 0.5 * math.log(2 * math.pi)
                   + math.log(BIN_WIDTH))
    return torch.where(torch.isfinite(log_probs), log_probs, log_density).clamp(max=0.0)


def prior_bpd(diffusion: Diffusion, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) of Eq. 5, in bits per dimension, for each image.

    q(x_T | x_0) = N(sqrt(abar_T) x_0, (1 - abar_T) I) (Eq. 4). It has no parameters to
    learn; for the paper's schedule it is about 1e-5 bits/dim (Sec. 4).

    Args:
        x0: images [N, C, H, W] on the 256-level grid in [-1, 1].
    Returns:
        [N], in the accumulation dtype (float64 except on MPS).
    """
    dtype = _accumulation_dtype(x0.device)
    abar = diffusion.alphas_cumprod[-1].item()
    x0 = x0.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=x0.device)
    kl = normal_kl(math.sqrt(abar) * x0, zero + math.log(1.0 - abar), zero, zero)
    return kl.flatten(1).mean(1) / LN2


def vb_terms(
    diffusion: Diffusion,
    model,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    clip: bool = True,
    labels: Tensor | None = None,
) -> Tensor:
    """One term of the bound (Eq. 5) per image, in bits per dimension.

    For code t >= 1 (the paper's t >= 2) it is L_{t-1} = KL(q(x_{t-1} | x_t, x_0) ||
    p_theta(x_{t-1} | x_t)) between two Gaussians (Eq. 6-7 and the model's mean and
    variance). For code t = 0 it is the decoder's L_0 = -log p_theta(x_0 | x_1) with the
    discrete likelihood of Eq. 13, whose Gaussian has the model's mean and variance at
    t = 0. Both are averaged over the D dimensions of an image and divided by ln 2.

    Args:
        x0: images [B, C, H, W] on the grid; x_t: q_sample(x0, t, noise) [B, C, H, W].
        t: LongTensor [B] of code timesteps; 0 and other values may be mixed.
        clip: clip the model's x0 estimate to [-1, 1] (as the samplers do); the bound
            holds for any choice, it is part of what the model is.
    Returns:
        [B] in the accumulation dtype (float64 except on MPS).
    """
    dtype = _accumulation_dtype(x0.device)
    out = diffusion.p_mean_variance(model, x_t, t, clip=clip, labels=labels)
    mean, log_variance = out["mean"].to(dtype), out["log_variance"].to(dtype)
    terms = torch.zeros(x0.shape[0], dtype=dtype, device=x0.device)
    decoder = t == 0
    if not decoder.all():
        true_mean, _, true_log_variance = diffusion.q_posterior(x0, x_t, t)
        kl = normal_kl(true_mean.to(dtype), true_log_variance.to(dtype), mean, log_variance)
        terms = torch.where(decoder, terms, kl.flatten(1).mean(1))
    if decoder.any():
        log_likelihood = discretized_gaussian_log_likelihood(x0.to(dtype), mean, 0.5 * log_variance)
        terms = torch.where(decoder, -log_likelihood.flatten(1).mean(1), terms)
    return terms / LN2


def timestep_strata(num_timesteps: int, k: int) -> list[int]:
    """Edges 0 = b_0 < b_1 < ... < b_k = T of k strata [b_{j-1}, b_j) of the code timesteps.

    The first stratum is {0} alone (the decoder L_0 differs from every KL term); then the
    edges grow geometrically, b_j ~ T^((j-1)/(k-1)), each stratum holding at least one
    timestep. The terms of the bound fall steeply with t, so small strata go where they
    change fast: with T = 1000 and k = 50, t = 0..22 are single strata.
    """
    if not 1 <= k <= num_timesteps:
        raise ValueError(f"k must be from 1 to T={num_timesteps}; got {k}")
    if k == 1:
        return [0, num_timesteps]
    edges = [0]
    for j in range(1, k + 1):
        geometric = round(num_timesteps ** ((j - 1) / (k - 1)))
        edges.append(min(max(edges[-1] + 1, geometric), num_timesteps - (k - j)))
    return edges


def sample_timesteps(
    num_timesteps: int, k: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """k code timesteps and weights for an unbiased estimate of a sum over all T terms.

    One timestep is drawn uniformly from each stratum of `timestep_strata`, and weighted
    by the stratum's size: sum_j weight_j * L_{t_j} has expectation sum_t L_t, exactly.

    Returns:
        (t LongTensor [k], ascending; weights float64 [k], summing to T), on the CPU.
        With k = T: every timestep, weight 1.
    """
    edges = torch.tensor(timestep_strata(num_timesteps, k))
    sizes = edges[1:] - edges[:-1]
    device = generator.device if generator is not None else "cpu"
    u = torch.rand(k, generator=generator, device=device).cpu().double()
    t = edges[:-1] + (u * sizes).long().clamp(max=sizes - 1)
    return t, sizes.to(torch.float64)


@torch.no_grad()
def bits_per_dim(
    diffusion: Diffusion,
    model,
    x0: Tensor,
    timesteps: int | None = None,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    labels: Tensor | None = None,
    clip: bool = True,
    progress: bool = False,
    return_terms: bool = False,
):
    """The variational bound on -log p(x_0) (Eq. 5), in bits per dimension, per image.

        L = L_T + sum_{t=2..T} L_{t-1} + L_0, divided by D ln 2,

    with the prior term L_T (`prior_bpd`), one KL term L_{t-1} per paper t = 2..T
    (code 1..T-1) and the discrete decoder L_0 (Eq. 13) at code t = 0 (see `vb_terms`).
    Each term is estimated with one draw x_t ~ q(x_t | x_0) per image: unbiased, and
    its noise averages out over images.

    Args:
        diffusion: the process the model was trained with.
        model: callable (x_t, t) -> output; an nn.Module is put in eval mode (and back).
        x0: images [N, C, H, W] on the 256-level grid in [-1, 1] (a dataset from
            `data.load_dataset` is; otherwise use `quantize`), on the model's device.
        timesteps: None evaluates all T terms. An integer K < T evaluates K of them, for
            K/T of the cost: an unbiased estimate of the sum over all T, stratified
            (`sample_timesteps`): L_0 always, then one t drawn uniformly from each of
            K - 1 strata that widen geometrically with t, weighted by the stratum's size.
            The terms fall steeply with t, so this is far more precise than K timesteps
            drawn uniformly from all T (for the Gaussian data of the tests, K = 50 gives
            a spread of about 0.03 bits/dim against 11 for uniform draws). The same K
            timesteps serve all N images (drawn once per call).
        batch_size: images per model call. The result does not depend on it: the noise
            for all N images is drawn at once per timestep.
        generator: a torch.Generator on x0's device, for reproducible numbers.
        labels: optional class labels [N] passed to the model.
        clip: clip the model's x0 estimate to [-1, 1] (see `vb_terms`).
        progress: show a progress bar over the timesteps.
        return_terms: also return the terms, each in bits/dim.

    Returns:
        bpd [N] (float64 except on MPS); with `return_terms`, ``(bpd, terms)`` where terms
        = {"prior": [N], "t": LongTensor [K] (code timesteps, ascending), "weights": [K]
        (1 each for all T; stratum sizes otherwise), "vb": [K, N] (the term of each
        timestep; the row of t = 0 is L_0), "decoder": [N] (L_0)}, so that
        bpd = prior + (weights[:, None] * vb).sum(0).
    """
    num_timesteps = diffusion.num_timesteps
    n = x0.shape[0]
    if n == 0 or x0.dim() != 4:
        raise ValueError(f"x0 must be a non-empty batch of images [N, C, H, W]; got {tuple(x0.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    if not torch.allclose(x0, quantize(x0), atol=1e-4, rtol=0):
        raise ValueError("x0 must lie on the 256-level grid in [-1, 1] (k / 127.5 - 1) for the "
                         "discrete decoder of Eq. 13; pass quantize(x0)")
    if timesteps is not None and not (isinstance(timesteps, int) and 1 <= timesteps <= num_timesteps):
        raise ValueError(f"timesteps must be None or an integer from 1 to T={num_timesteps}; "
                         f"got {timesteps!r}")
    device = x0.device
    dtype = _accumulation_dtype(device)
    if timesteps is None or timesteps == num_timesteps:
        ts, weights = torch.arange(num_timesteps), torch.ones(num_timesteps, dtype=torch.float64)
    else:
        ts, weights = sample_timesteps(num_timesteps, timesteps, generator)

    vb = torch.empty(len(ts), n, dtype=dtype, device=device)
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        for k, step in enumerate(tqdm(ts.tolist(), disable=not progress, desc="bits/dim")):
            # Drawn for all N images at once, so chunking the batch cannot change the draws.
            noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
            for first in range(0, n, batch_size):
                chunk = slice(first, first + batch_size)
                x0_chunk = x0[chunk]
                t = torch.full((x0_chunk.shape[0],), step, device=device, dtype=torch.long)
                x_t = diffusion.q_sample(x0_chunk, t, noise[chunk])
                vb[k, chunk] = vb_terms(diffusion, model, x0_chunk, x_t, t, clip=clip,
                                        labels=None if labels is None else labels[chunk])
    finally:
        if was_training:
            model.train()

    prior = prior_bpd(diffusion, x0)
    bpd = prior + (weights.to(device=device, dtype=dtype)[:, None] * vb).sum(0)
    if not return_terms:
        return bpd
    return bpd, {"prior": prior, "t": ts, "weights": weights, "vb": vb, "decoder": vb[0]}


# ============================================================ sample quality


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
    return f"python -m naivediffusion.metrics train-classifier --dataset {dataset} --out {out}"


def load_images(
    dataset: str,
    train: bool = False,
    n: int | None = None,
    seed: int = 0,
    root: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Real images of a dataset as one tensor, without augmentation.

    Args:
        train: the training split, else the test split.
        n: how many, drawn at random without replacement (fixed by `seed`); None: all,
            in the dataset's order.
    Returns:
        (images float32 [n, C, H, W] in [-1, 1], labels LongTensor [n]).
    """
    data = load_dataset(dataset, root=root, train=train, augment=False)
    if n is not None:
        if not 1 <= n <= len(data):
            raise ValueError(f"asked for {n} images of the {dataset} "
                             f"{'training' if train else 'test'} split, which has {len(data)}")
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
    (plain data: dataset, accuracy, the command that trained it, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in classifier.state_dict().items()}
    torch.save({"format": CLASSIFIER_FORMAT, "version": CLASSIFIER_VERSION,
                "config": {**classifier.config, "widths": list(classifier.config["widths"])},
                "state_dict": state, "metadata": metadata}, path)
    return path


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
    was_training = classifier.training
    classifier.eval()
    features = [classifier.features(x.to(device).float()).cpu() for x in images.split(batch_size)]
    classifier.train(was_training)
    return torch.cat(features)


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
    1,000 about 1.6-1.8; use 1,000 or more for numbers to compare.

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


# ============================================================ command line


def add_train_classifier_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `train-classifier`: train the feature network of `sample_quality`."""
    parser.add_argument("--dataset", default="mnist",
                        help='"mnist", "fashion-mnist" or "cifar10" (default: mnist)')
    parser.add_argument("--out", default=None,
                        help="where to save the weights (default: the package's "
                        "naivediffusion/assets/classifier_DATASET.pt)")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the training set (default: 2)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default: 128)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of Adam (default: 0.002)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                        help="auto: cuda, else mps, else cpu (default: auto)")
    parser.add_argument("--data-root", default=None, help="folder of the datasets "
                        "(default: $NAIVEDIFFUSION_DATA, else ~/.cache/naivediffusion/data)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")


def run_train_classifier(args) -> int:
    """Train the classifier, print its test accuracy, save it with the command that made it."""
    if args.epochs < 1 or args.batch_size < 1:
        raise ValueError("--epochs and --batch-size must be at least 1")
    out = args.out or str(classifier_path(args.dataset))
    command = (f"python -m naivediffusion.metrics train-classifier --dataset {args.dataset} "
               f"--epochs {args.epochs} --batch-size {args.batch_size} --lr {args.lr:g} "
               f"--seed {args.seed} --device {args.device} --out {shlex.quote(out)}")
    classifier, info = train_classifier(args.dataset, epochs=args.epochs, batch_size=args.batch_size,
                                        lr=args.lr, seed=args.seed, device=args.device,
                                        root=args.data_root, progress=not args.no_progress)
    path = save_classifier(
        classifier, out, **info, command=command, threads=torch.get_num_threads(),
        date=datetime.date.today().isoformat(), torch_version=str(torch.__version__),
        parameters=sum(p.numel() for p in classifier.parameters()),
    )
    print(f"{args.dataset} classifier: test accuracy {info['test_accuracy']:.4f}, trained in "
          f"{info['train_seconds']:.0f} s on {info['device']} -> {path} "
          f"({path.stat().st_size / 1024:.0f} KiB)")
    return 0


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `evaluate`: bits/dim on test images, or the sample-quality score."""
    parser.add_argument("--checkpoint", required=True,
                        help="a run's ema.pt or checkpoint.pt, or the run folder (required)")
    parser.add_argument("--metric", choices=("bpd", "fid"), required=True,
                        help="bpd: the variational bound on test images in bits/dim (Eq. 5); "
                        "fid: Fréchet distance of samples to test images in the features of the "
                        "package's classifier, with the real-data floor (not Inception FID) (required)")
    parser.add_argument("--n", type=int, default=1000,
                        help="test images (bpd) or samples (fid) (default: 1000)")
    parser.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim",
                        help="fid: ddpm runs all T steps, ddim --steps (default: ddim)")
    parser.add_argument("--steps", type=int, default=None, help="fid: DDIM steps (default: 50)")
    parser.add_argument("--eta", type=float, default=0.0, help="fid: DDIM noise (default: 0)")
    parser.add_argument("--timesteps", type=int, default=None,
                        help="bpd: terms of the bound to evaluate, an unbiased stratified estimate "
                        "when fewer than T (default: all T)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per model call (default: 256)")
    parser.add_argument("--classifier", default=None,
                        help="fid: classifier weights (default: the package's for the dataset)")
    parser.add_argument("--data-root", default=None, help="folder of the datasets "
                        "(default: the checkpoint's, else $NAIVEDIFFUSION_DATA)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                        help="auto: cuda, else mps, else cpu (default: auto)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed of the test images, noise and samples (default: 0)")
    parser.add_argument("--out", default="metrics.json", help="JSON file for the numbers (default: metrics.json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")


def run_evaluate(args) -> int:
    """Load the checkpoint's EMA model, compute the metric, print it, write it to JSON."""
    from .train import load_model  # train imports much more; only `evaluate` needs it

    if args.n < 2 or args.batch_size < 1:
        raise ValueError("--n must be at least 2 and --batch-size at least 1")
    device = pick_device(args.device)
    model, diffusion, info = load_model(args.checkpoint, device=device, ema=True)
    train_config = info.get("train_config") or {}
    dataset = train_config.get("dataset")
    if dataset is None:
        raise ValueError(f"{info['path']} does not say which dataset the model learned")
    root = args.data_root or train_config.get("data_root")
    image_size = train_config.get("image_size")
    result = {"metric": args.metric, "checkpoint": str(info["path"]), "step": info["step"],
              "dataset": dataset, "n": args.n, "seed": args.seed, "device": str(device)}
    start = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(args.seed)

    if args.metric == "bpd":
        T = diffusion.num_timesteps
        if args.timesteps is not None and not 1 <= args.timesteps <= T:
            raise ValueError(f"--timesteps must be from 1 to T={T}; got {args.timesteps}")
        test = load_dataset(dataset, root=root, train=False, image_size=image_size, augment=False)
        if args.n > len(test):
            raise ValueError(f"--n {args.n} is more than the {len(test)} test images of {dataset}")
        order = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))
        x0 = torch.stack([test[i][0] for i in order[:args.n].tolist()]).to(device)
        bpd, terms = bits_per_dim(diffusion, model, x0, timesteps=args.timesteps,
                                  batch_size=args.batch_size, generator=generator,
                                  progress=not args.no_progress, return_terms=True)
        bpd = bpd.double().cpu()
        result.update(
            bpd=bpd.mean().item(), bpd_standard_error=(bpd.std() / math.sqrt(len(bpd))).item(),
            timesteps=len(terms["t"]), num_timesteps=T, diffusion_config=diffusion.config,
            terms={"prior": terms["prior"].mean().item(), "decoder": terms["decoder"].mean().item(),
                   "t": terms["t"].tolist(), "weights": terms["weights"].tolist(),
                   "vb": terms["vb"].double().mean(1).cpu().tolist()},
        )
        how = "all" if args.timesteps in (None, T) else "a stratified estimate from"
        summary = (f"bits/dim {result['bpd']:.4f} +- {result['bpd_standard_error']:.4f} on {args.n} "
                   f"{dataset} test images ({how} {len(terms['t'])} of T={T} terms; prior "
                   f"{result['terms']['prior']:.2e}, decoder L_0 {result['terms']['decoder']:.4f})")
    else:
        classifier = load_classifier(dataset, args.classifier, device=device)
        steps = args.steps if args.sampler == "ddim" else None
        if args.sampler == "ddim" and steps is None:
            steps = min(50, diffusion.num_timesteps)
        samples = []
        for first in range(0, args.n, args.batch_size):
            size = min(args.batch_size, args.n - first)
            samples.append(diffusion.sample(model, (size, *info["image_shape"]), sampler=args.sampler,
                                            steps=steps, eta=args.eta, generator=generator,
                                            progress=not args.no_progress, device=device).cpu())
        scores = sample_quality(torch.cat(samples), dataset, classifier=classifier, seed=args.seed,
                                root=root)
        result.update(
            sampler=args.sampler, steps=steps or diffusion.num_timesteps, eta=args.eta, **scores,
            score="Fréchet distance in the features of the naivediffusion classifier (not Inception FID)",
            classifier={k: classifier.metadata.get(k) for k in ("path", "test_accuracy", "command")},
        )
        summary = (f"Fréchet distance (classifier features) {scores['fd']:.3f} for {args.n} samples "
                   f"({args.sampler}, {result['steps']} steps) vs {scores['n_reference']} {dataset} "
                   f"test images; real-data floor ({args.n} training images) {scores['fd_real']:.3f}")

    result["seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{summary}; {result['seconds']:.0f} s -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m naivediffusion.metrics train-classifier ...``"""
    parser = argparse.ArgumentParser(prog="python -m naivediffusion.metrics",
                                     description="Train the classifier behind the sample-quality score.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_classifier_arguments(subparsers.add_parser(
        "train-classifier", help="train and save the feature network of sample_quality"))
    args = parser.parse_args(argv)
    try:
        return run_train_classifier(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
