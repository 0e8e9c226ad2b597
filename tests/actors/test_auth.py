"""Joining a cluster started with `ray start --head` (token authentication on, Ray's default when a token exists):
the token is found as Ray's CLI finds it; without it, or with a wrong one, one line and exit 2 with nothing written."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

TOKEN = "0123456789abcdef" * 4


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory, short_tmp):
    """A real head node in its own process group, whose home holds Ray's token file (so `ray start` turns token
    authentication on); stopped by killing that group (never `ray stop`, which would stop every Ray here)."""
    home = tmp_path_factory.mktemp("head-home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(TOKEN)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))} | {"HOME": str(home)}
    ray = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    temp = short_tmp()
    command = [ray, "start", "--head", "--block", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
               "--node-ip-address=127.0.0.1", f"--temp-dir={temp}"]  # fmt: skip
    log = home / "ray-start.log"
    with log.open("w") as out:
        head = subprocess.Popen(command, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                if head.poll() is None:
                    os.killpg(head.pid, signal.SIGKILL)
                pytest.fail(f"ray start --head did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    time.sleep(3)  # the raylet registers after the GCS answers
    yield f"127.0.0.1:{port}", home, env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)


def _run(tmp_path, address, env):
    config = {
        "name": "join", "problem": {"name": "gmm2d"},
        "method": {"num_steps": 4, "n_c": 8, "target_batch": 8, "n_guess": 1},
        "chains": {"count": 2}, "resources": {"executor": "ray", "replicas": 1, "num_cpus": 0.5, "micro_batch": 2},
        "tracking": {"enabled": False}, "output": str(tmp_path / "out"),
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    command = [sys.executable, "-m", "cdm_cli.main", "run", str(path), "--address", address, "--quiet"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_a_token_in_rays_file_joins_the_cluster(token_cluster, tmp_path):
    address, _, env = token_cluster
    done = _run(tmp_path, address, env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2/2 chains ok" in done.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({}, "uses token authentication and needs a token and none was found (RAY_AUTH_MODE=unset)"),
        ({"RAY_AUTH_TOKEN": "f" * 64}, "uses token authentication and refused our token"),
    ],
)
def test_without_the_right_token_it_is_one_line_naming_the_token(token_cluster, tmp_path, extra, message):
    address, _, env = token_cluster
    elsewhere = tmp_path / "home"  # a user whose home has no token file
    elsewhere.mkdir()
    done = _run(tmp_path, address, env | {"HOME": str(elsewhere)} | extra)
    lines = [line for line in done.stderr.splitlines() if line.startswith("cdm: error:")]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert f"--address: the Ray cluster at {address} {message}" in lines[0] and "RAY_AUTH_TOKEN" in lines[0]
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()
