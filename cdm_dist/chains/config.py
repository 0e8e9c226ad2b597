"""Typed, validated configs for the chain loop; bad values fail up front with the field named."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cdm_dist.chains.losses import UNION_TAG, LossConfig, MMDLoss  # LossConfig: the union of the losses' configs
from cdm_dist.errors import InputError

Finite = Annotated[float, Field(allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class StrictModel(BaseModel):
    """Frozen, no unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ZetaConfig(StrictModel):
    """A chain's guidance step sizes zeta_t over the reverse steps."""

    # ζ_t over progress p = i / (steps - 1) from 0 (step 0, t = T) to 1: constant s; linear s((1 - p) + f p); cosine
    # s(f + (1 - f)(1 + cos πp) / 2); power s(f + (1 - f)(1 - p)^power); inv_sqrt_alpha s / sqrt(1 - β_t); rt s r_t;
    # cdms from beta (s, f ignored)
    kind: Literal["constant", "linear", "cosine", "power", "inv_sqrt_alpha", "rt", "cdms"] = "constant"
    scale: NonNegative = 1.0  # s: ζ_t at step 0, t = T (constant, linear, cosine, power), else a factor; cdms: unused
    final: NonNegative = 1.0  # f = ζ_end / ζ_start, a ratio, not an end value (linear, cosine, power; others: unused)
    power: Positive = 1.0  # exponent of the power kind
    beta: NonNegative | None = None  # CDMS inverse temperature β of P(x) exp(-β L) (kind 'cdms', which needs it)
    normalize: bool = False  # step along grad / ||grad||: ζ_t is then a step length in x
    trust_radius: Positive | None = None  # clip the step ||ζ_t grad|| to trust_radius sqrt(1 - ᾱ_t); null: no clip

    @model_validator(mode="after")
    def _beta_for_cdms(self) -> ZetaConfig:
        if self.kind == "cdms" and self.beta is None:
            raise ValueError("kind 'cdms' needs beta (the CDMS inverse temperature)")
        if self.kind == "cdms" and self.normalize:
            raise ValueError("kind 'cdms' fixes the step from beta; normalize must be false")
        return self


class MLGDConfig(StrictModel):
    """MLGD / MLGD-F hyper-parameters shared by every chain of a batch (MLGD-F Alg. 1 + 2)."""

    num_steps: Annotated[int, Field(ge=1)] = 100  # reverse diffusion steps over x (at most the prior's timesteps)
    eta: Fraction = 0.0  # DDIM's eta (reverse-step noise σ_t, Song et al. 2021): 0 = deterministic DDIM, 1 = DDPM
    # eta of the unguided steps after the last guided one (the clean-up): fresh noise there lets the prior wash out
    # what guidance left off its manifold; null: eta
    cleanup_eta: Fraction | None = None
    n_c: Annotated[int, Field(ge=1)] = 250  # n_c: conditional samples y ~ f(x̂0, η) per chain, guess and step
    n_guess: Annotated[int, Field(ge=1)] = 3  # LGD guesses x̂0 + r_t ξ per step; the loss is -log mean exp(-L) of them
    # the guesses' radius r_t: step_beta r_t = β_t / sqrt(1 + β_t²) (MLGD-F code), or posterior
    # r_t = guess_scale sqrt(1 - ᾱ_t), LGD's posterior-std radius for data of std guess_scale
    guess_radius: Literal["step_beta", "posterior"] = "step_beta"
    guess_scale: Positive = 1.0  # the data's std in guess_radius 'posterior' (step_beta: unused)
    target_batch: Annotated[int, Field(ge=2)] = 250  # target samples per chain, guess and step (all when fewer)
    loss: LossConfig = MMDLoss()  # the matching loss D(P(Y|X=x), G): one of cdm_dist.chains.losses.LOSSES by name
    grad: Literal["full", "identity"] = "full"  # dL/dx_t through Tweedie and the prior, or d x̂0/d x_t = I
    guidance: bool = True  # False: the prior alone, no gradient requests (SDEdit variations, plain prior samples)
    guidance_start: Fraction = 0.0  # step i is guided when guidance_start <= i / num_steps < guidance_stop
    guidance_stop: Fraction = 1.0  # fraction of the steps after which guidance stops (see guidance_start)
    # a guidance window in the prior's timesteps: steps at t < guidance_min_t are unguided, so the last steps only
    # clean x up (the MLGD-F code's uniform digits target: t < 250 of 1000); 0: every step, as start/stop allow
    guidance_min_t: Annotated[int, Field(ge=0)] = 0
    common_random_numbers: bool = False  # the same η, guesses' ξ and target batch at every step (step 0's)
    init: Literal["noise", "zero"] = "noise"  # x_T ~ N(0, I), or 0 as the MLGD-F code
    refine_steps: Annotated[int, Field(ge=0)] = 0  # CDMO (β → ∞): Adam steps on L(x0) after the chain, fresh η each
    refine_lr: Positive = 0.02  # Adam's learning rate of the refine_steps
    eval_samples: Annotated[int, Field(ge=2)] | None = None  # samples of y and target of final_loss; null: 4 n_c
    eval_seed: int = 20260517  # seed of the held-out target draw shared by all chains (and of prior_fit)
    # of the chain's maths (x, ζ_t, losses); weights keep theirs; float64 for exact references
    dtype: Literal["float64", "float32"] = "float32"

    @model_validator(mode="after")
    def _consistent(self) -> MLGDConfig:
        if self.guidance_start >= self.guidance_stop:
            raise ValueError(
                f"guidance_start ({self.guidance_start}) must be below guidance_stop ({self.guidance_stop})"
            )
        if self.n_c < self.loss.min_samples:
            raise ValueError(f"n_c = {self.n_c}: the {self.loss.name} loss needs n_c >= {self.loss.min_samples}")
        return self

    @property
    def heldout_samples(self) -> int:
        return self.eval_samples or 4 * self.n_c


M = TypeVar("M", bound=BaseModel)


def is_field(part: str | int) -> bool:
    """Whether a part of a pydantic error location is a field name or list index, not a union member's label
    (e.g. "~diffusers", "literal['auto','off']", "constrained-float")."""
    return isinstance(part, int) or (
        not part.startswith(UNION_TAG) and part.isidentifier() and part not in ("float", "int", "str", "bool")
    )


def parse(model: type[M], data: Any, source: str = "config") -> M:
    """Validate data into a config, turning the first error into one InputError naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        field, message = ".".join(str(p) for p in error["loc"] if is_field(p)), error["msg"]
        named = re.match(r"Value error, ([A-Za-z_][\w.]*): (.*)", message, re.S)
        if not field and named:  # a check across sections names its field itself
            field, message = named.groups()
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise InputError(f"{source}: {field or '(top level)'}: {message}{more}") from None
