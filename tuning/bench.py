"""`cdm bench tune`: per problem (5D mixture, rotated digits), the tuned configuration against the one as written,
both evaluated on fresh chain seeds, and the tuning wall time with 1 and K parallel trials."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cdm_dist.bench.report import markdown_table, write_report
from cdm_dist.campaign import CampaignConfig, load_config, with_values
from cdm_dist.runner import run_campaign
from cdm_dist.store import CampaignStore
from cdm_dist.worker import LocalExecutor
from tuning.study import Tuner, median_finite

EXAMPLES = Path(__file__).parents[1] / "examples"
STUDIES = {"gmm5d": EXAMPLES / "tune_gmm5d.yaml", "digits": EXAMPLES / "tune_digits.yaml"}
FRESH_SEED = 10_000  # evaluation chains never seen while tuning
EVAL_SAMPLES = 1000  # one held-out sample size for default and tuned, whatever their n_c


def _evaluate(config: CampaignConfig, label: str, chains: int) -> dict[str, Any]:
    """A campaign on fresh seeds: median held-out loss, median exact l2 (mixtures), chains per second."""
    values = {"chains.base_seed": FRESH_SEED, "chains.count": chains, "method.eval_samples": EVAL_SAMPLES}
    fresh = with_values(config, values, "bench")
    tic = time.perf_counter()
    report = run_campaign(fresh, LocalExecutor(fresh), CampaignStore.create(fresh), progress=False)
    wall = time.perf_counter() - tic
    losses = torch.tensor([r.final_loss for r in report.rows], dtype=torch.float64)
    l2 = [r.metrics["l2_gmm"] for r in report.rows if "l2_gmm" in r.metrics]
    fit = median_finite([r.metrics.get("prior_fit", math.nan) for r in report.rows])
    return {
        "problem": config.problem.name,
        "config": label,
        "chains": chains,
        "median_heldout_loss": float(losses.median()),
        "median_l2_gmm": float(torch.tensor(l2, dtype=torch.float64).median()) if l2 else None,
        "median_prior_fit": fit,
        "chains_per_s": chains / wall,
    }


def _bench_problem(problem: str, root: str, trials: int, parallel: int, quick: bool) -> dict[str, Any]:
    """One problem: evaluate the config as written, tune it at 1 and K parallel trials, evaluate the best."""
    overrides = [f"output={root}/{problem}", "tracking.enabled=false", "resources.executor=local"]
    if quick:
        overrides += ["method.num_steps=10", "chains.count=4", "method.n_c=16", "method.target_batch=16"]
    base = load_config(STUDIES[problem], overrides)
    if quick:  # keep the trials tiny: n_c stays fixed
        space = {path: spec for path, spec in base.tune.space.items() if path != "method.n_c"}
        base = base.model_copy(update={"tune": base.tune.model_copy(update={"space": space})})
    eval_chains = 8 if quick else 32
    rows = [_evaluate(base, "default", eval_chains)]
    timing: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    for k in sorted({1, parallel}):
        study = base.model_copy(update={"tune": base.tune.model_copy(update={"study_name": f"bench-k{k}"})})
        tic = time.perf_counter()
        result = Tuner(study).run(trials, k)
        timing.append({"problem": problem, "parallel": k, "trials": trials, "wall_s": time.perf_counter() - tic,
                       "pruned": result.pruned, "infeasible": result.infeasible,
                       "prior_fit_limit": result.prior_fit_limit, "best_value": result.best_value,
                       "chain_steps_run": result.chain_steps_run,
                       "chain_steps_saved_by_pruning": result.chain_steps_saved})  # fmt: skip
        if k == 1:
            best = result.best_params
    rows.append(_evaluate(with_values(base, best), "tuned", eval_chains))
    default, tuned = rows[0]["median_heldout_loss"], rows[1]["median_heldout_loss"]
    improvement = 1 - tuned / default if default > 0 else None
    return {"rows": rows, "tuning": timing, "best_params": best, "heldout_improvement": improvement}


def bench_tune(
    json_path: str | None,
    trials: int = 20,
    parallel: int = 2,
    quick: bool = False,
    problems: tuple[str, ...] = tuple(STUDIES),
) -> dict[str, Any]:
    """Default vs tuned per problem (evaluated on fresh seeds); tuning wall time at 1 and `parallel` trials."""
    trials = 4 if quick else trials
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for problem in problems:
            results[problem] = _bench_problem(problem, root, trials, parallel, quick)
    payload = {
        "rows": [row for r in results.values() for row in r["rows"]],
        "tuning": [row for r in results.values() for row in r["tuning"]],
        "best_params": {p: r["best_params"] for p, r in results.items()},
        "heldout_improvement": {p: r["heldout_improvement"] for p, r in results.items()},
        "eval_samples": EVAL_SAMPLES,
        "quick": quick,
    }
    markdown = markdown_table(payload["rows"], ["problem", "config", "chains", "median_heldout_loss",
                                                "median_l2_gmm", "median_prior_fit", "chains_per_s"])  # fmt: skip
    columns = ["problem", "parallel", "trials", "wall_s", "pruned", "infeasible", "prior_fit_limit", "best_value"]
    columns.append("chain_steps_run")
    columns.append("chain_steps_saved_by_pruning")
    markdown += "\n" + markdown_table(payload["tuning"], columns)
    write_report(payload, json_path, markdown)
    return payload
