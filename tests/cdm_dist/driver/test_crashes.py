"""A driver SIGKILLed at any point, then `cdm run --resume`: the store and MLflow agree, nothing is lost or repeated."""

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from cdm_cli.main import main
from cdm_dist.driver.tracking import client_for

KILLER = """
import os, signal, sys
import mlflow.tracking
from cdm_cli.main import main
from cdm_dist.driver.store import CampaignStore

owner, name, when, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cls = {"store": CampaignStore, "mlflow": mlflow.tracking.MlflowClient}[owner]
real, calls = getattr(cls, name), [0]

def wrapped(*args, **kwargs):
    calls[0] += 1
    if when == "before" and calls[0] == count:
        os.kill(os.getpid(), signal.SIGKILL)
    out = real(*args, **kwargs)
    if when == "after" and calls[0] == count:
        os.kill(os.getpid(), signal.SIGKILL)
    return out

setattr(cls, name, wrapped)
sys.exit(main(sys.argv[5:]))
"""

POINTS = {  # where the driver dies: (class, method, before/after the call, which call)
    "after the first result file": ("store", "save_result", "after", 1),
    "after tracking, before the result file": ("store", "save_result", "before", 2),
    "between two chains' tracking": ("mlflow", "set_terminated", "after", 3),
    "mid-chain: metrics written, run not closed": ("mlflow", "log_artifact", "after", 8),
    "between micro-batches": ("store", "save_checkpoint", "after", 4),
    "while making the chains' runs": ("mlflow", "create_run", "after", 4),
}


def _args(tmp_path, name):
    sets = {
        "name": name, "method.num_steps": 8, "method.n_c": 16, "method.target_batch": 16, "method.n_guess": 2,
        "method.refine_steps": 1, "chains.count": 6, "resources.executor": "local", "resources.micro_batch": 2,
        "resources.checkpoint_every": 4, "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db",
        "tracking.artifact_location": str(tmp_path / "art"), "tracking.experiment": name,
        "tracking.flush_seconds": 0,  # every chunk's losses are written live, before the driver dies
        "output": str(tmp_path / name),
    }  # fmt: skip
    return ["run", "--quiet", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


@pytest.fixture(scope="module")
def unfaulted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unfaulted")
    assert main([*_args(tmp, "reference"), "--json", str(tmp / "r.json")]) == 0
    return json.loads((tmp / "r.json").read_text())


@pytest.mark.parametrize("point", list(POINTS))
def test_a_killed_driver_resumes_to_exactly_one_complete_run_per_chain(tmp_path, unfaulted, point):
    owner, method, when, count = POINTS[point]
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, owner, method, when, str(count), *_args(tmp_path, "crash")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    (folder,) = (tmp_path / "crash").iterdir()
    assert main(["run", "--resume", str(folder), "--quiet", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())

    client = client_for(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("crash").experiment_id
    campaigns = client.search_runs([experiment], "tags.`cdm.kind` = 'campaign'")
    assert [c.info.run_id for c in campaigns] == [report["campaign_run_id"]]  # no orphan parent
    assert campaigns[0].info.status == "FINISHED" and campaigns[0].data.metrics["chains_ok"] == 6
    children = client.search_runs([experiment], "tags.`cdm.kind` = 'chain'")
    assert sorted(int(c.data.tags["cdm.chain"]) for c in children) == list(range(6))  # exactly one run per chain
    store_rows = {}
    for index in range(3):
        payload = torch.load(folder / "results" / f"mb{index:05d}.pt", weights_only=True)
        for row in range(2):
            store_rows[2 * index + row] = (float(payload["final_loss"][row]), payload["history"][row])
    for run in children:
        chain = int(run.data.tags["cdm.chain"])
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "ok"
        final = client.get_metric_history(run.info.run_id, "final_loss")
        assert len(final) == 1 and final[0].value == pytest.approx(store_rows[chain][0], abs=1e-12)
        loss = client.get_metric_history(run.info.run_id, "loss")
        steps = [m.step for m in loss]
        assert len(steps) == len(set(steps))  # no point written twice
        history = store_rows[chain][1]
        assert steps and sorted(steps) == [s for s in range(8) if not torch.isnan(history[s])]
        artifacts = Counter(a.path for a in client.list_artifacts(run.info.run_id))
        assert artifacts == Counter([f"chain{chain:05d}.npy", f"chain{chain:05d}.png", "images"])
        assert len(client.list_artifacts(run.info.run_id, "images")) == 2  # one candidate image, after any crash
    for name in ("chains_done", "best_final_loss", "chains_ok"):
        steps = [m.step for m in client.get_metric_history(campaigns[0].info.run_id, name)]
        assert len(steps) == len(set(steps))
    # the same chains as an unfaulted campaign, and `cdm topk` ranks them as the store does
    for got, want in zip(report["topk"], unfaulted["topk"], strict=True):
        assert (got["chain"], got["final_loss"]) == (want["chain"], pytest.approx(want["final_loss"], abs=1e-12))
        np.testing.assert_array_equal(np.load(got["x_path"]), np.load(want["x_path"]))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert (
        main(["topk", "--tracking-uri", uri, "--experiment", "crash", "-k", "5", "--json", str(tmp_path / "t.json")])
        == 0
    )
    topk = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [r["final_loss"] for r in topk] == [r["final_loss"] for r in report["topk"]]
