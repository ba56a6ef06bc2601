"""The diffusion process of DDPM (Ho, Jain, Abbeel 2020): forward, posterior, reverse, loss, samplers.

`Diffusion` is pure tensor math. It knows the noise schedule and nothing about
convolutions: a model is any callable ``model(x_t, t)`` (or ``model(x_t, t, labels)``)
that returns a tensor shaped like ``x_t``. The samplers and the likelihood work
with a U-Net and with an analytic model alike.

Index convention: code ``t = 0 .. T-1`` is the paper's ``t = 1 .. T``. So
``alphas_cumprod[0]`` is the paper's alpha-bar_1, and ``alphas_cumprod_prev[0] = 1``
stands for alpha-bar_0 (no noise at all).

Every table is float64 with shape [T]; it is cast to the data's dtype only when
indexed, so the forward process runs in the data's float32 even under autocast.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .schedule import SCHEDULES, get_schedule

OBJECTIVES = ("eps", "x0", "v")
VARIANCES = ("beta", "posterior")
SAMPLERS = ("ddpm", "ddim")


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")


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
            similar sample quality for both (Sec. 3.2).
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

        # Posterior q(x_{t-1} | x_t, x_0) = N(mean, posterior_variance) (Eq. 6-7).
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # posterior_variance[0] is 0 (x_0 is known exactly given x_0), so its log is
        # -inf; like the reference code, use the value of the next step instead.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = (
            betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)
        )

        # Reverse-process variance sigma_t^2 (Sec. 3.2). The first entry matters only for
        # the likelihood's decoder L_0 (sampling adds no noise at t = 0); for both choices
        # it is the posterior variance of the next step, as in the reference code, so that
        # the decoder has a sensible width, and the variance always equals exp(log-variance).
        if variance == "beta":
            self.model_log_variance = torch.log(torch.cat([self.posterior_variance[1:2], betas[1:]]))
        else:
            self.model_log_variance = self.posterior_log_variance_clipped
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
            x_t [B, C, H, W] = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise  (Eq. 9's reparameterisation).
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
        """
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

    # ---------------------------------------------------------- reverse process

    def p_mean_variance(
        self, model, x_t: Tensor, t: Tensor, clip: bool = True, labels: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The reverse step p(x_{t-1} | x_t) = N(mean, variance I)  (Eq. 1, Sec. 3.2).

        The mean is the posterior mean (Eq. 7) with x0 replaced by the model's
        estimate. With `clip` the estimate is first clipped to the data range
        [-1, 1]; without clipping and for objective "eps" this equals Eq. 11,
        mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t).

        Returns:
            dict with "mean" [B, C, H, W], "variance" and "log_variance" [B, 1, 1, 1],
            "pred_x0" [B, C, H, W] (clipped if `clip`) and the raw model "output".
        """
        output = model(x_t, t) if labels is None else model(x_t, t, labels)
        output = output.to(x_t.dtype)  # autocast may have returned bf16/fp16
        pred_x0 = self.predict_x0(x_t, t, output)
        if clip:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        return {
            "mean": mean,
            "variance": self._coef("model_variance", t, x_t),
            "log_variance": self._coef("model_log_variance", t, x_t),
            "pred_x0": pred_x0,
            "output": output,
        }

    # ------------------------------------------------------------------ training

    def loss(
        self,
        model,
        x0: Tensor,
        labels: Tensor | None = None,
        t: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """L_simple (Eq. 14, Algorithm 1): E_{t, x0, eps} || target - model(x_t, t) ||^2.

        t is drawn uniformly from all T values 0..T-1 (the paper's 1..T) and eps ~ N(0, I)
        unless given. The target is eps, x0 or v according to `objective`.

        Args:
            model: callable (x_t [B, C, H, W], t [B]) -> [B, C, H, W].
            x0: clean images [B, C, H, W] in [-1, 1].
        Returns:
            scalar tensor (float32), the mean squared error over all pixels.
        """
        batch = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (batch,), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        output = model(x_t, t) if labels is None else model(x_t, t, labels)
        # The network may run in bf16/fp16 under autocast; the error is taken in float32.
        return torch.mean((self.target(x0, noise, t).float() - output.float()) ** 2)

    # ------------------------------------------------------------------ sampling

    def ddim_timesteps(self, steps: int) -> Tensor:
        """`steps` timesteps evenly spaced over 0..T-1, both ends included, descending.

        Returns:
            LongTensor [steps], starting at T-1 and ending at 0.
        """
        if not isinstance(steps, int) or not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must be an integer from 1 to T={self.num_timesteps}, got {steps!r}")
        if steps == 1:
            return torch.tensor([self.num_timesteps - 1])
        # Rounding linspace over the T integers never repeats a value when steps <= T.
        seq = torch.linspace(0, self.num_timesteps - 1, steps, dtype=torch.float64).round().long()
        return seq.flip(0)

    @torch.no_grad()
    def sample(
        self,
        model,
        shape: tuple[int, ...],
        sampler: str = "ddpm",
        steps: int | None = None,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        progress: bool = True,
        return_chain: bool = False,
        labels: Tensor | None = None,
        device: torch.device | str | None = None,
        clip: bool = True,
        chain_every: int = 1,
    ):
        """Draw images from the reverse process, starting from x_T ~ N(0, I).

        Args:
            model: callable (x_t, t) -> output (see `objective`). An nn.Module is put
                in eval mode for sampling and restored afterwards.
            shape: (B, C, H, W) of the images to draw.
            sampler: "ddpm" — Algorithm 2 over all T steps, T-1 down to 0, adding no
                noise at the last step; "ddim" — Song et al. 2021, Eq. 12, over `steps`
                evenly spaced timesteps from T-1 down to 0.
            steps: number of DDIM steps (1..T; default 50). For "ddpm" only None or T.
            eta: DDIM's noise level (Song et al. Eq. 16): 0 is deterministic, 1 is
                DDPM-like (sigma^2 = posterior variance).
            generator: a torch.Generator on `device`, for reproducible samples.
            progress: show a progress bar.
            return_chain: also return the chain of x_t and predicted x0.
            labels: optional class labels [B] passed to the model.
            device: where to sample; default: the model's device (else CPU).
            clip: clip the predicted x0, and the final images, to the data range [-1, 1]
                (as the reference code does). Off only for data that is not images.
            chain_every: keep every n-th step in the chain (the last is always kept).

        Returns:
            images [B, C, H, W] in [-1, 1]; with `return_chain`, ``(images, chain)`` where
            chain = {"t": LongTensor [K], "x_t": [K, B, C, H, W], "pred_x0": [K, B, C, H, W]}
            on the CPU, "x_t" being the input of the step at time "t".
        """
        _check_choice("sampler", sampler, SAMPLERS)
        if sampler == "ddpm" and steps not in (None, self.num_timesteps):
            raise ValueError(
                f"the ddpm sampler runs all T={self.num_timesteps} steps (got steps={steps}); "
                "use sampler='ddim' to sample with fewer steps"
            )
        if device is None:
            params = getattr(model, "parameters", None)
            first = next(params(), None) if params is not None else None
            device = first.device if first is not None else torch.device("cpu")
        if sampler == "ddpm":
            timesteps = torch.arange(self.num_timesteps - 1, -1, -1)
        else:
            timesteps = self.ddim_timesteps(50 if steps is None else steps)

        was_training = getattr(model, "training", False)
        if was_training:
            model.eval()
        try:
            x = torch.randn(shape, generator=generator, device=device)
            chain = {"t": [], "x_t": [], "pred_x0": []}
            for i, step in enumerate(tqdm(timesteps.tolist(), disable=not progress, desc=sampler)):
                t = torch.full((shape[0],), step, device=device, dtype=torch.long)
                if sampler == "ddpm":
                    x_next, pred_x0 = self._ddpm_step(model, x, t, clip, labels, generator)
                else:
                    prev = timesteps[i + 1].item() if i + 1 < len(timesteps) else -1
                    x_next, pred_x0 = self._ddim_step(model, x, t, prev, eta, clip, labels, generator)
                if return_chain and (i % chain_every == 0 or i == len(timesteps) - 1):
                    chain["t"].append(step)
                    chain["x_t"].append(x.cpu())
                    chain["pred_x0"].append(pred_x0.cpu())
                x = x_next
        finally:
            if was_training:
                model.train()
        if clip:
            x = x.clamp(-1.0, 1.0)
        if not return_chain:
            return x
        return x, {
            "t": torch.tensor(chain["t"]),
            "x_t": torch.stack(chain["x_t"]),
            "pred_x0": torch.stack(chain["pred_x0"]),
        }

    def _ddpm_step(self, model, x, t, clip, labels, generator):
        """One step of Algorithm 2: x_{t-1} = mean + sigma_t z, with z = 0 at the last step."""
        out = self.p_mean_variance(model, x, t, clip=clip, labels=labels)
        if t[0].item() == 0:
            return out["mean"], out["pred_x0"]
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return out["mean"] + (0.5 * out["log_variance"]).exp() * z, out["pred_x0"]

    def _ddim_step(self, model, x, t, prev: int, eta, clip, labels, generator):
        """One DDIM step from t to prev (Song et al. 2021, Eq. 12 and 16); prev = -1 means x_0."""
        output = model(x, t) if labels is None else model(x, t, labels)
        output = output.to(x.dtype)
        pred_x0 = self.predict_x0(x, t, output)
        if clip:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        # The noise direction consistent with the (clipped) x0 estimate.
        eps = self.predict_eps(x, t, pred_x0)
        abar = self._coef("alphas_cumprod", t, x)
        if prev >= 0:
            abar_prev = self._coef("alphas_cumprod", torch.full_like(t, prev), x)
        else:
            abar_prev = torch.ones_like(abar)
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
        x_prev = abar_prev.sqrt() * pred_x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
        if prev >= 0 and eta > 0:
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x_prev = x_prev + sigma * z
        return x_prev, pred_x0
