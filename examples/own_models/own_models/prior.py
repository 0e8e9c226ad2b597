"""The prior's network: a residual MLP over 2-D launch designs, as a diffusers ModelMixin so that save_pretrained /
from_pretrained (config.json + safetensors) work and cdm-dist's diffusers adapter can load it by class name."""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class PointDenoiser(ModelMixin, ConfigMixin):
    """v̂(x_t, t) for x in R^dim (trained with v-prediction: v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x0)."""

    @register_to_config
    def __init__(self, dim: int = 2, width: int = 128, depth: int = 3, num_train_timesteps: int = 1000) -> None:
        super().__init__()
        self.inp = nn.Linear(dim + 32, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU())
                                    for _ in range(depth))  # fmt: skip
        self.out = nn.Linear(width, dim)

    def forward(self, x_t: torch.Tensor, timestep: int | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=x_t.device, dtype=x_t.dtype).expand(x_t.shape[0])
        t = t / self.config.num_train_timesteps
        freqs = torch.exp(torch.arange(16, device=x_t.device, dtype=x_t.dtype) * -math.log(1000) / 16)
        angles = 1000 * t[:, None] * freqs  # (N, 16)
        h = self.inp(torch.cat([x_t, torch.cos(angles), torch.sin(angles)], dim=1))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)
