"""cdm-dist: inverse design with distributional targets (conditional distribution matching, MLGD-F).

The names below are imported on first use (PEP 562), so `import cdm_dist.errors` or the `cdm` command line does
not load torch, diffusers, Ray or MLflow before a command needs them."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cdm_dist.chains.config import LossConfig, MLGDConfig, ZetaConfig
    from cdm_dist.chains.mlgd import Chains, ChainState, GuidedChains, run_chains
    from cdm_dist.chains.priors import DiffusionPrior, GaussianMixturePrior
    from cdm_dist.chains.samplers import ConditionalSampler, MixtureDiffusionSampler, MixtureInverseCDFSampler
    from cdm_dist.chains.targets import Target
    from cdm_dist.errors import InputError
    from cdm_dist.models.spec import CDMProblem
    from cdm_dist.problems.builtins import gmm_problem

_HOMES = {
    "CDMProblem": "cdm_dist.models.spec",
    "ChainState": "cdm_dist.chains.mlgd",
    "Chains": "cdm_dist.chains.mlgd",
    "ConditionalSampler": "cdm_dist.chains.samplers",
    "DiffusionPrior": "cdm_dist.chains.priors",
    "GaussianMixturePrior": "cdm_dist.chains.priors",
    "GuidedChains": "cdm_dist.chains.mlgd",
    "InputError": "cdm_dist.errors",
    "LossConfig": "cdm_dist.chains.config",
    "MLGDConfig": "cdm_dist.chains.config",
    "MixtureDiffusionSampler": "cdm_dist.chains.samplers",
    "MixtureInverseCDFSampler": "cdm_dist.chains.samplers",
    "Target": "cdm_dist.chains.targets",
    "ZetaConfig": "cdm_dist.chains.config",
    "gmm_problem": "cdm_dist.problems.builtins",
    "run_chains": "cdm_dist.chains.mlgd",
}
__all__ = [
    "CDMProblem",
    "ChainState",
    "Chains",
    "ConditionalSampler",
    "DiffusionPrior",
    "GaussianMixturePrior",
    "GuidedChains",
    "InputError",
    "LossConfig",
    "MLGDConfig",
    "MixtureDiffusionSampler",
    "MixtureInverseCDFSampler",
    "Target",
    "ZetaConfig",
    "gmm_problem",
    "run_chains",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
