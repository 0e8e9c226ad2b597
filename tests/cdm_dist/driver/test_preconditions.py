"""Bad input found before anything starts: one line naming the field or file, exit status 2, nothing created."""

import json
import socket
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from cdm_cli.main import main


@pytest.fixture
def workspace(tmp_path):
    """A small local campaign config (YAML file) whose output and MLflow store are in tmp_path; `created()` lists
    what exists besides the config."""
    from types import SimpleNamespace

    def write(**extra):
        config = {
            "method": {"num_steps": 4, "n_c": 8, "target_batch": 8},
            "chains": {"count": 2},
            "resources": {"executor": "local"},
            "tracking": {"uri": f"sqlite:///{tmp_path}/m.db", "artifact_location": str(tmp_path / "art")},
            "output": str(tmp_path / "out"),
        }
        for key, value in extra.items():
            section, _, name = key.partition("__")
            if name:
                config.setdefault(section, {})[name] = value
            else:
                config[section] = value
        (tmp_path / "c.yaml").write_text(json.dumps(config))
        return str(tmp_path / "c.yaml")

    def created():
        return sorted(p.name for p in tmp_path.iterdir() if p.name not in ("c.yaml", "input"))

    (tmp_path / "input").mkdir()
    return SimpleNamespace(write=write, created=created, root=tmp_path, input=tmp_path / "input")


def _one_line(capsys, code, *args):
    assert main(list(args)) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_or_wrong_tracking_store_stops_before_anything_starts(workspace, capsys):
    port = _closed_port()
    cases = [
        (f"http://127.0.0.1:{port}", f"tracking.uri: no MLflow server answers at http://127.0.0.1:{port}"),
        ("ftp://host/store", "tracking.uri: unsupported MLflow store 'ftp://host/store'"),
    ]
    text = workspace.input / "notes.db"
    text.write_text("these are not runs\n")
    cases.append((f"sqlite:///{text}", "notes.db is not an MLflow database (not SQLite)"))
    other = workspace.input / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("create table customers (id integer)")
    cases.append((f"sqlite:///{other}", "other.db is a SQLite database but not an MLflow store"))
    for uri, message in cases:
        tic = time.perf_counter()
        line = _one_line(capsys, 2, "run", workspace.write(tracking__uri=uri))
        assert message in line and time.perf_counter() - tic < 30
        assert workspace.created() == []
    with sqlite3.connect(other) as db:  # the foreign database was not touched
        assert [r[0] for r in db.execute("select name from sqlite_master")] == ["customers"]


def test_a_silent_ray_address_and_too_many_chains_stop_at_once(workspace, capsys):
    port = _closed_port()
    tic = time.perf_counter()
    line = _one_line(capsys, 2, "run", workspace.write(resources__executor="ray"), "--address", f"127.0.0.1:{port}")
    assert line.startswith(f"cdm: error: --address: no Ray cluster answers at 127.0.0.1:{port}")
    assert time.perf_counter() - tic < 30 and workspace.created() == []
    line = _one_line(capsys, 2, "run", workspace.write(chains__count=1_000_000_000))
    assert "chains.count: 1000000000 chains need about" in line and "run them as several campaigns" in line
    assert workspace.created() == []


def test_output_paths_that_cannot_be_written_are_named(workspace, capsys):
    (workspace.input / "a_file").write_text("")
    line = _one_line(capsys, 2, "run", workspace.write(), "--json", str(workspace.input))
    assert line == f"cdm: error: --json: {workspace.input} is a folder, not a file"
    line = _one_line(capsys, 2, "run", workspace.write(output=str(workspace.input / "a_file" / "x")))
    assert "output: cannot make" in line and "a_file is a file" in line
    line = _one_line(capsys, 2, "topk", "--export", str(workspace.input / "a_file"), "--tracking-uri", "sqlite:///x.db")
    assert line == f"cdm: error: --export: {workspace.input / 'a_file'} is a file, not a folder"
    line = _one_line(capsys, 2, "train", "prior", "--problem", "gmm2d", "--out", str(workspace.input / "a_file"))
    assert line.endswith("is a file, not a folder")
    assert workspace.created() == []


def test_topk_needs_an_existing_mlflow_store(workspace, capsys):
    line = _one_line(capsys, 2, "topk", "--tracking-uri", f"sqlite:///{workspace.root}/none.db")
    assert line == f"cdm: error: --tracking-uri: no MLflow database at {workspace.root}/none.db"
    port = _closed_port()
    line = _one_line(capsys, 2, "topk", "--tracking-uri", f"http://127.0.0.1:{port}")
    assert line.startswith(f"cdm: error: --tracking-uri: no MLflow server answers at http://127.0.0.1:{port}")
    assert workspace.created() == []


def test_a_config_that_is_not_utf8_and_a_complex_target_are_named(workspace, capsys):
    bad = workspace.input / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    line = _one_line(capsys, 2, "run", str(bad))
    assert line == f"cdm: error: {bad}: not UTF-8 text (byte 9); save the config as UTF-8"
    target = workspace.input / "g.npy"
    np.save(target, np.array([[1 + 2j], [3 + 0j]]))
    line = _one_line(capsys, 2, "run", workspace.write(problem__target_file=str(target)))
    assert line == f"cdm: error: {target}: target samples must be real numbers; got dtype complex128"
    assert workspace.created() == []


def test_damaged_model_folders_are_named(workspace, capsys, tiny_checkpoints):
    import shutil

    folder = workspace.input / "models"
    shutil.copytree(tiny_checkpoints("gmm2d"), folder)
    run = ["run", workspace.write(problem__models="learned", problem__checkpoints=str(folder))]
    (folder / "sampler" / "config.json").write_text("{not json")
    line = _one_line(capsys, 2, *run)
    assert f"{folder / 'sampler' / 'config.json'}" in line and "not valid JSON" in line
    shutil.copy(tiny_checkpoints("gmm2d") / "sampler" / "config.json", folder / "sampler" / "config.json")
    weights = folder / "prior" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    line = _one_line(capsys, 2, *run)
    assert "does not match the sha256 in" in line and "manifest.json" in line
    shutil.copy(folder / "sampler" / "diffusion_pytorch_model.safetensors", weights)  # the sampler's weights
    line = _one_line(capsys, 2, *run)
    assert "does not match the sha256 in" in line
    assert workspace.created() == []


def test_a_damaged_campaign_checkpoint_is_named_on_resume(workspace, capsys):
    assert main(["run", "--quiet", workspace.write(tracking__enabled=False)]) == 0
    (folder,) = (workspace.root / "out").iterdir()
    result = folder / "results" / "mb00000.pt"
    result.write_bytes(result.read_bytes()[:50])
    line = _one_line(capsys, 2, "run", "--resume", str(folder))
    assert line.startswith(f"cdm: error: {result}: the result cannot be read")


def test_a_cluster_too_small_for_one_replica_per_node_is_refused(tmp_path):
    """Two nodes of 2 CPUs hold 4 CPUs in all, but a split replica of 2 x 1.5 CPUs fits on neither."""
    import subprocess
    import sys

    script = f"""
import ray
from ray.cluster_utils import Cluster
from actors.coordinator import RayExecutor
from cdm_dist.driver.campaign import load_config
from cdm_dist.errors import InputError
cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 2}})
cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
config = load_config(None, ["resources.placement=split", "resources.num_cpus=1.5", "tracking.enabled=false",
                            "output={tmp_path}"])
try:
    RayExecutor(config, address=cluster.address)
except InputError as exc:
    print("ERROR", exc)
ray.shutdown()
cluster.shutdown()
"""
    tic = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "ERROR resources: replica 1 of 1 needs {'CPU': 3.0} on one node" in out.stdout, out.stderr[-2000:]
    assert time.perf_counter() - tic < 120  # not the placement group's timeout


def test_a_local_ray_started_by_cdm_keeps_token_authentication_no_dashboard_no_metrics_and_a_private_folder(
    short_tmp,
):
    """No HTTP server of the cluster's processes answers /metrics (Ray's three Prometheus exporters are off), and
    the session folder (logs, sockets, runtime_resources, all 0777 by Ray) lies in a folder only this user can
    enter."""
    import subprocess
    import sys

    script = """
import json, os, psutil, ray, stat, urllib.request
from pathlib import Path
from actors.coordinator import connect
from ray._private.authentication.authentication_utils import is_token_auth_enabled
connect(None, num_cpus=1)
session = Path(ray._private.worker._global_node.get_session_dir_path())
ports = sorted({c.laddr.port for c in psutil.net_connections(kind="inet") if c.status == "LISTEN"})
ours = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
metrics = []
for port in {c.laddr.port for c in psutil.net_connections(kind="inet") if c.status == "LISTEN" and c.pid in ours}:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            metrics.append((port, answer.status))
    except Exception:
        pass  # not HTTP, or it wants the token
own = lambda p: p.stat().st_uid == os.getuid() and stat.S_IMODE(p.stat().st_mode) == 0o700
private = [str(p) for p in session.parents if own(p)]
print("RESULT", json.dumps({"token": is_token_auth_enabled(), "dashboard": 8265 in ports, "metrics": metrics,
                            "private": private, "session": str(session), "env": "DASHBOARD_METRIC_PORT" in os.environ}))
ray.shutdown()
"""
    import os

    base = str(short_tmp())
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"} | {"TMPDIR": base}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    result = json.loads(out.stdout.split("RESULT", 1)[1])
    assert {k: result[k] for k in ("token", "dashboard", "metrics", "env")} == {
        "token": True, "dashboard": False, "metrics": [], "env": False
    }  # fmt: skip
    private = f"{base}/cdm-ray-{os.getuid()}"
    assert private in result["private"] and result["session"].startswith(f"{private}/r/session_")


def test_ray_files_go_in_a_private_folder_whose_socket_paths_fit(tmp_path, short_tmp):
    import os

    from actors.coordinator import SOCKET_PATH_MAX, private_temp_dir
    from cdm_dist.errors import InputError

    short = short_tmp()  # Ray's socket paths fit under it
    (short / "mine").mkdir()
    folder = private_temp_dir(str(short / "mine"))
    mode = oct(folder.parent.stat().st_mode & 0o777)
    (short / "taken").mkdir()
    (short / "taken" / f"cdm-ray-{os.getuid()}").symlink_to(tmp_path)
    with pytest.raises(InputError, match="not a folder of this user's"):
        private_temp_dir(str(short / "taken"))
    assert folder == short / "mine" / f"cdm-ray-{os.getuid()}" / "r" and mode == "0o700"
    long = tmp_path / ("x" * SOCKET_PATH_MAX)
    assert private_temp_dir(str(long)).parent.parent == Path("/tmp")  # they would not fit under it


JOURNAL_WRITER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("pragma journal_mode=delete")  # MLflow's mode: a rollback journal beside the file
db.execute("pragma cache_size=2")  # spill to the file mid-transaction: the journal becomes hot
db.execute("begin immediate")
run = db.execute("select run_uuid from runs").fetchone()[0]
db.executemany("insert into tags (key, value, run_uuid) values (?, ?, ?)",
               [(f"junk{i}", "x" * 4000, run) for i in range(500)])
db.execute("delete from metrics")
print("mid-write", flush=True)
time.sleep(600)
"""


def _hot_journal(path):
    """Kill a writer mid-transaction: the store is left with a hot journal (a read-only open cannot read it)."""
    import signal
    import subprocess
    import sys

    writer = subprocess.Popen([sys.executable, "-c", JOURNAL_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "mid-write"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    journal = path.with_name(f"{path.name}-journal")
    assert journal.stat().st_size > 0
    with pytest.raises(sqlite3.OperationalError, match="readonly database"):
        sqlite3.connect(f"file:{path}?mode=ro", uri=True).execute("select count(*) from runs").fetchall()
    return journal


@pytest.mark.parametrize("command", ["topk", "run", "resume"])
def test_a_store_a_crash_left_with_a_hot_journal_opens_with_its_data_intact(workspace, capsys, command):
    from cdm_dist.driver.tracking import client_for

    path = workspace.root / "m.db"
    uri = f"sqlite:///{path}"
    config = workspace.write()
    if command == "resume":  # a campaign whose runs are in the store
        assert main(["run", "--quiet", config]) == 0
    client = client_for(uri)
    experiment = client.create_experiment("before-the-crash", artifact_location=str(workspace.root / "art"))
    run = client.create_run(experiment).info.run_id
    client.log_metric(run, "final_loss", 0.25)
    client.set_tag(run, "cdm.kind", "other")
    runs = sqlite3.connect(path).execute("select count(*) from runs").fetchone()[0]
    journal = _hot_journal(path)

    if command == "topk":
        assert main(["topk", "--tracking-uri", uri]) == 0
    elif command == "run":
        assert main(["run", "--quiet", config]) == 0
        runs += 1 + 2  # the campaign's run and its 2 chains
    else:
        (folder,) = (workspace.root / "out").iterdir()
        assert main(["run", "--quiet", "--resume", str(folder)]) == 0  # already finished: nothing to add
    assert "cdm: error" not in capsys.readouterr().err
    assert not journal.exists()
    with sqlite3.connect(path) as db:
        assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
        assert db.execute("select count(*) from runs").fetchone()[0] == runs
        assert db.execute("select count(*) from tags where key like 'junk%'").fetchone()[0] == 0  # rolled back
    assert client_for(uri).get_run(run).data.metrics == {"final_loss": 0.25}  # the deleted metrics are back


TUNE = {"space": {"chains.zeta.0.scale": {"type": "float", "low": 0.3, "high": 10}}, "prior_fit_limit": "off"}


@pytest.mark.parametrize("command", ["tune --storage", "run tracking.uri", "topk --tracking-uri"])
def test_database_passwords_are_masked_in_every_error(workspace, capsys, command):
    port = _closed_port()
    url = f"postgresql+psycopg2://nobody:secret@127.0.0.1:{port}/none"
    config = workspace.write(tune=TUNE, tracking__enabled=command != "tune --storage")
    if command == "tune --storage":
        line = _one_line(capsys, 2, "tune", config, "--trials", "1", "--storage", url)
    elif command == "run tracking.uri":
        url = f"http://nobody:secret@127.0.0.1:{port}"  # an MLflow server behind basic authentication
        line = _one_line(capsys, 2, "run", config, "--set", f"tracking.uri={url}")
    else:
        line = _one_line(capsys, 2, "topk", "--tracking-uri", url)
    assert "nobody:***@127.0.0.1" in line and "secret" not in line
    assert workspace.created() == []


@pytest.mark.parametrize(
    ("command", "setting", "field"),
    [
        ("tune", "tune.study_name=../../escaped", "tune.study_name"),
        ("tune", "tune.study_name={root}/escaped", "tune.study_name"),
        ("run", "name=../escaped", "name"),
        ("run", "tracking.experiment=../escaped", "tracking.experiment"),
        ("tune", "tracking.experiment={root}/escaped", "tracking.experiment"),
    ],
)
def test_names_that_would_leave_output_are_refused_before_anything_is_written(
    workspace, capsys, command, setting, field
):
    config = workspace.write(tune=TUNE, output=str(workspace.root / "a" / "b" / "out"))
    extra = ["--trials", "1"] if command == "tune" else []
    line = _one_line(capsys, 2, command, config, *extra, "--set", setting.format(root=workspace.root))
    assert line.startswith(f"cdm: error: {config}: {field}: ")
    assert workspace.created() == []


def test_an_artifact_location_that_cannot_be_written_stops_before_anything_starts(workspace, capsys):
    """A new experiment's tracking.artifact_location, or an existing experiment's own location, is checked."""
    line = _one_line(capsys, 2, "run", workspace.write(tracking__artifact_location="/proc/cdm-artifacts"))
    assert line.startswith("cdm: error: tracking.artifact_location: cannot write in /proc")
    assert workspace.created() == []

    from mlflow.tracking import MlflowClient

    (workspace.input / "a_file").write_text("")
    uri = f"sqlite:///{workspace.root}/m.db"
    MlflowClient(uri).create_experiment("kept", artifact_location=(workspace.input / "a_file").as_uri())
    capsys.readouterr()  # MLflow's lines on making the store
    line = _one_line(capsys, 2, "run", workspace.write(tracking__experiment="kept"))
    assert line == (
        f"cdm: error: tracking.experiment: the artifact location of 'kept': {workspace.input / 'a_file'} is a file, "
        "not a folder"
    )
    assert workspace.created() == ["m.db"] and MlflowClient(uri).search_runs(["1"]) == []
