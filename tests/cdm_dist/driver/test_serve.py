"""`cdm serve` on a throwaway PostgreSQL: an MLflow tracking server and optuna-dashboard, a campaign tracked through
the server and read back (runs and served artifacts), a study seen by the dashboard; stopping it stops only what it
started. Bad input (port in use, one database for both, unreachable database) is one line and starts nothing."""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from cdm_dist.driver.runner import run_campaign
from cdm_dist.driver.store import CampaignStore
from cdm_dist.driver.tracking import client_for
from cdm_dist.driver.worker import LocalExecutor

CDM = [sys.executable, "-m", "cdm_cli.main", "serve"]


def _answers(url):
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _port_open(port):
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_serve_tracks_a_campaign_and_shows_a_study_then_stops_only_its_servers(
    postgres_server, free_port, small_campaign, tmp_path
):
    tracking, storage = postgres_server("serve_mlflow"), postgres_server("serve_optuna")
    port, dashboard = free_port(), free_port()
    command = [*CDM, "--tracking-db", tracking, "--optuna-storage", storage, "--artifacts", str(tmp_path / "art"),
               "--port", str(port), "--dashboard-port", str(dashboard)]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not (_answers(f"http://127.0.0.1:{port}/health") and _answers(f"http://127.0.0.1:{dashboard}/")):
            assert server.poll() is None and time.time() < deadline, server.stdout.read()[-3000:]
            time.sleep(0.5)

        uri = f"http://127.0.0.1:{port}"
        config = small_campaign(tracking__enabled=True, tracking__uri=uri, tracking__experiment="served",
                                chains__count=2)  # fmt: skip
        report = run_campaign(config, LocalExecutor(config), CampaignStore.create(config), progress=False)
        client = client_for(uri)
        experiment = client.get_experiment_by_name("served")
        assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server stores and serves them
        chains = client.search_runs([experiment.experiment_id], "tags.`cdm.kind` = 'chain'")
        assert sorted(r.info.run_id for r in chains) == sorted(r.run_id for r in report.rows)
        for row in report.rows:
            assert client.get_run(row.run_id).data.metrics["final_loss"] == pytest.approx(row.final_loss)
            names = sorted(a.path for a in client.list_artifacts(row.run_id))
            assert names == [f"chain{row.chain:05d}.npy", f"chain{row.chain:05d}.png", "images"]
        assert list((tmp_path / "art").rglob(f"chain{report.rows[0].chain:05d}.npy"))  # on the server's disk

        import optuna

        study = optuna.create_study(study_name="served-study", storage=storage)
        study.optimize(lambda trial: trial.suggest_float("x", 0, 1) ** 2, n_trials=3)
        with urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/studies", timeout=10) as answer:
            studies = json.load(answer)["study_summaries"]
        assert [s["study_name"] for s in studies] == ["served-study"]
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    assert not _port_open(port) and not _port_open(dashboard)  # both servers stopped with it
    optuna.load_study(study_name="served-study", storage=storage)  # PostgreSQL (not its to stop) still answers


def test_serve_refuses_a_port_in_use(postgres_server, free_port):
    tracking = postgres_server("serve_busy")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([*CDM, "--tracking-db", tracking, "--port", str(port)], capture_output=True, text=True,
                              timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"cdm: error: --port: 127.0.0.1:{port} is not free (Address already in use)"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--tracking-db: required (or set CDM_TRACKING_DB)"),
        (["--tracking-db", "sqlite:///x.db", "--optuna-storage", "sqlite:///x.db"], "must be another database"),
        (["--tracking-db", "postgresql+psycopg2://nobody:secret@127.0.0.1:1/none"], "--tracking-db: cannot connect to "
         "postgresql+psycopg2://nobody:***@127.0.0.1:1/none"),
    ],
)  # fmt: skip
def test_serve_bad_input_is_one_line_and_starts_nothing(args, message, monkeypatch, free_port):
    monkeypatch.delenv("CDM_TRACKING_DB", raising=False)
    monkeypatch.delenv("CDM_OPTUNA_STORAGE", raising=False)
    port = free_port()
    done = subprocess.run([*CDM, *args, "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert message in line and "secret" not in line
    assert not _port_open(port)


def test_serve_checks_its_ports_before_it_makes_the_optuna_database(postgres_server, free_port):
    from cdm_dist.driver.preconditions import database_tables

    tracking, storage = postgres_server("serve_ports_mlflow"), postgres_server("serve_ports_optuna")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        command = [*CDM, "--tracking-db", tracking, "--optuna-storage", storage, "--port", str(free_port())]
        done = subprocess.run([*command, "--dashboard-port", str(port)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"cdm: error: --dashboard-port: 127.0.0.1:{port} is not free (Address already in use)"
    ]
    assert database_tables(storage) == set()  # Optuna's tables were not made
