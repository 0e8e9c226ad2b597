"""Counter-based random numbers: every chain owns a stream keyed by (seed, stream, step).

A chain's noise is a pure function of its seed and the step index, so its result does not
depend on which chains share its batch, how the batch is split, which device runs it, or
whether it was resumed from a checkpoint: the checkpoint needs no generator state.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """The int64 two's-complement view of an unsigned 64-bit constant."""
    value &= _MASK64
    return value - (1 << 64) if value >= (1 << 63) else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _finalize(z: torch.Tensor) -> torch.Tensor:
    """The splitmix64 output function (Steele, Lea & Flood 2014), wrapping int64 arithmetic."""
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def _key(seeds: torch.Tensor, stream: int, step: int) -> torch.Tensor:
    """One 64-bit key per chain from (seed, stream, step); seeds: (B,) int64 -> (B,)."""
    key = _finalize(seeds + _GOLDEN)
    key = _finalize(key ^ _signed((stream + 1) * _GOLDEN))
    return _finalize(key ^ _signed((step + 1) * _MIX1))


def chain_bits(seeds: torch.Tensor, stream: int, step: int, numel: int) -> torch.Tensor:
    """Raw 64-bit words (B, numel) of each chain's stream at one step."""
    key = _key(seeds.to(torch.int64), stream, step)  # (B,)
    counter = torch.arange(1, numel + 1, dtype=torch.int64, device=seeds.device) * _GOLDEN
    return _finalize(key[:, None] + counter[None, :])  # (B, numel)


def chain_uniform(
    seeds: torch.Tensor, stream: int, step: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Uniforms in the open interval (0, 1), shape (B, *shape), from the top 53 bits."""
    numel = 1
    for size in shape:
        numel *= size
    words = _shift_right(chain_bits(seeds, stream, step, numel), 11)  # (B, numel) in [0, 2^53)
    uniform = (words.to(torch.float64) + 0.5) * (1.0 / (1 << 53))
    return uniform.reshape(seeds.shape[0], *shape).to(dtype)


def chain_normal(
    seeds: torch.Tensor, stream: int, step: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Standard normals (B, *shape) by the inverse normal CDF of chain_uniform."""
    return torch.special.ndtri(chain_uniform(seeds, stream, step, shape)).to(dtype)


class Stream:
    """Names of the per-chain random streams, so no two uses of noise ever collide."""

    INIT = 0  # x_T
    REVERSE = 1  # the stochastic part of each reverse step
    SAMPLER = 2  # eta for the conditional sampler, per step
    GUESS = 3  # perturbations of the loss-guided-diffusion guesses
    TARGET_BATCH = 4  # which target samples a step sees
    SELECT = 5  # eta for selection among candidates (CDMO, best-of-N)
    EVAL = 6  # eta for the final held-out evaluation
    REFINE = 7  # eta for the CDMO refinement
    DFLOW = 8  # eta for D-Flow's fixed objective
    PRIOR_FIT = 9  # the noise of the prior-fit score (shared by every chain)
    SOURCE = 10  # ε of an editing chain's noised source
    EVALUATE = 11  # eta of `cdm evaluate`'s fresh samples (one stream for every design)
