"""The diffusion process of DDPM (Ho, Jain, Abbeel 2020): forward, posterior, reverse step, loss.

`Diffusion` is pure tensor math. It knows the noise schedule and nothing about
convolutions: a model is any callable ``model(x_t, t)`` (or ``model(x_t, t, labels)``)
that returns a tensor shaped like ``x_t``. The samplers and the likelihood work
with a U-Net and with an analytic model alike. Classifier-free guidance (Ho & Salimans
2022) is math on such a callable too: `loss` drops labels to a null label, and the
samplers combine the conditional and the null-label predictions (`guided_model`).

The loops that chain reverse steps into samples (DDPM's Algorithm 2, DDIM) are in
`sampling.py`; `Diffusion.sample` is their entry point.

Index convention: code ``t = 0 .. T-1`` is the paper's ``t = 1 .. T``. So
``alphas_cumprod[0]`` is the paper's alpha-bar_1, and ``alphas_cumprod_prev[0] = 1``
stands for alpha-bar_0 (no noise at all).

Every table is float64 with shape [T]; it is cast to the data's dtype only when
indexed, so the forward process runs in the data's float32 even under autocast.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .schedule import SCHEDULES, get_schedule
from .variance import learned_log_variance, split_output, vlb_terms

OBJECTIVES = ("eps", "x0", "v")
VARIANCES = ("beta", "posterior", "learned")
# The weight lambda of L_vlb in Improved DDPM's hybrid loss L_simple + lambda L_vlb (Sec. 3.1).
VLB_WEIGHT = 0.001
WEIGHTINGS = ("none", "min-snr")


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")


def check_p_uncond(p_uncond: float) -> None:
    """Raise ValueError unless `p_uncond`, the probability of dropping a label, is in [0, 1]."""
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must be a probability in [0, 1] (0.1 is usual); got {p_uncond}")


class Diffusion:
    """The DDPM forward and reverse processes for a fixed noise schedule.

    Args:
        timesteps: T, the number of diffusion steps (the paper: 1000).
        schedule: "linear" (DDPM) or "cosine" (Improved DDPM, Eq. 17).
        objective: what the network predicts: "eps" (the noise, DDPM Eq. 11),
            "x0" (the clean image) or "v" (sqrt(abar) eps - sqrt(1 - abar) x0,
            Salimans & Ho 2022).
        variance: the reverse-step variance sigma_t^2: "beta" (sigma^2 = beta_t)
            or "posterior" (sigma^2 = beta-tilde_t, Eq. 7). The paper reports
            similar sample quality for both (Sec. 3.2). "learned": the network outputs
            twice the image's channels, the second half v, and sigma^2 interpolates
            between the two (Improved DDPM; `variance.learned_log_variance`). A network
            with such an extra output can also be read with a fixed variance.
    """

    def __init__(
        self,
        timesteps: int = 1000,
        schedule: str = "linear",
        objective: str = "eps",
        variance: str = "beta",
    ) -> None:
        _check_choice("schedule", schedule, SCHEDULES)
        _check_choice("objective", objective, OBJECTIVES)
        _check_choice("variance", variance, VARIANCES)
        self.num_timesteps = timesteps
        self.objective = objective
        self.variance = variance
        self.config = dict(
            timesteps=timesteps, schedule=schedule, objective=objective, variance=variance
        )

        # Forward process (Eq. 2 and 4).
        betas = get_schedule(schedule, timesteps)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64),
                                              self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        # Signal-to-noise ratio of x_t (Kingma et al. 2021): SNR(t) = abar_t / (1 - abar_t).
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)

        # Posterior q(x_{t-1} | x_t, x_0) = N(mean, posterior_variance) (Eq. 6-7).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # posterior_variance[0] is 0 (x_0 is known exactly given x_0), so its log is
        # -inf; like the reference code, use the value of the next step instead.
        self.posterior_log_variance_clipped = torch.log(torch.cat([self.posterior_variance[1:2],
                                                                    self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)

        # Reverse-process variance sigma_t^2 (Sec. 3.2). The first entry matters only for
        # the likelihood's decoder L_0 (sampling adds no noise at t = 0); for both choices
        # it is the posterior variance of the next step, as in the reference code, so that
        # the decoder has a sensible width, and the variance always equals exp(log-variance).
        # A learned one is the network's (`p_mean_variance`); the tables hold its value for v = 0,
        # the geometric mean of beta_t and the clipped beta-tilde_t (`variance.learned_log_variance`).
        self.log_betas = torch.log(betas)
        if variance == "beta":
            self.model_log_variance = torch.log(torch.cat([self.posterior_variance[1:2], betas[1:]]))
        elif variance == "posterior":
            self.model_log_variance = self.posterior_log_variance_clipped
        else:
            self.model_log_variance = 0.5 * (self.log_betas + self.posterior_log_variance_clipped)
        self.model_variance = torch.exp(self.model_log_variance)

        self._tables_by_device: dict[torch.device, dict[str, Tensor]] = {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"Diffusion({args})"

    # ------------------------------------------------------------------ helpers

    def _coef(self, name: str, t: Tensor, x: Tensor) -> Tensor:
        """``table[t]`` for the float64 table `name`, shaped [B, 1, 1, 1] to broadcast
        against `x` [B, C, H, W], in x's dtype. t: LongTensor [B] with values 0..T-1."""
        # The tables are copied to t's device once; MPS has no float64, so float32 there.
        tables = self._tables_by_device.setdefault(t.device, {})
        table = tables.get(name)
        if table is None:
            dtype = torch.float32 if t.device.type == "mps" else torch.float64
            table = tables[name] = getattr(self, name).to(device=t.device, dtype=dtype)
        return table[t].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))

    def _check_t(self, t: Tensor, batch: int) -> None:
        if t.dtype != torch.long or t.shape != (batch,):
            raise ValueError(f"t must be a LongTensor of shape [{batch}], got {t.dtype} {tuple(t.shape)}")

    # ---------------------------------------------------------- forward process

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)  (Eq. 4).

        Args:
            x0: clean images [B, C, H, W] in [-1, 1].
            t: LongTensor [B], code index 0..T-1 (paper t - 1).
            noise: the epsilon ~ N(0, I) to use, shaped like x0 (drawn if None).
        Returns:
            x_t [B, C, H, W] = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise  (the reparameterisation inside Eq. 9).
        """
        self._check_t(t, x0.shape[0])
        if noise is None:
            noise = torch.randn_like(x0)
        return (self._coef("sqrt_alphas_cumprod", t, x0) * x0
                + self._coef("sqrt_one_minus_alphas_cumprod", t, x0) * noise)

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The forward-process posterior q(x_{t-1} | x_t, x_0) = N(mean, variance I)  (Eq. 6-7).

        mean = posterior_mean_coef1[t] * x0 + posterior_mean_coef2[t] * x_t.

        Returns:
            (mean [B, C, H, W], variance [B, 1, 1, 1], log_variance [B, 1, 1, 1]);
            the log-variance is clipped at t = 0, where the variance is 0.
        """
        self._check_t(t, x_t.shape[0])
        mean = (self._coef("posterior_mean_coef1", t, x_t) * x0
                + self._coef("posterior_mean_coef2", t, x_t) * x_t)
        variance = self._coef("posterior_variance", t, x_t)
        log_variance = self._coef("posterior_log_variance_clipped", t, x_t)
        return mean, variance, log_variance

    # ------------------------------------- what the network predicts, and x0

    def velocity(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022)."""
        return (self._coef("sqrt_alphas_cumprod", t, x0) * noise
                - self._coef("sqrt_one_minus_alphas_cumprod", t, x0) * x0)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network should output for x_t = q_sample(x0, t, noise), per `objective`."""
        if self.objective == "eps":
            return noise
        if self.objective == "x0":
            return x0
        return self.velocity(x0, noise, t)

    def predict_x0(self, x_t: Tensor, t: Tensor, output: Tensor) -> Tensor:
        """The clean image implied by the network's `output` at (x_t, t).

        For "eps" this is Eq. 15: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t).
        For "v": x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v.
        The output of a learned-variance network is read through its mean's part.
        """
        output = split_output(x_t, output)[0]
        if self.objective == "eps":
            return (self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                    - self._coef("sqrt_recipm1_alphas_cumprod", t, x_t) * output)
        if self.objective == "x0":
            return output
        return (self._coef("sqrt_alphas_cumprod", t, x_t) * x_t
                - self._coef("sqrt_one_minus_alphas_cumprod", t, x_t) * output)

    def predict_eps(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """The noise that takes x0 to x_t: Eq. 4 solved for eps."""
        return ((self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0)
                / self._coef("sqrt_recipm1_alphas_cumprod", t, x_t))

    def eps_from_output(self, x_t: Tensor, t: Tensor, output: Tensor) -> Tensor:
        """The noise eps implied by the network's `output` at (x_t, t), for any objective.

        eps: the output itself; x0: Eq. 4 solved for eps (`predict_eps`); v: since
        x_t = sqrt(abar) x0 + sqrt(1 - abar) eps and v = sqrt(abar) eps - sqrt(1 - abar) x0,
        eps = sqrt(abar) v + sqrt(1 - abar) x_t. Shapes [B, C, H, W]; t LongTensor [B].
        """
        output = split_output(x_t, output)[0]
        if self.objective == "eps":
            return output
        if self.objective == "x0":
            return self.predict_eps(x_t, t, output)
        return (self._coef("sqrt_alphas_cumprod", t, x_t) * output
                + self._coef("sqrt_one_minus_alphas_cumprod", t, x_t) * x_t)

    def output_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """The inverse of `eps_from_output`: what the network would output if it predicted `eps`.

        x0: Eq. 15, x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar); v: the same two relations
        solved for v, v = (eps - sqrt(1 - abar) x_t) / sqrt(abar). Shapes [B, C, H, W].
        """
        if self.objective == "eps":
            return eps
        x0 = (self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t
              - self._coef("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)
        if self.objective == "x0":
            return x0
        return (eps - self._coef("sqrt_one_minus_alphas_cumprod", t, x_t) * x_t) / self._coef(
            "sqrt_alphas_cumprod", t, x_t)

    # ------------------------------------------------- classifier-free guidance

    def guided_model(self, model, labels: Tensor, guidance_scale: float, null_label: int | None):
        """A callable (x_t, t) -> output that applies classifier-free guidance to `model`.

        Ho & Salimans 2022, Eq. 6, with guidance weight w = `guidance_scale`:

            eps~(x_t, c) = (1 + w) eps(x_t, c) - w eps(x_t, null).

        w = 0 is plain conditional sampling; larger w trades diversity for fidelity. Other
        codebases (diffusers' `guidance_scale`) write eps_u + s (eps_c - eps_u): s = 1 + w.

        Why in eps: guidance is defined on scores. The optimal eps is a scaled score,
        eps(x_t) = -sqrt(1 - abar_t) grad log p_t(x_t), so Eq. 6 is the score of
        p_t(x|c)^(1 + w) / p_t(x)^w = p_t(x|c) p_t(c|x)^w / p(c)^w: Bayes' rule's
        "implicit classifier" grad log p_t(c|x) = grad log p_t(x|c) - grad log p_t(x),
        scaled by w. For the "x0" and "v" objectives each output is first turned into the
        eps it implies (`eps_from_output`), guided there, and turned back
        (`output_from_eps`), so that the sampler's step (clipping of x0, Eq. 7, DDIM) is the
        same as without guidance (the maps are affine, so this is (1 + w) out_c - w out_u;
        they run in float64, except on MPS). A learned variance is the conditional one.

        The conditional and unconditional predictions come from ONE forward pass on a
        doubled batch: x_t twice, labels followed by B copies of `null_label`. With w = 0
        the model is called once on the plain batch with `labels`.

        Args:
            model: callable (x_t [N, C, H, W], t [N], labels [N]) -> [N, C, H, W].
            labels: LongTensor [B], the class of each image.
            guidance_scale: w >= 0.
            null_label: the label meaning "no class" (`num_classes` of a UNet); needed when w > 0.
        Returns:
            callable (x_t [B, C, H, W], t [B]) -> guided output [B, C, H, W] in x_t's dtype.
        """
        w = float(guidance_scale)
        if not w >= 0:  # also rejects NaN
            raise ValueError(f"the guidance scale must be >= 0 (0 is plain conditional sampling); got {w}")
        if w == 0:
            return lambda x_t, t: model(x_t, t, labels)
        if null_label is None:
            raise ValueError("guidance needs null_label, the label that means 'no class' "
                             "(num_classes for UNet(num_classes=...))")
        both = torch.cat([labels, torch.full_like(labels, null_label)])

        def guided(x_t: Tensor, t: Tensor) -> Tensor:
            out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), both.to(x_t.device))
            work = torch.float32 if x_t.device.type == "mps" else torch.float64
            x = x_t.to(work)
            out_cond, out_uncond = out.to(work).chunk(2)
            eps_cond = self.eps_from_output(x, t, out_cond)
            eps_uncond = self.eps_from_output(x, t, out_uncond)
            eps = (1.0 + w) * eps_cond - w * eps_uncond  # Eq. 6
            guided_out = self.output_from_eps(x, t, eps)
            v = split_output(x, out_cond)[1]
            if v is not None:  # a learned variance: the conditional one (as GLIDE)
                guided_out = torch.cat([guided_out, v], dim=1)
            return guided_out.to(x_t.dtype)

        return guided

    # ---------------------------------------------------------- reverse process

    def p_mean_variance(
        self, model, x_t: Tensor, t: Tensor, clip: bool = True, labels: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The reverse step p(x_{t-1} | x_t) = N(mean, variance I)  (Eq. 1, Sec. 3.2).

        The mean is the posterior mean (Eq. 7) with x0 replaced by the model's
        estimate. With `clip` the estimate is first clipped to the data range
        [-1, 1]; without clipping and for objective "eps" this equals Eq. 11,
        mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t).

        With variance "learned" the variance is the network's (`learned_log_variance`),
        per pixel.

        Returns:
            dict with "mean" [B, C, H, W], "variance" and "log_variance" ([B, 1, 1, 1]
            for a fixed variance, [B, C, H, W] for a learned one), "pred_x0" [B, C, H, W]
            (clipped if `clip`) and the raw model "output".
        """
        output = model(x_t, t) if labels is None else model(x_t, t, labels)
        output = output.to(x_t.dtype)  # autocast may have returned bf16/fp16
        mean_output, v = split_output(x_t, output, self.variance)
        pred_x0 = self.predict_x0(x_t, t, mean_output)
        if clip:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        if self.variance == "learned":
            log_variance = learned_log_variance(self, v, t)
        else:
            log_variance = self._coef("model_log_variance", t, x_t)
        return {
            "mean": mean,
            "variance": log_variance.exp(),
            "log_variance": log_variance,
            "pred_x0": pred_x0,
            "output": output,
        }

    # ------------------------------------------------------------------ training

    def loss_weight(self, t: Tensor, weighting: str = "none", min_snr_gamma: float = 5.0) -> Tensor:
        """The weight of each sample's squared error in the loss, per timestep.

        "none": 1 for every t, which is L_simple (Eq. 14).
        "min-snr": Min-SNR-gamma (Hang et al. 2023). Written as a weight on the error of
        x0, every objective's error is a multiple of it: ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2
        and ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2. Min-SNR puts min(SNR, gamma) on the
        x0 error, so the weight on the objective's own error is
        eps: min(SNR, gamma) / SNR;  x0: min(SNR, gamma);  v: min(SNR, gamma) / (SNR + 1).

        t: LongTensor [B]. Returns float32 [B].
        """
        _check_choice("loss weighting", weighting, WEIGHTINGS)
        if weighting == "none":
            return torch.ones(t.shape, device=t.device)
        if not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be positive; got {min_snr_gamma}")
        snr = self._coef("snr", t, torch.empty(0, device=t.device)).reshape(-1)  # float32 [B]
        clamped = snr.clamp(max=min_snr_gamma)
        return {"eps": clamped / snr, "x0": clamped, "v": clamped / (snr + 1.0)}[self.objective]

    def loss(
        self,
        model,
        x0: Tensor,
        labels: Tensor | None = None,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        weighting: str = "none",
        min_snr_gamma: float = 5.0,
        *,
        p_uncond: float = 0.0,
        null_label: int | None = None,
        generator: torch.Generator | None = None,
        vlb_weight: float = VLB_WEIGHT,
    ) -> Tensor:
        """L_simple (Eq. 14, Algorithm 1): E_{t, x0, eps} || target - model(x_t, t) ||^2.

        t is drawn uniformly from all T values 0..T-1 (the paper's 1..T) and eps ~ N(0, I)
        unless given. The target is eps, x0 or v according to `objective`. With
        `weighting="min-snr"` each image's error is multiplied by `loss_weight(t)`. With
        variance "learned", Improved DDPM's hybrid loss L_simple + lambda L_vlb (lambda =
        `vlb_weight`), L_vlb = T L_t from the same draw, the mean detached (`variance.vlb_terms`).

        Classifier-free guidance training (Ho & Salimans 2022): with `labels` and
        `p_uncond` > 0, each sample's label is replaced by `null_label` independently with
        probability `p_uncond` (per sample, never the whole batch), so that one network
        learns both eps(x_t, c) and the unconditional eps(x_t) = eps(x_t, null) (the paper:
        p_uncond 0.1 or 0.2). Without `labels` the model is called as model(x_t, t).

        Args:
            model: callable (x_t [B, C, H, W], t [B]) -> [B, C, H, W], or
                (x_t, t, labels [B]) -> [B, C, H, W] when `labels` are given.
            x0: clean images [B, C, H, W] in [-1, 1].
            labels: optional class labels, LongTensor [B]; never modified in place.
            p_uncond: the probability, in [0, 1], of dropping each sample's label.
            null_label: the label that means "no class" (K for `UNet(num_classes=K)`), needed
                when `labels` are given and `p_uncond` > 0.
            generator: a torch.Generator on x0's device for all this draws (t, eps, then the
                drop mask, none when `p_uncond` is 0); the global generator if None.
        Returns:
            scalar tensor (float32): the (weighted) mean squared error over all pixels, plus
            the L_vlb term for a learned variance.
        """
        check_p_uncond(p_uncond)
        if labels is not None and p_uncond > 0 and null_label is None:
            raise ValueError("dropping labels (p_uncond > 0) needs null_label, the label that means "
                             "'no class' (num_classes for UNet(num_classes=...))")
        batch = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (batch,), device=x0.device, generator=generator)
        if noise is None:
            noise = (torch.randn_like(x0) if generator is None
                     else torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator))
        if labels is not None and p_uncond > 0:
            # One independent coin per sample; rand is in [0, 1), so p_uncond = 1 drops all.
            drop = torch.rand(batch, device=labels.device, generator=generator) < p_uncond
            labels = labels.masked_fill(drop, null_label)
        x_t = self.q_sample(x0, t, noise)
        output = model(x_t, t) if labels is None else model(x_t, t, labels)
        output, v = split_output(x_t, output, self.variance)
        # The network may run in bf16/fp16 under autocast; the error is taken in float32.
        error = (self.target(x0, noise, t).float() - output.float()) ** 2
        if weighting == "none":
            loss = error.mean()
        else:
            per_image = error.reshape(batch, -1).mean(dim=1)
            loss = (self.loss_weight(t, weighting, min_snr_gamma) * per_image).mean()
        if self.variance == "learned":
            loss = loss + vlb_weight * self.num_timesteps * vlb_terms(self, x0, x_t, t, output, v).mean()
        return loss

    # ------------------------------------------------------------------ sampling

    def sample(self, model, shape: tuple[int, ...], *args, **kwargs):
        """Draw images [B, C, H, W] in [-1, 1] from the reverse process, starting from x_T ~ N(0, I).

        ``sampling.sample(self, model, shape, ...)``, whose docstring describes every argument
        (sampler "ddpm", "ddim", "dpm++2m" or "dpm++2m-sde", steps, eta, generator, labels, ...).
        """
        from .sampling import sample  # sampling.py builds on this module

        return sample(self, model, shape, *args, **kwargs)
