"""cdm tune end to end on the in-process executor, plus candidate selection from the tracking store."""

import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from cdm_dist.driver.campaign import load_config, with_values
from cdm_dist.driver.tracking import client_for
from cdm_dist.errors import InputError
from tuning.study import MilestoneReporter, Tuner, aggregate, counted, died, suggest

SPACE = (
    "tune.space={chains.zeta.0.scale: {type: float, low: 0.3, high: 10, log: true},"
    " method.n_guess: {type: int, low: 1, high: 3}, chains.zeta.0.kind: {type: categorical, choices: [linear, cosine]}}"
)


@pytest.fixture
def study_config(small_campaign):
    def make(**overrides):
        overrides = {"tracking__enabled": True, "resources__executor": "local", "chains__count": 4} | overrides
        base = small_campaign(**overrides)
        return load_config(None, [SPACE]).model_copy(
            update={k: getattr(base, k) for k in type(base).model_fields if k != "tune"}
        )

    return make


def test_the_search_space_is_define_by_run_and_only_suggests(study_config):
    config = study_config()
    params = {"chains.zeta.0.scale": 2.5, "method.n_guess": 3, "chains.zeta.0.kind": "cosine"}
    values = suggest(optuna.trial.FixedTrial(params), config.tune.space)
    assert values == params
    tuned = with_values(config, values)
    assert tuned.chains.zeta[0].scale == 2.5 and tuned.chains.zeta[0].kind == "cosine" and tuned.method.n_guess == 3
    assert tuned.chains.base_seed == config.chains.base_seed  # trials share their chains' seeds


def test_bad_spaces_name_the_path(study_config):
    config = study_config()
    with pytest.raises(InputError, match=r"tune\.space: chains\.zeta\.3\.scale: no field 'chains\.zeta\.3'"):
        with_values(config, {"chains.zeta.3.scale": 1.0})
    with pytest.raises(InputError, match=r"method\.n_guess: Input should be greater than or equal to 1"):
        with_values(config, {"method.n_guess": 0})
    with pytest.raises(InputError, match=r"tune\.space: empty"):
        Tuner(config.model_copy(update={"tune": config.tune.model_copy(update={"space": {}})}))


def test_objectives_aggregate_chain_losses():
    losses = [0.4, 0.1, math.inf, 0.3, 0.2]
    assert aggregate(losses, "median", 2) == 0.3  # inf (a failed chain) sorts last
    assert aggregate(losses, "best", 2) == 0.1
    assert aggregate(losses, "topk_mean", 2) == pytest.approx(0.15)
    assert aggregate([math.inf, math.inf], "median", 2) == math.inf


class _Trial:
    def __init__(self, prune_at):
        self.reports, self.prune_at = [], prune_at

    def report(self, value, step):
        self.reports.append((step, value))

    def should_prune(self):
        return self.reports[-1][0] >= self.prune_at


def test_milestones_are_reported_once_every_micro_batch_passed_them(small_campaign):
    from cdm_dist.driver.callbacks import CampaignStopped
    from cdm_dist.driver.campaign import micro_batches
    from cdm_dist.driver.execution import Checkpoint, Chunk

    config = small_campaign()  # 12 steps: milestones at 3, 6, 9; 3 micro-batches of 2 chains
    trial = _Trial(prune_at=6)
    reporter = MilestoneReporter(trial, config, 3)
    batches = micro_batches(config)

    def report(batch, step, losses):
        state = Checkpoint(step, torch.zeros(2, 1), torch.zeros(2, dtype=torch.bool))
        chunk = Chunk(state, step - 4, torch.tensor(losses, dtype=torch.float64)[:, None].repeat(1, 4))
        reporter.on_chunk(batches[batch], chunk, None)

    report(0, 4, [1.0, 2.0])
    report(1, 4, [3.0, 4.0])
    assert trial.reports == []  # micro-batch 2 has not reached step 3 yet
    report(2, 4, [5.0, 6.0])
    assert trial.reports == [(3, 3.0)]  # the lower median of the six chains' losses
    report(0, 8, [1.0, 1.0])
    report(1, 8, [1.0, 1.0])
    with pytest.raises(CampaignStopped, match="pruned at step 6"):
        report(2, 8, [1.0, 1.0])
    assert trial.reports == [(3, 3.0), (6, 1.0)]
    assert reporter.steps_run == 6 * 2 * 4


@pytest.mark.parametrize("storage", ["journal", "postgresql"])
def test_a_study_tracks_trials_under_its_run_and_finishes_n_trials_after_a_crash(study_config, storage, request):
    config = study_config()
    url = None
    if storage == "postgresql":  # heartbeats every second; a trial silent for 2 s belongs to a dead process
        url = request.getfixturevalue("postgres_server")("crash")
        config = with_values(config, {"tune.heartbeat_seconds": 1, "tune.grace_seconds": 2})
    first = Tuner(config, url).run(trials=2, parallel=2)
    assert first.complete + first.pruned == 2 and first.failed == 0
    assert first.storage == (url or str(Tuner(config).folder / "optuna.journal"))

    # a process died mid-trial: its trial is still RUNNING in the storage (on a database, with its last heartbeat)
    tuner = Tuner(config, url)
    orphan = tuner.study.ask({"chains.zeta.0.scale": optuna.distributions.FloatDistribution(0.3, 10, log=True)})
    if url:
        tuner.storage.record_heartbeat(orphan._trial_id)
    result = Tuner(config, url).run(trials=3, parallel=1)
    trials = optuna.load_study(study_name=tuner.name, storage=tuner.storage).get_trials()
    stale = [t for t in trials if died(t)]
    assert [t.number for t in stale] == [orphan.number] and stale[0].state == optuna.trial.TrialState.FAIL
    assert result.complete + result.pruned == 3 and result.failed == 0  # the stale trial does not count
    retried = [t for t in trials if t.number > orphan.number]
    assert retried[0].params["chains.zeta.0.scale"] == orphan.params["chains.zeta.0.scale"]
    assert result.best_value == min(t.value for t in trials if t.state == optuna.trial.TrialState.COMPLETE)
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    saved = sum(t.user_attrs["cdm.planned_chain_steps"] - t.user_attrs["cdm.chain_steps"] for t in pruned)
    assert result.chain_steps_saved == saved

    client = client_for(config.tracking.uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment).experiment_id
    (study_run,) = client.search_runs([experiment], "tags.`cdm.kind` = 'study'")
    assert study_run.info.status == "FINISHED" and study_run.data.metrics["trials_complete"] == result.complete
    assert "optimization_history.png" in [a.path for a in client.list_artifacts(study_run.info.run_id)]
    trial_runs = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{study_run.info.run_id}'")
    assert len(trial_runs) == 3  # one per trial that ran to the end or was pruned (the orphan never started)
    for run in trial_runs:
        chains = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        assert sorted(int(c.data.tags["cdm.seed"]) for c in chains) == [0, 1, 2, 3]  # same seeds in every trial
        if run.info.status == "FINISHED":
            losses = [c.data.metrics["final_loss"] for c in chains]
            assert run.data.metrics["objective"] == pytest.approx(aggregate(losses, "median", 5))


def test_topk_selects_the_lowest_losses_and_exports_them(study_config, tmp_path):
    from cdm_cli.main import main
    from cdm_dist.driver.selection import select

    config = study_config(chains__count=4)
    Tuner(config).run(trials=2, parallel=1)
    uri = config.tracking.uri
    client = client_for(uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment).experiment_id
    every = client.search_runs([experiment], "tags.`cdm.kind` = 'chain' and tags.status = 'ok'")
    expected = sorted(r.data.metrics["final_loss"] for r in every)[:3]

    out = tmp_path / "topk.json"
    assert main(["topk", "-k", "3", "--tracking-uri", uri, "--export", str(tmp_path / "x"), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["final_loss"] for r in rows] == pytest.approx(expected)
    for row in rows:
        run = client.get_run(row["run_id"])
        folder = run.data.tags["cdm.campaign"]
        x_store = (
            client.get_run(folder).data.tags["cdm.output_dir"]
            + f"/chains/chain{int(run.data.tags['cdm.chain']):05d}.npy"
        )
        np.testing.assert_array_equal(np.load(row["x_path"]), np.load(x_store))
    assert (tmp_path / "x" / "contact_sheet.png").stat().st_size > 0

    chosen = rows[-1]["run_id"]
    client.set_tag(chosen, "cdm.selected", "true")  # what a user does in the MLflow UI
    assert [c.run_id for c in select(uri, None, 10, selected=True).candidates] == [chosen]


def test_tune_rejects_bad_input_with_status_2(tmp_path):
    from cdm_cli.main import main

    assert main(["tune", str(tmp_path / "none.yaml"), "--trials", "2"]) == 2
    assert main(["tune", "examples/tune_gmm5d.yaml", "--trials", "0"]) == 2
    assert main(["tune", "examples/tune_gmm5d.yaml", "--trials", "1", "--set", "tune.space.method.n_c.type=x"]) == 2


def test_multi_objective_study_on_rdb_storage_reports_a_pareto_front(study_config, tmp_path):
    config = study_config()
    config = config.model_copy(update={"tune": config.tune.model_copy(update={"multi_objective": True})})
    storage = f"sqlite:///{tmp_path}/optuna.db"
    result = Tuner(config, storage).run(trials=3, parallel=1)
    assert result.storage == storage and result.complete == 3 and result.pruned == 0
    study = optuna.load_study(study_name=result.study, storage=storage)
    front = {t.number for t in study.best_trials}
    assert {p["number"] for p in result.pareto} == front and front
    for trial in study.get_trials():
        n_c = trial.params.get("method.n_c", config.method.n_c)
        assert trial.values[1] == config.method.num_steps * n_c  # compute = steps x n_c
    # no trial on the front is dominated by another trial
    values = [t.values for t in study.get_trials()]
    for point in result.pareto:
        assert not any(
            v[0] <= point["values"][0] and v[1] <= point["values"][1] and v != point["values"] for v in values
        )


def test_parallel_trials_share_one_ray_actor_pool_and_match_in_process_runs(ray_cluster, study_config, monkeypatch):
    import tuning.study as study_module
    from cdm_dist.driver.runner import run_campaign
    from cdm_dist.driver.store import CampaignStore
    from cdm_dist.driver.worker import LocalExecutor

    made = []
    real = study_module.make_executor
    monkeypatch.setattr(study_module, "make_executor", lambda *a, **k: made.append(1) or real(*a, **k))
    config = study_config(resources__executor="ray", resources__placement="split")
    config = config.model_copy(update={"tune": config.tune.model_copy(update={"pruner": "none"})})
    tuner = Tuner(config)
    result = tuner.run(trials=3, parallel=2)
    assert len(made) == 1 and result.complete == 3  # one actor pool for all the trials
    for trial in tuner.study.get_trials():
        local = with_values(config, trial.params).model_copy(
            update={"resources": config.resources.model_copy(update={"executor": "local"}), "name": "check"}
        )
        local = local.model_copy(update={"tracking": local.tracking.model_copy(update={"enabled": False})})
        report = run_campaign(local, LocalExecutor(local), CampaignStore.create(local), progress=False)
        assert trial.value == pytest.approx(aggregate([r.final_loss for r in report.rows], "median", 5), abs=1e-5)


@pytest.mark.skipif(shutil.which("optuna-dashboard") is None, reason="optuna-dashboard is not installed")
def test_cdm_ui_serves_the_study_in_optuna_dashboard_next_to_mlflow_and_stops_on_ctrl_c(study_config, http_service,
                                                                                       free_port):  # fmt: skip
    """One `cdm ui` over a study's store: optuna-dashboard shows every trial as stored, the MLflow UI answers beside
    it; started as a shell's background job is (SIGINT ignored, inherited), Ctrl-C still stops it and its servers."""
    import signal
    import socket
    import urllib.request

    config = study_config(chains__count=2)
    tuner = Tuner(config)
    result = tuner.run(trials=2, parallel=1)  # its trials are campaigns in the store (`cdm ui` refuses one without)
    mlflow_port = free_port()
    command = [sys.executable, "-m", "cdm_cli.main", "ui", "--tracking-uri", config.tracking.uri, "--workers", "1"]
    command += ["--port", mlflow_port, "--optuna-storage", tuner.storage_label, "--dashboard-port", "{port}"]
    port = http_service(command, path="/api/studies", sigint_ignored=True)

    def get(url):
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())

    (summary,) = get(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
    assert summary["study_name"] == tuner.name
    detail = get(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}")
    trials = optuna.load_study(study_name=tuner.name, storage=tuner.storage).get_trials()
    shown = {t["number"]: (t["state"], t.get("values")) for t in detail["trials"]}
    assert result.complete + result.pruned == 2 and sorted(shown) == [t.number for t in trials]
    for trial in trials:  # every trial with its state and objective, as stored
        state, values = shown[trial.number]
        assert state.lower() == trial.state.name.lower()
        assert values == (None if trial.values is None else [pytest.approx(v) for v in trial.values])
    for _ in range(240):  # the MLflow UI comes up beside it
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{mlflow_port}/health", timeout=2) as response:
                assert response.read() == b"OK"
                break
        except OSError:
            time.sleep(0.5)
    else:
        pytest.fail("the MLflow UI did not answer")
    (ui,) = http_service.processes
    ui.send_signal(signal.SIGINT)
    assert ui.wait(timeout=120) == 0
    for server in (mlflow_port, port):
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", server)) != 0  # its servers stopped with it


def test_every_trial_is_scored_on_the_same_heldout_sample_size(study_config):
    config = study_config()
    assert config.method.eval_samples is None
    tuner = Tuner(config)
    assert tuner.config.method.eval_samples == 4 * config.method.n_c  # pinned from the config as written
    trial = with_values(tuner.config, {"method.n_c": 2 * config.method.n_c})
    assert trial.method.heldout_samples == 4 * config.method.n_c


def test_the_auto_prior_fit_limit_is_the_unguided_chains_quantile_and_survives_a_restart(study_config):
    from cdm_dist.chains.config import ZetaConfig
    from cdm_dist.chains.mlgd import Chains
    from cdm_dist.driver.methods import run_method
    from cdm_dist.problems.registry import resolve_problem
    from tuning.study import PRIOR_FIT_LIMIT, UNGUIDED_CHAINS, UNGUIDED_SEED

    config = study_config(chains__count=2)
    result = Tuner(config).run(trials=2, parallel=1)
    unguided = Chains.make(range(UNGUIDED_SEED, UNGUIDED_SEED + UNGUIDED_CHAINS), ZetaConfig(scale=0.0))
    problem = resolve_problem(config.problem).build()  # in-process, one batch: a second way to the same numbers
    fits = run_method(problem, "mlgd_f", unguided, Tuner(config).config.method.mlgd()).metrics["prior_fit"]
    assert result.prior_fit_limit == pytest.approx(float(torch.quantile(fits, 0.95)), rel=1e-12)
    resumed = Tuner(config)
    resumed.study.set_user_attr(PRIOR_FIT_LIMIT, 123.0)  # as if measured when the study started
    assert resumed.run(trials=3, parallel=1).prior_fit_limit == 123.0

    client = client_for(config.tracking.uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment).experiment_id
    for trial in optuna.load_study(study_name=resumed.name, storage=resumed.storage).get_trials():
        if trial.state != optuna.trial.TrialState.COMPLETE:
            continue
        (run,) = client.search_runs([experiment], f"params.`trial.number` = '{trial.number}'")
        chains = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        median = float(np.median([c.data.metrics["prior_fit"] for c in chains]))
        assert run.data.metrics["prior_fit_median"] == pytest.approx(median)
        limit = result.prior_fit_limit if trial.number < 2 else 123.0
        assert trial.constraints == {"prior_fit": pytest.approx(median - limit)}


def test_trials_over_the_prior_fit_limit_cannot_be_best(study_config):
    def limited(limit, name):
        config = study_config(chains__count=2)
        tune = config.tune.model_copy(update={"prior_fit_limit": limit, "study_name": name})
        return config.model_copy(update={"tune": tune})

    result = Tuner(limited(1e-9, "tight")).run(trials=3, parallel=1)  # no x fits the prior that well
    assert result.complete >= 1 and result.infeasible == result.complete
    assert result.best_value is None and result.best_params == {}
    unconstrained = Tuner(limited("off", "no-limit")).run(trials=3, parallel=1)
    assert unconstrained.infeasible == 0 and unconstrained.best_params != {}


def test_a_study_tunes_a_users_parts_spec(study_config, user_plugin, monkeypatch):
    from cdm_dist.models.spec import ProblemConfig

    monkeypatch.syspath_prepend(str(user_plugin.folder))
    parts = {p: {"factory": f"{user_plugin.module}:{p}"} for p in ("prior", "sampler", "target", "metrics")}
    config = study_config(chains__count=2, tune__prior_fit_limit="'off'")
    config = config.model_copy(update={"problem": ProblemConfig.model_validate(parts)})
    result = Tuner(config).run(trials=3, parallel=2)
    assert result.complete + result.pruned == 3 and result.failed == 0
    built = [part for part, _ in user_plugin.built()]
    assert sorted(built) == ["metrics", "prior", "sampler", "target"]  # one worker for every trial: built once


def test_a_restarted_study_never_asks_a_configuration_again(study_config):
    """The second process's sampler starts where the study stands, not from the same seed."""
    from tuning.study import DUPLICATE

    config = study_config(chains__count=2)
    Tuner(config).run(trials=3, parallel=1)
    Tuner(config).run(trials=6, parallel=1)  # a new process on the same study
    trials = Tuner(config).study.get_trials()
    ran = [t for t in trials if counted(t)]
    assert len(ran) == 6 and not [t for t in trials if DUPLICATE in t.user_attrs]
    params = [tuple(sorted(t.params.items())) for t in ran]
    assert len(set(params)) == 6
    assert len(trials) == 6  # not even asked again (with one seed, the new process repeated the old draws)


def test_duplicates_of_finished_trials_are_skipped_and_not_counted(study_config):
    from tuning.study import DUPLICATE

    config = study_config(chains__count=2)
    space = {"method.n_guess": {"type": "categorical", "choices": [1, 2]}}
    config = type(config).model_validate(config.model_dump() | {"tune": config.tune.model_dump() | {"space": space}})
    result = Tuner(config).run(trials=2, parallel=1)
    trials = Tuner(config).study.get_trials()
    counted = [t for t in trials if DUPLICATE not in t.user_attrs]
    assert result.complete + result.pruned == 2 and sorted(t.params["method.n_guess"] for t in counted) == [1, 2]
    for twin in (t for t in trials if DUPLICATE in t.user_attrs):  # asked again, never run
        assert twin.params == trials[twin.user_attrs[DUPLICATE]].params and "cdm.campaign_dir" not in twin.user_attrs


def test_a_killed_study_process_leaves_no_running_runs(study_config, tmp_path):
    """SIGKILL `cdm tune` mid-trial: the next process fails that trial (not counted), closes its MLflow runs as
    KILLED, retries its parameters and finishes N trials."""
    import signal
    import subprocess

    from cdm_dist.driver.campaign import dump_config

    config = study_config(chains__count=4, method__num_steps=40)
    path = tmp_path / "study.yaml"
    path.write_text(dump_config(config))
    process = subprocess.Popen([sys.executable, "-m", "cdm_cli.main", "tune", str(path), "--trials", "3"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and not list((tmp_path / "campaigns").glob("*trial0001*/checkpoints/*.pt")):
        assert process.poll() is None, "the study ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    result = Tuner(config).run(trials=3, parallel=1)
    assert result.complete + result.pruned == 3
    client = client_for(config.tracking.uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment).experiment_id
    runs = client.search_runs([experiment], "")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    trials = Tuner(config).study.get_trials()
    (stale,) = [t for t in trials if died(t)]
    killed = [r for r in runs if r.info.status == "KILLED"]
    parent = [r for r in killed if r.data.tags.get("cdm.trial") == str(stale.number)]
    assert len(parent) == 1 and len([r for r in killed if r.data.tags.get("cdm.campaign") == parent[0].info.run_id]) > 0


def _no_limit(config):
    return with_values(config, {"tune.prior_fit_limit": "off"})


def test_a_dead_trials_finished_chains_are_superseded_by_its_retry_and_listed_once(study_config, tmp_path):
    """A process dies after its trial's chains finished, before telling it: its retry stores the same chains again;
    `cdm topk` lists each x* once."""
    from cdm_cli.main import main
    from cdm_dist.driver.launch import make_executor
    from tuning.study import SUPERSEDED

    config = _no_limit(study_config(chains__count=4))
    dying = Tuner(config)
    dying.enqueue_baseline()
    dying._study_run()
    dying.executor = make_executor(dying.config)
    dead = dying._ask()
    dying._run_trial(dead)  # its campaign and chain runs finish; the trial is never told
    dying.executor.close()
    result = Tuner(config).run(trials=2, parallel=1)
    assert result.complete + result.pruned == 2

    trials = Tuner(config).study.get_trials()
    (retried,) = [t for t in trials if counted(t) and t.params == trials[dead.number].params]
    client = client_for(config.tracking.uri)

    def chains(trial):
        parent = trial.user_attrs["cdm.campaign_run_id"] if counted(trial) else None
        folder = trial.user_attrs["cdm.campaign_dir"]
        parent = parent or json.loads((Path(folder) / "tracking.json").read_text())["parent_run_id"]
        runs = client.search_runs(
            [client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'"
        )
        return {int(r.data.tags["cdm.chain"]): r for r in runs}, folder

    dead_runs, dead_folder = chains(trials[dead.number])
    retry_runs, retry_folder = chains(retried)
    assert sorted(dead_runs) == sorted(retry_runs) == [0, 1, 2, 3]
    for chain, run in dead_runs.items():  # the same chain twice: only the retry's is ok
        assert run.data.tags["status"] == SUPERSEDED and retry_runs[chain].data.tags["status"] == "ok"
        same = [np.load(f"{folder}/chains/chain{chain:05d}.npy") for folder in (dead_folder, retry_folder)]
        np.testing.assert_array_equal(*same)

    out = tmp_path / "topk.json"
    assert main(["topk", "-k", "50", "--tracking-uri", config.tracking.uri, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert not {r["run_id"] for r in rows} & {r.info.run_id for r in dead_runs.values()}
    listed = []  # (the trial's parameters, chain): the same pair is the same x*
    for row in rows:
        tags = client.get_run(row["run_id"]).data.tags
        trial = trials[int(client.get_run(tags["cdm.campaign"]).data.tags["cdm.trial"])]
        listed.append((tuple(sorted(trial.params.items())), int(tags["cdm.chain"])))
    assert len(rows) == 8 and len(set(listed)) == len(listed)  # two counted trials of 4 chains, none twice


def test_the_config_as_written_runs_again_until_it_is_evaluated(study_config):
    """Trial 0 (the config as written) dies, and so does its retry: it is queued a third time and evaluated."""
    from tuning.storage import CONFIG_AS_WRITTEN, retry

    config = _no_limit(study_config(chains__count=2))
    written = {"chains.zeta.0.scale": 3.0, "method.n_guess": 2, "chains.zeta.0.kind": "linear"}
    first = Tuner(config)
    first.enqueue_baseline()
    assert suggest(first._ask(), config.tune.space) == written  # its process dies
    Tuner(config).recover_stale()
    second = Tuner(config)
    assert suggest(second._ask(), config.tune.space) == written  # the retry's process dies too
    third = Tuner(config)
    assert third.recover_stale() == 1
    (queued,) = third.study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert retry(third.study, third.study.get_trials()[1])  # recovering it again queues nothing more
    assert len(third.study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 1

    result = Tuner(config).run(trials=2, parallel=1)
    trials = Tuner(config).study.get_trials()
    assert result.complete + result.pruned == 2 and [t.number for t in trials if died(t)] == [0, 1]
    (evaluated,) = [t for t in trials if counted(t) and t.params == written]
    assert evaluated.number == queued.number and evaluated.user_attrs[CONFIG_AS_WRITTEN]


def test_the_best_trial_is_written_as_a_config_that_cdm_run_reproduces(study_config):
    from cdm_dist.driver.runner import run_campaign
    from cdm_dist.driver.store import CampaignStore
    from cdm_dist.driver.worker import LocalExecutor

    config = study_config(chains__count=2)
    result = Tuner(config.model_copy(update={"tune": config.tune.model_copy(update={"prior_fit_limit": "off"})})).run(
        trials=2, parallel=1
    )
    assert result.objective.startswith("the median held-out final_loss over a trial's 2 chains")
    best = load_config(result.best_config)
    assert best.tune.space == {} and best.name.endswith("-best")
    report = run_campaign(best, LocalExecutor(best), CampaignStore.create(best), progress=False)
    assert aggregate([r.final_loss for r in report.rows], "median", 5) == result.best_value  # the same chains again
