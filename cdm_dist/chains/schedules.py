"""Guidance step-size schedules zeta_t, one per chain, as tables over the reverse steps."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from cdm_dist.chains.config import ZetaConfig
from cdm_dist.chains.diffusion import DiffusionSchedule


def zeta_table(config: ZetaConfig, schedule: DiffusionSchedule, eta: float) -> torch.Tensor:
    """zeta_t for every reverse step (T,), float64; progress p runs from 0 (noisiest) to 1."""
    steps = len(schedule)
    p = torch.linspace(0.0, 1.0, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    s, f = config.scale, config.final
    if config.kind == "constant":
        return torch.full((steps,), s, dtype=torch.float64)
    if config.kind == "linear":
        return s * ((1 - p) + f * p)
    if config.kind == "cosine":
        return s * (f + (1 - f) * 0.5 * (1 + torch.cos(math.pi * p)))
    if config.kind == "power":
        return s * (f + (1 - f) * (1 - p) ** config.power)
    if config.kind == "inv_sqrt_alpha":  # 1 / sqrt(alpha_t) of the MLGD-F code, per-step alpha_t = 1 - beta_t
        return s / torch.sqrt(1 - schedule.step_beta())
    if config.kind == "rt":  # proportional to the smoothing radius r_t
        return s * schedule.smoothing_radius()
    if config.kind == "cdms":
        # CDMS: sample Q_beta ∝ P(x) exp(-beta L): the score gains -beta ∇L, i.e. eps gains sqrt(1-ᾱ_t) beta ∇L,
        # which moves x_{t-1} by (d x_{t-1} / d eps) sqrt(1-ᾱ_t) beta ∇L.
        return -config.beta * schedule.eps_to_step(eta) * torch.sqrt(1 - schedule.alpha_bar)
    raise ValueError(f"zeta.kind: unknown {config.kind!r}")


def guided_mask(steps: int, start: float, stop: float) -> torch.Tensor:
    """Which of the steps get guidance: start <= i / steps < stop, (T,) bool."""
    frac = torch.arange(steps, dtype=torch.float64) / steps
    return (frac >= start) & (frac < stop)


def timestep_window(timesteps: Sequence[int], min_t: int) -> torch.Tensor:
    """Which reverse steps sit at timesteps t >= min_t (guidance off below, as the MLGD-F code's t < 250), (T,) bool."""
    return torch.tensor([t >= min_t for t in timesteps], dtype=torch.bool)


def apply_step_rule(
    grad: torch.Tensor, zeta: torch.Tensor, normalize: torch.Tensor, trust: torch.Tensor
) -> torch.Tensor:
    """The correction zeta grad per chain: grad (B, *event), zeta (B,), normalize (B,) bool, trust (B,) or inf."""
    flat = grad.flatten(1)
    norm = flat.norm(dim=1)  # (B,)
    direction = torch.where(normalize[:, None], flat / norm.clamp_min(1e-30)[:, None], flat)
    step = zeta[:, None] * direction
    step_norm = step.norm(dim=1)
    shrink = torch.where(step_norm > trust, trust / step_norm.clamp_min(1e-30), torch.ones_like(step_norm))
    return (step * shrink[:, None]).reshape(grad.shape)
