"""Learned models in diffusers' conventions, and adapters that put any diffusers model behind the interfaces."""

from cdm_dist.models.adapters import DecodedSampler, DiffusersPrior, LatentDecoder, load_diffusers_prior
from cdm_dist.models.learned import FlowSampler, load_flow_model, load_prior, load_sampler
from cdm_dist.models.networks import ConditionalVelocityModel, MLPNoiseModel

__all__ = [
    "ConditionalVelocityModel",
    "DecodedSampler",
    "DiffusersPrior",
    "FlowSampler",
    "LatentDecoder",
    "MLPNoiseModel",
    "load_diffusers_prior",
    "load_flow_model",
    "load_prior",
    "load_sampler",
]
