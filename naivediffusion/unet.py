"""The denoising network: a U-Net with a time embedding and self-attention.

DDPM (Ho et al. 2020, Section 4 and Appendix B) models eps_theta(x_t, t) with a U-Net
(Ronneberger et al. 2015) shaped like an unmasked PixelCNN++ (Salimans et al. 2017):

- the timestep t enters through a sinusoidal embedding (Vaswani et al. 2017) and a small MLP,
  and is added inside every residual block, so one network serves all T noise levels;
- normalisation is GroupNorm (Wu & He 2018), which does not depend on the batch size;
- self-attention sits between the convolutional blocks at the 16x16 resolution;
- the CIFAR-10 model has four resolutions (32 -> 16 -> 8 -> 4), two residual blocks per
  resolution, 128 base channels, dropout 0.1 and 35.7M parameters.

The network knows nothing about noise schedules: it maps (x_t, t) to a tensor shaped like x_t,
and `diffusion.py` decides what that tensor means (eps, x0 or v).

Read top to bottom: `timestep_embedding`, `TimeEmbedding`, `ResBlock`, `AttentionBlock`,
`Downsample`, `Upsample`, then `UNet`, which wires them together; last `eval_mode`, which
the samplers, the likelihood and the quality score use to run a network without training it.
"""

from __future__ import annotations

import contextlib
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of the timesteps (Vaswani et al. 2017, Section 3.5).

    As in the DDPM reference code: frequencies f_i = max_period^(-i / (dim/2 - 1)) for
    i = 0 .. dim/2 - 1, sines of t * f_i in the first half, cosines in the second.

    t: [B] integer (or float) timesteps. Returns [B, dim] float32.
    """
    if dim % 2 or dim < 4:
        raise ValueError(f"the embedding size must be even and at least 4; got {dim}")
    half = dim // 2
    # Geometric frequencies from 1 down to 1/max_period: the fast ones tell neighbouring
    # timesteps apart, the slow ones tell apart timesteps that are far from each other.
    exponents = torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1)
    frequencies = torch.exp(-math.log(max_period) * exponents)
    angles = t.float()[:, None] * frequencies[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def group_norm(channels: int, min_group_channels: int = 1) -> nn.GroupNorm:
    """GroupNorm (Wu & He 2018) with 32 groups as in DDPM, or fewer when 32 does not divide
    `channels`: gcd(32, channels) keeps every group the same size. The number of groups is
    halved until each group holds at least `min_group_channels` channels.

    Why the minimum matters: a ResBlock adds the time (and class) embedding as one bias per
    channel, constant over H and W, right before a GroupNorm. A group of ONE channel is
    normalised by its own mean over H and W, which removes that bias completely: the block
    can no longer see t. With 32 groups that happens for every layer of 32 channels or fewer,
    so the small MNIST networks need groups of several channels (DDPM's 128-channel CIFAR-10
    network has groups of 4).
    """
    groups = math.gcd(32, channels)
    while groups > 1 and channels // groups < min_group_channels:
        groups //= 2
    return nn.GroupNorm(groups, channels)


def zero_init(layer: nn.Conv2d) -> nn.Conv2d:
    """Zero a layer's weight and bias (DDPM's `init_scale=0`).

    A residual branch that ends in such a layer starts as the identity, so a deep network
    begins as a shallow one; the final layer of the U-Net makes the first prediction exactly 0.
    """
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class TimeEmbedding(nn.Module):
    """t -> sinusoidal features -> MLP (DDPM Appendix B: dense, swish, dense).

    t: [B] -> [B, time_dim]; DDPM uses time_dim = 4 * base_channels.
    """

    def __init__(self, channels: int, time_dim: int):
        super().__init__()
        self.channels = channels
        self.mlp = nn.Sequential(
            nn.Linear(channels, time_dim),
            nn.SiLU(),  # SiLU(x) = x * sigmoid(x), the "swish" of the DDPM code
            nn.Linear(time_dim, time_dim),
        )

    def forward(self, t: Tensor) -> Tensor:
        features = timestep_embedding(t, self.channels)
        # Match the weights' dtype so a model cast with .half() or .bfloat16() still runs.
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """A residual block that also sees the time embedding (PixelCNN++ style, as in DDPM).

    x -> GroupNorm -> SiLU -> conv3x3 -> + Linear(SiLU(emb)) -> GroupNorm -> SiLU -> dropout
    -> conv3x3 (zero-initialised), added to x (through a 1x1 convolution when the number of
    channels changes).

    x: [B, in_channels, H, W], emb: [B, time_dim] -> [B, out_channels, H, W].
    """

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, dropout: float,
                 min_group_channels: int = 1):
        super().__init__()
        self.norm1 = group_norm(in_channels, min_group_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        # Each block reads the timestep through its own projection: one bias per channel,
        # so the block can behave differently at different noise levels.
        self.time_proj = nn.Linear(time_dim, out_channels)
        # The embedding's per-channel bias survives this norm only as its differences between
        # the channels of a group (see group_norm).
        self.norm2 = group_norm(out_channels, min_group_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        # The residual path must have out_channels too; a 1x1 convolution ("nin_shortcut" in
        # the DDPM code) adapts it only where the count changes.
        if in_channels != out_channels:
            self.skip = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.skip = nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(emb))[:, :, None, None]  # broadcast over H and W
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels of a feature map (Vaswani et al. 2017).

    Every pixel is a token: Q, K, V come from one 1x1 convolution of the normalised input,
    each head computes softmax(Q K^T / sqrt(d)) V (Eq. 1 of the Transformer paper) with
    d = channels / num_heads, and a zero-initialised 1x1 convolution maps the heads back,
    added to the input. Convolutions only see neighbours; attention lets every pixel look at
    the whole image, whatever its size.

    Channel layout of the qkv convolution: [Q | K | V], each split into heads of d channels.

    x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, channels: int, num_heads: int, min_group_channels: int = 1):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels cannot be split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels, min_group_channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values of x, each [B, num_heads, H*W, d]."""
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        # Tokens first, channels last. The fused attention kernels need each token's channels
        # next to each other in memory (stride 1), hence the copy.
        q, k, v = qkv.transpose(-1, -2).contiguous().unbind(dim=1)
        return q, k, v

    def attention_weights(self, x: Tensor) -> Tensor:
        """softmax(Q K^T / sqrt(d)), computed by hand to look at: [B, num_heads, H*W, H*W].

        Row i holds how much pixel i (row-major, i = y * W + x) takes from every pixel; each
        row sums to 1. `forward` computes the same thing without storing this matrix.
        """
        q, k, _ = self.heads(x)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        return scores.softmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.heads(x)
        # The fused kernel never materialises the (H*W) x (H*W) matrix of weights.
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, H*W, d]
        out = out.transpose(-1, -2).reshape(b, c, h, w)  # heads back side by side as channels
        return x + self.proj(out)


class Downsample(nn.Module):
    """Halve the height and width with a stride-2 3x3 convolution. [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the height and width: nearest-neighbour copy, then a 3x3 convolution to smooth
    the blocks. [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepSequential(nn.Sequential):
    """Blocks applied in order; the residual blocks also receive the time embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


def _level_resolutions(image_size: int, channel_mults, attention_resolutions, num_classes) -> list[int]:
    """The side length of each level of a UNet ([32, 16, 8, 4] for CIFAR-10's), after checking
    that its settings fit together: one one-line error for each way they can not."""
    num_levels = len(channel_mults)
    if num_levels < 1:
        raise ValueError("channel_mults needs at least one level")
    if image_size % 2 ** (num_levels - 1):
        raise ValueError(f"image_size must be a multiple of {2 ** (num_levels - 1)} for {num_levels} "
                         f"levels; got {image_size}")
    resolutions = [image_size // 2**level for level in range(num_levels)]
    unmatched = sorted(set(attention_resolutions) - set(resolutions))
    if unmatched:
        raise ValueError(f"attention_resolutions {unmatched} match no level: with image_size={image_size} "
                         f"the levels have resolutions {resolutions}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be None or at least 1; got {num_classes}")
    return resolutions


class UNet(nn.Module):
    """The noise-prediction network eps_theta(x_t, t) of DDPM (Appendix B).

    Down the U, each level has `num_res_blocks` residual blocks and then halves the size;
    the middle is residual block, attention, residual block; up the U, each level has
    `num_res_blocks + 1` residual blocks, each fed the concatenation of the running features
    and one skip connection saved on the way down, and then doubles the size.

    Args:
        in_channels: image channels (3 for RGB, 1 for MNIST); the output has as many, unless
            `out_channels` says otherwise.
        base_channels: channels of the first level; level i has base_channels * channel_mults[i].
        channel_mults: one multiplier per level; len(channel_mults) levels, each half the size
            of the one before.
        num_res_blocks: residual blocks per level on the way down.
        attention_resolutions: which levels get self-attention, named by their resolution on an
            `image_size` x `image_size` input. Level i has resolution image_size / 2**i; at a
            level listed here every residual block is followed by an attention block. Other
            input sizes use the same levels (the 16x16 level of the CIFAR-10 model sees 32x24
            on a 64x48 input). The middle block always attends.
        num_heads: attention heads; must divide the channels of every level that attends.
        dropout: dropout rate inside the residual blocks.
        num_classes: if given, a class embedding is added to the time embedding; class index
            `num_classes` is the "null" class (no label), for classifier-free guidance.
        image_size: the reference resolution for `attention_resolutions`; the network itself
            takes any height and width divisible by 2 ** (len(channel_mults) - 1).
        min_group_channels: the fewest channels per GroupNorm group (`group_norm`); 1 keeps
            DDPM's 32 groups wherever they fit, which for layers of 32 channels or fewer means
            groups of one channel that erase the time embedding; the MNIST presets use 4.
        out_channels: the output's channels; None: as many as the input's. A network for a
            learned variance (Improved DDPM) outputs 2 * in_channels: the mean's prediction,
            then the variance's (`variance.split_output`).

    forward(x, t, labels=None): x [B, in_channels, H, W], t LongTensor [B] (or one timestep
    for the whole batch), labels LongTensor [B] or None -> [B, out_channels, H, W].
    """

    PRESETS: ClassVar[dict[str, dict]] = {
        # The paper's CIFAR-10 model (35.7M parameters). The DDPM code uses one attention
        # head; the number of heads does not change the parameter count.
        "ddpm-cifar10": dict(
            in_channels=3,
            base_channels=128,
            channel_mults=(1, 2, 2, 2),
            num_res_blocks=2,
            attention_resolutions=(16,),
            num_heads=1,
            dropout=0.1,
            image_size=32,
        ),
        # A small model for 28x28 digits that trains on a CPU: 28 -> 14 -> 7.
        "mnist": dict(
            in_channels=1,
            base_channels=32,
            channel_mults=(1, 2, 2),
            num_res_blocks=2,
            attention_resolutions=(14,),
            num_heads=4,
            dropout=0.1,
            image_size=28,
            min_group_channels=4,  # see group_norm: groups of one channel would erase t
        ),
        # The CPU-sized network (0.41M parameters): half the channels, attention only at 7x7
        # (49 positions instead of 196), no dropout for runs of minutes. On 2 CPU cores a step
        # at batch 64 takes about a third of the "mnist" preset's (benchmarks/recipes.py).
        "mnist-small": dict(
            in_channels=1,
            base_channels=16,
            channel_mults=(1, 2, 2),
            num_res_blocks=2,
            attention_resolutions=(7,),
            num_heads=4,
            dropout=0.0,
            image_size=28,
            min_group_channels=4,  # see group_norm: groups of one channel would erase t
        ),
    }

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 128,
        channel_mults: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (16,),
        num_heads: int = 4,
        dropout: float = 0.1,
        num_classes: int | None = None,
        image_size: int = 32,
        min_group_channels: int = 1,
        out_channels: int | None = None,
    ):
        super().__init__()
        # Everything needed to rebuild this network: UNet(**model.config). Lists, not tuples,
        # so the dict survives a round trip through JSON. out_channels only when given, so that
        # the configs of older checkpoints still match.
        self.config = dict(
            in_channels=in_channels, base_channels=base_channels, channel_mults=list(channel_mults),
            num_res_blocks=num_res_blocks, attention_resolutions=list(attention_resolutions),
            num_heads=num_heads, dropout=dropout, num_classes=num_classes, image_size=image_size,
            min_group_channels=min_group_channels, **({} if out_channels is None else {"out_channels": out_channels}))
        # Each level but the last halves the size, so H and W must survive that many halvings.
        num_levels = self.num_levels = len(channel_mults)
        self.size_multiple = 2 ** (num_levels - 1)
        resolutions = _level_resolutions(image_size, channel_mults, attention_resolutions, num_classes)
        self.num_classes = num_classes

        time_dim = 4 * base_channels
        self.time_embedding = TimeEmbedding(base_channels, time_dim)
        # One more row than classes: the last one, index num_classes, means "no label".
        self.class_embedding = nn.Embedding(num_classes + 1, time_dim) if num_classes is not None else None

        def res_block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, time_dim, dropout, min_group_channels)

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        # Down: the output of conv_in and of every entry of self.down is kept as a skip.
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch = base_channels
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                blocks = [res_block(ch, base_channels * mult)]
                ch = base_channels * mult
                if resolutions[level] in attention_resolutions:
                    blocks.append(AttentionBlock(ch, num_heads, min_group_channels))
                self.down.append(TimestepSequential(*blocks))
                skip_channels.append(ch)
            if level < num_levels - 1:
                self.down.append(TimestepSequential(Downsample(ch)))
                skip_channels.append(ch)

        # Middle, at the smallest size, where attention is cheapest and sees the whole image.
        self.mid = TimestepSequential(res_block(ch, ch), AttentionBlock(ch, num_heads, min_group_channels),
                                      res_block(ch, ch))

        # Up: every entry first concatenates one skip, the last one saved comes first.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for i in range(num_res_blocks + 1):
                blocks = [res_block(ch + skip_channels.pop(), base_channels * mult)]
                ch = base_channels * mult
                if resolutions[level] in attention_resolutions:
                    blocks.append(AttentionBlock(ch, num_heads, min_group_channels))
                if level > 0 and i == num_res_blocks:
                    blocks.append(Upsample(ch))
                self.up.append(TimestepSequential(*blocks))

        self.norm_out = group_norm(ch, min_group_channels)
        # Zero-initialised: the untrained network predicts 0 everywhere, a calm start.
        self.conv_out = zero_init(nn.Conv2d(ch, out_channels or in_channels, 3, padding=1))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> UNet:
        """Build a preset from `UNet.PRESETS`, with any constructor argument overridden."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    def count_parameters(self) -> int:
        """Number of parameters (the paper's CIFAR-10 model: 35.7M)."""
        return sum(p.numel() for p in self.parameters())

    def check_size(self, height: int, width: int) -> None:
        """Raise ValueError unless height and width survive every halving of the U."""
        m = self.size_multiple
        if height % m or width % m:
            raise ValueError(
                f"height and width must be multiples of {m} for {self.num_levels} levels; "
                f"got {height}x{width}; try {m * math.ceil(height / m)}x{m * math.ceil(width / m)}"
            )

    def forward(self, x: Tensor, t: Tensor | int, labels: Tensor | int | None = None) -> Tensor:
        batch = x.shape[0]
        self.check_size(x.shape[-2], x.shape[-1])
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:  # one timestep for the whole batch
            t = t.expand(batch)
        emb = self.time_embedding(t)

        if self.class_embedding is not None:
            if labels is None:
                labels = self.num_classes  # the null class: "any digit"
            labels = torch.as_tensor(labels, device=x.device)
            if labels.ndim == 0:
                labels = labels.expand(batch)
            # The label shifts the same vector the timestep does, so every block sees both.
            emb = emb + self.class_embedding(labels)
        elif labels is not None:
            raise ValueError("labels were given but this UNet has no classes (num_classes=None)")

        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        h = self.mid(h, emb)
        for block in self.up:
            # The skip brings back the fine detail that the way down gave up.
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


@contextlib.contextmanager
def eval_mode(model):
    """Run the block with `model` in eval mode (dropout off), then give it back its mode.

    For sampling, the likelihood and the quality score, which use a network without training
    it: an nn.Module in training mode is put in eval mode for the block and back in training
    mode after it, also when the block raises; one in eval mode stays so. Any other callable
    (a function, an analytic model) has no mode and passes through untouched.

        with eval_mode(model):
            images = ...
    """
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        yield model
    finally:
        if was_training:
            model.train()
