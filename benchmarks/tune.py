"""`cdm bench tune`: per problem (5D mixture, rotated digits), the tuned configuration against the one as written,
both evaluated on fresh chain seeds, and the tuning wall time with 1 and K parallel trials; then one study on a
throwaway PostgreSQL tuned by 1, 2 and 4 `cdm tune` processes at once, and by 2 with one killed mid-trial."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import postgres
from benchmarks.report import markdown_table, write_report
from cdm_dist.driver.campaign import CampaignConfig, dump_config, load_config, with_values
from cdm_dist.driver.runner import run_campaign
from cdm_dist.driver.store import CampaignStore
from cdm_dist.driver.worker import LocalExecutor
from tuning.study import PROCESS, RUN, Tuner, counted, died, median_finite

EXAMPLES = Path(__file__).parents[1] / "examples"
STUDIES = {"gmm5d": EXAMPLES / "tune_gmm5d.yaml", "digits": EXAMPLES / "tune_digits.yaml"}
FRESH_SEED = 10_000  # evaluation chains never seen while tuning
EVAL_SAMPLES = 1000  # one held-out sample size for default and tuned, whatever their n_c
QUICK = ["method.num_steps=10", "chains.count=4", "method.n_c=16", "method.target_batch=16", "pictures=false"]


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
        overrides += QUICK
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


def _shared_study(root: Path, quick: bool) -> Path:
    """The 5D-mixture study as a YAML file for `cdm tune` processes: heartbeats every 2 s, grace 6 s, no auto
    prior_fit limit (each process would measure it), in-process campaigns."""
    overrides = [f"output={root}/study", "tracking.enabled=false", "resources.executor=local",
                 "tune.heartbeat_seconds=2", "tune.grace_seconds=6", "tune.prior_fit_limit=off"]  # fmt: skip
    if quick:
        overrides += QUICK
    path = root / "shared.yaml"
    path.write_text(dump_config(load_config(STUDIES["gmm5d"], overrides)))
    return path


# The killed row's trials last seconds: a trial shorter than the moment between seeing it RUNNING and the SIGKILL
# would end first, leaving no dead trial to retry.
SLOW_TRIALS = ["method.num_steps=100", "method.n_c=256", "method.target_batch=256"]


def _processes_row(path: Path, url: str, trials: int, processes: int, kill: bool, logs: Path) -> dict[str, Any]:
    """`processes` cdm tune processes on one study at once (one SIGKILLed once two are mid-trial, if `kill`, its
    trials made slow: SLOW_TRIALS)."""
    import optuna

    command = [sys.executable, "-m", "cdm_cli.main", "tune", str(path), "--trials", str(trials), "--storage", url]
    command += [f"--set={setting}" for setting in SLOW_TRIALS] if kill else []
    name = load_config(path).name
    tic = time.perf_counter()
    with open(logs / f"p{processes}{'-kill' if kill else ''}.log", "w") as log:
        started = [subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT) for _ in range(processes)]
        if kill:

            def running(process: subprocess.Popen) -> bool:
                try:
                    trials_now = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
                except KeyError:  # no study yet
                    return False
                mine = [t for t in trials_now if t.user_attrs.get(PROCESS, "").endswith(f":{process.pid}")]
                return any(t.state == optuna.trial.TrialState.RUNNING for t in mine)

            while not all(running(p) for p in started[:2]) and all(p.poll() is None for p in started):
                time.sleep(0.1)
            started[0].send_signal(signal.SIGKILL)
        codes = [p.wait() for p in started]
    wall = time.perf_counter() - tic
    every = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    return {
        "processes": processes,
        "killed": int(kill),
        "trials": trials,
        "counted": sum(counted(t) for t in every),
        "wall_s": wall,
        "trials_per_min": 60 * trials / wall,
        "chain_steps_run": sum(t.user_attrs.get(RUN, 0) for t in every),
        "trials_died": sum(died(t) for t in every),
        "trials_retried": sum("failed_trial" in t.system_attrs for t in every),
        "exit_codes": codes,
    }


def bench_processes(root: Path, trials: int, counts: tuple[int, ...], quick: bool) -> list[dict[str, Any]]:
    """One study per row on a throwaway PostgreSQL, tuned by 1, 2, 4 processes at once, then by 2 with one killed."""
    reason = postgres.missing()
    if reason is not None:
        print(f"bench tune: no shared-study rows ({reason})", file=sys.stderr)
        return []
    path = _shared_study(root, quick)
    rows = []
    with postgres.throwaway_server() as database:
        for count in counts:
            rows.append(_processes_row(path, database(f"p{count}"), trials, count, False, root))
        rows.append(_processes_row(path, database("p2kill"), trials, 2, True, root))
    return rows


def bench_tune(
    json_path: str | None,
    trials: int = 20,
    parallel: int = 2,
    quick: bool = False,
    problems: tuple[str, ...] = tuple(STUDIES),
    processes: tuple[int, ...] = (1, 2, 4),
) -> dict[str, Any]:
    """Default vs tuned per problem (evaluated on fresh seeds); tuning wall time at 1 and `parallel` trials; one
    study shared by 1, 2 and 4 processes (and 2 with one killed)."""
    trials = 4 if quick else trials
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for problem in problems:
            results[problem] = _bench_problem(problem, root, trials, parallel, quick)
        shared = bench_processes(Path(root), 4 if quick else 24, processes, quick) if processes else []
    payload = {
        "rows": [row for r in results.values() for row in r["rows"]],
        "tuning": [row for r in results.values() for row in r["tuning"]],
        "best_params": {p: r["best_params"] for p, r in results.items()},
        "heldout_improvement": {p: r["heldout_improvement"] for p, r in results.items()},
        "shared_study": shared,
        "eval_samples": EVAL_SAMPLES,
        "quick": quick,
    }
    markdown = markdown_table(payload["rows"], ["problem", "config", "chains", "median_heldout_loss",
                                                "median_l2_gmm", "median_prior_fit", "chains_per_s"])  # fmt: skip
    columns = ["problem", "parallel", "trials", "wall_s", "pruned", "infeasible", "prior_fit_limit", "best_value"]
    columns.append("chain_steps_run")
    columns.append("chain_steps_saved_by_pruning")
    markdown += "\n" + markdown_table(payload["tuning"], columns)
    if shared:
        columns = ["processes", "killed", "trials", "counted", "wall_s", "trials_per_min", "chain_steps_run",
                   "trials_died", "trials_retried"]  # fmt: skip
        markdown += "\n" + markdown_table(shared, columns)
    write_report(payload, json_path, markdown)
    return payload
