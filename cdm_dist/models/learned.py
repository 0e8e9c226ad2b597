"""The project's learned models: FlowSampler (a ConditionalSampler over a conditional rectified flow) and the
loaders of its checkpoint folders; learned priors load through the diffusers adapter (cdm_dist.models.adapters).

A checkpoint folder holds the model (config.json + diffusion_pytorch_model.safetensors, diffusers' layout),
for priors the scheduler (scheduler_config.json), and manifest.json saying how it was made (with the weights'
sha256, checked on every load).
"""

from __future__ import annotations

from pathlib import Path

import torch

from cdm_dist.chains.samplers import ConditionalSampler
from cdm_dist.errors import InputError
from cdm_dist.models.adapters import DiffusersPrior, check_dtype_runs, load_diffusers_prior, load_model
from cdm_dist.models.manifest import read_manifest
from cdm_dist.models.networks import ConditionalVelocityModel
from cdm_dist.models.spec import DiffusersPriorSpec


def noise_prediction(model: torch.nn.Module, x_t: torch.Tensor, timestep: int | torch.Tensor) -> torch.Tensor:
    """ε̂(x_t, t) of either noise model, also when wrapped for training (UNet2DModel returns it as `.sample`)."""
    eps = model(x_t, timestep)
    return getattr(eps, "sample", eps)


class FlowSampler(ConditionalSampler):
    """f_phi(x, eta): `num_steps` Euler steps of a conditional rectified flow from eta; differentiable in x.

    One model serves both roles: a few steps is the fast sampler (MLGD-F), many steps the full chain (MLGD).
    """

    def __init__(self, model: ConditionalVelocityModel, num_steps: int, renoise: bool = False) -> None:
        if num_steps < 1:
            raise InputError(f"sampler steps: must be >= 1; got {num_steps}")
        self.model = model.eval().requires_grad_(False)
        self.num_steps = num_steps
        self.renoise = renoise  # consistency-style: fresh noise at every step, so eta holds one draw per step
        self.y_dim = model.config.y_dim
        self.noise_shape = (num_steps, self.y_dim) if renoise else (self.y_dim,)
        self.x_shape = tuple(model.config.x_shape or [1])

    def sample(self, x: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        model = self.model
        if next(model.parameters()).device != x.device:
            model.to(x.device)
        dtype = next(model.parameters()).dtype
        b, n_c = eta.shape[:2]
        features = model.condition(x.to(dtype))  # (B, F)
        features = features[:, None].expand(b, n_c, features.shape[-1]).reshape(b * n_c, -1)
        if self.renoise:
            z = eta.reshape(b * n_c, self.num_steps, self.y_dim).to(dtype)
            y = model.to_data(renoised_flow_map(model, z, features))
        else:
            y = euler_flow(model, eta.reshape(b * n_c, self.y_dim).to(dtype), features, self.num_steps)
        return y.reshape(b, n_c, self.y_dim).to(x.dtype)


def euler_flow(model: ConditionalVelocityModel, z: torch.Tensor, features: torch.Tensor, steps: int) -> torch.Tensor:
    """Integrate dz/ds = v(z, s | x) from s = 0 (noise z (N, d_y)) to s = 1 with Euler; returns y in data units."""
    return model.to_data(flow_map(model, z, features, steps))


def flow_map(model: ConditionalVelocityModel, z: torch.Tensor, features: torch.Tensor, steps: int) -> torch.Tensor:
    """The Euler integral of dz/ds = v(z, s | x) from s = 0 to 1 in the model's standardised units, z (N, d_y)."""
    ds = 1.0 / steps
    for k in range(steps):
        s = torch.full((z.shape[0],), k * ds, device=z.device, dtype=z.dtype)
        z = z + ds * model.velocity(z, s, features)
    return z


def renoised_flow_map(model: ConditionalVelocityModel, noise: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Consistency-style multistep sampling of a flow (Song et al. 2023, Alg. 1, the MLGD-F code's 6-step sampler):
    at s_k = k / K jump to the endpoint y1 = z + (1 - s_k) v(z, s_k | x), then re-noise it to s_{k+1} with fresh
    noise, z = s_{k+1} y1 + (1 - s_{k+1}) noise_{k+1}; noise (N, K, d_y) in standardised units, returns y1 (N, d_y)."""
    steps = noise.shape[1]
    z = noise[:, 0]  # (N, d_y): s = 0 is pure noise
    for k in range(steps):
        s = k / steps
        y1 = z + (1 - s) * model.velocity(z, torch.full((z.shape[0],), s, device=z.device, dtype=z.dtype), features)
        if k + 1 < steps:
            z = (k + 1) / steps * y1 + (1 - (k + 1) / steps) * noise[:, k + 1]
    return y1


def load_prior(folder: str | Path) -> DiffusersPrior:
    """A prior checkpoint folder of the project's (model + scheduler + manifest) as a DiffusersPrior."""
    manifest = read_manifest(folder)
    if manifest.get("role") != "prior":
        raise InputError(f"{folder}: not a prior checkpoint (role {manifest.get('role')!r})")
    try:
        spec = DiffusersPriorSpec(diffusers=str(folder))
    except ValueError as exc:
        raise InputError(f"{folder}: {exc}") from None
    return load_diffusers_prior(spec, "cpu", str(folder))


def load_flow_model(
    folder: str | Path, dtype: str = "float32", device: torch.device | str = "cpu", field: str = "sampler"
) -> ConditionalVelocityModel:
    """A conditional rectified-flow model from a sampler checkpoint folder (weights checked against its manifest)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.get("role") != "sampler":
        raise InputError(f"{field}: {folder} is not a sampler checkpoint (role {manifest.get('role')!r})")
    torch_dtype = check_dtype_runs(dtype, torch.device(device), f"{field}.dtype")
    model = load_model(folder, None, torch_dtype, torch.device(device), field)
    if not isinstance(model, ConditionalVelocityModel):
        raise InputError(f"{field}: {folder} holds a {type(model).__name__}, not a ConditionalVelocityModel")
    return model


def load_sampler(folder: str | Path, num_steps: int) -> FlowSampler:
    """A FlowSampler with `num_steps` Euler steps from a checkpoint folder (safetensors weights)."""
    return FlowSampler(load_flow_model(folder, field=str(folder)), num_steps)
