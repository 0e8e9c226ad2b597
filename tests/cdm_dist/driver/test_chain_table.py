"""Campaigns above tracking.child_runs_max: every chain in the campaign run's chains table, child runs for the top-k
only, and `cdm topk` reading the table. The same campaigns tracked both ways (two experiments of one store) give the
same `cdm topk` rows; the table holds what the campaign folder holds; a tabled chain exports from its folder."""

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cdm_cli.main import main
from cdm_dist.driver.campaign import load_config
from cdm_dist.driver.chain_table import CHAIN_RUNS_TAG, CHAINS_TABLE, chain_runs_mode
from cdm_dist.driver.runner import run_campaign
from cdm_dist.driver.selection import local_folder
from cdm_dist.driver.store import CampaignStore
from cdm_dist.driver.tracking import client_for
from cdm_dist.driver.worker import LocalExecutor

SMALL = {
    "method.num_steps": 4,
    "method.n_c": 16,
    "method.target_batch": 16,
    "method.n_guess": 2,
    "method.eta": 0.5,
    "method.refine_steps": 0,
    "chains.count": 4,
    "chains.zeta": "[{kind: linear, scale: 3.0, final: 0.1}, {kind: rt, normalize: true}]",
    "resources.executor": "local",
    "resources.micro_batch": 2,
    "pictures": False,
    "topk": 2,
}
CAMPAIGNS = (("a", 0), ("c", 2))  # name, base_seed: c's chains 0 and 1 are a's chains 2 and 3


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Campaigns a and c in experiment 'runs' (a run per chain) and again in 'tabled' (child_runs_max 0)."""
    root = tmp_path_factory.mktemp("chain_table")
    uri = f"sqlite:///{root}/mlflow.db"
    reports = {}
    for experiment, most in (("runs", 500), ("tabled", 0)):
        for name, seed in CAMPAIGNS:
            items = SMALL | {"name": name, "chains.base_seed": seed, "tracking.child_runs_max": most}
            items |= {"tracking.uri": uri, "tracking.experiment": experiment, "output": str(root / "campaigns")}
            items |= {"tracking.artifact_location": str(root / "artifacts")}
            config = load_config(None, [f"{k}={v}" for k, v in items.items()])
            store = CampaignStore.create(config)
            reports[experiment, name] = run_campaign(config, LocalExecutor(config), store, progress=False)
    return {"uri": uri, "root": root, "reports": reports, "client": client_for(uri)}


def _topk(store, tmp_path, *flags):
    out = tmp_path / f"topk{len(list(tmp_path.iterdir()))}.json"
    assert main(["topk", "--tracking-uri", store["uri"], "--json", str(out), *flags]) == 0
    return json.loads(out.read_text())["rows"]


def _same_chain(row):
    """A row without what names its runs: the chain, its numbers and the campaigns (by name) it is in."""
    names = [row["campaign"].split("-")[0]] + [a["campaign"].split("-")[0] for a in row["also"]]
    hidden = ("run_id", "campaign", "campaign_run_id", "also")
    return {k: v for k, v in row.items() if k not in hidden} | {"in": names}


def test_the_mode_follows_the_threshold():
    assert [chain_runs_mode(n, 3) for n in (0, 3, 4)] == ["all", "all", "top"]


def test_topk_lists_the_same_chains_whether_each_has_a_run_or_only_a_table_row(store, tmp_path):
    for flags in ((), ("--all",), ("-k", "3")):
        runs = _topk(store, tmp_path, "--experiment", "runs", "-k", "100", *flags)
        tabled = _topk(store, tmp_path, "--experiment", "tabled", "-k", "100", *flags)
        assert [_same_chain(r) for r in tabled] == [_same_chain(r) for r in runs]
    rows = _topk(store, tmp_path, "--experiment", "tabled", "-k", "100")
    assert len(rows) == 6 and sum(len(r["also"]) for r in rows) == 2  # a's chains 2 and 3 are c's 0 and 1
    assert any("#" in r["run_id"] for r in rows)  # rows without a run are named CAMPAIGN#CHAIN


def test_the_table_holds_every_chain_as_the_campaign_folder_and_runs_only_the_top_k(store):
    client = store["client"]
    for (experiment, _), report in store["reports"].items():
        parent = client.get_run(report.campaign_run_id)
        assert parent.data.tags[CHAIN_RUNS_TAG] == ("all" if experiment == "runs" else "top")
        table = pq.read_table(local_folder(parent.info.artifact_uri) / CHAINS_TABLE).to_pydict()
        results = [CampaignStore(report.output_dir).load_result(i)[0] for i in range(2)]
        losses = torch.cat([r.final_loss for r in results]).tolist()
        assert table["chain"] == [0, 1, 2, 3] and table["final_loss"] == losses  # exact
        fits = torch.cat([r.metrics["prior_fit"] for r in results]).tolist()
        assert table["metric.prior_fit"] == fits
        query = f"tags.`cdm.campaign` = '{report.campaign_run_id}'"
        children = {int(r.data.tags["cdm.chain"]): r for r in client.search_runs([parent.info.experiment_id], query)}
        best = sorted(range(4), key=losses.__getitem__)[:2]
        assert sorted(children) == (list(range(4)) if experiment == "runs" else sorted(best))
        for chain, run in children.items():
            assert table["run_id"][chain] == run.info.run_id and run.data.metrics["final_loss"] == losses[chain]
            assert run.info.status == "FINISHED" and len(client.get_metric_history(run.info.run_id, "loss")) > 0
        assert all(table["run_id"][c] is None for c in range(4) if c not in children)


def test_topk_equals_the_campaign_folders_and_exports_a_tabled_chain_from_its_folder(store, tmp_path):
    reports = [store["reports"]["tabled", name] for name, _ in CAMPAIGNS]
    losses = [(r.final_loss, r.chain, report.output_dir) for report in reports for r in report.rows]
    rows = _topk(store, tmp_path, "--experiment", "tabled", "--all", "-k", "5", "--export", str(tmp_path / "x"))
    assert [r["final_loss"] for r in rows] == sorted(loss for loss, _, _ in losses)[:5]
    tabled = [r for r in rows if "#" in r["run_id"]]
    assert tabled and all(math.isfinite(r["prior_fit"]) for r in tabled)
    for row in tabled:
        folder = next(f for loss, chain, f in losses if (loss, chain) == (row["final_loss"], row["chain"]))
        np.testing.assert_array_equal(np.load(row["x_path"]), np.load(CampaignStore(folder).chain_x_path(row["chain"])))
        assert load_config(row["config_path"], []).chains.base_seed == row["seed"]


KILLER = """
import os, signal, sys
import mlflow.tracking
from cdm_cli.main import main

name, count, calls = sys.argv[1], int(sys.argv[2]), [0]
real = getattr(mlflow.tracking.MlflowClient, name)

def wrapped(*args, **kwargs):
    out = real(*args, **kwargs)
    calls[0] += 1
    if calls[0] == count:
        os.kill(os.getpid(), signal.SIGKILL)
    return out

setattr(mlflow.tracking.MlflowClient, name, wrapped)
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("point", [("create_run", 2), ("log_artifact", 2)])  # after the first top-k run is made;
def test_a_driver_killed_while_writing_the_top_k_runs_resumes_to_one_run_each(tmp_path, point):  # half-written
    import subprocess
    import sys

    items = SMALL | {"name": "k", "chains.count": 6, "tracking.child_runs_max": 0, "output": str(tmp_path / "out")}
    items |= {"tracking.uri": f"sqlite:///{tmp_path}/m.db", "tracking.artifact_location": str(tmp_path / "art")}
    args = ["run", "--quiet", *[a for k, v in items.items() for a in ("--set", f"{k}={v}")]]
    killed = subprocess.run([sys.executable, "-c", KILLER, *map(str, point), *args], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    (folder,) = (tmp_path / "out").iterdir()
    assert main(["run", "--resume", str(folder), "--quiet", "--json", str(tmp_path / "r.json")]) == 0

    client = client_for(items["tracking.uri"])
    (parent,) = client.search_runs(["1"], "tags.`cdm.kind` = 'campaign'")
    children = client.search_runs(["1"], "tags.`cdm.kind` = 'chain'")
    results = [CampaignStore(folder).load_result(i)[0] for i in range(3)]
    losses = torch.cat([r.final_loss for r in results]).tolist()
    best = sorted(range(6), key=losses.__getitem__)[:2]
    assert sorted(int(r.data.tags["cdm.chain"]) for r in children) == sorted(best)  # each once
    for run in children:
        chain = int(run.data.tags["cdm.chain"])
        assert run.info.status == "FINISHED" and run.data.metrics["final_loss"] == losses[chain]
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == [f"chain{chain:05d}.npy"]  # written once
    table = pq.read_table(local_folder(parent.info.artifact_uri) / CHAINS_TABLE).to_pydict()
    assert table["final_loss"] == losses and parent.info.status == "FINISHED"
    rows = _topk({"uri": items["tracking.uri"]}, tmp_path, "-k", "6")
    assert [r["final_loss"] for r in rows] == sorted(losses)
