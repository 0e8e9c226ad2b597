"""Counter-based random numbers: every chain owns a stream keyed by (seed, stream, step).

A chain's noise is a pure function of its seed and the step index, so its result does not
depend on which chains share its batch, how the batch is split, which device runs it, or
whether it was resumed from a checkpoint: the checkpoint needs no generator state.
"""

from __future__ import annotations

import functools
import math

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


def stream_keys(seeds: torch.Tensor, stream: int) -> torch.Tensor:
    """Each chain's key of one stream, (B,) int64 -> (B,): the part of the key that no step changes."""
    return _finalize(_finalize(seeds.to(torch.int64) + _GOLDEN) ^ _signed((stream + 1) * _GOLDEN))


def step_keys(keys: torch.Tensor, steps: torch.Tensor | int) -> torch.Tensor:
    """The keys of steps of a stream: keys (B,) and one step (-> (B,)) or steps (T,) (-> (T, B))."""
    if isinstance(steps, int):
        return _finalize(keys ^ _signed((steps + 1) * _MIX1))
    salt = (steps.to(torch.int64) + 1) * _MIX1  # (T,), wrapping int64 as the scalar form
    return _finalize(keys[None, :] ^ salt[:, None])


@functools.lru_cache(maxsize=32)
def _counters(numel: int, device: torch.device) -> torch.Tensor:
    """(1, numel): the counter part of each word, (k + 1) * golden."""
    return (torch.arange(1, numel + 1, dtype=torch.int64, device=device) * _GOLDEN)[None, :]


def bits_of(keys: torch.Tensor, numel: int) -> torch.Tensor:
    """Raw 64-bit words (B, numel) of step keys (B,)."""
    return _finalize(keys[:, None] + _counters(numel, keys.device))


def chain_bits(seeds: torch.Tensor, stream: int, step: int, numel: int) -> torch.Tensor:
    """Raw 64-bit words (B, numel) of each chain's stream at one step."""
    return bits_of(step_keys(stream_keys(seeds, stream), step), numel)


def uniform_of(bits: torch.Tensor) -> torch.Tensor:
    """Float64 uniforms in the open interval (0, 1) from the top 53 bits of each word."""
    return (_shift_right(bits, 11).to(torch.float64) + 0.5) * (1.0 / (1 << 53))


def chain_uniform(
    seeds: torch.Tensor, stream: int, step: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Uniforms in the open interval (0, 1), shape (B, *shape), from the top 53 bits."""
    uniform = uniform_of(chain_bits(seeds, stream, step, math.prod(shape)))
    return uniform.reshape(seeds.shape[0], *shape).to(dtype)


def chain_normal(
    seeds: torch.Tensor, stream: int, step: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Standard normals (B, *shape) by the inverse normal CDF of chain_uniform."""
    return torch.special.ndtri(chain_uniform(seeds, stream, step, shape)).to(dtype)


class ChainStreams:
    """Every chain's streams for one batch, with the keys that no step changes computed once: a draw is then one
    vectorised hash of its words (the same numbers as chain_uniform / chain_normal)."""

    def __init__(self, seeds: torch.Tensor) -> None:
        self.seeds = seeds.to(torch.int64)
        self._streams: dict[int, torch.Tensor] = {}  # stream -> (B,)
        self._steps: dict[int, torch.Tensor] = {}  # stream -> (T, B), the keys of steps 0..T-1

    def keys(self, stream: int, step: int) -> torch.Tensor:
        """The step's keys (B,) of a stream."""
        table = self._steps.get(stream)
        if table is not None and step < table.shape[0]:
            return table[step]
        return step_keys(self._stream(stream), step)

    def _stream(self, stream: int) -> torch.Tensor:
        """The stream's keys (B,), hashed on first use."""
        if stream not in self._streams:
            self._streams[stream] = stream_keys(self.seeds, stream)
        return self._streams[stream]

    def precompute(self, stream: int, steps: int) -> None:
        """The keys of steps 0..steps-1 of a stream, in one vectorised hash."""
        self._steps[stream] = step_keys(self._stream(stream), torch.arange(steps, device=self.seeds.device))

    def uniform(self, stream: int, step: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """(B, *shape) uniforms in (0, 1)."""
        words = bits_of(self.keys(stream, step), math.prod(shape))
        return uniform_of(words).reshape(self.seeds.shape[0], *shape).to(dtype)

    def normal(self, stream: int, step: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """(B, *shape) standard normals."""
        return torch.special.ndtri(self.uniform(stream, step, shape, torch.float64)).to(dtype)


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
