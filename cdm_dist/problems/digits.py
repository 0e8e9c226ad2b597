"""Rotated digits: the MLGD-F paper's MNIST-rotation experiment on scikit-learn's 8x8 digits (no download).

X = a digit upsampled to 12x12, zero-padded to 16x16 (so rotation never crops it) and rotated by
theta ~ U[0, 2 pi), pixel values in [-1, 1] (background -1). Y = (cos theta, sin theta).
"""

from __future__ import annotations

import math
from functools import cache

import torch

from cdm_dist.errors import InputError

SIZE = 16
TARGETS = ("uniform", "bimodal", "unimodal")
TARGET_SPREAD = 0.15  # radians: the width of the bimodal and unimodal targets' modes


@cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    return images, torch.tensor(data.target)


@cache
def base_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Upright digits in [0, 1] (N, 1, 16, 16) and labels (N,); every 10th digit is held out (cached: read-only)."""
    images, labels = _digits()
    if split not in ("train", "heldout", "all"):
        raise InputError(f"digits split: unknown {split!r}; expected train, heldout or all")
    index = torch.arange(len(images))
    keep = index % 10 != 0 if split == "train" else index % 10 == 0 if split == "heldout" else index >= 0
    big = torch.nn.functional.interpolate(images[keep], size=(12, 12), mode="bilinear", align_corners=False)
    return torch.nn.functional.pad(big, (2, 2, 2, 2)).clamp(0, 1), labels[keep]


def rotate(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotate images (N, C, H, W) in [0, 1] counter-clockwise by theta (N,) radians about the centre (bilinear)."""
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(cos)
    # grid_sample maps output to input coordinates, so the matrix is the inverse (transpose) rotation;
    # image rows grow downwards, which flips the sign of the angle in (x, y) pixel coordinates.
    matrix = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)  # (N, 2, 3)
    grid = torch.nn.functional.affine_grid(matrix.to(images), list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> [-1, 1], the prior's space."""
    return images * 2 - 1


def from_model_space(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] pixels, clamped."""
    return ((x + 1) / 2).clamp(0, 1)


def angle_of(y: torch.Tensor) -> torch.Tensor:
    """(cos, sin) (..., 2) -> theta in [0, 2 pi) (...)."""
    return torch.atan2(y[..., 1], y[..., 0]) % (2 * math.pi)


def rotated_batch(n: int, generator: torch.Generator, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """n random digits at random angles: x (n, 1, 16, 16) in [-1, 1], y = (cos, sin) (n, 2)."""
    images, _ = base_digits(split)
    index = torch.randint(len(images), (n,), generator=generator)
    theta = 2 * math.pi * torch.rand(n, generator=generator)
    x = to_model_space(rotate(images[index], theta))
    return x, torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)


def target_angles(kind: str, n: int, seed: int) -> torch.Tensor:
    """Angles of the digits experiment's targets: uniform on the circle, modes at 0 and pi, or one at 0, (n,)."""
    if kind not in TARGETS:
        raise InputError(f"digits target: unknown {kind!r}; expected one of {list(TARGETS)}")
    gen = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return 2 * math.pi * torch.rand(n, generator=gen, dtype=torch.float64)
    theta = TARGET_SPREAD * torch.randn(n, generator=gen, dtype=torch.float64)
    if kind == "bimodal":
        theta = theta + math.pi * torch.randint(2, (n,), generator=gen)
    return theta % (2 * math.pi)


def target_samples(kind: str, n: int, seed: int) -> torch.Tensor:
    """Target samples on the circle: (n, 2) = (cos theta, sin theta)."""
    theta = target_angles(kind, n, seed)
    return torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
