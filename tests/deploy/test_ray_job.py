"""A real Ray head on 127.0.0.1, a campaign submitted with `ray job submit`, its MLflow runs checked."""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cdm_dist.driver.tracking import client_for

RAY = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def auth_env():
    """Ray's token authentication, with a token of this test's own, for the head and every client."""
    return os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@pytest.fixture
def ray_head(tmp_path, auth_env, free_port):
    """`ray start --head --block` on 127.0.0.1; stopping that process stops the cluster it started (only it)."""
    port, dashboard = free_port(), free_port()
    head = subprocess.Popen(
        [
            RAY, "start", "--head", "--block", "--disable-usage-stats", "--num-cpus=2",
            "--node-ip-address=127.0.0.1", f"--port={port}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={free_port()}",  # not the default 52365: another Ray may hold it
        ],
        stdout=(tmp_path / "head.log").open("w"),
        stderr=subprocess.STDOUT,
        env=auth_env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{dashboard}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # answering (it may want Ray's auth token): up
                break
            except OSError:
                assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
                time.sleep(0.5)
        else:
            pytest.fail("the Ray head did not come up: " + (tmp_path / "head.log").read_text()[-3000:])
        yield url
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=120)
        current = Path("/tmp/ray/ray_current_cluster")  # `ray start` records its address; drop ours
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def test_a_users_problem_submitted_as_a_ray_job_succeeds_and_is_tracked(ray_head, auth_env, tmp_path, user_plugin):
    """The user's problem package reaches the job's actors only through resources.runtime_env.working_dir."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    roles = ("prior", "sampler", "target", "metrics")
    parts = ", ".join(f"{p}: {{factory: '{user_plugin.module}:{p}'}}" for p in roles)
    overrides = [
        f"problem={{{parts}}}", f"resources.runtime_env={{working_dir: '{user_plugin.folder}'}}",
        "method.num_steps=10", "method.n_c=16", "method.target_batch=16", "chains.count=4",
        "resources.placement=split", "resources.micro_batch=2", "resources.num_cpus=1",
        f"tracking.uri={uri}", f"tracking.artifact_location={tmp_path / 'art'}", "tracking.experiment=job",
        f"output={tmp_path / 'campaigns'}",
    ]  # fmt: skip
    entrypoint = [sys.executable, "-m", "deploy.entrypoint", *[f"--set={o}" for o in overrides]]
    entrypoint += ["--json", str(tmp_path / "job.json")]
    for _ in range(30):  # the dashboard answers before its job agent is ready: nothing is started until it is
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", ray_head, "--", *entrypoint],
            capture_output=True,
            text=True,
            timeout=300,
            env=auth_env,
        )
        if "No available agent" not in submit.stderr:
            break
        time.sleep(2)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout + submit.stderr
    summary = json.loads((tmp_path / "job.json").read_text())
    assert summary["executor"] == "ray_split" and summary["chains_ok"] == 4
    client = client_for(uri)
    parent = client.get_run(summary["campaign_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["chains_ok"] == 4
    experiment = client.get_experiment_by_name("job").experiment_id
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["status"] for c in children) == ["ok"] * 4
    assert all("final_loss" in c.data.metrics for c in children)
    assert sorted(part for part, _ in user_plugin.built()) == ["metrics", "prior", "sampler", "target"]


def test_the_entrypoint_refuses_to_run_outside_a_cluster(monkeypatch):
    from deploy.entrypoint import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["examples/quick.yaml"]) == 2
