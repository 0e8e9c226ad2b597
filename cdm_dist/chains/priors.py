"""The prior P(X): a diffusers scheduler plus a noise model giving ε̂(x_t, t) and x̂0 (the prior interface)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from cdm_dist.chains.diffusion import CosineScheduler, DiffusionSchedule, tweedie_x0
from cdm_dist.chains.mixtures import GaussianMixture, mixture_score
from cdm_dist.chains.rng import Stream, chain_normal

if TYPE_CHECKING:
    from cdm_dist.chains.diffusion import Scheduler

PRIOR_FIT_LEVELS = (0.01, 0.05, 0.1, 0.2)  # noise levels, as fractions of the training timesteps


class DiffusionPrior(ABC):
    """A diffusion prior over x of shape event_shape; implementations provide predict_noise."""

    def __init__(self, scheduler: Scheduler, event_shape: tuple[int, ...]) -> None:
        self.scheduler = scheduler
        self.event_shape = event_shape

    @abstractmethod
    def predict_noise(self, x_t: torch.Tensor, timestep: int) -> torch.Tensor:
        """ε̂(x_t, t): x_t (N, *event_shape) -> (N, *event_shape), differentiable in x_t."""

    def denoise(self, x_t: torch.Tensor, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂, x̂0) at x_t, both (N, *event_shape); x̂0 by Tweedie unless the model predicts it directly."""
        eps = self.predict_noise(x_t, timestep)
        return eps, tweedie_x0(x_t, eps, float(self.scheduler.alphas_cumprod[timestep].double()))

    def schedule(self, num_inference_steps: int) -> DiffusionSchedule:
        """The reverse-time grid for this many steps."""
        return DiffusionSchedule.from_scheduler(self.scheduler, num_inference_steps)


@torch.no_grad()
def prior_fit(prior: DiffusionPrior, x: torch.Tensor, seed: int = 0, draws: int = 2) -> torch.Tensor:
    """How typical x is under the prior: the mean squared noise-prediction error ||ε̂(x_t, t) - ε||² per
    coordinate at low noise levels (DDPM's simple loss, Ho et al. 2020), x (B, *event) -> (B,).

    Every x sees the same ε, so values compare across chains and batches. Prior samples score low (about the
    model's training loss); images that fool the sampler but are no digits score one to two orders higher."""
    size = prior.scheduler.config.num_train_timesteps
    same = torch.full((x.shape[0],), seed, dtype=torch.int64, device=x.device)  # (B,): one ε for every row
    errors = []
    for level in PRIOR_FIT_LEVELS:
        timestep = max(1, round(level * size))
        alpha_bar = float(prior.scheduler.alphas_cumprod[timestep])
        for draw in range(draws):
            eps = chain_normal(same, Stream.PRIOR_FIT, timestep * draws + draw, tuple(x.shape[1:]), x.dtype)
            x_t = alpha_bar**0.5 * x + (1 - alpha_bar) ** 0.5 * eps  # (B, *event)
            errors.append((prior.predict_noise(x_t, timestep) - eps).square().flatten(1).mean(1))
    return torch.stack(errors).mean(0)


class GaussianMixturePrior(DiffusionPrior):
    """The exact prior of a Gaussian mixture: ε̂ = -sqrt(1-ᾱ_t) ∇ log p_t(x_t), p_t the noised mixture."""

    def __init__(self, mixture: GaussianMixture, scheduler: Scheduler | None = None) -> None:
        super().__init__(scheduler or CosineScheduler(num_train_timesteps=100), (mixture.dim,))
        self.mixture = mixture.to(torch.float64)
        self._tables: dict[tuple[int, torch.dtype, torch.device], tuple[torch.Tensor, ...]] = {}

    def _noised_tables(self, timestep: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = (timestep, like.dtype, like.device)
        if key not in self._tables:
            alpha_bar = float(self.scheduler.alphas_cumprod[timestep])
            noised = self.mixture.noised(alpha_bar)
            precisions, logdets = noised.precisions_and_logdets()
            tables = (
                torch.log(noised.weights),
                noised.means,
                precisions,
                logdets,
                torch.tensor(1 - alpha_bar, dtype=torch.float64).sqrt(),
            )
            self._tables[key] = tuple(t.to(dtype=like.dtype, device=like.device) for t in tables)
        return self._tables[key]

    def predict_noise(self, x_t: torch.Tensor, timestep: int) -> torch.Tensor:
        log_w, means, precisions, logdets, sigma = self._noised_tables(timestep, x_t)
        return -sigma * mixture_score(x_t, log_w, means, precisions, logdets)
