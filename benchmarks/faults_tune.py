"""`cdm bench faults --tune`: one tiny `cdm tune` study SIGKILLed at random moments, K times in a row, each kill
followed by a restart of the same command; then the study and its MLflow store are checked.

First the same study runs unfaulted (its wall time D) and once more when finished (S, a restart with nothing to
do). Each leg is `python -m cdm_cli.main tune study.yaml --trials N` in its own session, SIGKILLed (its whole process
group) at a random moment of one of three kinds: in the trials, within 2 (D - S) / N seconds (about two trials)
after the leg's first write to the study's journal (its first trial asked, or a dead one recovered), 3 kills in 4;
in start-up, within S seconds of its start, 1 in 4; and, once the study is finished, within a restart of it. A leg
that ends before its moment must exit 0. After the K-th kill, one last restart runs to the end. Every leg has a
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


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else -1


def _leg(
    root: Path, trials: int, kill_at: float | None, kill_after_write: float | None, timeout: float, log: Path
) -> dict[str, Any]:
    """One `cdm tune` process (a new session), its process group SIGKILLed at `kill_at` seconds, or
    `kill_after_write` seconds after its first write to the study's journal (its first trial asked, or a dead one
    recovered), if still running; killed as hung at `timeout`."""
    command = [sys.executable, "-m", "cdm_cli.main", "tune", "study.yaml", "--trials", str(trials)]
    paths = [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    journal = _journal(root)
    before, written = _size(journal), None
    killed = hung = False
    with open(log, "w") as out:
        tic = time.monotonic()
        process = subprocess.Popen(command, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=env)  # fmt: skip
        while process.poll() is None:
            now = time.monotonic() - tic
            if written is None and _size(journal) != before:
                written = now
            due = kill_at is not None and now >= kill_at
            due |= kill_after_write is not None and written is not None and now >= written + kill_after_write
            if due or now >= timeout:
                killed, hung = due, not due
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        code = process.wait()
        seconds = time.monotonic() - tic
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # anything the leg started and left behind
    text = log.read_text(errors="replace")
    return {"killed": killed, "hung": hung, "seconds": round(seconds, 2), "returncode": code,
            "first_write_s": None if written is None else round(written, 2),
            "lock_waits": text.count("taking longer than"), "tail": text[-1500:]}  # fmt: skip


def _journal(root: Path) -> Path:
    return root / "out" / "study-ftune" / "optuna.journal"


def _trials(root: Path) -> list[Any]:
    """The study's trials, read from its journal (no process runs it now)."""
    import optuna

    journal = _journal(root)
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
    timeout: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """K kills + restarts of one `cdm tune` study, then its invariants; JSON + markdown (a row per kill)."""
    import optuna

    from tuning.study import died

    if quick:
        kills, trials = 1, min(trials, 2)  # a smoke test of the machinery: every leg is a fresh `cdm tune` process
    timeout = timeout or (300.0 if quick else 600.0)
    rng = random.Random(seed)
    legs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        reference, root = Path(tmp) / "reference", Path(tmp) / "faulted"
        for folder in (reference, root):
            folder.mkdir()
            (folder / "study.yaml").write_text(STUDY.format(root=folder, chains=CHAINS))
        clean = [_leg(reference, trials, None, None, timeout, reference / f"clean{i}.log") for i in range(2)]
        if any(leg["returncode"] != 0 for leg in clean):
            raise RuntimeError(f"the unfaulted study failed: {clean[0]['tail']}{clean[1]['tail']}")
        (full, noop) = (leg["seconds"] for leg in clean)
        trial_s = max(0.5, (full - noop) / trials)
        horizon = noop  # a restart of a finished study: kills land within it
        counted = 0
        while sum(leg["killed"] for leg in legs) < kills and len(legs) < 3 * kills:
            draw = rng.random()
            if counted >= trials:  # finished: a moment in the restart (start-up, wrap-up, MLflow writes)
                kill_at, after_write, phase = 0.5 + draw * 0.9 * horizon, None, "finished study"
            elif rng.random() < 0.25:  # start-up: imports, probe, the journal opened, dead trials recovered
                kill_at, after_write, phase = 0.5 + draw * horizon, None, "start-up"
            else:  # the work: within about two trials of its first write to the journal
                kill_at, after_write, phase = None, draw * 2 * trial_s, "trials"
            leg = _leg(root, trials, kill_at, after_write, timeout, root / f"leg{len(legs)}.log")
            leg["phase"] = phase
            leg["counted"] = counted = len(_counted(_trials(root)))
            legs.append(leg)
            if not leg["killed"] and leg["returncode"] == 0 and counted >= trials:
                horizon = min(horizon, max(1.0, leg["seconds"]))  # ended before its moment: later kills sooner
        final = _leg(root, trials, None, None, timeout, root / "final.log")
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
            rows.append({"kill": len(rows) + 1, "killed_after_s": leg["seconds"], "phase": leg["phase"],
                         "after_first_write_s": None if leg["first_write_s"] is None else
                         round(leg["seconds"] - leg["first_write_s"], 2), "counted_after_kill": leg["counted"],
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
        "trial_s": round(trial_s, 2),
        "unfaulted_s": full,
        "restart_of_finished_study_s": noop,
        "timeout_s": timeout,
        "quick": quick,
        "study": STUDY.format(root="ROOT", chains=CHAINS),
    }
    columns = [
        "kill",
        "killed_after_s",
        "phase",
        "after_first_write_s",
        "restart_exit",
        "restart_s",
        "counted_after_kill",
    ]
    markdown = markdown_table(rows, columns) + "\n" + markdown_table([totals], list(totals))
    write_report(payload, json_path, markdown)
    return payload
