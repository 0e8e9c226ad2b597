"""Matching losses between each chain's conditional samples and the target samples, batched over chains.

Every loss maps y (B, n, d) and target (m, d) or (B, m, d) to (B,), and is differentiable in y.

Configs: one LossSpec subclass per loss, with `name: Literal["its_name"] = "its_name"`, its own options, `base()`
(the loss as a function) and, if not 2, `min_samples`. Defining the class registers it; `LossConfig`, the union of
the registered losses discriminated on `name`, is built at the end of this module. So a new loss is one class here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import torch
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, create_model

from cdm_dist.chains.numerics import floored_exp, floored_exp_
from cdm_dist.errors import InputError

PAIR_CHUNK = 1 << 22  # most kernel entries of the target block evaluated at once


@dataclass(frozen=True)
class PreparedTarget:
    """Target samples with a loss's target-only terms (the target-target block), computed once per target batch and
    detached: the gradient never needs them, and their value only enters the reported loss and the guesses'
    log-mean-exp weights."""

    samples: torch.Tensor  # (m, d) shared by every row of y, or (B, m, d) one batch per row
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # each (1, ...) when shared, else (B, ...)

    @property
    def size(self) -> int:
        """m, the target samples per row."""
        return self.samples.shape[-2]


Loss = Callable[[torch.Tensor, "torch.Tensor | PreparedTarget"], torch.Tensor]
UNION_TAG = "~"  # prefix of the tags of discriminated unions: not fields, so left out of error paths (config.parse)
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


def _per_row(target: torch.Tensor) -> torch.Tensor:
    """A shared target (m, d) as one row (1, m, d); a per-row target (B, m, d) as it is."""
    return target.unsqueeze(0) if target.dim() == 2 else target


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||^2, a (B, n, d), b (B, m, d) or (m, d) -> (B, n, m), clamped at 0."""
    if a.shape[-1] == 1:
        return (a - b.transpose(-1, -2)) ** 2  # exact, and cheaper, in 1-D
    cross = a @ b.transpose(-1, -2)
    return ((a**2).sum(-1, keepdim=True) + (b**2).sum(-1).unsqueeze(-2) - 2 * cross).clamp_min(0)


def distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||, a (B, n, d), b (B, m, d) or (m, d) -> (B, n, m); the clamp keeps the gradient finite at 0."""
    return torch.sqrt(squared_distances(a, b).clamp_min(1e-30))


@functools.lru_cache(maxsize=8)
def _upper_pairs(m: int, device: torch.device) -> torch.Tensor:
    """The index pairs i < j of m samples, (2, m(m-1)/2)."""
    return torch.triu_indices(m, m, offset=1, device=device)


@torch.no_grad()
def target_pairs(target: torch.Tensor, power: int) -> torch.Tensor:
    """The target's within-sample squared distances (power 2) or distances (power 1), target (m, d) or (B, m, d):
    in low dimensions its pairs i < j, (1 or B, m(m-1)/2), from the differences themselves (exact, and half the
    full block); else its full blocks (1 or B, m, m) with a zero diagonal."""
    t = _per_row(target)
    m, d = t.shape[-2:]
    if d <= 4:
        first, second = _upper_pairs(m, t.device)
        pairs = t.new_empty(t.shape[0], first.shape[0])  # (P, K), filled in chunks of rows: small temporaries
        chunk = max(1, PAIR_CHUNK // max(first.shape[0] * d, 1))
        for lo in range(0, t.shape[0], chunk):
            rows = t[lo : lo + chunk]
            if d == 1:
                flat = rows[..., 0]  # (rows, m): index_select along the last dim is the fast gather
                torch.sub(flat.index_select(-1, first), flat.index_select(-1, second), out=pairs[lo : lo + chunk])
            else:
                diff = rows.index_select(-2, first) - rows.index_select(-2, second)  # (rows, K, d)
                torch.sum(diff.square_(), -1, out=pairs[lo : lo + chunk])
        pairs = pairs.square_() if d == 1 else pairs
    else:
        pairs = squared_distances(t, t)  # (P, m, m)
        pairs.diagonal(dim1=-2, dim2=-1).zero_()
    return pairs if power == 2 else pairs.sqrt_()  # no gradient flows here, so sqrt(0) = 0 needs no clamp


def _pair_sum(pairs: torch.Tensor) -> torch.Tensor:
    """Σ_{i<j} of a sample's pair values, from its pairs (1, K) or its block (B, m, m) -> (1 or B,)."""
    return pairs.sum(-1) if pairs.dim() == 2 else pairs.sum((-1, -2)) / 2


def _off_diagonal_mean(k: torch.Tensor) -> torch.Tensor:
    """Mean of k[b, i, j] over i != j, (B, n, n) -> (B,)."""
    n = k.shape[-1]
    return (k.sum((-1, -2)) - torch.diagonal(k, dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))


@torch.no_grad()
def within_kernel_mean(
    pairs: torch.Tensor, m: int, scale: torch.Tensor, multipliers: Sequence[float], unbiased: bool
) -> torch.Tensor:
    """Mean kernel Σ_j exp(-v / (c_j s)) over a sample's pairs i != j (unbiased) or all (i, j) (biased), from its
    target_pairs (1, K) or (B, m, m) and one scale per row s (B,) -> (B,); chunked over rows."""
    rows, size = scale.shape[0], pairs[0].numel()
    chunk = max(1, PAIR_CHUNK // max(size, 1))
    total = torch.zeros_like(scale)
    for c in multipliers:
        for lo in range(0, rows, chunk):
            hi = min(rows, lo + chunk)
            v = pairs if pairs.shape[0] == 1 else pairs[lo:hi]
            coef = (-1.0 / (c * scale[lo:hi])).view(-1, *[1] * (pairs.dim() - 1))
            total[lo:hi] += floored_exp_(torch.mul(v, coef)).flatten(1).sum(-1)
    if pairs.dim() == 3:  # a block: both orders of each pair, and its zero diagonal, exp(0) = 1 once per multiplier
        total = (total - m * len(multipliers)) / 2
    if unbiased:
        return 2 * total / (m * (m - 1))
    return (2 * total + m * len(multipliers)) / (m * m)  # the diagonal


def kernel_scale(
    d_xy: torch.Tensor, d_xx: torch.Tensor, target_terms: dict[str, torch.Tensor], m: int, bandwidth: str | float
) -> torch.Tensor:
    """The kernel scale s (B,) in exp(-v / s), detached: the median of the cross values v, the mean of the pooled
    off-diagonal ones (the target's Σ_{i<j} from its terms), the target's own (from its terms), or a fixed number
    (already a scale)."""
    if isinstance(bandwidth, float | int):
        return torch.full(d_xy.shape[:1], float(bandwidth), dtype=d_xy.dtype, device=d_xy.device)
    if bandwidth == "target":
        return target_terms["scale"].expand(d_xy.shape[0])
    target_pair_sum = target_terms.get("pair_sum")
    with torch.no_grad():
        if bandwidth == "median":  # median heuristic on the cross values (as the MLGD-F code)
            return d_xy.flatten(1).median(dim=1).values.clamp_min(1e-12)
        if bandwidth == "mean" and target_pair_sum is not None:
            pooled = d_xx.shape[-1] + m
            total = d_xx.sum((-1, -2)) + 2 * target_pair_sum + 2 * d_xy.sum((-1, -2))
            return (total / (pooled**2 - pooled)).clamp_min(1e-12)
    raise InputError(f"loss.bandwidth: unknown {bandwidth!r}; expected 'median', 'mean', 'target' or a positive number")


def kernel_target_terms(
    target: torch.Tensor, bandwidth: str | float, multipliers: Sequence[float], unbiased: bool, power: int
) -> dict[str, torch.Tensor]:
    """The target's terms of a kernel MMD: with a scale that does not depend on y (a number, or 'target': the mean
    of the target's own off-diagonal values, as the MLGD-F code's mixtures) the within-target kernel mean ('within',
    and that 'scale'); else its pair values ('pairs') and, for the mean heuristic, their sum ('pair_sum')."""
    pairs = target_pairs(target, power)  # (P, K)
    m = target.shape[-2]
    if bandwidth == "target":
        scale = (2 * _pair_sum(pairs) / (m * (m - 1))).clamp_min(1e-12)  # (P,)
        return {"within": within_kernel_mean(pairs, m, scale, multipliers, unbiased), "scale": scale}
    if isinstance(bandwidth, str):
        return {"pairs": pairs, "pair_sum": _pair_sum(pairs)}
    scale = pairs.new_full((pairs.shape[0],), float(bandwidth))
    return {"within": within_kernel_mean(pairs, m, scale, multipliers, unbiased)}


def kernel_mmd2(
    y: torch.Tensor,
    target: PreparedTarget,
    bandwidth: str | float,
    multipliers: Sequence[float],
    unbiased: bool,
    power: int,
) -> torch.Tensor:
    """MMD² with the kernel Σ_j exp(-v / (c_j s)), v the squared distance (power 2, RBF) or the distance (power 1,
    Laplace) (Gretton et al. 2012); U-statistic if unbiased, else V. y (B, n, d) -> (B,); the target block comes
    prepared."""
    pair = squared_distances if power == 2 else distances
    d_xx, d_xy = pair(y, y), pair(y, target.samples)  # (B, n, n), (B, n, m)
    m = target.size
    scale = kernel_scale(d_xy, d_xx, target.terms, m, bandwidth)  # (B,)
    if "within" in target.terms:
        within_t = target.terms["within"].expand(y.shape[0])
    else:
        within_t = within_kernel_mean(target.terms["pairs"], m, scale, multipliers, unbiased)  # (B,)
    scale = scale[:, None, None]
    k_xx = sum(floored_exp(-d_xx / (c * scale)) for c in multipliers)
    k_xy = sum(floored_exp(-d_xy / (c * scale)) for c in multipliers)
    within_y = _off_diagonal_mean(k_xx) if unbiased else k_xx.mean((-1, -2))
    return within_y + within_t - 2 * k_xy.mean((-1, -2))


def _rbf_bandwidth(bandwidth: str | float) -> str | float:
    """The RBF scale of a bandwidth h, 2 h²; a heuristic's name as it is."""
    return bandwidth if isinstance(bandwidth, str) else 2.0 * float(bandwidth) ** 2


def mmd2(
    y: torch.Tensor,
    target: torch.Tensor,
    bandwidth: str | float = "median",
    multipliers: Sequence[float] = (1.0,),
    unbiased: bool = True,
) -> torch.Tensor:
    """MMD² with the RBF kernel Σ_j exp(-d² / (c_j s)), s = 2 h² or a heuristic; y (B, n, d), target (m, d) or
    (B, m, d) -> (B,)."""
    scale = _rbf_bandwidth(bandwidth)
    terms = kernel_target_terms(target, scale, multipliers, unbiased, power=2)
    return kernel_mmd2(y, PreparedTarget(target, terms), scale, multipliers, unbiased, power=2)


def energy_target_terms(target: torch.Tensor) -> dict[str, torch.Tensor]:
    """The energy distance's target term: the mean distance between the target's samples, i != j."""
    m = target.shape[-2]
    return {"within": 2 * _pair_sum(target_pairs(target, power=1)) / (m * (m - 1))}


def energy_distance(y: torch.Tensor, target: torch.Tensor | PreparedTarget) -> torch.Tensor:
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (Székely & Rizzo 2013), within-sample terms as U-statistics."""
    if not isinstance(target, PreparedTarget):
        target = PreparedTarget(target, energy_target_terms(target))
    d_yt, d_yy = distances(y, target.samples), distances(y, y)  # (B, n, m), (B, n, n)
    return 2 * d_yt.mean((-1, -2)) - _off_diagonal_mean(d_yy) - target.terms["within"]


def _quantiles(sorted_values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Linear-interpolated empirical quantiles along dim -2: (B, m, L) at levels (n,) -> (B, n, L)."""
    m = sorted_values.shape[-2]
    pos = (levels * m - 0.5).clamp(0, m - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp_max(m - 1)
    frac = (pos - lo).to(sorted_values.dtype)[:, None]
    return sorted_values[..., lo, :] * (1 - frac) + sorted_values[..., hi, :] * frac


def projection_directions(d: int, n_projections: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    """Fixed random unit directions (d, L) of the sliced Wasserstein loss, in like's dtype and device."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(d, n_projections, generator=gen, dtype=torch.float64)
    return (directions / directions.norm(dim=0, keepdim=True)).to(like)


@torch.no_grad()
def sliced_target_terms(target: torch.Tensor, n_projections: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The sliced Wasserstein loss's target terms: its directions and the target's sorted projections (1 or B, m, L)."""
    directions = projection_directions(target.shape[-1], n_projections, seed, target)
    return {"directions": directions, "sorted": torch.sort(_per_row(target) @ directions, dim=-2).values}


def sliced_wasserstein(
    y: torch.Tensor, target: torch.Tensor | PreparedTarget, n_projections: int = 64, seed: int = 0, p: int = 2
) -> torch.Tensor:
    """Sliced W_p^p over fixed random directions (Rabin et al. 2011): p = 2 the sliced W2², p = 1 the sliced W1 of the
    MLGD-F code (mean |difference| of sorted projections); unequal sizes matched by target quantiles, (B,)."""
    if not isinstance(target, PreparedTarget):
        target = PreparedTarget(target, sliced_target_terms(target, n_projections, seed))
    y_proj = torch.sort(y @ target.terms["directions"], dim=-2).values  # (B, n, L)
    t_proj = target.terms["sorted"]  # (1 or B, m, L)
    n = y.shape[1]
    if t_proj.shape[1] != n:
        levels = (torch.arange(n, dtype=torch.float64, device=y.device) + 0.5) / n
        t_proj = _quantiles(t_proj, levels)
    gap = y_proj - t_proj  # (B, n, L)
    return (gap.abs() if p == 1 else gap**2).mean((-1, -2))


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

    def target_terms(self, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss's terms that depend on the target alone, target (m, d) or (B, m, d); none by default."""
        return {}

    def prepare(self, target: torch.Tensor | PreparedTarget) -> PreparedTarget:
        """The target with its terms computed: once per target batch, then reused by every call."""
        if isinstance(target, PreparedTarget):
            return target
        if target.shape[-2] < self.min_samples:
            raise InputError(
                f"loss: the {self.name} loss needs at least {self.min_samples} samples on each side "
                f"(n_c >= {self.min_samples})"
            )
        return PreparedTarget(target, self.target_terms(target))

    def base(self) -> Callable[[torch.Tensor, PreparedTarget], torch.Tensor]:
        """The loss itself on a prepared target, without the sqrt option or the sample-count check."""
        raise NotImplementedError

    def build(self) -> Loss:
        """The loss y (B, n, d), target (m, d), (B, m, d) or prepared -> (B,), checking the sample counts."""
        base, least, sqrt, name = self.base(), self.min_samples, self.sqrt, self.name

        def loss(y: torch.Tensor, target: torch.Tensor | PreparedTarget) -> torch.Tensor:
            if y.shape[-2] < least:
                raise InputError(f"loss: the {name} loss needs at least {least} samples on each side (n_c >= {least})")
            value = base(y, self.prepare(target))  # (B,)
            return torch.sqrt(value.clamp_min(0) + 1e-8) if sqrt else value

        return loss


class KernelOptions(LossSpec):
    """The kernel scale options of the MMD losses."""

    # the median of the cross distances, the mean of the pooled ones, the mean of the target's own (fixed per target
    # batch: the MLGD-F code's mixtures), or h
    bandwidth: Literal["median", "mean", "target"] | PositiveFloat = "median"
    multipliers: list[PositiveFloat] = Field(default_factory=lambda: [1.0], min_length=1)  # c_j of the kernel mixture

    power: ClassVar[int] = 2  # the kernel of v = distance**power

    @property
    def u_statistic(self) -> bool:
        """Whether the within-sample means leave out i = j (the U-statistic MMD²)."""
        return True

    @property
    def scale(self) -> str | float:
        """The bandwidth as the kernel's scale s in exp(-v / s), or the heuristic's name."""
        return self.bandwidth

    def target_terms(self, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return kernel_target_terms(target, self.scale, self.multipliers, self.u_statistic, self.power)

    def base(self) -> Callable[[torch.Tensor, PreparedTarget], torch.Tensor]:
        scale, mults, unbiased, power = self.scale, tuple(self.multipliers), self.u_statistic, self.power
        return lambda y, t: kernel_mmd2(y, t, scale, mults, unbiased, power)


class MMDLoss(KernelOptions):
    """MMD² with the RBF kernel Σ_j exp(-d² / (c_j s)), s from the bandwidth (2 h² for a number h)."""

    name: Literal["mmd"] = "mmd"
    unbiased: bool = True  # U-statistic MMD² (else V-statistic)

    @property
    def min_samples(self) -> int:
        return 2 if self.unbiased else 1

    @property
    def u_statistic(self) -> bool:
        return self.unbiased

    @property
    def scale(self) -> str | float:
        return _rbf_bandwidth(self.bandwidth)


class EnergyLoss(LossSpec):
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'|."""

    name: Literal["energy"] = "energy"

    def target_terms(self, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return energy_target_terms(target)

    def base(self) -> Callable[[torch.Tensor, PreparedTarget], torch.Tensor]:
        return energy_distance


class SlicedWassersteinLoss(LossSpec):
    """Sliced W_p^p over fixed random directions (p = 1: the MLGD-F code's loss, with 50 directions)."""

    name: Literal["sliced_wasserstein"] = "sliced_wasserstein"
    n_projections: Annotated[int, Field(ge=1)] = 64  # random directions projected on
    p: Literal[1, 2] = 2  # 2: sliced W2² (mean squared gap of sorted projections); 1: sliced W1, the MLGD-F code's

    @property
    def min_samples(self) -> int:
        return 1

    def target_terms(self, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return sliced_target_terms(target, self.n_projections)

    def base(self) -> Callable[[torch.Tensor, PreparedTarget], torch.Tensor]:
        p = self.p
        return lambda y, t: sliced_wasserstein(y, t, p=p)


class MMDLaplaceLoss(KernelOptions):
    """MMD² (U-statistic) with the Laplace kernel Σ_j exp(-||a-b|| / (c_j s)), s from the bandwidth (h for a number)."""

    name: Literal["mmd_laplace"] = "mmd_laplace"
    power: ClassVar[int] = 1


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
