"""MLflow tracking while a campaign runs: live per-chain loss curves, progress, per-node system metrics."""

import socket
import time
from types import SimpleNamespace

import pytest

from cdm_dist.driver.callbacks import CampaignCallback
from cdm_dist.driver.runner import run_campaign
from cdm_dist.driver.store import CampaignStore
from cdm_dist.driver.tracking import client_for
from cdm_dist.driver.worker import LocalExecutor
from cdm_dist.errors import InputError


class Peek(CampaignCallback):
    """Calls `function(batch, chunk)` after the tracker has seen the chunk."""

    def __init__(self, function):
        self.function = function

    def on_chunk(self, batch, chunk, progress):
        self.function(batch, chunk)


def test_loss_curves_reach_mlflow_while_the_campaign_runs(small_campaign):
    config = small_campaign(tracking__enabled=True, tracking__flush_seconds=0, method__refine_steps=0)
    store = CampaignStore.create(config)
    client = client_for(config.tracking.uri)
    seen = {}

    def look(batch, chunk):
        if batch.index == 2 and chunk.step == 8:  # micro-batch 2 (chains 4, 5) is two thirds done
            ids = store.load_tracking()["child_run_ids"]
            seen["steps"] = sorted(m.step for m in client.get_metric_history(ids["4"], "loss"))
            parent = store.load_tracking()["parent_run_id"]
            seen["progress"] = [m.value for m in client.get_metric_history(parent, "chain_steps_done")]

    report = run_campaign(config, LocalExecutor(config), store, [Peek(look)], progress=False)
    assert seen["steps"] == [3, 4, 5, 6, 7]  # guided steps so far (guidance starts at step 3)
    assert seen["progress"] and max(seen["progress"]) == 6 * 8  # three micro-batches at step 8
    for row in report.rows:
        steps = [m.step for m in client.get_metric_history(row.run_id, "loss")]
        assert sorted(steps) == list(range(3, 12))  # every guided step, once


def test_system_metrics_of_this_machine_reach_the_campaign_run(small_campaign):
    config = small_campaign(tracking__enabled=True, tracking__system_metrics=True, tracking__system_metrics_seconds=0.2)
    slow = [Peek(lambda b, c: time.sleep(0.2))]
    report = run_campaign(config, LocalExecutor(config), CampaignStore.create(config), slow, progress=False)
    run = client_for(config.tracking.uri).get_run(report.campaign_run_id)
    host = socket.gethostname()
    assert run.data.tags[f"cdm.node.{host}"] == "localhost"
    assert f"system/{host}/cpu_utilization_percentage" in run.data.metrics
    assert run.data.metrics[f"system/{host}/system_memory_usage_megabytes"] > 0


def test_system_metrics_of_every_ray_node_reach_the_campaign_run(ray_cluster, small_campaign):
    from actors.coordinator import RayExecutor

    config = small_campaign(
        tracking__enabled=True, tracking__system_metrics=True, tracking__system_metrics_seconds=0.2,
        resources__placement="split",
    )  # fmt: skip
    executor = RayExecutor(config)
    try:
        report = run_campaign(config, executor, CampaignStore.create(config), [Peek(lambda b, c: time.sleep(0.2))],
                              progress=False)  # fmt: skip
        assert executor.monitors == []  # stopped at the end
    finally:
        executor.close()
    run = client_for(config.tracking.uri).get_run(report.campaign_run_id)
    nodes = [k.removeprefix("cdm.node.") for k in run.data.tags if k.startswith("cdm.node.")]
    assert nodes == [n["NodeID"][:12] for n in ray_cluster.nodes() if n["Alive"]]
    assert f"system/{nodes[0]}/cpu_utilization_percentage" in run.data.metrics


def test_system_metrics_need_a_store_every_node_can_write(small_campaign, monkeypatch):
    import ray

    from actors.coordinator import RayExecutor

    with pytest.raises(InputError, match=r"tracking: Value error, system_metrics: needs tracking\.enabled"):
        small_campaign(tracking__enabled=False, tracking__system_metrics=True)
    config = small_campaign(tracking__enabled=True, tracking__system_metrics=True)
    monkeypatch.setattr(
        ray, "nodes", lambda: [{"Alive": True, "NodeManagerAddress": a} for a in ("10.0.0.1", "10.0.0.2")]
    )
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.0.1")
    with pytest.raises(
        InputError, match=r"tracking\.system_metrics: the MLflow store sqlite:///.* nodes \['10\.0\.0\.2'\]"
    ):
        RayExecutor._check_metrics_store(SimpleNamespace(config=config))
    server = config.model_copy(update={"tracking": config.tracking.model_copy(update={"uri": "http://mlflow:5000"})})
    RayExecutor._check_metrics_store(SimpleNamespace(config=server))  # a server: every node can reach it


def test_a_maker_killed_mid_way_leaves_no_half_made_store(tmp_path, monkeypatch):
    """A new SQLite store is made beside its path and renamed in: a maker interrupted before the rename leaves nothing
    at the path (a half-made store would fail every later opening), and the next opening removes what it left and
    makes the store whole."""
    import os

    import cdm_dist.driver.tracking as tracking

    path = tmp_path / "mlflow.db"
    real_replace = os.replace

    def killed(src, dst):
        raise KeyboardInterrupt  # the maker stops after MLflow made the tables, before the rename

    monkeypatch.setattr(tracking.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        tracking.make_sqlite_store(path)
    (left,) = tmp_path.glob(".mlflow.db.*.new")
    assert not path.exists() and left.stat().st_size > 0
    monkeypatch.setattr(tracking.os, "replace", real_replace)
    client = client_for(f"sqlite:///{path}")
    assert [e.name for e in client.search_experiments()] == ["Default"] and path.stat().st_size > 0
    assert not list(tmp_path.glob(".mlflow.db.*.new"))
