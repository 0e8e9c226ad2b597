"""The target distribution G(Y): a set of samples S_G, optionally with a sampler for fresh held-out draws."""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cdm_dist.errors import InputError

TargetSampler = Callable[[int, int], torch.Tensor]  # (n, seed) -> (n, d_y)
HELDOUT_ROWS = 10_000  # a sample set's rows in held-out losses and pictures; a larger set is subsampled


def subsample(samples: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    """At most `rows` of the samples (m, d): all of them when m <= rows, else rows distinct ones drawn with the seed,
    in their order in the set."""
    m = samples.shape[0]
    if m <= rows:
        return samples
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(m, generator=generator)[:rows].sort().values
    return samples[index.to(samples.device)]


def check_samples(samples: torch.Tensor, source: str) -> torch.Tensor:
    """Validate a (m, d_y) sample matrix: real, 2-D, at least 2 rows, finite."""
    if samples.is_complex():
        raise InputError(f"{source}: target samples must be real numbers; got dtype {samples.dtype}")
    if samples.dim() == 1:
        samples = samples[:, None]
    if samples.dim() != 2:
        raise InputError(f"{source}: target samples must be (m, d_y); got shape {tuple(samples.shape)}")
    if samples.shape[0] < 2 or samples.shape[1] < 1:
        raise InputError(f"{source}: need at least 2 target samples of dimension >= 1; got {tuple(samples.shape)}")
    if not torch.isfinite(samples).all():
        bad = int((~torch.isfinite(samples)).any(1).sum())
        raise InputError(f"{source}: target samples contain NaN or Inf ({bad} rows)")
    return samples


@dataclass(frozen=True)
class Target:
    """Samples S_G (m, d_y) of the target G(Y); `sampler` draws fresh ones for held-out evaluation."""

    samples: torch.Tensor
    sampler: TargetSampler | None = None
    source: str = "target"

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", check_samples(self.samples, self.source))

    @property
    def dim(self) -> int:
        return self.samples.shape[1]

    def heldout(self, n: int, seed: int) -> torch.Tensor:
        """n fresh samples from G when a sampler exists, else the sample set (m, d_y), at most HELDOUT_ROWS of it:
        the held-out loss's within-target block grows as m², so a larger set is subsampled (seeded)."""
        if self.sampler is None:
            return subsample(self.samples, HELDOUT_ROWS, seed)
        return check_samples(self.sampler(n, seed).to(self.samples), f"{self.source} sampler")

    @classmethod
    def from_sampler(cls, sampler: TargetSampler, m: int, seed: int, source: str = "target sampler") -> Target:
        """S_G = m draws of the sampler with the given seed."""
        return cls(sampler(m, seed), sampler, source)

    @classmethod
    def from_file(cls, path: str | Path) -> Target:
        """Load S_G from .npy, .csv (numbers only, optional header) or .safetensors (one tensor)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: target file not found")
        suffix = path.suffix.lower()
        try:
            if suffix == ".npy":
                array = np.load(path, allow_pickle=False)
            elif suffix == ".csv":
                array = _read_csv(path)
            elif suffix == ".safetensors":
                from safetensors.torch import load_file

                tensors = load_file(str(path))
                if len(tensors) != 1:
                    raise InputError(f"{path}: expected one tensor in the safetensors file; found {sorted(tensors)}")
                array = next(iter(tensors.values())).numpy()
            else:
                raise InputError(f"{path}: unknown target format {suffix!r}; expected .npy, .csv or .safetensors")
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{path}: cannot read target samples ({exc})") from exc
        if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
            raise InputError(f"{path}: target samples must be real numbers; got dtype {array.dtype}")
        return cls(torch.as_tensor(np.asarray(array, dtype=np.float64)), None, str(path))


def _read_csv(path: Path) -> np.ndarray:
    with path.open(newline="") as handle:
        rows = [row for row in csv.reader(handle) if row]
    if rows and not _is_numeric(rows[0]):
        rows = rows[1:]
    for line, row in enumerate(rows, start=1):
        if not _is_numeric(row):
            raise InputError(f"{path}: row {line} is not all numbers: {row}")
    widths = {len(r) for r in rows}
    if len(widths) > 1:
        raise InputError(f"{path}: rows have different lengths {sorted(widths)}")
    return np.array([[float(v) for v in r] for r in rows], dtype=np.float64)


def _is_numeric(row: list[str]) -> bool:
    try:
        [float(v) for v in row]
    except ValueError:
        return False
    return True
