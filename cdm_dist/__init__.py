"""cdm-dist: inverse design with distributional targets (conditional distribution matching, MLGD-F)."""

from cdm_dist.chains.config import LossConfig, MLGDConfig, ZetaConfig
from cdm_dist.chains.mlgd import Chains, ChainState, GuidedChains, run_chains
from cdm_dist.chains.priors import DiffusionPrior, GaussianMixturePrior
from cdm_dist.chains.samplers import ConditionalSampler, MixtureDiffusionSampler, MixtureInverseCDFSampler
from cdm_dist.chains.targets import Target
from cdm_dist.errors import InputError
from cdm_dist.models.spec import CDMProblem
from cdm_dist.problems.builtins import gmm_problem

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
