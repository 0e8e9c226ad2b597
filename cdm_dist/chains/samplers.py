"""Conditional samplers f(x, eta) ≈ P(Y | X = x): one-step (MLGD-F) and full-chain (MLGD)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from cdm_dist.chains.diffusion import CosineScheduler, DiffusionSchedule, ddim_sample
from cdm_dist.chains.mixtures import ConditionalMixture, mixture_icdf_1d_reparam, mixture_score
from cdm_dist.errors import InputError

if TYPE_CHECKING:
    from cdm_dist.chains.diffusion import Scheduler


class ConditionalSampler(ABC):
    """The fast conditional sampler's contract, f_phi(x, eta) ≈ P(Y | X = x) (MLGD-F paper, Sec. 3):

    - `sample(x, eta) -> y`: x (B, *x_shape) on the chain's device and dtype, eta (B, n_c, *noise_shape) ~ N(0, I)
      -> y (B, n_c, y_dim) in x's dtype; differentiable in x (MLGD-F backpropagates the matching loss through it);
      row b of y depends only on x[b] and eta[b].
    - `y_dim`: the dimension of Y, which the target samples must have.
    - `noise_shape`: the shape of one draw's noise eta.
    - `x_shape`: the event shape of x it takes, or None when any (checked against the prior by `cdm check`).
    """

    y_dim: int
    noise_shape: tuple[int, ...]
    x_shape: tuple[int, ...] | None = None

    @abstractmethod
    def sample(self, x: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        """Draw y for each x from its own noise."""


class MixtureInverseCDFSampler(ConditionalSampler):
    """Exact one-step sampler of a mixture's 1-D conditional: y = F^{-1}(Φ(eta) | x), implicit gradients in x."""

    def __init__(self, conditional: ConditionalMixture) -> None:
        if conditional.y_dim != 1:
            raise InputError(f"the inverse-CDF sampler needs 1-D Y; this mixture has d_y = {conditional.y_dim}")
        self.conditional = conditional
        self.y_dim = 1
        self.noise_shape = (1,)
        self.x_shape = (conditional.x_dim,)
        self._stds = torch.sqrt(conditional.covs_y[:, 0, 0])  # (K,)

    def sample(self, x: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        cond = _cast(self.conditional, x)
        log_w, means = cond.at(x)  # (B, K), (B, K, 1)
        u = torch.special.ndtr(eta[..., 0])  # (B, n_c)
        y = mixture_icdf_1d_reparam(u, log_w, means[..., 0], self._stds.to(x))
        return y.unsqueeze(-1)  # (B, n_c, 1)


class MixtureDiffusionSampler(ConditionalSampler):
    """Full-chain sampler: deterministic DDIM over y with the exact conditional mixture score, differentiable (MLGD)."""

    def __init__(
        self, conditional: ConditionalMixture, num_steps: int = 100, scheduler: Scheduler | None = None
    ) -> None:
        self.conditional = conditional
        self.y_dim = conditional.y_dim
        self.noise_shape = (conditional.y_dim,)
        self.x_shape = (conditional.x_dim,)
        self.schedule = DiffusionSchedule.from_scheduler(
            scheduler or CosineScheduler(num_train_timesteps=100), num_steps
        )
        self._per_step = [self._noised(float(ab)) for ab in self.schedule.alpha_bar]

    def _noised(self, alpha_bar: float) -> tuple[torch.Tensor, ...]:
        eye = torch.eye(self.y_dim, dtype=torch.float64)
        covs = alpha_bar * self.conditional.covs_y.to(torch.float64) + (1 - alpha_bar) * eye
        chol = torch.linalg.cholesky(covs)
        logdets = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        return torch.cholesky_inverse(chol), logdets, torch.tensor(alpha_bar, dtype=torch.float64)

    def sample(self, x: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        cond = _cast(self.conditional, x)
        log_w, means = cond.at(x)  # (B, K), (B, K, dy)
        log_w, means = log_w[:, None], means[:, None]  # broadcast over the n_c samples
        tables = {t: tuple(v.to(x) for v in self._per_step[i]) for i, t in enumerate(self.schedule.timesteps)}

        def noise_fn(y_t: torch.Tensor, timestep: int) -> torch.Tensor:
            precisions, logdets, alpha_bar = tables[timestep]
            score = mixture_score(y_t, log_w, alpha_bar.sqrt() * means, precisions, logdets)
            return -torch.sqrt(1 - alpha_bar) * score

        return ddim_sample(noise_fn, eta, self.schedule)  # (B, n_c, dy)


def _cast(cond: ConditionalMixture, like: torch.Tensor) -> ConditionalMixture:
    if cond.means_x.dtype == like.dtype and cond.means_x.device == like.device:
        return cond
    return ConditionalMixture(*(getattr(cond, f).to(like) for f in cond.__dataclass_fields__))
