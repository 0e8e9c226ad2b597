"""The fast conditional sampler: a noisy projectile. x = a launch design in standard units, y = (range, height) in m.

cdm-dist's sampler contract: sample(x (B, 2), eta (B, n_c, 2)) -> y (B, n_c, 2), differentiable in x."""

from __future__ import annotations

import math

import torch

from cdm_dist import ConditionalSampler

G = 9.81
ANGLE_CENTER, ANGLE_SCALE = 45.0, 15.0  # degrees: x[0] = (angle - 45) / 15
SPEED_CENTER, SPEED_SCALE = 12.0, 1.2  # m/s: x[1] = (speed - 12) / 1.2


def to_physical(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Angle (radians) and speed (m/s) of designs x (..., 2)."""
    angle = torch.deg2rad(ANGLE_CENTER + ANGLE_SCALE * x[..., 0])
    return angle, SPEED_CENTER + SPEED_SCALE * x[..., 1]


def to_design(angle_deg: float, speed: float) -> torch.Tensor:
    """The design x of a launch angle (degrees) and speed (m/s)."""
    return torch.tensor([(angle_deg - ANGLE_CENTER) / ANGLE_SCALE, (speed - SPEED_CENTER) / SPEED_SCALE])


class ProjectileSampler(ConditionalSampler):
    """Range v² sin(2θ)/g and apex height v² sin²θ/(2g), each scaled by (1 + gust · eta) for gusty wind."""

    def __init__(self, gust: float = 0.05) -> None:
        self.gust = gust
        self.y_dim, self.noise_shape, self.x_shape = 2, (2,), (2,)

    def sample(self, x: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        angle, speed = to_physical(x)  # (B,)
        reach = speed**2 * torch.sin(2 * angle) / G
        apex = speed**2 * torch.sin(angle) ** 2 / (2 * G)
        clean = torch.stack([reach, apex], dim=-1)[:, None]  # (B, 1, 2)
        return clean * (1 + self.gust * eta)  # (B, n_c, 2)


def make_sampler(gust: float = 0.05) -> ProjectileSampler:
    """The factory a problem spec names: sampler: {factory: "own_models.simulator:make_sampler"}."""
    return ProjectileSampler(gust)


def degrees(x: torch.Tensor) -> list[tuple[float, float]]:
    """(angle in degrees, speed in m/s) of designs x (N, 2), for printing."""
    angle, speed = to_physical(x)
    return [(round(math.degrees(a), 1), round(s, 2)) for a, s in zip(angle.tolist(), speed.tolist(), strict=True)]
