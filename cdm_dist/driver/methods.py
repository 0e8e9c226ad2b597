"""One entry point for every method on a CDM problem: MLGD-F, MLGD, best-of-N, D-Flow."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cdm_dist.chains.baselines import BestOfNConfig, DFlowConfig, best_of_n, dflow
from cdm_dist.chains.config import MLGDConfig
from cdm_dist.chains.mlgd import ChainResult, Chains, ChainState, GuidedChains, run_chains
from cdm_dist.errors import InputError
from cdm_dist.models.spec import CDMProblem

METHODS = ("mlgd_f", "mlgd", "best_of_n", "dflow")


def run_method(
    problem: CDMProblem,
    method: str,
    chains: Chains,
    config: MLGDConfig,
    device: torch.device | str = "cpu",
    best_of_n_config: BestOfNConfig | None = None,
    dflow_config: DFlowConfig | None = None,
    on_step: Callable[[ChainState], None] | None = None,
) -> ChainResult:
    """Run one method's chains on a problem and evaluate them on held-out samples and exact metrics."""
    if method not in METHODS:
        raise InputError(f"method: unknown {method!r}; expected one of {list(METHODS)}")
    if method in ("mlgd_f", "mlgd"):
        runner = GuidedChains(problem.prior, problem.sampler(method), problem.target, chains, config, device)
        return run_chains(runner, problem.metrics, on_step=on_step)
    if method == "best_of_n":
        return best_of_n(
            problem.prior,
            problem.fast_sampler,
            problem.target,
            chains,
            config,
            best_of_n_config or BestOfNConfig(),
            problem.metrics,
        )
    return dflow(
        problem.prior,
        problem.fast_sampler,
        problem.target,
        chains,
        config,
        dflow_config or DFlowConfig(),
        problem.metrics,
    )
