"""`cdm bench tune`: the tuned configuration against the default one on the 5D mixture, on fresh chain seeds,
and the tuning wall time with 1 and K parallel trials."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cdm_dist.bench.report import markdown_table, write_report
from cdm_dist.campaign import CampaignConfig, load_config, with_values
from cdm_dist.runner import LocalExecutor, run_campaign
from cdm_dist.store import CampaignStore
from tuning.study import Tuner

EXAMPLE = Path(__file__).parents[1] / "examples" / "tune_gmm5d.yaml"
FRESH_SEED = 10_000  # evaluation chains never seen while tuning


def _evaluate(config: CampaignConfig, label: str, chains: int) -> dict[str, Any]:
    """A campaign on fresh seeds: median held-out loss, median exact l2, chains per second."""
    fresh = with_values(config, {"chains.base_seed": FRESH_SEED, "chains.count": chains}, "bench")
    executor = LocalExecutor(fresh)
    tic = time.perf_counter()
    report = run_campaign(fresh, executor, CampaignStore.create(fresh), progress=False)
    wall = time.perf_counter() - tic
    losses = torch.tensor([r.final_loss for r in report.rows], dtype=torch.float64)
    l2 = torch.tensor([r.metrics.get("l2_gmm", float("nan")) for r in report.rows], dtype=torch.float64)
    return {
        "problem": config.problem.name,
        "config": label,
        "chains": chains,
        "median_heldout_loss": float(losses.median()),
        "median_l2_gmm": float(l2.nanmedian()),
        "chains_per_s": chains / wall,
    }


def bench_tune(json_path: str | None, trials: int = 20, parallel: int = 2, quick: bool = False) -> dict[str, Any]:
    """Default vs tuned on gmm5d (evaluated on fresh seeds); tuning wall time at 1 and `parallel` trials."""
    trials = 4 if quick else trials
    with tempfile.TemporaryDirectory() as root:
        overrides = [f"output={root}", "tracking.enabled=false", "resources.executor=local"]
        if quick:
            overrides += ["method.num_steps=10", "chains.count=4"]
        base = load_config(EXAMPLE, overrides)
        eval_chains = 8 if quick else 32
        rows = [_evaluate(base, "default", eval_chains)]
        timing: list[dict[str, Any]] = []
        best: dict[str, Any] = {}
        for k in sorted({1, parallel}):
            study = base.model_copy(update={"tune": base.tune.model_copy(update={"study_name": f"bench-k{k}"})})
            tic = time.perf_counter()
            result = Tuner(study).run(trials, k)
            timing.append({"parallel": k, "trials": trials, "wall_s": time.perf_counter() - tic,
                           "pruned": result.pruned, "best_value": result.best_value,
                           "chain_steps_run": result.chain_steps_run,
                           "chain_steps_saved_by_pruning": result.chain_steps_saved})  # fmt: skip
            if k == 1:
                best = result.best_params
        rows.append(_evaluate(with_values(base, best), "tuned", eval_chains))
    default, tuned = rows[0]["median_heldout_loss"], rows[1]["median_heldout_loss"]
    payload = {
        "rows": rows,
        "tuning": timing,
        "best_params": best,
        "heldout_improvement": 1 - tuned / default if default > 0 else None,
        "l2_improvement": 1 - rows[1]["median_l2_gmm"] / rows[0]["median_l2_gmm"],
        "digits": None,  # rotated digits need the learned models of issue 3
        "quick": quick,
    }
    markdown = markdown_table(rows, ["problem", "config", "chains", "median_heldout_loss", "median_l2_gmm",
                                     "chains_per_s"])  # fmt: skip
    columns = ["parallel", "trials", "wall_s", "pruned", "best_value", "chain_steps_run"]
    columns.append("chain_steps_saved_by_pruning")
    markdown += "\n" + markdown_table(timing, columns)
    write_report(payload, json_path, markdown)
    return payload
