"""Networks as diffusers ModelMixin + ConfigMixin: save_pretrained writes config JSON + safetensors.

- MLPNoiseModel: ε̂(x_t, t) for vector priors, with the input scaled to unit variance at every noise level and
  (preconditioning "edm") a Gaussian skip connection.
- ConditionalVelocityModel: v(y_s, s | x) of a conditional rectified flow (Liu et al. 2023), conditioned on a
  vector x through an MLP or on an image x through a small convolutional encoder.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

PRECONDITIONINGS = ("none", "edm")


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Transformer-style features of a scalar per row: t (N,) -> (N, dim)."""
    half = dim // 2
    dtype = t.dtype if t.is_floating_point() else torch.float32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    angles = t.to(dtype)[:, None] * freqs[None]  # (N, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class ResidualBlock(nn.Module):
    """x + W2 silu(W1 LayerNorm(x) + e): a pre-norm residual MLP block with an additive embedding."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.inner = nn.Linear(width, width)
        self.outer = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return h + self.outer(nn.functional.silu(self.inner(self.norm(h)) + embedding))


class ResidualMLP(nn.Module):
    """in_dim -> width -> blocks (each seeing the embedding) -> out_dim."""

    def __init__(self, in_dim: int, out_dim: int, width: int, blocks: int, embed_dim: int) -> None:
        super().__init__()
        self.inp = nn.Linear(in_dim, width)
        self.embed = nn.Sequential(nn.Linear(embed_dim, width), nn.SiLU(), nn.Linear(width, width * blocks))
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, out_dim))

    def forward(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.inp(h)
        for block, e in zip(self.blocks, self.embed(embedding).chunk(len(self.blocks), dim=-1), strict=True):
            h = block(h, e)
        return self.out(h)


class MLPNoiseModel(ModelMixin, ConfigMixin):
    """ε̂(x_t, t) for x in R^dim from a residual MLP F of h = c_in (x_t - sqrt(ᾱ_t) μ), c_in = 1/sqrt(ᾱ_t σ² + 1 - ᾱ_t).

    preconditioning "none": ε̂ = F. "edm" (Karras et al. 2022, in ε form): x̂0 = μ + c_skip (x_t/sqrt(ᾱ_t) - μ)
    + c_out F, i.e. ε̂ = c_in (sqrt(1 - ᾱ_t) h - sqrt(ᾱ_t) σ F): the exact ε of N(μ, diag σ²) plus a residual
    whose error in x̂0 stays below σ |ΔF| at every noise level, where plain ε-prediction divides it by sqrt(ᾱ_t)."""

    @register_to_config
    def __init__(
        self,
        dim: int = 1,
        width: int = 128,
        blocks: int = 3,
        embed_dim: int = 64,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        data_mean: list[float] | None = None,
        data_std: list[float] | None = None,
        preconditioning: str = "none",
    ) -> None:
        super().__init__()
        if preconditioning not in PRECONDITIONINGS:
            raise ValueError(f"preconditioning: unknown {preconditioning!r}; expected one of {PRECONDITIONINGS}")
        alphas = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule).alphas_cumprod
        self.register_buffer("alphas_cumprod", alphas.float(), persistent=False)
        self.register_buffer("center", torch.tensor(data_mean or [0.0] * dim), persistent=False)
        self.register_buffer("scale", torch.tensor(data_std or [1.0] * dim), persistent=False)
        self.net = ResidualMLP(dim, dim, width, blocks, embed_dim)

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor | int) -> torch.Tensor:
        """x_t (N, dim), timestep () or (N,) training-grid indices -> ε̂ (N, dim)."""
        t = torch.as_tensor(timestep, device=x_t.device).expand(x_t.shape[0])
        alpha_bar = self.alphas_cumprod[t.long()][:, None]  # (N, 1)
        c_in = torch.rsqrt(alpha_bar * self.scale**2 + 1 - alpha_bar)  # (N, dim)
        h = c_in * (x_t - alpha_bar.sqrt() * self.center)
        time = t.to(self.alphas_cumprod.dtype) * 1000 / self.config.num_train_timesteps
        residual = self.net(h, sinusoidal_embedding(time, self.config.embed_dim))
        if self.config.preconditioning == "none":
            return residual
        return c_in * ((1 - alpha_bar).sqrt() * h - alpha_bar.sqrt() * self.scale * residual)

    def loss_weight(self, timestep: torch.Tensor) -> torch.Tensor:
        """Per-coordinate weight on ||ε̂ - ε||² that makes it ||F - F_target||² (EDM's λ), timestep (N,) -> (N, dim)."""
        alpha_bar = self.alphas_cumprod[timestep.long()][:, None]  # (N, 1)
        if self.config.preconditioning == "none":
            return torch.ones_like(alpha_bar).expand(-1, self.config.dim)
        return (alpha_bar * self.scale**2 + 1 - alpha_bar) / (alpha_bar * self.scale**2)


class ConvEncoder(nn.Module):
    """A small CNN: images (N, C, H, W) -> features (N, width); two stride-2 stages then global pooling."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(128 * 4, width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConditionalVelocityModel(ModelMixin, ConfigMixin):
    """v(y_s, s | x) of a conditional rectified flow from N(0, I) (s = 0) to P(Y | X = x) (s = 1).

    x is a vector (x_shape = [d_x]) fed to the MLP with y, or an image (x_shape = [C, H, W]) encoded by a CNN.
    y is standardised by data_mean / data_std inside, so the flow runs on unit-scale data.
    """

    @register_to_config
    def __init__(
        self,
        x_shape: list[int] | None = None,
        y_dim: int = 1,
        width: int = 128,
        blocks: int = 3,
        embed_dim: int = 64,
        encoder_width: int = 128,
        x_mean: list[float] | None = None,
        x_std: list[float] | None = None,
        y_mean: list[float] | None = None,
        y_std: list[float] | None = None,
    ) -> None:
        super().__init__()
        x_shape = list(x_shape or [1])
        self.image = len(x_shape) == 3
        x_features = encoder_width if self.image else x_shape[0]
        self.encoder = ConvEncoder(x_shape[0], encoder_width) if self.image else None
        x_event = 1 if self.image else x_shape[0]
        self.register_buffer("x_center", torch.tensor(x_mean or [0.0] * x_event), persistent=False)
        self.register_buffer("x_scale", torch.tensor(x_std or [1.0] * x_event), persistent=False)
        self.register_buffer("y_center", torch.tensor(y_mean or [0.0] * y_dim), persistent=False)
        self.register_buffer("y_scale", torch.tensor(y_std or [1.0] * y_dim), persistent=False)
        self.net = ResidualMLP(y_dim + x_features, y_dim, width, blocks, embed_dim)

    def condition(self, x: torch.Tensor) -> torch.Tensor:
        """Features of x: (N, *x_shape) -> (N, F); compute once per x and reuse over flow steps and samples."""
        if self.image:
            return self.encoder((x - self.x_center) / self.x_scale)
        return (x - self.x_center) / self.x_scale

    def velocity(self, z: torch.Tensor, s: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """In standardised units: z (N, y_dim), s (N,), features (N, F) -> dz/ds (N, y_dim)."""
        embedding = sinusoidal_embedding(s * 1000, self.config.embed_dim)
        return self.net(torch.cat([z, features], dim=-1), embedding)

    def forward(self, z: torch.Tensor, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """z (N, y_dim) standardised flow state, s (N,) in [0, 1], x (N, *x_shape) -> velocity (N, y_dim)."""
        return self.velocity(z, s, self.condition(x))

    def to_data(self, z: torch.Tensor) -> torch.Tensor:
        """Standardised y -> data units."""
        return z * self.y_scale + self.y_center

    def to_standard(self, y: torch.Tensor) -> torch.Tensor:
        """Data-unit y -> standardised."""
        return (y - self.y_center) / self.y_scale
