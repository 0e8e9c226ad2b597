"""A target of 10^6 rows runs: guidance takes target_batch rows per step, and the held-out evaluation a seeded
subsample (targets.HELDOUT_ROWS), where the whole set's within-target block would need terabytes."""

import math

import numpy as np

from cdm_dist.driver.runner import run_campaign
from cdm_dist.driver.store import CampaignStore
from cdm_dist.driver.worker import LocalExecutor


def test_a_campaign_on_a_million_row_target_finishes(small_campaign, tmp_path, monkeypatch):
    from cdm_dist.chains import targets

    monkeypatch.setattr(targets, "HELDOUT_ROWS", 2000)  # the whole set's block would be 4 TB; 2000 rows keep it quick
    rows = np.random.default_rng(0).normal(size=(1_000_000, 1))  # gmm2d: y is 1-D
    np.save(tmp_path / "target.npy", rows)
    config = small_campaign(
        problem__target_file=str(tmp_path / "target.npy"),
        resources__executor="local",
        chains__count=2,
        method__num_steps=2,
        method__guidance_start=0.0,
        method__refine_steps=0,
        pictures=False,
    )
    subsampled = []
    cut = targets.subsample
    monkeypatch.setattr(targets, "subsample", lambda *a: subsampled.append(len(cut(*a))) or cut(*a))
    report = run_campaign(config, LocalExecutor(config), CampaignStore.create(config), progress=False)
    assert len(report.rows) == 2 and all(not r.failed and math.isfinite(r.final_loss) for r in report.rows)
    assert subsampled == [2000] * len(subsampled) and subsampled  # every held-out loss saw 2000 rows
