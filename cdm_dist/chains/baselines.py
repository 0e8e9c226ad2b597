"""Baselines on the same interfaces: best-of-N prior sampling and D-Flow (Ben-Hamu et al. 2024)."""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field

from cdm_dist.chains.config import MLGDConfig, Positive, StrictModel
from cdm_dist.chains.diffusion import ddim_sample
from cdm_dist.chains.mlgd import ChainResult, Chains, GuidedChains, MetricsFn
from cdm_dist.chains.priors import DiffusionPrior
from cdm_dist.chains.rng import Stream
from cdm_dist.chains.samplers import ConditionalSampler
from cdm_dist.chains.targets import Target


class BestOfNConfig(StrictModel):
    """Draw N prior samples per chain, keep the one with the lowest selection loss."""

    n: Annotated[int, Field(ge=1)] = 64
    num_steps: Annotated[int, Field(ge=1)] = 100  # deterministic DDIM steps per prior sample


class DFlowConfig(StrictModel):
    """D-Flow: optimise the source noise through the deterministic sampler with L-BFGS."""

    num_steps: Annotated[int, Field(ge=1)] = 20  # DDIM steps of the differentiated sampler
    iterations: Annotated[int, Field(ge=1)] = 10  # outer L-BFGS steps
    inner_iterations: Annotated[int, Field(ge=1)] = 20  # L-BFGS max_iter per step (D-Flow App. B: 20)
    lr: Positive = 1.0
    chi_weight: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0  # lambda of the chi^d regulariser
    checkpoint: bool = True  # gradient checkpointing per sampler step


def chi_regulariser(z: torch.Tensor) -> torch.Tensor:
    """Negative log-density of ||z|| under chi_d, up to a constant: -(d-1) log||z|| + ||z||^2 / 2 (D-Flow eq. 10)."""
    flat = z.flatten(1)
    d = flat.shape[1]
    norm = flat.norm(dim=1)
    return -(d - 1) * torch.log(norm) + 0.5 * norm**2


def _prior_ddim(prior: DiffusionPrior, z: torch.Tensor, num_steps: int, checkpoint: bool = False) -> torch.Tensor:
    return ddim_sample(prior.predict_noise, z, prior.schedule(num_steps), checkpoint=checkpoint)


def best_of_n(
    prior: DiffusionPrior,
    sampler: ConditionalSampler,
    target: Target,
    chains: Chains,
    loss_config: MLGDConfig,
    config: BestOfNConfig,
    metrics: MetricsFn | None = None,
) -> ChainResult:
    """Per chain: N unguided DDIM prior samples; the lowest selection loss wins; reported on a separate draw."""
    evaluator = GuidedChains(prior, sampler, target, chains, loss_config)
    b, n = len(chains), config.n
    z = evaluator.noise.normal(Stream.INIT, 0, (n, *prior.event_shape))  # (B, N, *event)
    with torch.no_grad():
        x = _prior_ddim(prior, z.reshape(b * n, *prior.event_shape), config.num_steps)
        candidates = x.reshape(b, n, *prior.event_shape)
        selection = evaluator.sampler_side.sample_loss(candidates, 0, Stream.SELECT)  # (B, N), n_c samples each
    selection = torch.nan_to_num(selection, nan=math.inf)
    best = candidates[torch.arange(b), selection.argmin(dim=1)]
    state = evaluator.prior_side.initial_state()
    state.x = best
    return evaluator.finish(state, metrics)


def dflow(
    prior: DiffusionPrior,
    sampler: ConditionalSampler,
    target: Target,
    chains: Chains,
    loss_config: MLGDConfig,
    config: DFlowConfig,
    metrics: MetricsFn | None = None,
) -> ChainResult:
    """D-Flow per chain: min_z L(f(DDIM(z), eta)) + lambda R_chi(z) by L-BFGS with strong-Wolfe line search.

    Chains are optimised one at a time: L-BFGS's line search is per problem, so batching would couple them.
    The objective is deterministic (fixed eta and target batch), as L-BFGS needs.
    """
    xs = []
    for index in range(len(chains)):
        one = GuidedChains(prior, sampler, target, chains[index : index + 1], loss_config)
        z = one.noise.normal(Stream.INIT, 0, tuple(prior.event_shape)).clone().requires_grad_(True)  # (1, *event)
        opt = torch.optim.LBFGS([z], lr=config.lr, max_iter=config.inner_iterations, line_search_fn="strong_wolfe")

        def closure(one: GuidedChains = one, z: torch.Tensor = z, opt: torch.optim.LBFGS = opt) -> torch.Tensor:
            opt.zero_grad()
            x0 = _prior_ddim(prior, z, config.num_steps, checkpoint=config.checkpoint)
            loss = one.sampler_side.sample_loss(x0.unsqueeze(1), 0, Stream.DFLOW)[:, 0]
            if config.chi_weight > 0:
                loss = loss + config.chi_weight * chi_regulariser(z)
            loss.sum().backward()
            return loss.sum()

        for _ in range(config.iterations):
            opt.step(closure)
        with torch.no_grad():
            xs.append(_prior_ddim(prior, z.detach(), config.num_steps))
    evaluator = GuidedChains(prior, sampler, target, chains, loss_config)
    state = evaluator.prior_side.initial_state()
    state.x = torch.cat(xs)
    return evaluator.finish(state, metrics)
