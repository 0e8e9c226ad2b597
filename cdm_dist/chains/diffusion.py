"""Diffusion maths over batched tensors, in diffusers' conventions (epsilon prediction)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np
import torch

from cdm_dist.errors import InputError

NoiseFn = Callable[[torch.Tensor, int], torch.Tensor]  # (x_t (N, *event), timestep) -> eps (N, *event)


def make_scheduler(
    kind: str = "ddpm",
    num_train_timesteps: int = 1000,
    beta_schedule: str = "squaredcos_cap_v2",
    timestep_spacing: str = "trailing",
    prediction_type: str = "epsilon",
) -> Scheduler:
    """A diffusers scheduler with clipping off (our data are not images in [-1, 1])."""
    from diffusers import DDIMScheduler, DDPMScheduler  # not at import: diffusers costs every process ~2 s of CPU

    classes = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
    if kind not in classes:
        raise ValueError(f"scheduler kind: unknown {kind!r}; expected one of {sorted(classes)}")
    return classes[kind](
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        clip_sample=False,
        prediction_type=prediction_type,
        timestep_spacing=timestep_spacing,
    )


class CosineScheduler:
    """make_scheduler()'s grid without diffusers, for the exact mixture models (whose workers then never import it):
    ᾱ_t of the 'squaredcos_cap_v2' betas (Nichol & Dhariwal 2021, β capped at 0.999) in float32, and 'trailing'
    timesteps, as diffusers computes them; only what DiffusionSchedule and the priors read."""

    def __init__(self, num_train_timesteps: int = 1000) -> None:
        n = num_train_timesteps
        alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        self.config = SimpleNamespace(num_train_timesteps=n, prediction_type="epsilon", timestep_spacing="trailing")
        self.alphas_cumprod = torch.cumprod(1.0 - torch.tensor(betas, dtype=torch.float32), dim=0)  # (n,)
        self.timesteps = torch.arange(n - 1, -1, -1)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """The 'trailing' grid: n - 1 down to about n / steps - 1, every n / steps training steps."""
        n = self.config.num_train_timesteps
        self.timesteps = torch.from_numpy(np.round(np.arange(n, 0, -n / num_inference_steps)).astype(np.int64) - 1)


if TYPE_CHECKING:
    from diffusers import DDIMScheduler, DDPMScheduler

    Scheduler = DDPMScheduler | DDIMScheduler | CosineScheduler


@dataclass(frozen=True)
class DiffusionSchedule:
    """The reverse-time grid: timesteps t_i (descending) with alpha_bar at t_i and at the next step."""

    timesteps: tuple[int, ...]  # (T,) training-grid indices, noisiest first
    alpha_bar: torch.Tensor  # (T,) float64
    alpha_bar_prev: torch.Tensor  # (T,) float64, 1.0 after the last step

    @classmethod
    def from_scheduler(cls, scheduler: Scheduler, num_inference_steps: int) -> DiffusionSchedule:
        """Read the grid off a diffusers scheduler after set_timesteps (same maths as its step())."""
        if num_inference_steps < 1 or num_inference_steps > scheduler.config.num_train_timesteps:
            top = scheduler.config.num_train_timesteps
            raise InputError(f"method.num_steps: {num_inference_steps} is outside 1..{top} (the prior's timesteps)")
        scheduler.set_timesteps(num_inference_steps)
        steps = [int(t) for t in scheduler.timesteps]
        cumprod = scheduler.alphas_cumprod.to(torch.float64)
        alpha_bar = cumprod[steps]
        prev = [cumprod[s] for s in steps[1:]] + [torch.tensor(1.0, dtype=torch.float64)]
        return cls(tuple(steps), alpha_bar, torch.stack(prev))

    def __len__(self) -> int:
        return len(self.timesteps)

    def step_beta(self) -> torch.Tensor:
        """Per-step beta_t = 1 - alpha_bar_t / alpha_bar_prev, (T,)."""
        return 1.0 - self.alpha_bar / self.alpha_bar_prev

    def smoothing_radius(self) -> torch.Tensor:
        """r_t = beta_t / sqrt(1 + beta_t^2), the loss-guided-diffusion guess radius of the MLGD-F code, (T,)."""
        beta = self.step_beta()
        return beta / torch.sqrt(1.0 + beta**2)

    def ddim_sigma(self, eta: float) -> torch.Tensor:
        """sigma_t of DDIM (Song et al. 2021, eq. 16); eta = 1 is the DDPM posterior std, (T,)."""
        ab, ab_prev = self.alpha_bar, self.alpha_bar_prev
        return eta * torch.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))

    def eps_to_step(self, eta: float) -> torch.Tensor:
        """d x_{t-1} / d eps of one DDIM step at fixed x_t (negative), (T,)."""
        ab, ab_prev = self.alpha_bar, self.alpha_bar_prev
        sigma = self.ddim_sigma(eta)
        return -torch.sqrt(ab_prev) * torch.sqrt(1 - ab) / torch.sqrt(ab) + torch.sqrt(1 - ab_prev - sigma**2)


def tweedie_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
    """x̂0 = (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t) (Tweedie; MLGD-F Alg. 1, line 1)."""
    return (x_t - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5


def ddim_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    alpha_bar: float | torch.Tensor,
    alpha_bar_prev: float | torch.Tensor,
    sigma: float | torch.Tensor = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One reverse step x_t -> x_{t-1} (DDIM eq. 12; sigma = DDPM posterior std gives DDPM)."""
    return ddim_step_from_x0(tweedie_x0(x_t, eps, alpha_bar), eps, alpha_bar_prev, sigma, noise)


def ddim_step_from_x0(
    x0: torch.Tensor,
    eps: torch.Tensor,
    alpha_bar_prev: float | torch.Tensor,
    sigma: float | torch.Tensor = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_{t-1} = sqrt(ᾱ_prev) x̂0 + sqrt(1 - ᾱ_prev - σ²) ε̂ + σ z (DDIM eq. 12), given x̂0 directly (so v- and
    x0-prediction models never divide by sqrt(ᾱ_t))."""
    x_prev = alpha_bar_prev**0.5 * x0 + (1 - alpha_bar_prev - sigma**2) ** 0.5 * eps
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev


def ddim_sample(
    noise_fn: NoiseFn,
    x_T: torch.Tensor,
    schedule: DiffusionSchedule,
    checkpoint: bool = False,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from x_T to x_0, differentiable; optional per-step gradient checkpointing."""

    def one_step(x: torch.Tensor, i: int) -> torch.Tensor:
        eps = noise_fn(x, schedule.timesteps[i])
        return ddim_step(x, eps, schedule.alpha_bar[i].item(), schedule.alpha_bar_prev[i].item())

    x = x_T
    for i in range(len(schedule)):
        if checkpoint and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(one_step, x, i, use_reentrant=False)
        else:
            x = one_step(x, i)
    return x
