"""CDM problems: a prior, fast and full-chain conditional samplers, a target, and exact metrics where known.

The Gaussian-mixture suite follows the MLGD-F paper's synthetic benchmark: X = the first d-1 coordinates,
Y = the last, target G = P(Y | X = x*) of the joint itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cdm_dist.errors import InputError
from cdm_dist.mixtures import ConditionalMixture, GaussianMixture, l2_squared
from cdm_dist.mlgd import MetricsFn
from cdm_dist.priors import DiffusionPrior, GaussianMixturePrior
from cdm_dist.samplers import ConditionalSampler, MixtureDiffusionSampler, MixtureInverseCDFSampler
from cdm_dist.targets import Target


@dataclass
class CDMProblem:
    """Everything a campaign needs about one problem."""

    name: str
    prior: DiffusionPrior
    fast_sampler: ConditionalSampler  # MLGD-F
    full_sampler: ConditionalSampler | None  # MLGD
    target: Target
    metrics: MetricsFn | None = None  # exact metrics per chain, x (B, *event) -> name -> (B,)
    x_star: torch.Tensor | None = None
    x_star_unique: bool = False
    params: dict[str, Any] = field(default_factory=dict)  # what to save next to results

    def sampler(self, method: str) -> ConditionalSampler:
        """The inner sampler a method uses: 'mlgd' the full chain, every other the fast one."""
        if method == "mlgd":
            if self.full_sampler is None:
                raise InputError(f"problem {self.name}: no full-chain sampler, so method 'mlgd' is unavailable")
            return self.full_sampler
        return self.fast_sampler


# -- the joints ---------------------------------------------------------------------------------------------

# Means and shared covariance of the 2D_cond_1D benchmark (shared/reference/gmm_2d_cond_1d.json).
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
        joint, x_star = _draw_joint(dim, components, min_distance, gen)
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


def _draw_joint(
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


# -- the problems -------------------------------------------------------------------------------------------

GMM_PROBLEMS = {"gmm2d": 2, "gmm5d": 5, "gmm10d": 10}


def gmm_problem(
    name: str, target_size: int = 1000, target_seed: int = 0, joint_seed: int = 1, full_chain_steps: int = 100
) -> CDMProblem:
    """A Gaussian-mixture CDM problem with exact prior, exact samplers and the closed-form l2_gmm metric."""
    if name not in GMM_PROBLEMS:
        raise InputError(f"problem: unknown {name!r}; expected one of {sorted(GMM_PROBLEMS)}")
    dim = GMM_PROBLEMS[name]
    if dim == 2:
        joint, x_star = joint_2d()
        min_weight = 0.01
    else:
        joint, x_star = joint_random(dim, joint_seed)
        min_weight = RANDOM_TARGET_MIN_WEIGHT
    x_coords, y_coords = list(range(dim - 1)), [dim - 1]
    conditional = joint.condition(x_coords, y_coords)
    target_mixture = conditional_target(conditional, x_star, min_weight)

    def draw_target(n: int, seed: int) -> torch.Tensor:
        return target_mixture.sample(n, torch.Generator().manual_seed(seed))

    def metrics(x: torch.Tensor) -> dict[str, torch.Tensor]:
        x64 = x.detach().to(torch.float64).cpu()
        l2 = torch.stack([l2_squared(conditional.mixture_at(xi), target_mixture) for xi in x64])
        return {"l2_gmm": l2, "x_err": (x64 - x_star).norm(dim=1)}

    params = {
        "problem": name,
        "x_coords": x_coords,
        "y_coords": y_coords,
        "joint": _mixture_json(joint),
        "x_star": x_star.tolist(),
        "target": _mixture_json(target_mixture),
        "target_min_weight": min_weight,
        "joint_seed": None if dim == 2 else joint_seed,
        "target_size": target_size,
        "target_seed": target_seed,
    }
    return CDMProblem(
        name=name,
        prior=GaussianMixturePrior(joint.marginal(x_coords)),
        fast_sampler=MixtureInverseCDFSampler(conditional),
        full_sampler=MixtureDiffusionSampler(conditional, full_chain_steps),
        target=Target.from_sampler(draw_target, target_size, target_seed, source=f"{name} target"),
        metrics=metrics,
        x_star=x_star,
        x_star_unique=dim == 2,
        params=params,
    )


# -- learned models ------------------------------------------------------------------------------------------

SHIPPED_CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"  # <problem>/{prior,sampler}/


def _learned_models(folder: Path, fast_steps: int, full_steps: int) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Prior, fast and full-chain samplers from <folder>/prior and <folder>/sampler, and their weights' sha256."""
    from cdm_dist.models.learned import FlowSampler, load_prior, load_sampler, read_manifest

    if not folder.is_dir():
        raise InputError(f"problem.checkpoints: {folder} is not a folder")
    prior = load_prior(folder / "prior")
    fast = load_sampler(folder / "sampler", fast_steps)
    full = FlowSampler(fast.model, full_steps)  # one model, more Euler steps
    shas = {role: read_manifest(folder / role)["weights_sha256"] for role in ("prior", "sampler")}
    return prior, fast, full, {"checkpoints": str(folder), "weights_sha256": shas}


def learned_gmm_problem(
    name: str,
    checkpoints: str | Path | None = None,
    fast_steps: int = 8,
    full_chain_steps: int = 100,
    target_size: int = 1000,
    target_seed: int = 0,
) -> CDMProblem:
    """A Gaussian-mixture problem with the learned prior and flow sampler in place of the exact ones.

    The target and the exact metrics (l2_gmm, x_err) stay those of the true mixture, so learned and exact
    models are scored alike. The 5D/10D joints are those the shipped models were trained on (joint seed 1).
    """
    problem = gmm_problem(name, target_size, target_seed)
    folder = Path(checkpoints) if checkpoints else SHIPPED_CHECKPOINTS / name
    problem.prior, problem.fast_sampler, problem.full_sampler, info = _learned_models(
        folder, fast_steps, full_chain_steps
    )
    if problem.fast_sampler.y_dim != 1 or problem.prior.event_shape != (GMM_PROBLEMS[name] - 1,):
        raise InputError(f"problem.checkpoints: {folder} does not hold models for {name}")
    problem.params.update(models="learned", fast_steps=fast_steps, full_chain_steps=full_chain_steps, **info)
    return problem


def digits_problem(
    target: str = "uniform",
    checkpoints: str | Path | None = None,
    fast_steps: int = 8,
    full_chain_steps: int = 32,
    target_size: int = 1000,
    target_seed: int = 0,
) -> CDMProblem:
    """Rotated digits (MLGD-F paper, Exp. 1): x = a 16x16 image, Y = (cos, sin) of its rotation, G on the circle."""
    from cdm_dist.digits import TARGET_SPREAD, target_samples

    folder = Path(checkpoints) if checkpoints else SHIPPED_CHECKPOINTS / "digits"
    prior, fast, full, info = _learned_models(folder, fast_steps, full_chain_steps)
    if fast.y_dim != 2 or len(prior.event_shape) != 3:
        raise InputError(f"problem.checkpoints: {folder} does not hold rotated-digits models")
    draw = lambda n, seed: target_samples(target, n, seed)  # noqa: E731
    params = {
        "problem": "digits",
        "target": target,
        "target_spread_rad": TARGET_SPREAD,
        "target_size": target_size,
        "target_seed": target_seed,
        "models": "learned",
        "fast_steps": fast_steps,
        "full_chain_steps": full_chain_steps,
        **info,
    }
    return CDMProblem(
        name="digits",
        prior=prior,
        fast_sampler=fast,
        full_sampler=full,
        target=Target.from_sampler(draw, target_size, target_seed, source=f"digits {target} target"),
        params=params,
    )


def _mixture_json(m: GaussianMixture) -> dict[str, list]:
    return {"weights": m.weights.tolist(), "means": m.means.tolist(), "covs": m.covs.tolist()}


def save_params(problem: CDMProblem, path: str) -> None:
    """Write the problem's parameters as JSON next to results."""
    with open(path, "w") as handle:
        json.dump(problem.params, handle, indent=1)
