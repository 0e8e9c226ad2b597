"""One study, several `cdm tune` processes on one PostgreSQL database: exactly N counted trials, none run twice,
one MLflow study run; a process SIGKILLed mid-trial loses nothing and touches nobody else's trials. The journal
file refuses a second process. Storage errors are one line and create nothing."""

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import optuna
import pytest

from benchmarks.tune import SLOW_TRIALS
from cdm_dist.driver.campaign import dump_config, load_config
from cdm_dist.driver.tracking import client_for
from cdm_dist.errors import InputError
from tuning.storage import exclusive_journal
from tuning.study import CAMPAIGN_DIR, OUTCOME, PROCESS, Tuner, counted, died

SPACE = "tune.space={chains.zeta.0.scale: {type: float, low: 0.3, high: 10, log: true}}"
TRIALS = 6


@pytest.fixture
def shared_config(small_campaign, tmp_path):
    """A study config (short heartbeats) written to YAML, and a function starting `cdm tune` on it."""
    base = small_campaign(tracking__enabled=True, resources__executor="local", chains__count=2, method__num_steps=24)
    config = load_config(
        None,
        [SPACE, "tune.heartbeat_seconds=1", "tune.grace_seconds=3", "tune.pruner=none", "tune.prior_fit_limit=off"],
    )
    config = config.model_copy(update={k: getattr(base, k) for k in type(base).model_fields if k != "tune"})
    path = tmp_path / "study.yaml"
    path.write_text(dump_config(config))

    def start(url, log, *overrides):
        command = [sys.executable, "-m", "cdm_cli.main", "tune", str(path), "--trials", str(TRIALS), "--storage", url]
        command += [f"--set={o}" for o in overrides]
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    return config, start


def _trials(config, url):
    """The study's trials ([] before a process made the study)."""
    try:
        return optuna.load_study(study_name=config.name, storage=url).get_trials()
    except KeyError:
        return []


def _check_mlflow(config, trials):
    """One study run; every counted trial's campaign run under it."""
    client = client_for(config.tracking.uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment).experiment_id
    (study_run,) = client.search_runs([experiment], "tags.`cdm.kind` = 'study'")
    under = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{study_run.info.run_id}'")
    by_trial = Counter(r.data.tags["cdm.trial"] for r in under)
    for trial in trials:
        if counted(trial):
            assert by_trial[str(trial.number)] == 1, trial.number


def test_two_processes_finish_exactly_n_trials_of_one_study(shared_config, postgres_server, tmp_path):
    config, start = shared_config
    url = postgres_server("two_processes")
    with open(tmp_path / "a.log", "w") as a, open(tmp_path / "b.log", "w") as b:
        processes = [start(url, a), start(url, b)]
        codes = [p.wait(timeout=600) for p in processes]
    assert codes == [0, 0], (tmp_path / "a.log").read_text()[-2000:] + (tmp_path / "b.log").read_text()[-2000:]
    trials = _trials(config, url)
    ran = [t for t in trials if counted(t)]
    assert len(ran) == TRIALS and not [t for t in trials if died(t)]
    assert len({t.user_attrs[CAMPAIGN_DIR] for t in ran}) == TRIALS  # none run twice
    assert len({tuple(sorted(t.params.items())) for t in ran}) == TRIALS
    assert len({t.user_attrs[PROCESS] for t in ran}) == 2  # both processes ran trials
    never_ran = [t for t in trials if not counted(t)]
    assert all(t.user_attrs[OUTCOME] in ("surplus", "duplicate") and CAMPAIGN_DIR not in t.user_attrs
               for t in never_ran)  # fmt: skip
    _check_mlflow(config, trials)


def test_a_killed_process_trial_is_retried_once_and_the_other_process_is_untouched(
    shared_config, postgres_server, tmp_path
):
    config, start = shared_config
    url = postgres_server("killed")
    slow = SLOW_TRIALS  # trials of seconds

    def running_in(process):
        return [t for t in _trials(config, url) if t.state == optuna.trial.TrialState.RUNNING
                and t.user_attrs.get(PROCESS, "").endswith(f":{process.pid}")]  # fmt: skip

    with open(tmp_path / "victim.log", "w") as v, open(tmp_path / "survivor.log", "w") as s:
        victim, survivor = start(url, v, *slow), start(url, s, *slow)
        deadline = time.time() + 300
        while not (running_in(victim) and running_in(survivor)):
            assert time.time() < deadline and victim.poll() is None and survivor.poll() is None
            time.sleep(0.1)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        assert survivor.wait(timeout=600) == 0, (tmp_path / "survivor.log").read_text()[-2000:]

    trials = _trials(config, url)
    dead = [t for t in trials if died(t)]
    assert len(dead) == 1 and dead[0].user_attrs[PROCESS].endswith(f":{victim.pid}")
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == dead[0].number]
    assert retry.params == dead[0].params and counted(retry)  # retried once, with the same parameters
    survivors = [t for t in trials if t.user_attrs.get(PROCESS, "").endswith(f":{survivor.pid}")]
    assert survivors and all(counted(t) or t.user_attrs[OUTCOME] in ("surplus", "duplicate") for t in survivors)
    assert len([t for t in trials if counted(t)]) == TRIALS
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    _check_mlflow(config, trials)
    client = client_for(config.tracking.uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment).experiment_id
    assert not client.search_runs([experiment], "attributes.status = 'RUNNING'")


def test_a_journal_file_takes_one_process_at_a_time(small_campaign, tmp_path):
    config = load_config(None, [SPACE, f"output={tmp_path / 'out'}", "tracking.enabled=false"])
    tuner = Tuner(config)
    with exclusive_journal(tuner.storage_label, tuner.storage):
        probe = f"""
import sys
from cdm_dist.driver.campaign import load_config
from cdm_dist.errors import InputError
from tuning.study import Tuner
config = load_config(None, [{SPACE!r}, "output={tmp_path / "out"}", "tracking.enabled=false"])
try:
    Tuner(config).run(trials=1)
except InputError as exc:
    print(exc)
    sys.exit(2)
"""
        second = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert second.returncode == 2
    assert f"pid {os.getpid()}" in second.stdout and "--storage postgresql://" in second.stdout


@pytest.mark.parametrize(
    ("overrides", "storage", "message"),
    [
        (["tune.heartbeat_seconds=5"], None, "tune.heartbeat_seconds: the journal file cannot hold heartbeats"),
        (["tune.heartbeat_seconds=5", "tune.grace_seconds=5"], "x", "grace_seconds: must exceed heartbeat_seconds"),
        ([], "postgresql+psycopg2://nobody@127.0.0.1:1/none", "--storage: cannot open postgresql+psycopg2://"),
        ([], "not-a-url", "--storage: 'not-a-url' is not a database URL"),
    ],
)
def test_bad_storage_settings_are_one_line_and_create_nothing(tmp_path, overrides, storage, message):
    output, config = tmp_path / "out", tmp_path / "c.yaml"
    config.write_text("name: bad\n")
    command = [sys.executable, "-m", "cdm_cli.main", "tune", str(config), "--trials", "1", f"--set={SPACE}"]
    args = [f"--set=output={output}", *[f"--set={o}" for o in overrides], *(["--storage", storage] if storage else [])]
    done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not output.exists()


def test_input_errors_name_the_storage(tmp_path):
    with pytest.raises(InputError, match="cannot open"):
        Tuner(load_config(None, [SPACE, f"output={tmp_path}"]), "sqlite:////nonexistent/folder/x.db")
