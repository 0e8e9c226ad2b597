"""cdm-dist: inverse design with distributional targets (conditional distribution matching, MLGD-F)."""

from cdm_dist.config import LossConfig, MLGDConfig, ZetaConfig
from cdm_dist.errors import InputError
from cdm_dist.mlgd import Chains, ChainState, GuidedChains, run_chains
from cdm_dist.priors import DiffusionPrior, GaussianMixturePrior
from cdm_dist.problems import gmm_problem
from cdm_dist.samplers import ConditionalSampler, MixtureDiffusionSampler, MixtureInverseCDFSampler
from cdm_dist.spec import CDMProblem
from cdm_dist.targets import Target

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
