"""Matching losses between each chain's conditional samples and the target samples, batched over chains.

Every loss maps y (B, n, d) and target (m, d) or (B, m, d) to (B,), and is differentiable in y.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from cdm_dist.errors import InputError

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _batched_target(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Broadcast a shared target (m, d) to (B, m, d)."""
    return target.unsqueeze(0).expand(y.shape[0], -1, -1) if target.dim() == 2 else target


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||^2, a (B, n, d), b (B, m, d) -> (B, n, m), clamped at 0."""
    if a.shape[-1] == 1:
        return (a - b.transpose(-1, -2)) ** 2  # exact, and cheaper, in 1-D
    cross = a @ b.transpose(-1, -2)
    return ((a**2).sum(-1, keepdim=True) + (b**2).sum(-1).unsqueeze(-2) - 2 * cross).clamp_min(0)


def _off_diagonal_mean(k: torch.Tensor) -> torch.Tensor:
    """Mean of k[b, i, j] over i != j, (B, n, n) -> (B,)."""
    n = k.shape[-1]
    return (k.sum((-1, -2)) - torch.diagonal(k, dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))


def kernel_scale(d_xy: torch.Tensor, d_xx: torch.Tensor, d_yy: torch.Tensor, bandwidth: str | float) -> torch.Tensor:
    """The RBF scale s (B,) in exp(-d^2 / s), detached: median of cross distances, mean of pooled ones, or 2 h^2."""
    if isinstance(bandwidth, float | int):
        return torch.full(d_xy.shape[:1], 2.0 * float(bandwidth) ** 2, dtype=d_xy.dtype, device=d_xy.device)
    with torch.no_grad():
        if bandwidth == "median":  # median heuristic on the cross distances (as the MLGD-F code)
            return d_xy.flatten(1).median(dim=1).values.clamp_min(1e-12)
        if bandwidth == "mean":  # mean pooled off-diagonal squared distance
            n, m = d_xx.shape[-1], d_yy.shape[-1]
            total = d_xx.sum((-1, -2)) + d_yy.sum((-1, -2)) + 2 * d_xy.sum((-1, -2))
            return (total / ((n + m) ** 2 - (n + m))).clamp_min(1e-12)
    raise InputError(f"loss.bandwidth: unknown {bandwidth!r}; expected 'median', 'mean' or a positive number")


def mmd2(
    y: torch.Tensor,
    target: torch.Tensor,
    bandwidth: str | float = "median",
    multipliers: Sequence[float] = (1.0,),
    unbiased: bool = True,
) -> torch.Tensor:
    """MMD² with the kernel Σ_j exp(-d² / (c_j s)) (Gretton et al. 2012); U-statistic if unbiased, else V."""
    t = _batched_target(y, target)
    if unbiased and (y.shape[1] < 2 or t.shape[1] < 2):
        raise InputError("loss: the unbiased MMD needs at least 2 samples on each side (n_c >= 2)")
    d_xx, d_yy, d_xy = squared_distances(y, y), squared_distances(t, t), squared_distances(y, t)
    scale = kernel_scale(d_xy, d_xx, d_yy, bandwidth)[:, None, None]  # (B, 1, 1)

    def kernel(d: torch.Tensor) -> torch.Tensor:
        return sum(torch.exp(-d / (c * scale)) for c in multipliers)

    k_xx, k_yy, k_xy = kernel(d_xx), kernel(d_yy), kernel(d_xy)
    if unbiased:
        return _off_diagonal_mean(k_xx) + _off_diagonal_mean(k_yy) - 2 * k_xy.mean((-1, -2))
    return k_xx.mean((-1, -2)) + k_yy.mean((-1, -2)) - 2 * k_xy.mean((-1, -2))


def energy_distance(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (Székely & Rizzo 2013), within-sample terms as U-statistics."""
    t = _batched_target(y, target)
    if y.shape[1] < 2 or t.shape[1] < 2:
        raise InputError("loss: the energy distance needs at least 2 samples on each side (n_c >= 2)")

    def dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(squared_distances(a, b).clamp_min(1e-30))

    return 2 * dist(y, t).mean((-1, -2)) - _off_diagonal_mean(dist(y, y)) - _off_diagonal_mean(dist(t, t))


def _quantiles(sorted_values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Linear-interpolated empirical quantiles along dim -2: (B, m, L) at levels (n,) -> (B, n, L)."""
    m = sorted_values.shape[-2]
    pos = (levels * m - 0.5).clamp(0, m - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp_max(m - 1)
    frac = (pos - lo).to(sorted_values.dtype)[:, None]
    return sorted_values[..., lo, :] * (1 - frac) + sorted_values[..., hi, :] * frac


def sliced_wasserstein(y: torch.Tensor, target: torch.Tensor, n_projections: int = 64, seed: int = 0) -> torch.Tensor:
    """Sliced W2² over fixed random directions (Rabin et al. 2011); unequal sizes matched by target quantiles."""
    t = _batched_target(y, target)
    d = y.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(d, n_projections, generator=gen, dtype=torch.float64)
    directions = (directions / directions.norm(dim=0, keepdim=True)).to(y)
    y_proj = torch.sort(y @ directions, dim=-2).values  # (B, n, L)
    t_proj = torch.sort(t @ directions, dim=-2).values  # (B, m, L)
    n = y.shape[1]
    if t_proj.shape[1] != n:
        levels = (torch.arange(n, dtype=torch.float64, device=y.device) + 0.5) / n
        t_proj = _quantiles(t_proj, levels)
    return ((y_proj - t_proj) ** 2).mean((-1, -2))


def make_loss(
    name: str,
    bandwidth: str | float = "median",
    multipliers: Sequence[float] = (1.0,),
    unbiased: bool = True,
    sqrt: bool = False,
    n_projections: int = 64,
) -> Loss:
    """A loss by name: 'mmd', 'energy' or 'sliced_wasserstein'; sqrt takes sqrt(max(L, 0) + 1e-8) as the MLGD-F code."""
    if name == "mmd":
        if not isinstance(bandwidth, float | int) and bandwidth not in ("median", "mean"):
            raise InputError(f"loss.bandwidth: unknown {bandwidth!r}; expected 'median', 'mean' or a positive number")
        mults = tuple(float(c) for c in multipliers)

        def base(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return mmd2(y, t, bandwidth, mults, unbiased)
    elif name == "energy":
        base = energy_distance
    elif name == "sliced_wasserstein":

        def base(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return sliced_wasserstein(y, t, n_projections)
    else:
        raise InputError(f"loss.name: unknown {name!r}; expected one of ['energy', 'mmd', 'sliced_wasserstein']")
    if not sqrt:
        return base
    return lambda y, t: torch.sqrt(base(y, t).clamp_min(0) + 1e-8)


def log_mean_exp_loss(losses: torch.Tensor) -> torch.Tensor:
    """-log mean_j exp(-L_j) over guesses, (B, G) -> (B,) (loss-guided diffusion, Song et al. 2023)."""
    return -(torch.logsumexp(-losses, dim=-1) - math.log(losses.shape[-1]))
