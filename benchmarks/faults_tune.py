"""`cdm bench faults --tune`: one tiny `cdm tune` study SIGKILLed at random moments, K times in a row, each kill
followed by a restart of the same command; then the study and its MLflow store are checked.

First the same study runs unfaulted (its wall time D) and once more when finished (S, a restart with nothing to
do: start-up and wrap-up), which sets the horizon S + 2 (D - S) / N: start-up plus about two trials. Each leg is
`python -m cdm_cli.main tune study.yaml --trials N` in its own session, SIGKILLed (its whole process group) at a
moment drawn uniformly from [0.5, horizon] seconds after it started. A leg that ends before its moment must exit 0
(the study is then complete; later legs restart a finished study, and the horizon shrinks below that leg's
duration so the next kills still land). After the K-th kill, one last restart runs to the end. Every leg has a
timeout: a leg still running at it hangs. Checked at the end:
- exactly N counted trials, all COMPLETE (the study has no pruner), with N distinct parameter sets;
- the config as written (trial 0's parameters) among the counted trials;
- no chain stored twice: no two FINISHED chain runs in MLflow, neither marked status=superseded, of the same
  parameters (a dead trial and its retry) and the same chain index; and every counted trial's chains stored;
- no restart that failed (exit code other than 0 or the kill's -9) or hung.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.report import markdown_table, write_report

STUDY = """# cdm bench faults --tune: a tiny study, seconds per trial
name: ftune
problem: {{name: gmm2d}}
method: {{name: mlgd_f, num_steps: 8, n_c: 16, target_batch: 16, n_guess: 1, grad: identity}}
chains:
  count: {chains}
  base_seed: 0
  zeta:
    - {{kind: linear, scale: 3.0, final: 0.1}}
resources: {{executor: local, micro_batch: 2, checkpoint_every: 2}}
tracking: {{uri: "sqlite:///{root}/mlflow.db", experiment: ftune}}
output: {root}/out
tune:
  space:
    chains.zeta.0.scale: {{type: float, low: 0.1, high: 30.0, log: true}}
    method.n_guess: {{type: int, low: 1, high: 3}}
  pruner: none
  prior_fit_limit: auto
"""
AS_WRITTEN = {"chains.zeta.0.scale": 3.0, "method.n_guess": 1}  # the study's config as written, in its space
CHAINS = 4
KILLED = -signal.SIGKILL


def _leg(root: Path, trials: int, kill_at: float | None, timeout: float, log: Path) -> dict[str, Any]:
    """One `cdm tune` process (a new session), its process group SIGKILLed at `kill_at` seconds if still running;
    killed as hung at `timeout`."""
    command = [sys.executable, "-m", "cdm_cli.main", "tune", "study.yaml", "--trials", str(trials)]
    paths = [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    with open(log, "w") as out:
        tic = time.monotonic()
        process = subprocess.Popen(command, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=env)  # fmt: skip
        deadline = min(kill_at, timeout) if kill_at is not None else timeout
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=deadline)
        seconds = time.monotonic() - tic
        killed = hung = False
        if process.poll() is None:
            killed, hung = kill_at is not None and kill_at <= timeout, kill_at is None or kill_at > timeout
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        code = process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # anything the leg started and left behind
    text = log.read_text(errors="replace")
    return {"killed": killed, "hung": hung, "seconds": round(seconds, 2), "returncode": code,
            "lock_waits": text.count("taking longer than"), "tail": text[-1500:]}  # fmt: skip


def _trials(root: Path) -> list[Any]:
    """The study's trials, read from its journal (no process runs it now)."""
    import optuna

    journal = root / "out" / "study-ftune" / "optuna.journal"
    if not journal.is_file():
        return []
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    try:
        return optuna.load_study(study_name="ftune", storage=storage).get_trials(deepcopy=False)
    except KeyError:  # killed before the study was made
        return []


def _counted(trials: list[Any]) -> list[Any]:
    from tuning.study import counted

    return [t for t in trials if t.state.is_finished() and counted(t)]


def _key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def _chains_stored(root: Path, trials: list[Any]) -> tuple[int, int, int]:
    """(chains stored twice, chains of counted trials missing, superseded chain runs) in MLflow: FINISHED chain runs
    not marked superseded, keyed by their trial's parameters and chain index."""
    from cdm_dist.driver.tracking import client_for
    from tuning.study import SUPERSEDED, _all_runs

    client = client_for(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("ftune")
    if experiment is None:
        return 0, CHAINS * len(_counted(trials)), 0
    found = experiment.experiment_id
    params = {str(t.number): _key(t.params) for t in trials}
    campaigns = {
        r.info.run_id: r.data.tags.get("cdm.trial") for r in _all_runs(client, found, "tags.`cdm.kind` = 'campaign'")
    }
    stored: dict[tuple[str, str], int] = {}
    superseded = 0
    for run in _all_runs(client, found, "tags.`cdm.kind` = 'chain'"):
        tags = run.data.tags
        superseded += tags.get("status") == SUPERSEDED
        trial = campaigns.get(tags.get("mlflow.parentRunId", ""))
        if run.info.status != "FINISHED" or tags.get("status") == SUPERSEDED or trial is None:
            continue
        key = (params.get(trial, f"trial {trial}"), tags["cdm.chain"])
        stored[key] = stored.get(key, 0) + 1
    twice = sum(n - 1 for n in stored.values() if n > 1)
    missing = sum(1 for t in _counted(trials) for chain in range(CHAINS) if (_key(t.params), str(chain)) not in stored)
    return twice, missing, superseded


def bench_faults_tune(
    json_path: str | None,
    kills: int = 20,
    trials: int = 8,
    quick: bool = False,
    horizon: float | None = None,
    timeout: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """K kills + restarts of one `cdm tune` study, then its invariants; JSON + markdown (a row per kill)."""
    import optuna

    from tuning.study import died

    if quick:
        kills, trials = min(kills, 3), min(trials, 3)
    timeout = timeout or (300.0 if quick else 600.0)
    rng = random.Random(seed)
    legs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        reference, root = Path(tmp) / "reference", Path(tmp) / "faulted"
        for folder in (reference, root):
            folder.mkdir()
            (folder / "study.yaml").write_text(STUDY.format(root=folder, chains=CHAINS))
        clean = [_leg(reference, trials, None, timeout, reference / f"clean{i}.log") for i in range(2)]
        if any(leg["returncode"] != 0 for leg in clean):
            raise RuntimeError(f"the unfaulted study failed: {clean[0]['tail']}{clean[1]['tail']}")
        (full, noop) = (leg["seconds"] for leg in clean)
        horizon = horizon or noop + 2 * max(0.5, (full - noop) / trials)
        start_horizon = horizon
        while sum(leg["killed"] for leg in legs) < kills and len(legs) < 3 * kills:
            leg = _leg(root, trials, rng.uniform(0.5, horizon), timeout, root / f"leg{len(legs)}.log")
            leg["kill_at_s"] = None if not leg["killed"] else leg["seconds"]
            leg["counted"] = len(_counted(_trials(root)))
            legs.append(leg)
            if not leg["killed"] and leg["returncode"] == 0:  # ended before its moment: later kills land sooner
                horizon = min(horizon, max(1.0, 0.9 * leg["seconds"]))
        final = _leg(root, trials, None, timeout, root / "final.log")
        every = _trials(root)
        final["counted"] = len(_counted(every))
        legs.append(final)
        twice, missing, superseded = _chains_stored(root, every)
    counted = _counted(every)
    complete = [t for t in counted if t.state == optuna.trial.TrialState.COMPLETE]
    first = next((t for t in every if t.number == 0), None)
    rows = []
    for index, leg in enumerate(legs[:-1]):
        if leg["killed"]:
            restart = legs[index + 1]
            rows.append({"kill": len(rows) + 1, "killed_after_s": leg["seconds"], "counted_after_kill": leg["counted"],
                         "restart_exit": restart["returncode"], "restart_s": restart["seconds"],
                         "restart_killed": restart["killed"]})  # fmt: skip
    failed = [leg for leg in legs if not leg["killed"] and (leg["returncode"] != 0 or leg["hung"])]
    totals = {
        "trials": trials,
        "kills": len(rows),
        "legs": len(legs),
        "counted": len(counted),
        "complete": len(complete),
        "distinct_params": len({_key(t.params) for t in counted}),
        "trials_died": sum(1 for t in every if died(t)),
        "config_as_written_evaluated": any(t.params == AS_WRITTEN for t in complete),
        "trial0_is_config_as_written": first is not None and first.params == AS_WRITTEN,
        "chains_stored_twice": twice,
        "chains_missing": missing,
        "chain_runs_superseded": superseded,
        "restarts_failed": len([leg for leg in failed if not leg["hung"]]),
        "restarts_hung": sum(leg["hung"] for leg in legs),
        "lock_waits": sum(leg["lock_waits"] for leg in legs),
        "final_exit": legs[-1]["returncode"],
        "final_s": legs[-1]["seconds"],
    }
    totals["ok"] = (
        totals["counted"] == totals["complete"] == totals["distinct_params"] == trials
        and totals["config_as_written_evaluated"]
        and totals["trial0_is_config_as_written"]
        and twice == 0
        and missing == 0
        and not failed
        and totals["kills"] == kills
    )
    payload = {
        "rows": rows,
        "totals": totals,
        "legs": [{k: v for k, v in leg.items() if k != "tail" or not leg["killed"]} for leg in legs],
        "horizon_s": round(start_horizon, 2),
        "unfaulted_s": full,
        "restart_of_finished_study_s": noop,
        "timeout_s": timeout,
        "quick": quick,
        "study": STUDY.format(root="ROOT", chains=CHAINS),
    }
    columns = ["kill", "killed_after_s", "restart_exit", "restart_s", "counted_after_kill"]
    markdown = markdown_table(rows, columns) + "\n" + markdown_table([totals], list(totals))
    write_report(payload, json_path, markdown)
    return payload
