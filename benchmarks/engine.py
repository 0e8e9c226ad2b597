"""`cdm bench engine`: the batched chain loop's throughput over a grid, one-at-a-time beside it, and where a step's
time goes (denoiser, sampler, loss forward with the target block apart, backward, RNG, DDIM, Python)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from tqdm import tqdm

from benchmarks.report import environment, markdown_table, write_report
from cdm_dist.chains import losses, mlgd, rng
from cdm_dist.chains.allocator import keep_large_allocations
from cdm_dist.chains.config import MLGDConfig, ZetaConfig
from cdm_dist.chains.losses import MMDLoss
from cdm_dist.chains.mlgd import Chains, GuidedChains
from cdm_dist.problems.shipped import learned_gmm_problem

GRAD = "identity"
PARTS = ("denoiser", "sampler", "loss_forward", "target_block", "backward", "rng", "ddim_step")
# the issue's side-by-side measurement of the authors' batched restart runner (another 2-core machine, same grid
# settings, 2D problem, target of 250 fixed samples): chains/s by (n_c, n_guess, chains per batch)
AUTHORS_2D = {(8, 1, 1): 3.34, (8, 1, 8): 17.2, (8, 1, 32): 31.6, (32, 1, 32): 14.3, (8, 3, 32): 12.9}
# The loss settings. default: this project's (1000 target samples, a batch of 250 per chain and guess each step, the
# median heuristic, U-statistic). authors: the authors' mixture runner's (250 fixed target samples, a bandwidth fixed
# from them, five kernels s/4 .. 4s, V-statistic), whose target block is a constant.
SETTINGS: dict[str, tuple[int, MMDLoss]] = {
    "default": (1000, MMDLoss()),
    "authors": (250, MMDLoss(bandwidth="target", multipliers=[0.25, 0.5, 1.0, 2.0, 4.0], unbiased=False)),
}


class StepProfile:
    """Exclusive wall time per part of the loop, by wrapping the functions that do each part."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self._stack: list[float] = []  # child time of the enclosing timed calls

    def wrap(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._stack.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                children = self._stack.pop()
                self.seconds[part] += elapsed - children
                if self._stack:
                    self._stack[-1] += elapsed

        return timed


@contextmanager
def profiled(runner: GuidedChains) -> Iterator[StepProfile]:
    """Time the parts of `runner`'s steps; the wrapped functions are restored on exit."""
    profile = StepProfile()
    prior, sampler_side = runner.prior_side.prior, runner.sampler_side
    patches: list[tuple[Any, str, str]] = [
        (prior, "denoise", "denoiser"),
        (sampler_side.sampler, "sample", "sampler"),
        (sampler_side, "loss_fn", "loss_forward"),
        (losses, "target_pairs", "target_block"),
        (losses, "within_kernel_mean", "target_block"),
        (torch.autograd, "grad", "backward"),
        (rng.ChainStreams, "uniform", "rng"),
        (rng.ChainStreams, "normal", "rng"),
        (mlgd, "ddim_step_from_x0", "ddim_step"),
    ]
    saved = []
    for owner, name, part in patches:
        original = getattr(owner, name)
        saved.append((owner, name, original, name in vars(owner)))
        setattr(owner, name, profile.wrap(part, original))
    try:
        yield profile
    finally:
        for owner, name, original, own in reversed(saved):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


def _runner(
    problem: Any, n_c: int, n_guess: int, seeds: range, dtype: str, grad: str = GRAD, loss: MMDLoss | None = None
) -> GuidedChains:
    config = MLGDConfig(
        num_steps=100, n_c=n_c, n_guess=n_guess, eta=0.3, dtype=dtype, grad=grad, loss=loss or MMDLoss()
    )
    zeta = ZetaConfig(kind="linear", scale=10.0, final=0.1, trust_radius=1.0)
    return GuidedChains(problem.prior, problem.fast_sampler, problem.target, Chains.make(seeds, zeta), config)


def _run_steps(runner: GuidedChains) -> tuple[float, torch.Tensor]:
    """Wall time of the 100 reverse steps (the loop a campaign repeats, without the final evaluation), and x_0."""
    start = time.perf_counter()
    states = list(runner.states())
    return time.perf_counter() - start, states[-1].x


def bench_cell(
    problem: Any,
    n_c: int,
    n_guess: int,
    batch: int,
    repeats: int,
    dtype: str,
    grad: str = GRAD,
    loss: MMDLoss | None = None,
) -> dict[str, Any]:
    """chains/s of `batch` chains per batch, and of chains run one at a time (medians of repeats), with the largest
    difference between a chain's x_0 batched and alone, and the batched step's profile."""

    def chains_of(seeds: range) -> GuidedChains:
        return _runner(problem, n_c, n_guess, seeds, dtype, grad, loss)

    _run_steps(chains_of(range(batch)))  # warm-up
    singles = min(batch, 4)  # chains timed one at a time per repeat
    batched, single, difference = [], [], 0.0
    for r in range(repeats):
        seeds = range(r * batch, (r + 1) * batch)
        seconds, x = _run_steps(chains_of(seeds))
        batched.append(seconds)
        alone = [_run_steps(chains_of(seeds[k : k + 1])) for k in range(singles)]
        single.append(statistics.mean(seconds for seconds, _ in alone))
        difference = max(difference, *(float((x[k] - x_k[0]).abs().max()) for k, (_, x_k) in enumerate(alone)))
    runner = chains_of(range(batch))
    with profiled(runner) as profile:
        total, _ = _run_steps(runner)
    parts = {part: seconds / total for part, seconds in profile.seconds.items()}
    parts["python_other"] = max(0.0, 1.0 - sum(parts.values()))
    batched_rate = batch / statistics.median(batched)
    single_rate = 1 / statistics.median(single)
    return {
        "n_c": n_c,
        "n_guess": n_guess,
        "batch": batch,
        "chains_per_s": batched_rate,
        "one_at_a_time_chains_per_s": single_rate,
        "batched_over_one_at_a_time": batched_rate / single_rate,
        "ms_per_step": 1e3 * statistics.median(batched) / 100,
        "max_abs_x_difference_alone": difference,
        "profile_fraction": parts,
    }


def bench_engine(
    json_path: str | None,
    problems: tuple[str, ...] = ("gmm2d", "gmm10d"),
    n_cs: tuple[int, ...] = (8, 32, 64),
    n_guesses: tuple[int, ...] = (1, 3),
    batches: tuple[int, ...] = (1, 8, 32, 128),
    repeats: int = 3,
    dtype: str = "float32",
    grad: str = GRAD,
    quick: bool = False,
    setting: str = "default",
) -> dict[str, Any]:
    """The engine grid: learned mixtures with the one-step sampler, 100 steps, every (n_c, guesses, batch) cell, with
    the loss setting's target and MMD (SETTINGS)."""
    if quick:
        n_cs, n_guesses, batches, repeats = n_cs[:1], n_guesses[:1], batches[:2], 1
    keep_large_allocations()
    target_size, loss = SETTINGS[setting]
    cells = [(p, n, g, b) for p in problems for n in n_cs for g in n_guesses for b in batches]
    loaded = {name: learned_gmm_problem(name, sampler_kind="one_step", target_size=target_size) for name in problems}
    rows = []
    for name, n_c, n_guess, batch in tqdm(cells, desc=f"engine grid ({setting})"):
        row = {"problem": name} | bench_cell(loaded[name], n_c, n_guess, batch, repeats, dtype, grad, loss)
        row["authors_chains_per_s_reported"] = AUTHORS_2D.get((n_c, n_guess, batch)) if name == "gmm2d" else None
        rows.append(row)
    payload = {
        "rows": rows,
        "settings": {"setting": setting, "steps": 100, "dtype": dtype, "grad": grad, "sampler": "one_step",
                     "eta": 0.3, "repeats": repeats, "loss": loss.model_dump(),
                     "target_batch": MLGDConfig().target_batch, "target_size": target_size},
        "environment": environment(torch.device("cpu")),
        "quick": quick,
    }  # fmt: skip
    flat = [r | {f"%{k}": 100 * v for k, v in r["profile_fraction"].items()} for r in rows]
    columns = ["problem", "n_c", "n_guess", "batch", "chains_per_s", "one_at_a_time_chains_per_s",
               "batched_over_one_at_a_time", "ms_per_step", "max_abs_x_difference_alone",
               "authors_chains_per_s_reported", *(f"%{p}" for p in (*PARTS, "python_other"))]  # fmt: skip
    write_report(payload, json_path, markdown_table(flat, columns))
    return payload
