"""cdm bench faults --tune: a cdm tune study SIGKILLed at random moments and restarted keeps its invariants; and the
bench's duplicate-chain check finds a dead trial's chains stored next to its retry's, unless marked superseded."""

import json

import optuna

from benchmarks.faults_tune import CHAINS, _chains_stored
from cdm_cli.main import main
from cdm_dist.driver.tracking import client_for
from tuning.study import OUTCOME, SUPERSEDED


def test_bench_faults_tune_quick_keeps_every_invariant(tmp_path):
    out = tmp_path / "faults_tune.json"
    assert main(["bench", "faults", "--tune", "--quick", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    totals = payload["totals"]
    assert [r["kill"] for r in payload["rows"]] == [1] and totals["kills"] == 1
    assert all(r["killed_after_s"] > 0 and r["phase"] in ("trials", "start-up", "finished study")
               for r in payload["rows"])  # fmt: skip
    # every restart exited 0 or was itself the next kill; none failed or hung
    assert all(r["restart_exit"] in (0, -9) for r in payload["rows"])
    assert all(leg["returncode"] == (-9 if leg["killed"] else 0) for leg in payload["legs"])
    assert totals["restarts_failed"] == totals["restarts_hung"] == 0 and totals["final_exit"] == 0
    # exactly N counted trials, all complete, N distinct parameter sets, the config as written among them
    assert totals["counted"] == totals["complete"] == totals["distinct_params"] == totals["trials"] == 2
    assert totals["config_as_written_evaluated"] and totals["trial0_is_config_as_written"]
    assert totals["chains_stored_twice"] == 0 and totals["chains_missing"] == 0
    assert totals["ok"]
    assert (tmp_path / "faults_tune.md").read_text().startswith("| kill | killed_after_s | phase |")


def _campaign(client, experiment, trial, superseded=()):
    """A trial's campaign run with its CHAINS finished chain runs (those in `superseded` marked so); their ids."""
    parent = client.create_run(experiment, tags={"cdm.kind": "campaign", "cdm.trial": str(trial)}).info.run_id
    ids = []
    for chain in range(CHAINS):
        status = SUPERSEDED if chain in superseded else "ok"
        tags = {"cdm.kind": "chain", "cdm.chain": str(chain), "mlflow.parentRunId": parent, "status": status}
        ids.append(client.create_run(experiment, tags=tags).info.run_id)
        client.set_terminated(ids[-1], "FINISHED")
    return ids


def test_the_duplicate_check_counts_a_dead_trials_chains_beside_its_retrys(tmp_path):
    client = client_for(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("ftune")
    distribution = {"method.n_guess": optuna.distributions.IntDistribution(1, 3)}
    dead = optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params={"method.n_guess": 2},
                                     distributions=distribution)  # fmt: skip
    retry = optuna.trial.create_trial(params={"method.n_guess": 2}, distributions=distribution, value=1.0,
                                      user_attrs={OUTCOME: "complete"})  # fmt: skip
    dead.number, retry.number = 0, 1
    left = _campaign(client, experiment, 0, superseded={0, 1})[2:]  # the dead trial: chains 2, 3 not superseded
    retried = _campaign(client, experiment, 1)  # its retry: the same parameters, the same chains
    assert _chains_stored(tmp_path, [dead, retry]) == (2, 0, 2)  # chains 2 and 3 stored twice
    for run_id in left:
        client.set_tag(run_id, "status", SUPERSEDED)
    assert _chains_stored(tmp_path, [dead, retry]) == (0, 0, 4)
    client.set_terminated(retried[3], "KILLED")  # a counted trial's chain not finished: missing
    assert _chains_stored(tmp_path, [dead, retry]) == (0, 1, 4)
