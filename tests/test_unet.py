"""The U-Net: shapes, where attention sits, size of the paper's model, gradients, attention maths."""

import json
import math

import pytest
import torch
from torch import nn

from naivediffusion.unet import AttentionBlock, ResBlock, UNet, group_norm, timestep_embedding

# A small network with the paper's layout (four levels, attention at 16 on 32x32), fast on a CPU.
TINY = dict(base_channels=16, channel_mults=(1, 2, 2, 2), num_res_blocks=1, num_heads=2)


def tiny(**overrides) -> UNet:
    torch.manual_seed(0)
    return UNet(**{**TINY, **overrides})


def randomise_zero_init(model: nn.Module) -> None:
    """Give the zero-initialised layers small random weights, so that every output depends on
    every parameter (a zero layer blocks the gradient to everything behind it)."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.05)


def attention_sizes(model: UNet, x: torch.Tensor, t: torch.Tensor) -> dict[str, tuple[int, int]]:
    """The (H, W) each attention block sees during one forward pass, by module name."""
    sizes, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, AttentionBlock):
            hook = lambda m, args, name=name: sizes.__setitem__(name, tuple(args[0].shape[-2:]))
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(x, t)
    for h in hooks:
        h.remove()
    return sizes


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: UNet.from_preset("mnist"), (2, 1, 28, 28)),
        (lambda: tiny(), (2, 3, 32, 32)),
        (lambda: tiny(), (2, 3, 64, 48)),
    ],
    ids=["mnist-28x28", "tiny-32x32", "tiny-64x48"],
)
def test_output_shape_equals_input_shape(make, shape):
    model = make()
    randomise_zero_init(model)
    x = torch.randn(shape)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 999]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_untrained_network_predicts_zero():
    # The output convolution is zero-initialised (DDPM's init_scale=0).
    out = tiny()(torch.randn(2, 3, 32, 32), torch.tensor([3, 500]))
    assert torch.equal(out, torch.zeros_like(out))


def test_scalar_timestep_is_broadcast():
    model = tiny().eval()
    randomise_zero_init(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x, 7), model(x, torch.full((3,), 7)))


@pytest.mark.parametrize(
    "size, expected",
    [((30, 30), "32x32"), ((32, 20), "32x24"), ((28, 28), "32x32")],
)
def test_bad_size_names_the_sizes_that_work(size, expected):
    model = tiny()
    with pytest.raises(ValueError, match="multiples of 8") as err:
        model(torch.randn(1, 3, *size), torch.tensor([0]))
    assert expected in str(err.value)
    assert f"{size[0]}x{size[1]}" in str(err.value)


def test_attention_resolution_that_matches_no_level_is_rejected():
    with pytest.raises(ValueError, match=r"\[32, 16, 8, 4\]"):
        tiny(attention_resolutions=(14,))


@pytest.mark.parametrize(
    "overrides, input_size, factors",
    [
        # factors: the downsampling factors of the levels that should attend
        (dict(), (32, 32), [2]),  # the paper: 16x16 on 32x32
        (dict(), (64, 48), [2]),  # same level, other input: 32x24
        (dict(attention_resolutions=(32, 8)), (32, 40), [1, 4]),
        (dict(attention_resolutions=()), (16, 24), []),
        (dict(channel_mults=(1, 2, 2), image_size=28, attention_resolutions=(14,)), (28, 28), [2]),
        (dict(channel_mults=(1, 2, 2), image_size=28, attention_resolutions=(7,)), (28, 36), [4]),
    ],
)
def test_attention_sits_at_the_configured_resolutions(overrides, input_size, factors):
    model = tiny(**overrides)
    mults = model.config["channel_mults"]
    num_res_blocks = model.config["num_res_blocks"]
    h, w = input_size
    sizes = attention_sizes(model, torch.randn(1, 3, h, w), torch.tensor([10]))

    # The middle block always attends, at the smallest size.
    bottom = 2 ** (len(mults) - 1)
    assert sizes.pop("mid.1") == (h // bottom, w // bottom)
    # Elsewhere: one attention block after each residual block of the levels that attend,
    # num_res_blocks on the way down and num_res_blocks + 1 on the way up.
    expected = {(h // f, w // f) for f in factors}
    assert set(sizes.values()) == expected
    down = [s for name, s in sizes.items() if name.startswith("down.")]
    up = [s for name, s in sizes.items() if name.startswith("up.")]
    for size in expected:
        assert down.count(size) == num_res_blocks
        assert up.count(size) == num_res_blocks + 1


def test_ddpm_cifar10_has_the_papers_parameter_count():
    model = UNet.from_preset("ddpm-cifar10")
    assert abs(model.count_parameters() - 35.7e6) / 35.7e6 < 0.01


def test_parameter_count_of_a_one_level_unet_by_hand():
    """Counted layer by layer from the architecture (DDPM Appendix B): one level of 8 channels,
    one residual block down, the middle (block, attention, block), two blocks up."""
    conv = lambda cin, cout, k: cin * cout * k * k + cout
    linear = lambda n_in, n_out: n_in * n_out + n_out
    norm = lambda c: 2 * c  # GroupNorm: a scale and a shift per channel
    c, time_dim = 8, 32

    def res_block(cin, cout):
        skip = conv(cin, cout, 1) if cin != cout else 0
        return norm(cin) + conv(cin, cout, 3) + linear(time_dim, cout) + norm(cout) + conv(cout, cout, 3) + skip

    attention = norm(c) + conv(c, 3 * c, 1) + conv(c, c, 1)
    expected = (linear(c, time_dim) + linear(time_dim, time_dim)  # time embedding MLP
                + conv(1, c, 3)  # conv_in
                + res_block(c, c)  # down
                + res_block(c, c) + attention + res_block(c, c)  # middle
                + 2 * res_block(2 * c, c)  # up: each block also reads a skip of c channels
                + norm(c) + conv(c, 1, 3))  # norm_out, conv_out
    model = UNet(in_channels=1, base_channels=c, channel_mults=(1,), num_res_blocks=1,
                 attention_resolutions=(), num_heads=1, image_size=8)
    assert expected == 10_593
    assert model.count_parameters() == expected
    # a class embedding adds (num_classes + 1) rows of time_dim
    labelled = UNet(in_channels=1, base_channels=c, channel_mults=(1,), num_res_blocks=1,
                    attention_resolutions=(), num_heads=1, image_size=8, num_classes=10)
    assert labelled.count_parameters() == expected + 11 * time_dim


def test_mnist_preset_is_small():
    assert 1e6 <= UNet.from_preset("mnist").count_parameters() <= 3e6


def test_every_parameter_receives_a_gradient():
    torch.manual_seed(0)
    model = UNet(**TINY, num_classes=3, attention_resolutions=(16, 4))
    # At initialisation the zero output layer blocks every gradient behind it: only
    # conv_out would learn in the first step. With it randomised, nothing should be cut off.
    randomise_zero_init(model)
    x = torch.randn(4, 3, 32, 16)
    labels = torch.tensor([0, 1, 2, 3])  # 3 = the null class, so every embedding row is used
    loss = (model(x, torch.tensor([0, 1, 500, 999]), labels) - torch.randn_like(x)).square().mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_zero_init_alone_still_trains_the_output_layer():
    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    model(x, torch.tensor([1, 2])).sub(x).square().mean().backward()
    assert model.conv_out.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_multi_head_attention_equals_the_formula():
    torch.manual_seed(0)
    channels, heads, d = 8, 2, 4
    block = AttentionBlock(channels, heads)
    randomise_zero_init(block)
    x = torch.randn(2, channels, 3, 5)

    # By hand from the block's own weights: 1x1 convolutions are matrix products over channels.
    tokens = block.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
    weight = block.qkv.weight[:, :, 0, 0]
    q, k, v = (tokens @ weight.T + block.qkv.bias).split(channels, dim=-1)
    outs, maps = [], []
    for i in range(heads):
        head = slice(i * d, (i + 1) * d)
        a = torch.softmax(q[..., head] @ k[..., head].transpose(1, 2) / math.sqrt(d), dim=-1)
        maps.append(a)
        outs.append(a @ v[..., head])
    mixed = torch.cat(outs, dim=-1) @ block.proj.weight[:, :, 0, 0].T + block.proj.bias
    expected = x + mixed.transpose(1, 2).reshape(x.shape)

    with torch.no_grad():
        assert torch.allclose(block(x), expected, atol=1e-5)
        weights = block.attention_weights(x)
    assert weights.shape == (2, heads, 15, 15)
    assert torch.allclose(weights, torch.stack(maps, dim=1), atol=1e-6)


def test_attention_does_not_depend_on_the_number_of_pixels_it_was_built_for():
    block = AttentionBlock(8, 2)
    randomise_zero_init(block)
    for h, w in [(1, 2), (4, 4), (7, 3)]:
        assert block(torch.randn(1, 8, h, w)).shape == (1, 8, h, w)


def test_heads_must_divide_channels():
    with pytest.raises(ValueError, match="heads"):
        AttentionBlock(12, 5)


def test_timestep_embedding_is_the_transformer_sinusoid():
    t = torch.tensor([0, 1, 37, 999])
    emb = timestep_embedding(t, 16)
    assert emb.shape == (4, 16) and emb.dtype == torch.float32
    # t = 0: all sines 0, all cosines 1.
    assert torch.equal(emb[0], torch.cat([torch.zeros(8), torch.ones(8)]))
    # Every entry, in float64: frequencies 10000^(-i / 7), i = 0..7, from 1 down to 1/10000;
    # sines in the first half, cosines in the second.
    for row, step in enumerate(t.tolist()):
        for i in range(8):
            angle = step * 10000.0 ** (-i / 7)
            assert emb[row, i].item() == pytest.approx(math.sin(angle), abs=2e-4), (step, i)
            assert emb[row, 8 + i].item() == pytest.approx(math.cos(angle), abs=2e-4), (step, i)


def test_class_conditioning():
    model = tiny(num_classes=10)
    randomise_zero_init(model)
    model.eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([100, 100])
    with torch.no_grad():
        out_3 = model(x, t, torch.tensor([3, 3]))
        out_4 = model(x, t, torch.tensor([4, 4]))
        out_null = model(x, t, torch.tensor([10, 10]))
        assert not torch.allclose(out_3, out_4)
        assert torch.equal(model(x, t), out_null)
        assert torch.equal(model(x, t, 3), out_3)
    assert model.class_embedding.num_embeddings == 11


def test_labels_without_classes_are_rejected():
    with pytest.raises(ValueError, match="num_classes"):
        tiny()(torch.randn(1, 3, 32, 32), torch.tensor([0]), torch.tensor([1]))


def test_config_rebuilds_an_identical_network():
    model = tiny(num_classes=5, channel_mults=(1, 2), attention_resolutions=(32,), dropout=0.0)
    randomise_zero_init(model)
    config = json.loads(json.dumps(model.config))  # as a checkpoint would store it
    rebuilt = UNet(**config)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.config == model.config
    x, t, y = torch.randn(2, 3, 16, 8), torch.tensor([5, 900]), torch.tensor([1, 5])
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x, t, y), model(x, t, y))


def test_from_preset_overrides_and_unknown_names():
    model = UNet.from_preset("mnist", base_channels=16, num_classes=10)
    assert model.config["base_channels"] == 16
    assert model.config["num_classes"] == 10
    assert model.config["in_channels"] == UNet.PRESETS["mnist"]["in_channels"]
    with pytest.raises(ValueError) as err:
        UNet.from_preset("imagenet")
    for name in UNet.PRESETS:
        assert name in str(err.value)


def test_channels_last_and_autocast_agree_with_the_plain_forward():
    model = tiny(dropout=0.0).eval()
    randomise_zero_init(model)
    x, t = torch.randn(2, 3, 32, 24), torch.tensor([1, 800])
    with torch.no_grad():
        reference = model(x, t)
        fast = model.to(memory_format=torch.channels_last)(
            x.to(memory_format=torch.channels_last), t
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t)
    assert torch.allclose(fast, reference, atol=1e-4)
    assert low.shape == x.shape
    assert (low.float() - reference).abs().max() < 0.1 * reference.abs().max()


@pytest.mark.parametrize("channels, minimum, groups", [
    (16, 1, 16), (32, 1, 32), (128, 1, 32), (48, 1, 16),  # DDPM's rule: gcd(32, channels)
    (16, 4, 4), (32, 4, 8), (64, 4, 16), (128, 4, 32),  # at least 4 channels per group
])
def test_group_norm_groups(channels, minimum, groups):
    assert group_norm(channels, minimum).num_groups == groups


def randomised(model: nn.Module) -> nn.Module:
    """The network with every weight drawn at random: the zero-initialised output layers of
    an untrained UNet would hide what the inputs change."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("preset", ["mnist", "mnist-small"])
def test_every_block_of_the_mnist_presets_sees_the_time_and_the_label(preset):
    """A ResBlock adds the embedding as a per-channel bias before a GroupNorm; with groups of
    one channel the norm removes it entirely and the network cannot tell t or the label."""
    model = randomised(UNet.from_preset(preset, num_classes=10)).eval()
    x = torch.randn(2, 1, 28, 28)
    for block in [m for m in model.modules() if isinstance(m, ResBlock)]:
        h = torch.randn(2, block.conv1.in_channels, 7, 7)
        e1, e2 = torch.randn(2, block.time_proj.in_features), torch.randn(2, block.time_proj.in_features)
        with torch.no_grad():
            assert (block(h, e1) - block(h, e2)).abs().max() > 1e-3
    with torch.no_grad():
        out = model(x, torch.tensor([10, 10]), torch.tensor([3, 3]))
        assert (out - model(x, torch.tensor([900, 900]), torch.tensor([3, 3]))).abs().max() > 1e-4
        assert (out - model(x, torch.tensor([10, 10]), torch.tensor([10, 10]))).abs().max() > 1e-4


def test_groups_of_one_channel_erase_the_time_embedding():
    """Why the MNIST presets set min_group_channels: with DDPM's 32 groups (min 1) a network
    of 16- and 32-channel layers gives the same output for every t and every label."""
    model = randomised(UNet.from_preset("mnist-small", num_classes=10, min_group_channels=1)).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        out = model(x, torch.tensor([10, 10]), torch.tensor([3, 3]))
        assert torch.allclose(out, model(x, torch.tensor([900, 900]), torch.tensor([7, 7])), atol=1e-5)


def test_a_config_without_min_group_channels_rebuilds_the_old_network():
    """Checkpoints written before min_group_channels existed rebuild with DDPM's rule."""
    config = UNet.from_preset("mnist-small").config
    assert config["min_group_channels"] == 4
    old = {k: v for k, v in config.items() if k != "min_group_channels"}
    norms = [m.num_groups for m in UNet(**old).modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(g == math.gcd(32, c) for g, c in zip(
        norms, [m.num_channels for m in UNet(**old).modules() if isinstance(m, nn.GroupNorm)], strict=True))
