"""Classifier-free guidance (Ho & Salimans 2022): label dropping in the loss, the guided prediction
(Eq. 6) for every objective, its single batched forward pass, and an analytic two-class model whose
conditional and unconditional optimal eps are known in closed form."""

import math

import pytest
import torch

from naivediffusion import Diffusion
from naivediffusion.unet import UNet

NULL = 5  # the stubs' null label: classes 0..4, as UNet(num_classes=5) would have


class LabelRecorder:
    """A model for the loss that records the labels of every call and predicts zeros."""

    def __init__(self):
        self.labels: list[torch.Tensor] = []

    def __call__(self, x_t, t, labels=None):
        self.labels.append(None if labels is None else labels.clone())
        return torch.zeros_like(x_t)


def _batch(n: int = 64):
    x0 = torch.zeros(n, 1, 2, 2)
    labels = torch.arange(n) % NULL  # never the null label
    return x0, labels


# ------------------------------------------------------------ label dropping

def test_dropped_fraction_is_close_to_p_uncond():
    d = Diffusion(timesteps=10)
    model, g = LabelRecorder(), torch.Generator().manual_seed(0)
    x0, labels = _batch(64)
    p, batches = 0.3, 200
    for _ in range(batches):
        d.loss(model, x0, labels=labels, p_uncond=p, null_label=NULL, generator=g)
    seen = torch.stack(model.labels)  # [batches, 64]
    dropped = seen == NULL
    # Every kept label is the sample's own label, and every change is to the null label.
    assert torch.equal(seen[~dropped], labels.expand_as(seen)[~dropped])
    n = dropped.numel()
    assert dropped.float().mean().item() == pytest.approx(p, abs=5 * math.sqrt(p * (1 - p) / n))
    # Per sample, not per batch: the per-batch counts vary like Binomial(64, p), not 0 or 64.
    per_batch = dropped.float().mean(dim=1)
    assert ((per_batch > 0) & (per_batch < 1)).all()
    assert per_batch.std().item() == pytest.approx(math.sqrt(p * (1 - p) / 64), rel=0.25)
    # ... and each position of the batch is dropped about equally often.
    per_position = dropped.float().mean(dim=0)
    assert per_position.min().item() > 0.1 and per_position.max().item() < 0.5


def test_half_dropped_batches_hold_both_dropped_and_kept_labels():
    """A per-batch drop (one coin for the whole batch) would give all or nothing every time."""
    d = Diffusion(timesteps=10)
    model, g = LabelRecorder(), torch.Generator().manual_seed(1)
    x0, labels = _batch(64)
    for _ in range(20):
        d.loss(model, x0, labels=labels, p_uncond=0.5, null_label=NULL, generator=g)
    for seen in model.labels:
        dropped = seen == NULL
        assert dropped.any() and (~dropped).any()


@pytest.mark.parametrize("p, expected", [(0.0, "none"), (1.0, "all")])
def test_p_uncond_0_drops_none_and_1_drops_all(p, expected):
    d = Diffusion(timesteps=10)
    model, g = LabelRecorder(), torch.Generator().manual_seed(2)
    x0, labels = _batch(64)
    state = g.get_state()
    t, noise = torch.zeros(64, dtype=torch.long), torch.zeros_like(x0)
    for _ in range(10):
        d.loss(model, x0, labels=labels, t=t, noise=noise, p_uncond=p, null_label=NULL, generator=g)
    for seen in model.labels:
        assert seen.tolist() == (labels.tolist() if expected == "none" else [NULL] * 64)
    if p == 0.0:  # nothing drawn: an unconditional run's random stream is unchanged
        assert torch.equal(g.get_state(), state)


def test_the_default_drops_nothing_and_needs_no_null_label():
    d = Diffusion(timesteps=10)
    model = LabelRecorder()
    x0, labels = _batch(8)
    d.loss(model, x0, labels=labels)
    assert model.labels[-1].tolist() == labels.tolist()


def test_dropping_is_reproducible_from_the_generator_and_leaves_the_labels_alone():
    d = Diffusion(timesteps=10)
    x0, labels = _batch(64)
    original = labels.clone()
    t, noise = torch.zeros(64, dtype=torch.long), torch.zeros_like(x0)

    def masks(seed, global_seed):
        torch.manual_seed(global_seed)  # the global generator must not matter
        model, g = LabelRecorder(), torch.Generator().manual_seed(seed)
        for _ in range(3):
            d.loss(model, x0, labels=labels, t=t, noise=noise, p_uncond=0.5, null_label=NULL,
                   generator=g)
        return torch.stack(model.labels) == NULL

    assert torch.equal(masks(7, 0), masks(7, 123))
    assert not torch.equal(masks(7, 0), masks(8, 0))
    assert torch.equal(labels, original)


def test_the_generator_also_draws_t_and_eps_when_loss_draws_them():
    d = Diffusion(timesteps=10)
    x0, labels = torch.randn(16, 1, 2, 2), _batch(16)[1]
    a = d.loss(lambda x, t, c: x, x0, labels=labels, p_uncond=0.2, null_label=NULL,
               generator=torch.Generator().manual_seed(3))
    torch.manual_seed(99)
    b = d.loss(lambda x, t, c: x, x0, labels=labels, p_uncond=0.2, null_label=NULL,
               generator=torch.Generator().manual_seed(3))
    assert a.item() == b.item()


@pytest.mark.parametrize(
    "kwargs, match",
    [({"p_uncond": 0.1}, "null_label"), ({"p_uncond": -0.1, "null_label": NULL}, r"\[0, 1\]"),
     ({"p_uncond": 1.5, "null_label": NULL}, r"\[0, 1\]")],
)
def test_bad_dropping_arguments(kwargs, match):
    d = Diffusion(timesteps=10)
    x0, labels = _batch(4)
    with pytest.raises(ValueError, match=match):
        d.loss(LabelRecorder(), x0, labels=labels, **kwargs)


def test_dropping_keeps_the_min_snr_weighting():
    d = Diffusion(timesteps=10)
    x0, labels = torch.randn(8, 1, 2, 2), _batch(8)[1]
    t, noise = torch.arange(8) + 2, torch.randn(8, 1, 2, 2)
    plain = d.loss(lambda x, tt: torch.zeros_like(x), x0, t=t, noise=noise, weighting="min-snr",
                   min_snr_gamma=2.0)
    dropped = d.loss(lambda x, tt, c: torch.zeros_like(x), x0, labels=labels, t=t, noise=noise,
                     weighting="min-snr", min_snr_gamma=2.0, p_uncond=0.5, null_label=NULL,
                     generator=torch.Generator().manual_seed(0))
    assert dropped.item() == pytest.approx(plain.item(), rel=1e-6)


# ------------------------------------------------------- the guided prediction

def stub(x_t, t, labels):
    """A deterministic model whose output depends on x_t, t and the label (null included)."""
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    c = labels.to(x_t.dtype).reshape(shape)
    tt = t.to(x_t.dtype).reshape(shape)
    return torch.sin(1.3 * x_t + 0.4 * c + 0.05 * tt) + 0.1 * c


def hand_guided(objective, abar, x, out_c, out_u, w):
    """Eq. 6 by hand: each output to the eps it implies, (1 + w) eps_c - w eps_u, and back.

    x_t = sqrt(abar) x0 + sqrt(1 - abar) eps; v = sqrt(abar) eps - sqrt(1 - abar) x0.
    """
    a, s = math.sqrt(abar), math.sqrt(1 - abar)

    def to_eps(out):
        if objective == "eps":
            return out
        if objective == "x0":
            return (x - a * out) / s
        x0 = a * x - s * out  # v: x0 = sqrt(abar) x_t - sqrt(1 - abar) v
        return (x - a * x0) / s

    eps = (1 + w) * to_eps(out_c) - w * to_eps(out_u)
    if objective == "eps":
        return eps
    x0 = (x - s * eps) / a
    return x0 if objective == "x0" else a * eps - s * x0


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("w", [0.0, 0.5, 3.0])
def test_guided_model_is_eq6_on_the_implied_eps(objective, w):
    d = Diffusion(timesteps=100, objective=objective)
    labels = torch.tensor([0, 3, 1, 4])
    guided = d.guided_model(stub, labels, w, null_label=NULL)
    x = torch.linspace(-2, 2, 4 * 6, dtype=torch.float64).reshape(4, 1, 2, 3)
    for step in [0, 1, 37, 99]:
        t = torch.full((4,), step, dtype=torch.long)
        abar = d.alphas_cumprod[step].item()
        out_c, out_u = stub(x, t, labels), stub(x, t, torch.full_like(labels, NULL))
        expected = hand_guided(objective, abar, x, out_c, out_u, w)
        got = guided(x, t)
        assert got.dtype == torch.float64
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-9), step
        # The conversions are affine with label-independent weights: the same as guiding the output.
        assert torch.allclose(got, (1 + w) * out_c - w * out_u, rtol=1e-9, atol=1e-9), step


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler, steps", [("ddpm", None), ("ddim", 5)])
def test_sampling_uses_the_guided_prediction_at_every_step(objective, sampler, steps):
    """Replay every step from the chain: the x0 the sampler predicted is the one the hand-guided
    output implies at that step's x_t and t (clip=False, so no clipping hides a difference)."""
    w = 2.0
    d = Diffusion(timesteps=20, objective=objective)
    labels = torch.tensor([0, 2, 4])
    images, chain = d.sample(stub, (3, 1, 2, 2), sampler=sampler, steps=steps, labels=labels,
                             guidance_scale=w, null_label=NULL, clip=False, progress=False,
                             return_chain=True, generator=torch.Generator().manual_seed(0))
    assert len(chain["t"]) == (20 if steps is None else steps)
    for step, x, pred_x0 in zip(chain["t"].tolist(), chain["x_t"], chain["pred_x0"], strict=True):
        x = x.double()
        t = torch.full((3,), step, dtype=torch.long)
        abar = d.alphas_cumprod[step].item()
        out = hand_guided(objective, abar, x, stub(x, t, labels),
                          stub(x, t, torch.full_like(labels, NULL)), w)
        a, s = math.sqrt(abar), math.sqrt(1 - abar)
        x0 = {"eps": (x - s * out) / a, "x0": out, "v": a * x - s * out}[objective]
        assert torch.allclose(pred_x0.double(), x0, rtol=1e-4, atol=1e-4), step
    assert torch.allclose(images, chain["pred_x0"][-1])  # the last step returns its x0


class CallRecorder:
    """Wraps `stub`, recording each call's batch size, labels and whether the halves agree."""

    def __init__(self):
        self.calls = []

    def __call__(self, x_t, t, labels):
        half = x_t.shape[0] // 2
        self.calls.append(dict(batch=x_t.shape[0], labels=labels.tolist(),
                               x_halves=torch.equal(x_t[:half], x_t[half:2 * half]),
                               t_halves=torch.equal(t[:half], t[half:2 * half])))
        return stub(x_t, t, labels)


@pytest.mark.parametrize("sampler, steps", [("ddpm", None), ("ddim", 4)])
def test_one_batched_forward_pass_per_step(sampler, steps):
    d = Diffusion(timesteps=10)
    model = CallRecorder()
    labels = torch.tensor([1, 0, 4])
    d.sample(model, (3, 1, 2, 2), sampler=sampler, steps=steps, labels=labels, guidance_scale=1.5,
             null_label=NULL, progress=False)
    assert len(model.calls) == (10 if steps is None else steps)
    for call in model.calls:
        assert call["batch"] == 6
        assert call["labels"] == [1, 0, 4, NULL, NULL, NULL]
        assert call["x_halves"] and call["t_halves"]


@pytest.mark.parametrize("sampler, steps", [("ddpm", None), ("ddim", 4)])
def test_w_0_is_plain_conditional_sampling_with_one_undoubled_pass(sampler, steps):
    d = Diffusion(timesteps=10)
    labels = torch.tensor([1, 0, 4])
    model = CallRecorder()

    def draw(m, **kwargs):
        return d.sample(m, (3, 1, 2, 2), sampler=sampler, steps=steps, labels=labels, progress=False,
                        eta=0.5, generator=torch.Generator().manual_seed(4), **kwargs)

    guided = draw(model, guidance_scale=0.0, null_label=NULL)
    assert [c["batch"] for c in model.calls] == [3] * (10 if steps is None else steps)
    assert all(c["labels"] == [1, 0, 4] for c in model.calls)
    assert torch.equal(guided, draw(stub))  # exactly what sampling without guidance draws
    assert torch.equal(guided, draw(stub, guidance_scale=0.0))  # no null label needed at w = 0


def test_the_starting_noise_does_not_depend_on_the_guidance_scale():
    d = Diffusion(timesteps=10)
    labels = torch.tensor([1, 2])
    starts = []
    for w in [0.0, 1.0, 3.0]:
        _, chain = d.sample(stub, (2, 1, 2, 2), labels=labels, guidance_scale=w, null_label=NULL,
                            progress=False, return_chain=True,
                            generator=torch.Generator().manual_seed(5))
        starts.append(chain["x_t"][0])
    assert torch.equal(starts[0], starts[1]) and torch.equal(starts[0], starts[2])


@pytest.mark.parametrize(
    "kwargs, match",
    [({"labels": torch.tensor([0, 1]), "guidance_scale": -0.5, "null_label": NULL}, ">= 0"),
     ({"labels": torch.tensor([0, 1]), "guidance_scale": float("nan"), "null_label": NULL}, ">= 0"),
     ({"guidance_scale": 1.0, "null_label": NULL}, "needs labels"),
     ({"guidance_scale": 0.0}, "needs labels"),
     ({"labels": torch.tensor([0, 1]), "guidance_scale": 1.0}, "null_label"),
     ({"labels": torch.tensor([0, 1, 2]), "guidance_scale": 1.0, "null_label": NULL}, r"shape \[2\]")],
)
def test_bad_guidance_arguments(kwargs, match):
    d = Diffusion(timesteps=10)
    with pytest.raises(ValueError, match=match):
        d.sample(stub, (2, 1, 2, 2), sampler="ddim", steps=2, progress=False, **kwargs)


def test_a_conditional_unet_trains_and_samples_with_its_null_class(one_thread):
    """The network side: UNet(num_classes=K) takes label K as "no class"."""
    torch.manual_seed(0)
    net = UNet(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
               attention_resolutions=(), num_heads=1, dropout=0.0, num_classes=3, image_size=8)
    with torch.no_grad():  # the zero-initialised output layer would block every gradient
        for param in net.parameters():
            if not param.any():
                param.normal_(std=0.05)
    d = Diffusion(timesteps=10)
    x0, labels = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0])
    loss = d.loss(net, x0, labels=labels, p_uncond=0.5, null_label=net.num_classes,
                  generator=torch.Generator().manual_seed(0))
    loss.backward()
    # Some label was dropped (seeded), so the null class's embedding row gets a gradient.
    assert torch.isfinite(loss) and net.class_embedding.weight.grad[net.num_classes].abs().sum() > 0
    images = d.sample(net, (4, 1, 8, 8), sampler="ddim", steps=3, labels=labels, guidance_scale=2.0,
                      null_label=net.num_classes, progress=False)
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()


# ------------------------------------------- analytic check: two Gaussian classes

MUS = (-0.5, 0.5)  # x0 | c ~ N(MUS[c] 1, SIGMA^2 I), c = 0 or 1 with probability 1/2 each
SIGMA = 0.3
TWO_NULL = 2


class TwoGaussians:
    """The exact eps-prediction E[eps | x_t, c] for each class and, for the null label, the
    unconditional E[eps | x_t] of the mixture, for x0 [C, H, W] (D pixels).

    Given c, x_t ~ N(sqrt(abar) mu_c, v I) with v = abar s^2 + 1 - abar, so
    E[eps | x_t, c] = sqrt(1 - abar) (x_t - sqrt(abar) mu_c) / v; the mixture's is the same
    with mu_c replaced by its posterior mean sum_c p(c | x_t) mu_c, where
    p(c | x_t) is proportional to exp(-||x_t - sqrt(abar) mu_c||^2 / (2 v)).
    """

    def __init__(self, diffusion, objective="eps"):
        self.d, self.objective = diffusion, objective

    def __call__(self, x_t, t, labels):
        abar = self.d.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        x = x_t.double()
        a, s = abar.sqrt(), (1 - abar).sqrt()
        v = abar * SIGMA**2 + 1 - abar
        mus = torch.tensor(MUS, dtype=torch.float64)
        sq = ((x.flatten(1)[:, :, None] - a.reshape(-1, 1, 1) * mus) ** 2).sum(dim=1)  # [B, 2]
        posterior = (-sq / (2 * v.reshape(-1, 1))).softmax(dim=1)
        mixture_mu = (posterior * mus).sum(dim=1)
        mu = torch.where(labels == TWO_NULL, mixture_mu, mus[labels.clamp(max=1)]).reshape(-1, 1, 1, 1)
        eps = s * (x - a * mu) / v
        x0 = (x - s * eps) / a
        out = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[self.objective]
        return out.to(x_t.dtype)


def log_guided_density(x, abar, c, w):
    """log [p_t(x | c)^(1 + w) / p_t(x)^w] up to a constant, for x [B, D]."""
    v = abar * SIGMA**2 + 1 - abar
    log_cond = torch.stack([-((x - math.sqrt(abar) * m) ** 2).sum(dim=1) / (2 * v) for m in MUS], dim=1)
    log_marginal = torch.logsumexp(log_cond + math.log(0.5), dim=1)
    return (1 + w) * log_cond[:, c] - w * log_marginal


@pytest.mark.parametrize("w", [0.0, 1.0, 4.0])
def test_guided_eps_is_the_scaled_score_of_the_tilted_density(w):
    """eps~ = -sqrt(1 - abar) grad log [p_t(x|c)^(1+w) / p_t(x)^w], the score by autograd."""
    d = Diffusion(timesteps=1000)
    oracle = TwoGaussians(d)
    g = torch.Generator().manual_seed(0)
    for c in (0, 1):
        labels = torch.full((32,), c, dtype=torch.long)
        guided = d.guided_model(oracle, labels, w, null_label=TWO_NULL)
        for step in [0, 100, 500, 999]:
            abar = d.alphas_cumprod[step].item()
            x = (math.sqrt(abar) * torch.randn(32, 1, 1, 3, dtype=torch.float64, generator=g)
                 + math.sqrt(1 - abar) * torch.randn(32, 1, 1, 3, dtype=torch.float64, generator=g))
            x.requires_grad_(True)
            score = torch.autograd.grad(log_guided_density(x.flatten(1), abar, c, w).sum(), x)[0]
            eps = guided(x.detach(), torch.full((32,), step, dtype=torch.long))
            assert torch.allclose(eps, -math.sqrt(1 - abar) * score, rtol=1e-8, atol=1e-10), (c, step)


def test_w_0_reproduces_each_class_conditional_gaussian():
    d = Diffusion(timesteps=1000)
    n = 2000
    labels = torch.arange(n) % 2
    x = d.sample(TwoGaussians(d), (n, 1, 4, 4), sampler="ddpm", labels=labels, guidance_scale=0.0,
                 null_label=TWO_NULL, clip=False, progress=False,
                 generator=torch.Generator().manual_seed(1))
    for c in (0, 1):
        values = x[labels == c]
        m = values.numel()
        # Monte Carlo error (5 standard errors) plus a small allowance for the T = 1000 discretisation.
        assert values.mean().item() == pytest.approx(MUS[c], abs=5 * SIGMA / math.sqrt(m) + 0.002)
        assert values.std().item() == pytest.approx(SIGMA, rel=5 * math.sqrt(1 / (2 * m)) + 0.01)


@pytest.mark.parametrize("objective", ["x0", "v"])
def test_guided_sampling_is_the_same_for_every_objective(objective):
    """The same analytic model, asked for x0 or v instead of eps, draws the same guided samples:
    guidance acts on the implied eps, whatever the network outputs."""
    def draw(obj):
        d = Diffusion(timesteps=1000, objective=obj)
        return d.sample(TwoGaussians(d, obj), (64, 1, 2, 2), sampler="ddim", steps=50,
                        labels=torch.arange(64) % 2, guidance_scale=3.0, null_label=TWO_NULL,
                        clip=False, progress=False, generator=torch.Generator().manual_seed(2))

    assert torch.allclose(draw(objective), draw("eps"), atol=1e-3)


@pytest.mark.parametrize("c", [0, 1])
def test_larger_w_moves_samples_away_from_the_other_class_and_sharpens_them(c):
    """The guided score adds w grad log p_t(c | x), a logistic in x here, whose log is concave and
    increases towards class c: samples move away from the other class and their spread shrinks,
    the more so the larger w. Same starting noise (DDIM, eta = 0) for every w."""
    d = Diffusion(timesteps=1000)
    n = 1000
    direction = 1.0 if MUS[c] > MUS[1 - c] else -1.0
    means, stds = [], []
    for w in [0.0, 0.5, 1.0, 2.0, 4.0]:
        x = d.sample(TwoGaussians(d), (n, 1, 2, 2), sampler="ddim", steps=100,
                     labels=torch.full((n,), c, dtype=torch.long), guidance_scale=w,
                     null_label=TWO_NULL, clip=False, progress=False,
                     generator=torch.Generator().manual_seed(3))
        means.append(direction * x.mean().item())
        stds.append(x.std().item())
    # DDIM with 100 steps is close to the class's Gaussian at w = 0 ...
    assert means[0] == pytest.approx(abs(MUS[c]), abs=0.02)
    assert stds[0] == pytest.approx(SIGMA, rel=0.1)
    # ... and each larger w moves the mean further from the other class and narrows the spread.
    assert all(b > a + 0.01 for a, b in zip(means[:-1], means[1:], strict=True)), means
    assert all(b < a - 0.002 for a, b in zip(stds[:-1], stds[1:], strict=True)), stds


@pytest.mark.parametrize("extra, message", [
    ([], "--unconditional-only updates the stored measurement: add --write-provenance"),
    (["--write-provenance", "--n", "7"], "the stored rows were measured with --n 1000, not 7: pass --n 1000"),
])
def test_the_guidance_benchmark_refuses_to_mix_measurements(extra, message):
    """--unconditional-only reuses the stored per-weight rows only at the n, steps and seed that
    made them, and writes nothing otherwise."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    stored = (root / "naivediffusion/pretrained/mnist_conditional.json").read_bytes()
    run = subprocess.run([sys.executable, "benchmarks/guidance.py", "--unconditional-only", *extra],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].endswith(message)
    assert (root / "naivediffusion/pretrained/mnist_conditional.json").read_bytes() == stored
