"""The built-in problems built whole, with the shipped (or given) learned models: for benchmarks, tests and the
Python API (campaigns build theirs lazily through the registry's ProblemSource)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cdm_dist.models.factories import call_with_args
from cdm_dist.models.spec import CDMProblem, ProblemConfig
from cdm_dist.problems.builtins import (
    BUILTIN_PROBLEMS,
    checkpoints_folder,
    digits,
    fast_sampler_part,
    gmm_params,
    mixture_problem,
)
from cdm_dist.problems.registry import ProblemSource


def learned_gmm_problem(
    name: str,
    checkpoints: str | Path | None = None,
    fast_steps: int | None = None,
    full_chain_steps: int = 100,
    target_size: int = 1000,
    target_seed: int = 0,
    sampler_kind: str = "flow",
) -> CDMProblem:
    """A Gaussian-mixture problem with the learned prior and flow sampler in place of the exact ones.

    The target and the exact metrics (l2_gmm, x_err) stay those of the true mixture, so learned and exact
    models are scored alike. The 5D/10D joints are those the shipped models were trained on (joint seed 1)."""
    mix = mixture_problem(name)
    args = {"models": "learned", "checkpoints": None if checkpoints is None else str(checkpoints),
            "fast_steps": fast_steps, "full_chain_steps": full_chain_steps, "target_size": target_size,
            "target_seed": target_seed, "sampler_kind": sampler_kind}  # fmt: skip
    params = gmm_params(name, 1, target_size, target_seed)
    return learned_problem(BUILTIN_PROBLEMS[name], args, params, mix.x_star, mix.joint.dim == 2)


def digits_problem(
    target: str = "uniform",
    checkpoints: str | Path | None = None,
    fast_steps: int | None = None,
    full_chain_steps: int = 32,
    target_size: int = 1000,
    target_seed: int = 0,
    sampler_kind: str = "flow",
) -> CDMProblem:
    """Rotated digits with the shipped (or given) learned models, as one CDMProblem."""
    from cdm_dist.problems.digits import TARGET_SPREAD

    args = {"checkpoints": None if checkpoints is None else str(checkpoints), "fast_steps": fast_steps,
            "full_chain_steps": full_chain_steps, "digits_target": target, "target_size": target_size,
            "target_seed": target_seed, "sampler_kind": sampler_kind}  # fmt: skip
    params = {"problem": "digits", "target": target, "target_spread_rad": TARGET_SPREAD, "target_size": target_size,
              "target_seed": target_seed}  # fmt: skip
    return learned_problem(digits, args, params)


def learned_problem(
    recipe: Callable[..., ProblemConfig],
    args: dict[str, Any],
    params: dict[str, Any],
    x_star: torch.Tensor | None = None,
    x_star_unique: bool = False,
) -> CDMProblem:
    """A built-in recipe with learned models, every part built once, with params naming the models' weights."""
    name = recipe.__name__
    parts = call_with_args(recipe, args, "problem", label=f"problem (name {name!r})")
    folder = checkpoints_folder(args["checkpoints"], name)
    learned = _learned_params(folder, args["fast_steps"], args["full_chain_steps"], args["sampler_kind"])
    return ProblemSource(parts).build(name, params | learned, x_star, x_star_unique)


def _learned_params(folder: Path, fast_steps: int | None, full_chain_steps: int, kind: str = "flow") -> dict[str, Any]:
    from cdm_dist.models.manifest import read_manifest

    roles = ("prior", "sampler", *(("sampler_one_step",) if kind == "one_step" else ()))
    shas = {role: read_manifest(folder / role)["weights_sha256"] for role in roles}
    steps = fast_sampler_part(folder, kind, fast_steps)["steps"]
    return {"models": "learned", "sampler_kind": kind, "fast_steps": steps, "full_chain_steps": full_chain_steps,
            "checkpoints": str(folder), "weights_sha256": shas}  # fmt: skip
