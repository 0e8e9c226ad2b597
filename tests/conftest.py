import os

import pytest
import torch

# Under xdist two workers share the 2 cores: one torch thread each (two each oversubscribe the cores, and a test's
# OpenMP threads then wait on each other: one test took 55 s instead of 5).
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)  # tests that draw with the global generator are reproducible
    yield


@pytest.fixture(scope="session")
def gmm2d():
    from cdm_dist.problems.builtins import gmm_problem

    return gmm_problem("gmm2d", full_chain_steps=20)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (each xdist worker is one): 2 CPUs and 2 logical GPUs (for pinning checks;
    torch stays on CPU)."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def short_tmp():
    """A function making a new folder under /tmp with a short path (Ray's socket paths under it must fit in 107
    bytes, which a worker's basetemp can exceed); all are removed at the session's end."""
    import shutil
    import tempfile
    from pathlib import Path

    made = []

    def make():
        made.append(Path(tempfile.mkdtemp(prefix="cdm", dir="/tmp")))
        return made[-1]

    yield make
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory):
    """An empty MLflow SQLite store whose tables cdm made (client_for), made once: a new store's migrations take
    seconds, so tracked test campaigns start from a copy of this one (MLflow meets it as an up-to-date store)."""
    from cdm_dist.driver.tracking import client_for

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    client_for(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def small_campaign(tmp_path, mlflow_template):
    """A factory of campaign configs small enough for tests; keyword overrides are dotted keys. A tracked config on
    the default store finds it made (a copy of mlflow_template) rather than paying its migrations."""
    return lambda **overrides: _small_campaign(tmp_path, overrides, mlflow_template)


def _small_campaign(tmp_path, overrides, template=None):
    import shutil

    from cdm_dist.driver.campaign import load_config

    overrides = {k.replace("__", "."): v for k, v in overrides.items()}
    items = {
        "name": "test",
        "method.num_steps": 12,
        "method.n_c": 16,
        "method.target_batch": 16,
        "method.n_guess": 2,
        "method.eta": 0.5,
        "method.guidance_start": 0.25,
        "method.refine_steps": 2,
        "method.dtype": "float64",  # the references tests compare with are float64 (the default is float32)
        "chains.count": 6,
        "chains.zeta": "[{kind: linear, scale: 3.0, final: 0.1}, {kind: rt, normalize: true}]",
        "resources.micro_batch": 2,
        "resources.checkpoint_every": 4,
        "resources.num_cpus": 0.5,
        "tracking.enabled": False,
        "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db",
        "tracking.artifact_location": str(tmp_path / "artifacts"),
        "output": str(tmp_path / "campaigns"),
    } | overrides
    config = load_config(None, [f"{k}={v}" for k, v in items.items()])
    store = tmp_path / "mlflow.db"
    tracked_here = config.tracking.enabled and config.tracking.uri == f"sqlite:///{store}"
    if template is not None and tracked_here and not store.exists():
        shutil.copyfile(template, store)
    return config


@pytest.fixture
def free_port():
    """A function returning a free TCP port on 127.0.0.1."""
    from cdm_dist.driver.processes import free_port

    return free_port


@pytest.fixture
def http_service():
    """Start a command serving HTTP on 127.0.0.1 ('{port}' in it is replaced); returns the port once `path`
    answers; `start.processes` lists what was started. `sigint_ignored`: started as a shell's background job is,
    with SIGINT ignored. Every service started is stopped (its process group) at teardown."""
    import signal
    import subprocess
    import time
    import urllib.error
    import urllib.request

    from cdm_dist.driver.processes import free_port

    started = []

    def start(command, path="/health", sigint_ignored=False):
        port = free_port()
        process = subprocess.Popen(
            [str(c).format(port=port) for c in command],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: the server's workers are stopped with it
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None,
        )
        started.append(process)
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2)
                return port
            except urllib.error.HTTPError:  # it answers
                return port
            except OSError:
                assert process.poll() is None, f"{command[:4]} exited with {process.returncode}"
                time.sleep(0.5)
        pytest.fail(f"{command[:4]} did not answer on port {port}")

    start.processes = started
    yield start
    from cdm_dist.driver.processes import stop_process_group

    for process in started:
        stop_process_group(process)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """A function (problem) -> folder with prior/ and sampler/ trained for a few steps on tiny networks (cached)."""
    from cdm_dist.problems.training import train

    root = tmp_path_factory.mktemp("checkpoints")
    made = {}

    def make(problem):
        if problem not in made:
            for role in ("prior", "sampler"):
                train(role, problem, root / problem / role, steps=4, tiny=True, progress=False)
            made[problem] = root / problem
        return made[problem]

    return make


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server on 127.0.0.1 (skipped, with the reason, where initdb or psycopg2 is missing);
    yields a function (name) -> URL of a new, empty database."""
    from benchmarks import postgres

    reason = postgres.missing()
    if reason is not None:
        pytest.skip(reason)
    with postgres.throwaway_server() as database:
        yield database


PLUGIN_SOURCE = '''
"""A user's problem package, as tests write it: every factory logs "<part> <pid>" to LOG."""
import os
from pathlib import Path

from cdm_dist.problems.builtins import gmm_fast_sampler, gmm_metrics, gmm_prior, gmm_problem, gmm_target

LOG = Path({log!r})


def _log(part):
    with LOG.open("a") as handle:
        handle.write(f"{{part}} {{os.getpid()}}\\n")


def prior(name="gmm2d"):
    _log("prior")
    return gmm_prior(name)


def sampler(name="gmm2d"):
    _log("sampler")
    return gmm_fast_sampler(name)


def target(name="gmm2d", target_size: int = 1000):
    _log("target")
    return gmm_target(name, target_size=target_size)


def metrics(name="gmm2d"):
    _log("metrics")
    return gmm_metrics(name)


def whole(name="gmm2d"):
    _log("whole")
    return gmm_problem(name)


def recipe(name="gmm2d"):
    """A registered problem that returns parts."""
    here = __name__
    return {{part: {{"factory": f"{{here}}:{{part}}", "args": {{"name": name}}}}
            for part in ("prior", "sampler", "target", "metrics")}}


def boom(name="gmm2d"):
    raise RuntimeError("the user's model failed to load")


def not_a_sampler():
    return 42
'''


@pytest.fixture
def user_plugin(tmp_path):
    """A user package (one module) in its own folder, not on sys.path: (folder, module name, log of constructions).
    `parts(log)` counts the constructions per part."""
    import uuid
    from types import SimpleNamespace

    folder = tmp_path / "plugin"
    folder.mkdir()
    name = f"cdm_user_plugin_{uuid.uuid4().hex[:8]}"
    log = tmp_path / "constructions.log"
    (folder / f"{name}.py").write_text(PLUGIN_SOURCE.format(log=str(log)))

    def built():
        lines = log.read_text().split() if log.is_file() else []
        return [(part, int(pid)) for part, pid in zip(lines[::2], lines[1::2], strict=True)]

    return SimpleNamespace(folder=folder, module=name, log=log, built=built)
