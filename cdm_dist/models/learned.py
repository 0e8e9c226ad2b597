"""Learned models behind the core interfaces: LearnedPrior (a DiffusionPrior) and FlowSampler (a ConditionalSampler).

A checkpoint folder holds the model (config.json + diffusion_pytorch_model.safetensors, diffusers' layout),
for priors the scheduler (scheduler_config.json), and manifest.json saying how it was made.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from cdm_dist.errors import InputError
from cdm_dist.models.networks import ConditionalVelocityModel, MLPNoiseModel
from cdm_dist.priors import DiffusionPrior
from cdm_dist.samplers import ConditionalSampler

NOISE_MODELS = {"MLPNoiseModel": MLPNoiseModel, "UNet2DModel": UNet2DModel}


def _follow(model: torch.nn.Module, like: torch.Tensor) -> torch.nn.Module:
    """Move the model to the device of `like` (once); it keeps its own dtype."""
    param = next(model.parameters())
    if param.device != like.device:
        model.to(like.device)
    return model


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def noise_prediction(model: torch.nn.Module, x_t: torch.Tensor, timestep: int | torch.Tensor) -> torch.Tensor:
    """ε̂(x_t, t) of either noise model, also when wrapped for training (UNet2DModel returns it as `.sample`)."""
    eps = model(x_t, timestep)
    return getattr(eps, "sample", eps)


class LearnedPrior(DiffusionPrior):
    """A diffusion prior with a learned noise model (MLPNoiseModel for vectors, UNet2DModel for images)."""

    def __init__(self, model: MLPNoiseModel | UNet2DModel, scheduler: DDPMScheduler) -> None:
        if isinstance(model, UNet2DModel):
            size = model.config.sample_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            event_shape = (model.config.in_channels, *size)
        else:
            event_shape = (model.config.dim,)
        super().__init__(scheduler, event_shape)
        self.model = model.eval().requires_grad_(False)

    def predict_noise(self, x_t: torch.Tensor, timestep: int) -> torch.Tensor:
        model = _follow(self.model, x_t)
        return noise_prediction(model, x_t.to(_model_dtype(model)), timestep).to(x_t.dtype)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LearnedPrior:
        self.model.to(device)
        return self

    def save(self, folder: str | Path) -> None:
        """Model and scheduler in diffusers' layout."""
        self.model.save_pretrained(folder)
        self.scheduler.save_pretrained(folder)


class FlowSampler(ConditionalSampler):
    """f_phi(x, eta): `num_steps` Euler steps of a conditional rectified flow from eta; differentiable in x.

    One model serves both roles: a few steps is the fast sampler (MLGD-F), many steps the full chain (MLGD).
    """

    def __init__(self, model: ConditionalVelocityModel, num_steps: int) -> None:
        if num_steps < 1:
            raise InputError(f"sampler steps: must be >= 1; got {num_steps}")
        self.model = model.eval().requires_grad_(False)
        self.num_steps = num_steps
        self.y_dim = model.config.y_dim
        self.noise_shape = (self.y_dim,)

    def sample(self, x: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        model = _follow(self.model, x)
        dtype = _model_dtype(model)
        b, n_c = eta.shape[:2]
        features = model.condition(x.to(dtype))  # (B, F)
        features = features[:, None].expand(b, n_c, features.shape[-1]).reshape(b * n_c, -1)
        z = eta.reshape(b * n_c, self.y_dim).to(dtype)
        return euler_flow(model, z, features, self.num_steps).reshape(b, n_c, self.y_dim).to(x.dtype)


def euler_flow(model: ConditionalVelocityModel, z: torch.Tensor, features: torch.Tensor, steps: int) -> torch.Tensor:
    """Integrate dz/ds = v(z, s | x) from s = 0 (noise z (N, d_y)) to s = 1 with Euler; returns y in data units."""
    ds = 1.0 / steps
    for k in range(steps):
        s = torch.full((z.shape[0],), k * ds, device=z.device, dtype=z.dtype)
        z = z + ds * model.velocity(z, s, features)
    return model.to_data(z)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest.json of a checkpoint folder, with a clear error when the folder is not a checkpoint."""
    folder = Path(folder)
    path = folder / "manifest.json"
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: not a checkpoint folder (no config.json)")
    if not path.is_file():
        raise InputError(f"{folder}: checkpoint has no manifest.json")
    return json.loads(path.read_text())


def load_prior(folder: str | Path) -> LearnedPrior:
    """A LearnedPrior from a checkpoint folder (safetensors weights)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    config = json.loads((folder / "config.json").read_text())
    name = config.get("_class_name")
    if manifest.get("role") != "prior" or name not in NOISE_MODELS:
        raise InputError(f"{folder}: not a prior checkpoint (role {manifest.get('role')!r}, model {name!r})")
    model = NOISE_MODELS[name].from_pretrained(folder, use_safetensors=True)
    return LearnedPrior(model, DDPMScheduler.from_pretrained(folder))


def load_sampler(folder: str | Path, num_steps: int) -> FlowSampler:
    """A FlowSampler with `num_steps` Euler steps from a checkpoint folder (safetensors weights)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.get("role") != "sampler":
        raise InputError(f"{folder}: not a sampler checkpoint (role {manifest.get('role')!r})")
    return FlowSampler(ConditionalVelocityModel.from_pretrained(folder, use_safetensors=True), num_steps)
