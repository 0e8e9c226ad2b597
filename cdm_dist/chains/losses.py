"""Matching losses between each chain's conditional samples and the target samples, batched over chains.

Every loss maps y (B, n, d) and target (m, d) or (B, m, d) to (B,), and is differentiable in y.

Configs: one LossSpec subclass per loss, with `name: Literal["its_name"] = "its_name"`, its own options, `base()`
(the loss as a function) and, if not 2, `min_samples`. Defining the class registers it; `LossConfig`, the union of
the registered losses discriminated on `name`, is built at the end of this module. So a new loss is one class here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

import torch
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, create_model

from cdm_dist.errors import InputError

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
UNION_TAG = "~"  # prefix of the tags of discriminated unions: not fields, so left out of error paths (config.parse)
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


def _batched_target(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Broadcast a shared target (m, d) to (B, m, d)."""
    return target.unsqueeze(0).expand(y.shape[0], -1, -1) if target.dim() == 2 else target


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||^2, a (B, n, d), b (B, m, d) -> (B, n, m), clamped at 0."""
    if a.shape[-1] == 1:
        return (a - b.transpose(-1, -2)) ** 2  # exact, and cheaper, in 1-D
    cross = a @ b.transpose(-1, -2)
    return ((a**2).sum(-1, keepdim=True) + (b**2).sum(-1).unsqueeze(-2) - 2 * cross).clamp_min(0)


def distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||, a (B, n, d), b (B, m, d) -> (B, n, m); the clamp keeps the gradient finite at 0."""
    return torch.sqrt(squared_distances(a, b).clamp_min(1e-30))


def _off_diagonal_mean(k: torch.Tensor) -> torch.Tensor:
    """Mean of k[b, i, j] over i != j, (B, n, n) -> (B,)."""
    n = k.shape[-1]
    return (k.sum((-1, -2)) - torch.diagonal(k, dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))


def kernel_scale(d_xy: torch.Tensor, d_xx: torch.Tensor, d_yy: torch.Tensor, bandwidth: str | float) -> torch.Tensor:
    """The RBF scale s (B,) in exp(-d^2 / s), detached: median of cross distances, mean of pooled ones, or 2 h^2."""
    if isinstance(bandwidth, float | int):
        return torch.full(d_xy.shape[:1], 2.0 * float(bandwidth) ** 2, dtype=d_xy.dtype, device=d_xy.device)
    with torch.no_grad():
        if bandwidth == "median":  # median heuristic on the cross distances (as the MLGD-F code)
            return d_xy.flatten(1).median(dim=1).values.clamp_min(1e-12)
        if bandwidth == "mean":  # mean pooled off-diagonal squared distance
            n, m = d_xx.shape[-1], d_yy.shape[-1]
            total = d_xx.sum((-1, -2)) + d_yy.sum((-1, -2)) + 2 * d_xy.sum((-1, -2))
            return (total / ((n + m) ** 2 - (n + m))).clamp_min(1e-12)
    raise InputError(f"loss.bandwidth: unknown {bandwidth!r}; expected 'median', 'mean' or a positive number")


def mmd2(
    y: torch.Tensor,
    target: torch.Tensor,
    bandwidth: str | float = "median",
    multipliers: Sequence[float] = (1.0,),
    unbiased: bool = True,
) -> torch.Tensor:
    """MMD² with the kernel Σ_j exp(-d² / (c_j s)) (Gretton et al. 2012); U-statistic if unbiased, else V."""
    t = _batched_target(y, target)
    d_xx, d_yy, d_xy = squared_distances(y, y), squared_distances(t, t), squared_distances(y, t)
    scale = kernel_scale(d_xy, d_xx, d_yy, bandwidth)[:, None, None]  # (B, 1, 1)

    def kernel(d: torch.Tensor) -> torch.Tensor:
        return sum(torch.exp(-d / (c * scale)) for c in multipliers)

    return mmd2_from_kernels(kernel(d_xx), kernel(d_yy), kernel(d_xy), unbiased)


def mmd2_from_kernels(k_xx: torch.Tensor, k_yy: torch.Tensor, k_xy: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """MMD² from kernel matrices (B, n, n), (B, m, m), (B, n, m) -> (B,): U-statistic if unbiased, else V."""
    within = _off_diagonal_mean if unbiased else lambda k: k.mean((-1, -2))
    return within(k_xx) + within(k_yy) - 2 * k_xy.mean((-1, -2))


def energy_distance(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (Székely & Rizzo 2013), within-sample terms as U-statistics."""
    t = _batched_target(y, target)
    d_yt, d_yy, d_tt = distances(y, t), distances(y, y), distances(t, t)  # (B, n, m), (B, n, n), (B, m, m)
    return 2 * d_yt.mean((-1, -2)) - _off_diagonal_mean(d_yy) - _off_diagonal_mean(d_tt)


def _quantiles(sorted_values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Linear-interpolated empirical quantiles along dim -2: (B, m, L) at levels (n,) -> (B, n, L)."""
    m = sorted_values.shape[-2]
    pos = (levels * m - 0.5).clamp(0, m - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp_max(m - 1)
    frac = (pos - lo).to(sorted_values.dtype)[:, None]
    return sorted_values[..., lo, :] * (1 - frac) + sorted_values[..., hi, :] * frac


def sliced_wasserstein(y: torch.Tensor, target: torch.Tensor, n_projections: int = 64, seed: int = 0) -> torch.Tensor:
    """Sliced W2² over fixed random directions (Rabin et al. 2011); unequal sizes matched by target quantiles."""
    t = _batched_target(y, target)
    d = y.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(d, n_projections, generator=gen, dtype=torch.float64)
    directions = (directions / directions.norm(dim=0, keepdim=True)).to(y)
    y_proj = torch.sort(y @ directions, dim=-2).values  # (B, n, L)
    t_proj = torch.sort(t @ directions, dim=-2).values  # (B, m, L)
    n = y.shape[1]
    if t_proj.shape[1] != n:
        levels = (torch.arange(n, dtype=torch.float64, device=y.device) + 0.5) / n
        t_proj = _quantiles(t_proj, levels)
    return ((y_proj - t_proj) ** 2).mean((-1, -2))


def log_mean_exp_loss(losses: torch.Tensor) -> torch.Tensor:
    """-log mean_j exp(-L_j) over guesses, (B, G) -> (B,) (loss-guided diffusion, Song et al. 2023)."""
    return -(torch.logsumexp(-losses, dim=-1) - math.log(losses.shape[-1]))


# -- configs: one class per loss ---------------------------------------------------------------------------

LOSSES: dict[str, type[LossSpec]] = {}  # name -> config class, filled by defining LossSpec subclasses


class LossSpec(BaseModel):
    """A matching loss's config; a subclass with `name: Literal["x"] = "x"` registers itself as loss "x"."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    sqrt: bool = False  # sqrt(max(L, 0) + 1e-8), as the MLGD-F code

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        field = cls.model_fields["name"]
        if get_origin(field.annotation) is not Literal:
            return  # shared options of several losses, no loss of its own
        (name,) = get_args(field.annotation)
        if field.default != name or name in LOSSES:
            raise TypeError(f"{cls.__name__}: needs name: Literal[{name!r}] = {name!r}, a name no other loss has")
        LOSSES[name] = cls

    @property
    def min_samples(self) -> int:
        """The fewest samples the loss takes on each side (n_c and the target batch): 2 for U-statistics."""
        return 2

    def base(self) -> Loss:
        """The loss itself, without the sqrt option or the sample-count check."""
        raise NotImplementedError

    def build(self) -> Loss:
        """The loss y (B, n, d), target (m, d) or (B, m, d) -> (B,), checking the sample counts."""
        base, least, sqrt, name = self.base(), self.min_samples, self.sqrt, self.name

        def loss(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            if min(y.shape[-2], target.shape[-2]) < least:
                raise InputError(f"loss: the {name} loss needs at least {least} samples on each side (n_c >= {least})")
            value = base(y, target)  # (B,)
            return torch.sqrt(value.clamp_min(0) + 1e-8) if sqrt else value

        return loss


class KernelOptions(LossSpec):
    """The kernel scale options of the MMD losses."""

    bandwidth: Literal["median", "mean"] | PositiveFloat = "median"  # a statistic of the distances, or h
    multipliers: list[PositiveFloat] = Field(default_factory=lambda: [1.0], min_length=1)  # multi-bandwidth mixture


class MMDLoss(KernelOptions):
    """MMD² with the RBF kernel Σ_j exp(-d² / (c_j s)), s from the bandwidth (2 h² for a number h)."""

    name: Literal["mmd"] = "mmd"
    unbiased: bool = True  # U-statistic MMD² (else V-statistic)

    @property
    def min_samples(self) -> int:
        return 2 if self.unbiased else 1

    def base(self) -> Loss:
        bandwidth, mults, unbiased = self.bandwidth, tuple(self.multipliers), self.unbiased
        return lambda y, t: mmd2(y, t, bandwidth, mults, unbiased)


class EnergyLoss(LossSpec):
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'|."""

    name: Literal["energy"] = "energy"

    def base(self) -> Loss:
        return energy_distance


class SlicedWassersteinLoss(LossSpec):
    """Sliced W2² over fixed random directions."""

    name: Literal["sliced_wasserstein"] = "sliced_wasserstein"
    n_projections: Annotated[int, Field(ge=1)] = 64  # directions

    @property
    def min_samples(self) -> int:
        return 1

    def base(self) -> Loss:
        n_projections = self.n_projections
        return lambda y, t: sliced_wasserstein(y, t, n_projections)


class MMDLaplaceLoss(KernelOptions):
    """MMD² (U-statistic) with the Laplace kernel Σ_j exp(-||a-b|| / (c_j s)), s from the bandwidth (h for a number)."""

    name: Literal["mmd_laplace"] = "mmd_laplace"

    def base(self) -> Loss:
        bandwidth, mults = self.bandwidth, tuple(self.multipliers)

        def loss(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            t = _batched_target(y, target)
            d_xx, d_yy, d_xy = distances(y, y), distances(t, t), distances(y, t)  # (B, n, n), (B, m, m), (B, n, m)
            fixed = not isinstance(bandwidth, str)
            scale = d_xy.new_full(d_xy.shape[:1], bandwidth) if fixed else kernel_scale(d_xy, d_xx, d_yy, bandwidth)
            k = [sum(torch.exp(-d / (c * scale[:, None, None])) for c in mults) for d in (d_xx, d_yy, d_xy)]
            return mmd2_from_kernels(*k, unbiased=True)

        return loss


def loss_union() -> Any:
    """The registered losses as a union discriminated on `name` ("mmd" when left out); an unknown name fails at
    `name`, listing the known ones."""
    names = tuple(LOSSES)
    unknown = create_model("UnknownLoss", __config__=ConfigDict(extra="allow"), name=(Literal[names], ...))

    def tag(data: Any) -> str | None:
        name = data.get("name", "mmd") if isinstance(data, dict) else getattr(data, "name", None)
        return None if name is None else f"{UNION_TAG}{name if name in LOSSES else '?'}"

    members = [Annotated[cls, Tag(f"{UNION_TAG}{name}")] for name, cls in LOSSES.items()]
    return Annotated[
        Union[(*members, Annotated[unknown, Tag(f"{UNION_TAG}?")])],
        Discriminator(tag, custom_error_type="loss", custom_error_message=f"expected a mapping with a name in {names}"),
    ]


if TYPE_CHECKING:
    LossConfig = LossSpec
else:
    LossConfig = loss_union()  # every loss defined above; define new losses before this line
