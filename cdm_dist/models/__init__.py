"""Learned models in diffusers' conventions: the noise models of priors and the conditional flow samplers."""

from cdm_dist.models.learned import FlowSampler, LearnedPrior, load_prior, load_sampler
from cdm_dist.models.networks import ConditionalVelocityModel, MLPNoiseModel

__all__ = ["ConditionalVelocityModel", "FlowSampler", "LearnedPrior", "MLPNoiseModel", "load_prior", "load_sampler"]
