"""A campaign end to end in-process: files, MLflow runs, top-k, failed chains, resume after the driver died."""

import math

import numpy as np
import pytest
import torch

from cdm_dist.driver.execution import chunk_end
from cdm_dist.driver.report import top_k
from cdm_dist.driver.runner import run_campaign
from cdm_dist.driver.store import CampaignStore
from cdm_dist.driver.tracking import client_for
from cdm_dist.driver.worker import LocalExecutor


def _run(config, store=None):
    return run_campaign(config, LocalExecutor(config), store or CampaignStore.create(config), progress=False)


def test_chunks_end_on_checkpoint_boundaries():
    assert [chunk_end(s, 4, 10) for s in (0, 3, 4, 8, 9)] == [4, 4, 8, 10, 10]


@pytest.fixture
def tracked(small_campaign):
    """A tracked campaign in which chain 3 diverges (its zeta schedule is absurd)."""
    good, other = "{kind: linear, scale: 3.0, final: 0.1}", "{kind: rt, normalize: true}"
    zetas = f"[{good}, {other}, {good}, {{scale: 1.0e+300}}]"
    config = small_campaign(tracking__enabled=True, chains__zeta=zetas, chains__count=6)
    return config, _run(config)


def test_a_campaign_tracks_a_parent_run_and_one_child_run_per_chain(tracked):
    config, report = tracked
    client = client_for(config.tracking.uri)
    parent = client.get_run(report.campaign_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["method.n_c"] == "16" and parent.data.params["chains.count"] == "6"
    assert parent.data.metrics["chains_ok"] == 5 and parent.data.metrics["chains_failed"] == 1
    experiment = client.get_experiment_by_name(config.tracking.experiment).experiment_id
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{report.campaign_run_id}'")
    assert len(children) == 6
    by_chain = {int(c.data.tags["cdm.chain"]): c for c in children}
    for row in report.rows:
        run = by_chain[row.chain]
        assert run.info.run_id == row.run_id
        assert run.data.params["seed"] == str(row.seed)
        assert run.data.tags["status"] == ("failed" if row.failed else "ok")
        artifacts = sorted(a.path for a in client.list_artifacts(row.run_id))
        if row.failed:
            assert "final_loss" not in run.data.metrics and run.info.status == "FAILED"
            continue
        assert run.data.metrics["final_loss"] == pytest.approx(row.final_loss)
        assert run.data.metrics["l2_gmm"] == pytest.approx(row.metrics["l2_gmm"])
        assert artifacts == [f"chain{row.chain:05d}.npy", f"chain{row.chain:05d}.png", "images"]
        assert len(client.list_artifacts(row.run_id, "images")) == 2  # the gallery's candidate image (+ its thumbnail)
        # the loss of every guided step (steps 3..11 of 12: guidance starts at a quarter) is logged
        history = client.get_metric_history(row.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(3, 12))


def test_failed_chains_never_reach_the_top_k(tracked):
    _, report = tracked
    assert [r.chain for r in report.rows if r.failed] == [3]
    summary = report.to_json()
    assert (summary["chains_total"], summary["chains_ok"], summary["chains_failed"]) == (6, 5, 1)
    assert 3 not in [r["chain"] for r in summary["topk"]]
    losses = [r["final_loss"] for r in summary["topk"]]
    assert losses == sorted(losses) and len(losses) == 5
    assert losses[0] == min(r.final_loss for r in report.rows if not r.failed)
    for entry in summary["topk"]:
        x = np.load(entry["x_path"])
        row = next(r for r in report.rows if r.chain == entry["chain"])
        assert x.shape == (1,) and np.isfinite(x).all() and row.seed == entry["seed"]


def test_top_k_orders_by_loss_and_skips_non_finite():
    from cdm_dist.driver.report import ChainRow

    rows = [
        ChainRow(i, i, "z", loss, failed, {}, "", None)
        for i, (loss, failed) in enumerate([(0.3, False), (math.inf, False), (0.1, False), (0.0, True), (0.2, False)])
    ]
    assert [r.chain for r in top_k(rows, 3)] == [2, 4, 0]


def test_top_k_leaves_out_chains_over_the_prior_fit_limit():
    from cdm_dist.driver.report import ChainRow

    fits = [0.5, 0.9, 0.7, math.nan, 0.6]  # a chain without prior_fit is never judged over it
    rows = [ChainRow(i, i, "z", 0.1 * i, False, {"prior_fit": f}, "", None) for i, f in enumerate(fits)]
    assert [r.chain for r in top_k(rows, 5, prior_fit_limit=0.65)] == [0, 3, 4]
    assert [r.chain for r in top_k(rows, 5, prior_fit_limit=0.7)] == [0, 2, 3, 4]  # the limit itself is within
    assert [r.chain for r in top_k(rows, 5)] == [0, 1, 2, 3, 4]


class DriverDied(Exception):
    pass


def test_resume_after_the_driver_died_redoes_no_finished_chain(small_campaign, monkeypatch):
    config = small_campaign(tracking__enabled=True)
    reference = _run(small_campaign(tracking__enabled=False, output=config.output + "-ref"))

    save_result = CampaignStore.save_result

    def die_after_the_first_result(self, result, history):
        save_result(self, result, history)
        raise DriverDied

    store = CampaignStore.create(config)
    with monkeypatch.context() as patch:
        patch.setattr(CampaignStore, "save_result", die_after_the_first_result)
        with pytest.raises(DriverDied):
            _run(config, store)
    finished = store.root / "results" / "mb00000.pt"
    stamp = finished.stat().st_mtime_ns
    parent_id = store.load_tracking()["parent_run_id"]
    # round-robin: the others had run all 12 steps (checkpointed at the end) but were not finished
    assert [store.load_checkpoint(i)[0].step for i in (1, 2)] == [12, 12]

    resumed = _run(config, CampaignStore.open(store.root))
    assert finished.stat().st_mtime_ns == stamp  # micro-batch 0 was not redone
    assert resumed.chain_steps == 0  # micro-batches 1 and 2 only needed their final evaluation
    assert resumed.campaign_run_id == parent_id
    for got, want in zip(resumed.rows, reference.rows, strict=True):
        assert got.final_loss == pytest.approx(want.final_loss, abs=1e-12)
        torch.testing.assert_close(torch.from_numpy(np.load(got.x_path)), torch.from_numpy(np.load(want.x_path)))
    client = client_for(config.tracking.uri)
    assert client.get_run(parent_id).info.status == "FINISHED"
    experiment = client.get_experiment_by_name(config.tracking.experiment).experiment_id
    assert len(client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent_id}'")) == 6


def test_a_campaign_tracks_to_an_mlflow_server(small_campaign, tmp_path, http_service):
    """The same campaign against `mlflow server` on 127.0.0.1 (artifacts proxied by the server)."""
    import sys

    port = http_service(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", "{port}",
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "srv"),
         "--workers", "1"]  # one worker comes up sooner (MLflow's default 4 on 2 cores)
    )  # fmt: skip
    config = small_campaign(tracking__enabled=True, tracking__uri=f"http://127.0.0.1:{port}", chains__count=2)
    report = _run(config)
    client = client_for(config.tracking.uri)
    assert client.get_run(report.campaign_run_id).data.metrics["chains_ok"] == 2
    for row in report.rows:
        run = client.get_run(row.run_id)
        assert run.data.metrics["final_loss"] == pytest.approx(row.final_loss)
        assert f"chain{row.chain:05d}.npy" in [a.path for a in client.list_artifacts(row.run_id)]


@pytest.mark.parametrize("problem", ["digits", "gmm5d"])
def test_a_campaign_runs_on_learned_models(small_campaign, tiny_checkpoints, problem):
    folder = tiny_checkpoints(problem)
    target = {"problem__digits_target": "bimodal"} if problem == "digits" else {}
    config = small_campaign(
        problem__name=problem,
        problem__models="learned",
        problem__checkpoints=str(folder),
        problem__fast_steps=2,
        **target,
        tracking__enabled=True,
        chains__count=4,
        method__num_steps=6,
        method__refine_steps=0,
    )
    report = _run(config)
    event = (1, 16, 16) if problem == "digits" else (4,)
    assert len(report.rows) == 4 and not any(r.failed for r in report.rows)
    assert np.load(report.rows[0].x_path).shape == event
    parent = client_for(config.tracking.uri).get_run(report.campaign_run_id)
    assert parent.data.params["problem.args.models"] == "learned"
    if problem == "gmm5d":  # exact metrics of the true mixture stay available with learned models
        assert all(math.isfinite(r.metrics["l2_gmm"]) for r in report.rows)


def test_a_latent_campaign_saves_the_latent_and_its_decoded_image(small_campaign, tmp_path):
    from PIL import Image

    from cdm_dist.models.spec import ProblemConfig
    from cdm_dist.models.tiny import save_tiny_latent_pipeline

    folder = save_tiny_latent_pipeline(tmp_path / "latent")
    problem = ProblemConfig.model_validate(
        {
            "prior": {"diffusers": str(folder), "subfolder": "unet", "vae_subfolder": "vae", "dtype": "bfloat16",
                      "conditioning": {"file": str(folder / "conditioning.safetensors")}},
            "sampler": {"factory": "cdm_dist.models.tiny:ImageFeatureSampler"},
            "target": {"factory": "cdm_dist.models.tiny:gaussian_target"},
        }
    )  # fmt: skip
    config = small_campaign(tracking__enabled=True, chains__count=2, method__num_steps=4, method__refine_steps=0)
    config = config.model_copy(update={"problem": problem})
    report = _run(config)
    client = client_for(config.tracking.uri)
    for row in report.rows:
        assert not row.failed and np.load(row.x_path).shape == (4, 8, 8)  # x* is the latent
        image = Image.open(row.x_path.replace(".npy", "_image.png"))
        assert image.size == (128, 128) and image.mode == "RGB"  # the decoded 16x16 image, shown 8x
        artifacts = sorted(a.path for a in client.list_artifacts(row.run_id))
        chain = f"chain{row.chain:05d}"
        assert artifacts == [f"{chain}.npy", f"{chain}.png", f"{chain}_image.png", "images"]


def test_pictures_false_writes_the_same_chains_without_pictures(small_campaign):
    drawn, bare = small_campaign(chains__count=2), small_campaign(chains__count=2, pictures=False)
    stores = CampaignStore.create(drawn), CampaignStore.create(bare)
    with_pictures, without = _run(drawn, stores[0]), _run(bare, stores[1])
    assert [r.final_loss for r in without.rows] == [r.final_loss for r in with_pictures.rows]
    for store, report, pictures in ((stores[0], with_pictures, [".png"]), (stores[1], without, [])):
        for row in report.rows:
            assert [p.suffix for p in store.chain_files(row.chain)] == [".npy", *pictures]
