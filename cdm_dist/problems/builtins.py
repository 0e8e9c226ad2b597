"""CDM problems: a prior, fast and full-chain conditional samplers, a target, and exact metrics where known.

The Gaussian-mixture suite follows the MLGD-F paper's synthetic benchmark: X = the first d-1 coordinates,
Y = the last, target G = P(Y | X = x*) of the joint itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import torch
from pydantic import Field

from cdm_dist.chains.mixtures import ConditionalMixture, GaussianMixture, l2_squared
from cdm_dist.chains.mlgd import MetricsFn
from cdm_dist.chains.priors import GaussianMixturePrior
from cdm_dist.chains.samplers import MixtureDiffusionSampler, MixtureInverseCDFSampler
from cdm_dist.chains.targets import Target
from cdm_dist.errors import InputError
from cdm_dist.models.spec import CDMProblem, ProblemConfig, read_json

BUILTIN_PROBLEMS: dict[str, Callable[..., Any]] = {}  # name -> recipe, filled by @builtin_problem below
Recipe = TypeVar("Recipe", bound=Callable[..., Any])


def builtin_problem(function: Recipe) -> Recipe:
    """Register a built-in problem under its function's name (a decorator)."""
    BUILTIN_PROBLEMS[function.__name__] = function
    return function


# -- the joints ---------------------------------------------------------------------------------------------

# Means and shared covariance of the 2D_cond_1D benchmark (benchmarks/reference/gmm_2d_cond_1d.json).
_MEANS_2D = [[-5, 5], [-5, -5], [5, 3], [5, -1], [0, -3], [-2, 4], [-2, -3], [1, 2], [-8, 1], [7, 5], [0, -5]]
_COV_2D = [[0.5, 0.195], [0.195, 0.2]]


def joint_2d() -> tuple[GaussianMixture, torch.Tensor]:
    """The paper's 2D joint (11 components) and x* = -5."""
    means = torch.tensor(_MEANS_2D, dtype=torch.float64)
    covs = torch.tensor(_COV_2D, dtype=torch.float64).expand(len(_MEANS_2D), 2, 2).clone()
    weights = torch.full((len(_MEANS_2D),), 1 / len(_MEANS_2D), dtype=torch.float64)
    return GaussianMixture(weights, means, covs), torch.tensor([-5.0], dtype=torch.float64)


RANDOM_TARGET_MIN_WEIGHT = 0.001  # 5D/10D targets drop conditional components below this weight
WELL_POSED_WEIGHT = 0.2  # each target mode carries at least this weight ...
WELL_POSED_VARIANCE = (0.05, 5.0)  # ... and a variance in this range (the 2D reference: 0.5 / 0.5, 0.124)


def joint_random(
    dim: int, seed: int, components: int = 4, min_distance: float = 5.0
) -> tuple[GaussianMixture, torch.Tensor]:
    """The paper's recipe for 5D/10D: means 5 N(0, I) kept >= min_distance apart (1000 tries each),
    covariances A Aᵀ + 1e-4 I with A standard normal, equal weights; two components then share their
    x-part, which is x*, so P(Y | X = x*) has two modes.

    With A square, the conditional variance of Y is about chi-squared with one degree of freedom, so some draws
    give a mode of variance 1e-3: a spike whose l2_gmm (its own ∫p² is above 1) no sample-based method resolves.
    Draws are repeated from the same generator until the target is well posed (`_well_posed`)."""
    gen = torch.Generator().manual_seed(seed)
    for _draw in range(100):
        joint, x_star = draw_joint(dim, components, min_distance, gen)
        conditional = joint.condition(list(range(dim - 1)), [dim - 1])
        if _well_posed(conditional_target(conditional, x_star, RANDOM_TARGET_MIN_WEIGHT)):
            return joint, x_star
    raise ValueError(f"joint_random: no well-posed {dim}D joint in 100 draws from seed {seed}")


def _well_posed(target: GaussianMixture) -> bool:
    """Two modes, each of weight >= WELL_POSED_WEIGHT and variance within WELL_POSED_VARIANCE, whose means lie at
    least 2 (std_1 + std_2) apart (so the target is bimodal, as in 2D)."""
    if len(target.weights) != 2 or not bool((target.weights >= WELL_POSED_WEIGHT).all()):
        return False
    low, high = WELL_POSED_VARIANCE
    variances = target.covs[:, 0, 0]
    if not bool(((variances >= low) & (variances <= high)).all()):
        return False
    return float((target.means[0, 0] - target.means[1, 0]).abs()) >= 2 * float(variances.sqrt().sum())


def draw_joint(
    dim: int, components: int, min_distance: float, gen: torch.Generator
) -> tuple[GaussianMixture, torch.Tensor]:
    """One draw of the recipe: the joint and x* (the x-part two components share)."""
    means: list[torch.Tensor] = []
    for _ in range(components):
        for _attempt in range(1000):
            candidate = 5 * torch.randn(dim, generator=gen, dtype=torch.float64)
            if all((candidate - m).norm() >= min_distance for m in means):
                break
        means.append(candidate)
    a = torch.randn(components, dim, dim, generator=gen, dtype=torch.float64)
    covs = a @ a.transpose(1, 2) + 1e-4 * torch.eye(dim, dtype=torch.float64)
    first, second = torch.randperm(components, generator=gen)[:2].tolist()
    means_t = torch.stack(means)
    means_t[second, :-1] = means_t[first, :-1]
    weights = torch.full((components,), 1 / components, dtype=torch.float64)
    return GaussianMixture(weights, means_t, covs), means_t[first, :-1].clone()


def conditional_target(conditional: ConditionalMixture, x_star: torch.Tensor, min_weight: float) -> GaussianMixture:
    """P(Y | X = x*) without components below min_weight, renormalised (as the paper's code)."""
    full = conditional.mixture_at(x_star)
    keep = full.weights >= min_weight
    return GaussianMixture(full.weights[keep] / full.weights[keep].sum(), full.means[keep], full.covs[keep])


# -- the problems: parts shared by the exact and learned variants --------------------------------------------

GMM_PROBLEMS = {"gmm2d": 2, "gmm5d": 5, "gmm10d": 10}


@dataclass(frozen=True)
class MixtureProblem:
    """A Gaussian-mixture CDM problem's closed-form pieces."""

    name: str
    joint: GaussianMixture
    x_star: torch.Tensor  # (d - 1,)
    conditional: ConditionalMixture  # Y given X
    target: GaussianMixture  # P(Y | X = x*) without negligible components
    min_weight: float
    joint_seed: int | None

    @property
    def x_coords(self) -> list[int]:
        return list(range(self.joint.dim - 1))


@functools.lru_cache(maxsize=8)
def mixture_problem(name: str, joint_seed: int = 1) -> MixtureProblem:
    """The joint, x*, the conditional and the target of a mixture benchmark (cached: every part shares them)."""
    if name not in GMM_PROBLEMS:
        raise InputError(f"problem: unknown {name!r}; expected one of {sorted(GMM_PROBLEMS)}")
    dim = GMM_PROBLEMS[name]
    if dim == 2:
        joint, x_star = joint_2d()
        min_weight = 0.01
    else:
        joint, x_star = joint_random(dim, joint_seed)
        min_weight = RANDOM_TARGET_MIN_WEIGHT
    conditional = joint.condition(list(range(dim - 1)), [dim - 1])
    target = conditional_target(conditional, x_star, min_weight)
    return MixtureProblem(name, joint, x_star, conditional, target, min_weight, None if dim == 2 else joint_seed)


def gmm_prior(name: str, joint_seed: int = 1) -> GaussianMixturePrior:
    """The exact prior: the X marginal of the joint."""
    mix = mixture_problem(name, joint_seed)
    return GaussianMixturePrior(mix.joint.marginal(mix.x_coords))


def gmm_fast_sampler(name: str, joint_seed: int = 1) -> MixtureInverseCDFSampler:
    """The exact one-step conditional sampler (MLGD-F)."""
    return MixtureInverseCDFSampler(mixture_problem(name, joint_seed).conditional)


def gmm_full_sampler(name: str, joint_seed: int = 1, steps: int = 100) -> MixtureDiffusionSampler:
    """The exact full-chain conditional sampler (MLGD)."""
    return MixtureDiffusionSampler(mixture_problem(name, joint_seed).conditional, steps)


def gmm_target(name: str, joint_seed: int = 1, target_size: int = 1000, target_seed: int = 0) -> Target:
    """S_G: target_size draws of P(Y | X = x*), with fresh held-out draws on demand."""
    mixture = mixture_problem(name, joint_seed).target

    def draw(n: int, seed: int) -> torch.Tensor:
        return mixture.sample(n, torch.Generator().manual_seed(seed))

    return Target.from_sampler(draw, target_size, target_seed, source=f"{name} target")


def gmm_metrics(name: str, joint_seed: int = 1) -> MetricsFn:
    """The closed-form metrics: l2_gmm = ∫ (p(y | x) - g(y))² dy and x_err = |x - x*|."""
    mix = mixture_problem(name, joint_seed)

    def metrics(x: torch.Tensor) -> dict[str, torch.Tensor]:
        x64 = x.detach().to(torch.float64).cpu()
        l2 = torch.stack([l2_squared(mix.conditional.mixture_at(xi), mix.target) for xi in x64])
        return {"l2_gmm": l2, "x_err": (x64 - mix.x_star).norm(dim=1)}

    return metrics


def gmm_params(name: str, joint_seed: int = 1, target_size: int = 1000, target_seed: int = 0) -> dict[str, Any]:
    """The problem's parameters, saved next to benchmark results."""
    mix = mixture_problem(name, joint_seed)
    return {
        "problem": name,
        "x_coords": mix.x_coords,
        "y_coords": [mix.joint.dim - 1],
        "joint": _mixture_json(mix.joint),
        "x_star": mix.x_star.tolist(),
        "target": _mixture_json(mix.target),
        "target_min_weight": mix.min_weight,
        "joint_seed": mix.joint_seed,
        "target_size": target_size,
        "target_seed": target_seed,
    }


# -- the registered built-ins: cheap recipes that return parts (each worker builds only its role's) ------------

SHIPPED_CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"  # <problem>/{prior,sampler}/
PositiveInt = Annotated[int, Field(ge=1)]
# learned fast sampler: Euler steps of the flow, its one-step distillation, or the flow re-noised at each step
SamplerKind = Literal["flow", "one_step", "consistency"]


def checkpoints_folder(checkpoints: str | None, problem: str) -> Path:
    """The learned models' folder (prior/ and sampler/): the one given, else the problem's shipped one."""
    return Path(checkpoints) if checkpoints else SHIPPED_CHECKPOINTS / problem


def checked_checkpoints(checkpoints: str | None, problem: str, x_shape: tuple[int, ...], y_dim: int) -> Path:
    """The learned models' folder, checked from their configs against the problem's shapes."""
    folder = checkpoints_folder(checkpoints, problem)
    if not folder.is_dir():
        raise InputError(f"checkpoints: {folder} is not a folder")
    configs = {}
    for role in ("prior", "sampler"):
        try:
            configs[role] = read_json(folder / role / "config.json", f"not a diffusers folder for the {role}")
        except InputError as exc:
            raise InputError(f"checkpoints: {exc}") from None
    prior = configs["prior"]
    size = prior.get("sample_size")
    prior_shape = (prior["dim"],) if "dim" in prior else (prior.get("in_channels"), size, size)
    sampler_shape = tuple(configs["sampler"].get("x_shape") or [1])
    if prior_shape != x_shape or sampler_shape != x_shape or configs["sampler"].get("y_dim") != y_dim:
        raise InputError(
            f"checkpoints: {folder} does not hold models for {problem} (prior x {list(prior_shape)}, sampler "
            f"x {list(sampler_shape)} and y_dim {configs['sampler'].get('y_dim')}; expected x {list(x_shape)}, "
            f"y_dim {y_dim})"
        )
    return folder


def fast_sampler_part(folder: Path, kind: str, fast_steps: int | None) -> dict[str, Any]:
    """The fast sampler of a learned problem: the flow (default 8 Euler steps) or its one-step distillation."""
    if kind == "one_step":
        if fast_steps not in (None, 1):
            raise InputError(f"fast_steps: the one-step sampler takes 1 step, got {fast_steps} (or use flow)")
        return {"flow": str(folder / "sampler_one_step"), "steps": 1}
    if kind == "consistency":  # the flow sampled consistency-style, re-noised at each of its steps (default 6)
        return {"flow": str(folder / "sampler"), "steps": fast_steps or 6, "renoise": True}
    return {"flow": str(folder / "sampler"), "steps": fast_steps or 8}


def learned_parts(folder: Path, kind: str, fast_steps: int | None, full_chain_steps: int) -> dict[str, Any]:
    """A learned problem's models: the prior, the fast sampler and the full-chain flow."""
    return {
        "prior": {"diffusers": str(folder / "prior")},
        "sampler": fast_sampler_part(folder, kind, fast_steps),
        "full_sampler": {"flow": str(folder / "sampler"), "steps": full_chain_steps},
    }


def mixture_recipe(name: str, summary: str) -> Callable[..., ProblemConfig]:
    """The registered built-in of a mixture benchmark, named `name`: its parts, with exact or learned models."""

    def recipe(
        models: Literal["exact", "learned"] = "exact",
        checkpoints: str | None = None,
        fast_steps: PositiveInt | None = None,
        full_chain_steps: PositiveInt = 100,
        sampler_kind: SamplerKind = "flow",
        joint_seed: int = 1,
        target_size: PositiveInt = 1000,
        target_seed: int = 0,
    ) -> ProblemConfig:
        if checkpoints is not None and models != "learned":
            raise InputError("checkpoints: only used with models: learned")
        if sampler_kind != "flow" and models != "learned":
            raise InputError("sampler_kind: only used with models: learned (the exact sampler is exact)")
        if models == "learned" and joint_seed != 1:
            raise InputError("joint_seed: learned mixture models are trained on joint seed 1")
        mixture = {"name": name, "joint_seed": joint_seed}
        target = {"factory": gmm_target, "args": mixture | {"target_size": target_size, "target_seed": target_seed}}
        if models == "learned":
            folder = checked_checkpoints(checkpoints, name, (GMM_PROBLEMS[name] - 1,), 1)
            parts = learned_parts(folder, sampler_kind, fast_steps, full_chain_steps)
        else:
            parts = {
                "prior": {"factory": gmm_prior, "args": mixture},
                "sampler": {"factory": gmm_fast_sampler, "args": mixture},
                "full_sampler": {"factory": gmm_full_sampler, "args": mixture | {"steps": full_chain_steps}},
            }
        metrics = {"factory": gmm_metrics, "args": mixture}
        return ProblemConfig.model_validate(parts | {"target": target, "metrics": metrics})

    recipe.__name__ = recipe.__qualname__ = name
    recipe.__doc__ = summary
    return builtin_problem(recipe)


gmm2d = mixture_recipe("gmm2d", "The paper's 2D Gaussian mixture (X 1-D, Y 1-D), target P(Y | X = -5).")
gmm5d = mixture_recipe("gmm5d", "The paper's 5D recipe (X 4-D, Y 1-D), seeded by joint_seed.")
gmm10d = mixture_recipe("gmm10d", "The paper's 10D recipe (X 9-D, Y 1-D), seeded by joint_seed.")


def rotation_target(
    target: Literal["uniform", "bimodal", "unimodal"] = "uniform", target_size: int = 1000, target_seed: int = 0
) -> Target:
    """Rotation angles on the circle as (cos, sin): uniform, bimodal (0 and pi) or unimodal (0)."""
    from cdm_dist.problems.digits import target_samples

    draw = lambda n, seed: target_samples(target, n, seed)  # noqa: E731
    return Target.from_sampler(draw, target_size, target_seed, source=f"digits {target} target")


@builtin_problem
def digits(
    models: Literal["learned"] = "learned",
    checkpoints: str | None = None,
    fast_steps: PositiveInt | None = None,
    full_chain_steps: PositiveInt = 32,
    sampler_kind: SamplerKind = "flow",
    digits_target: Literal["uniform", "bimodal", "unimodal"] = "uniform",
    target_size: PositiveInt = 1000,
    target_seed: int = 0,
) -> ProblemConfig:
    """Rotated digits (MLGD-F paper, Exp. 1): x = a 16x16 image, Y = (cos, sin) of its rotation, G on the circle."""
    from cdm_dist.problems.digits import SIZE

    folder = checked_checkpoints(checkpoints, "digits", (1, SIZE, SIZE), 2)
    target = {"target": digits_target, "target_size": target_size, "target_seed": target_seed}
    parts = learned_parts(folder, sampler_kind, fast_steps, full_chain_steps)
    return ProblemConfig.model_validate(parts | {"target": {"factory": rotation_target, "args": target}})


ScribblesTarget = Literal["balanced", "skewed", "colour_interpolation", "background_interpolation"]


@builtin_problem
def scribbles(
    checkpoints: str | None = None,
    scribbles_target: ScribblesTarget = "balanced",
    target_size: PositiveInt = 1000,
    target_seed: int = 0,
) -> ProblemConfig:
    """Editing scribbles (MLGD-F paper, Exp. 2 at small scale): x = a 32x32 scribble under a pixel prior, a one-step
    ControlNet generator renders it red or blue on a light or dark background, y = an embedding of the image."""
    from cdm_dist.problems.scribbles import problem_parts

    folder = checkpoints_folder(checkpoints, "scribbles")
    if not folder.is_dir():
        raise InputError(f"checkpoints: {folder} is not a folder")
    return ProblemConfig.model_validate(problem_parts(folder, scribbles_target, target_size, target_seed))


# -- eager problems (benchmarks, tests and the Python API) -----------------------------------------------------


def gmm_problem(
    name: str, target_size: int = 1000, target_seed: int = 0, joint_seed: int = 1, full_chain_steps: int = 100
) -> CDMProblem:
    """A Gaussian-mixture CDM problem with exact prior, exact samplers and the closed-form l2_gmm metric."""
    mix = mixture_problem(name, joint_seed)
    return CDMProblem(
        name=name,
        prior=gmm_prior(name, joint_seed),
        fast_sampler=gmm_fast_sampler(name, joint_seed),
        full_sampler=gmm_full_sampler(name, joint_seed, full_chain_steps),
        target=gmm_target(name, joint_seed, target_size, target_seed),
        metrics=gmm_metrics(name, joint_seed),
        x_star=mix.x_star,
        x_star_unique=mix.joint.dim == 2,
        params=gmm_params(name, joint_seed, target_size, target_seed),
    )


def _mixture_json(m: GaussianMixture) -> dict[str, list]:
    return {"weights": m.weights.tolist(), "means": m.means.tolist(), "covs": m.covs.tolist()}
