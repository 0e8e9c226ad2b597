"""The time-matched SDEdit search beside an editing campaign."""

import json

import numpy as np
import pytest
import torch

from cdm_dist.driver.campaign import load_config, micro_batches
from cdm_dist.driver.runner import run_campaign
from cdm_dist.driver.sdedit import SEED_OFFSET, format_sdedit, load_sdedit, sdedit_search
from cdm_dist.driver.store import CampaignStore
from cdm_dist.driver.worker import LocalExecutor
from cdm_dist.errors import InputError


@pytest.fixture
def editing_campaign(small_campaign, tmp_path):
    np.save(tmp_path / "source.npy", np.array([0.8]))
    config = small_campaign(
        resources__executor="local",
        chains__count=4,
        chains__source={"file": str(tmp_path / "source.npy"), "strengths": [0.5, 0.75]},
    )
    report = run_campaign(config, LocalExecutor(config), CampaignStore.create(config), progress=False)
    return config, report


def test_sdedit_spends_the_budget_on_unguided_variations_and_keeps_the_best(editing_campaign):
    config, campaign = editing_campaign
    budget = 3 * campaign.wall_seconds
    result = sdedit_search(campaign.output_dir, seconds=budget, progress=False)
    assert result == load_sdedit(campaign.output_dir)
    assert result["budget_seconds"] == budget and len(result["rounds"]) >= 1
    assert result["variations"] == sum(r["variations"] for r in result["rounds"]) >= config.chains.count
    # every round but the first was sized to fit what was left of the budget
    assert sum(r["seconds"] for r in result["rounds"][:-1]) <= budget
    rows = []
    for r in result["rounds"]:
        report = json.loads((CampaignStore.open(r["folder"]).root / "report.json").read_text())
        rows += report["topk"]
        stored = CampaignStore.open(r["folder"])
        for batch in micro_batches(load_config(stored.config_path)):
            _, history = stored.load_result(batch.index)
            assert history.shape[0] == len(batch.chains) and torch.isnan(history).all()  # unguided: no guidance loss
    best = min(rows, key=lambda row: row["final_loss"])
    assert result["best"]["final_loss"] == best["final_loss"]
    assert result["best"]["seed"] >= config.chains.base_seed + SEED_OFFSET  # never one of the campaign's chains
    assert {"source_loss", "improvement"} <= set(result["best"]["metrics"])
    table = format_sdedit(result)
    assert table.splitlines()[1].startswith("mlgd_f") and table.splitlines()[2].startswith("sdedit")


def test_sdedit_needs_an_editing_campaign(small_campaign):
    config = small_campaign(resources__executor="local", chains__count=2)
    report = run_campaign(config, LocalExecutor(config), CampaignStore.create(config), progress=False)
    with pytest.raises(InputError, match=r"chains\.source is not set"):
        sdedit_search(report.output_dir, progress=False)


def test_cdm_evaluate_scores_the_sdedit_best_beside_the_top_k(editing_campaign):
    from cdm_dist.driver.evaluation import evaluate_campaign, format_evaluation

    _, campaign = editing_campaign
    result = sdedit_search(campaign.output_dir, seconds=campaign.wall_seconds, progress=False)
    report = evaluate_campaign(campaign.output_dir, ["evaluation.samples=300", "topk=2"], progress=lambda line: None)
    (baseline,) = report["baselines"]
    assert baseline["design"] == f"sdedit best of {result['variations']}"
    assert baseline["final_loss"] == result["best"]["final_loss"]
    source = report["source"]["mmd"]
    assert baseline["improvement"] == pytest.approx((source - baseline["mmd"]) / source, rel=1e-12)
    assert len(report["rows"]) == 2 and format_evaluation(report).count("sdedit best of") == 1
