"""User problem specs on Ray: each split actor builds only its role's parts; user code reaches the actors only through
resources.runtime_env (on the session's cluster, on a two-node cluster, and in a `ray job submit` job)."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from ray.runtime_env import RuntimeEnv

from actors.coordinator import RayExecutor
from cdm_dist.driver.campaign import RAY_RUNTIME_ENV_KEYS, check_config, load_config
from cdm_dist.driver.runner import run_campaign
from cdm_dist.driver.store import CampaignStore
from cdm_dist.driver.worker import LocalExecutor
from cdm_dist.errors import InputError

SMALL = [
    "method.num_steps=8",
    "method.n_c=16",
    "method.target_batch=16",
    "method.n_guess=2",
    "chains.count=4",
    "resources.micro_batch=2",
    "resources.checkpoint_every=4",
    "tracking.enabled=false",
]


def _parts(module):
    return "{" + ", ".join(f"{p}: {{factory: '{module}:{p}'}}" for p in ("prior", "sampler", "target", "metrics")) + "}"


def _config(tmp_path, module, *extra):
    return load_config(None, [*SMALL, f"output={tmp_path / 'campaigns'}", f"problem={_parts(module)}", *extra])


def test_the_runtime_env_keys_are_those_ray_knows():
    public = {k for k in RuntimeEnv.known_fields if not k.startswith("_")}
    assert set(RAY_RUNTIME_ENV_KEYS) == public
    with pytest.raises(InputError, match=r"resources\.runtime_env: Value error, unknown key\(s\) \['workdir'\]; Ray"):
        load_config(None, ["resources.runtime_env={workdir: .}"])
    with pytest.raises(InputError, match=r"resources\.runtime_env\.working_dir: Value error, /nowhere is not a"):
        load_config(None, ["resources.runtime_env={working_dir: /nowhere}"])


def test_split_actors_each_build_only_their_roles_parts(ray_cluster, tmp_path, user_plugin):
    env = f"resources.runtime_env={{env_vars: {{PYTHONPATH: '{user_plugin.folder}'}}}}"
    config = _config(tmp_path, user_plugin.module, "resources.placement=split", "resources.num_cpus=0.5", env)
    check_config(config)  # the driver cannot import the plugin: the actors check it
    executor = RayExecutor(config)
    try:
        infos = {i["role"]: i for i in executor.actor_info()}
        report = run_campaign(config, executor, CampaignStore.create(config), progress=False)
    finally:
        executor.close()
    built = user_plugin.built()
    by_pid = {pid: sorted(part for part, p in built if p == pid) for pid in {p for _, p in built}}
    assert by_pid == {infos["prior"]["pid"]: ["prior"], infos["sampler"]["pid"]: ["metrics", "sampler", "target"]}
    assert infos["prior"]["built"] == {"prior": 1} and infos["prior"]["parts"].keys() == {"prior"}
    assert infos["sampler"]["built"] == {"sampler": 1, "target": 1, "metrics": 1}
    local = load_config(None, [*SMALL, f"output={tmp_path / 'local'}", "resources.executor=local"])
    reference = run_campaign(local, LocalExecutor(local), CampaignStore.create(local), progress=False)
    for got, want in zip(report.rows, reference.rows, strict=True):
        assert got.final_loss == pytest.approx(want.final_loss, abs=1e-5)
        assert got.metrics["prior_fit"] == pytest.approx(want.metrics["prior_fit"], abs=1e-5)
        np.testing.assert_allclose(np.load(got.x_path), np.load(want.x_path), atol=1e-5)


def test_an_actor_that_cannot_import_the_plugin_stops_the_campaign_in_one_line(ray_cluster, tmp_path, user_plugin):
    (tmp_path / "elsewhere").mkdir()
    env = f"resources.runtime_env={{env_vars: {{PYTHONPATH: '{tmp_path / 'elsewhere'}'}}}}"
    config = _config(tmp_path, user_plugin.module, "resources.num_cpus=0.5", env)
    message = rf"^problem\.prior\.factory: cannot import '{user_plugin.module}' \(No module"
    with pytest.raises(InputError, match=message):
        RayExecutor(config)
    assert not (tmp_path / "campaigns").exists()


def test_local_runtime_env_paths_need_cdm_to_start_ray(ray_cluster, tmp_path, user_plugin):
    config = _config(tmp_path, user_plugin.module, f"resources.runtime_env={{working_dir: '{user_plugin.folder}'}}")
    with pytest.raises(InputError, match=r"resources\.runtime_env: \[.*plugin'\] are local paths, which Ray uploads"):
        RayExecutor(config)


TWO_NODES = """
import json, sys
import ray
from ray.cluster_utils import Cluster
from actors.coordinator import RayExecutor
from cdm_dist.driver.campaign import check_config, load_config
from cdm_dist.errors import InputError
from cdm_dist.driver.runner import run_campaign
from cdm_dist.driver.store import CampaignStore

cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 2}})
cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
items = {items!r}
without = load_config(None, items)
try:
    check_config(without)
    print("NO ERROR")
except InputError as exc:
    print("WITHOUT", json.dumps(str(exc)))
config = load_config(None, items + [{env!r}])
check_config(config)
executor = RayExecutor(config, address=cluster.address)
info = executor.actor_info()
report = run_campaign(config, executor, CampaignStore.create(config), progress=False)
executor.close()
print("RESULT", json.dumps({{"info": info, "losses": [r.final_loss for r in report.rows]}}))
ray.shutdown()
cluster.shutdown()
"""


def test_a_two_node_cluster_runs_a_users_problem_shipped_by_runtime_env(tmp_path, user_plugin):
    """A simulated two-node cluster in its own process: the plugin is importable only through working_dir."""
    items = [*SMALL, f"output={tmp_path / 'campaigns'}", f"problem={_parts(user_plugin.module)}",
             "resources.placement=split", "resources.replicas=2", "resources.num_cpus=1"]  # fmt: skip
    env = f"resources.runtime_env={{working_dir: '{user_plugin.folder}'}}"
    script = textwrap.dedent(TWO_NODES.format(items=items, env=env))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    without = json.loads(out.stdout.split("WITHOUT", 1)[1].splitlines()[0])
    assert without.startswith(f"problem.prior.factory: cannot import '{user_plugin.module}'")
    assert "resources.runtime_env" in without and "\n" not in without
    result = json.loads(out.stdout.split("RESULT", 1)[1])
    nodes = [i["node_id"] for i in result["info"]]  # replica 0: prior, sampler; replica 1: prior, sampler
    assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and nodes[0] != nodes[2]
    assert [i["built"] for i in result["info"]] == [{"prior": 1}, {"sampler": 1, "target": 1, "metrics": 1}] * 2
    assert len(result["losses"]) == 4 and all(v < float("inf") for v in result["losses"])
