import math
from pathlib import Path

import pytest
import torch

from benchmarks.digits import (
    HELDOUT_ROTATION_SEED,
    PAPER_FAST_STEPS,
    PAPER_SEEDS,
    bench_digits,
    heldout_prior_fit,
    paper_settings,
    prior_fit_limit,
    study_settings,
    top_within_limit,
)
from cdm_dist.chains.losses import MMDLoss
from cdm_dist.errors import InputError


def test_the_top_5_skips_chains_over_the_prior_fit_limit_and_failed_ones():
    loss = torch.tensor([0.5, 0.1, 0.2, math.inf, 0.05, 0.3, 0.4, 0.15])
    fit = torch.tensor([0.1, 0.9, 0.2, 0.1, math.nan, 0.2, 0.1, 0.2])  # chain 1 over 0.5; chain 4's NaN is not over
    assert top_within_limit(loss, fit, 0.5).tolist() == [4, 7, 2, 5, 6]
    assert top_within_limit(loss, fit, None).tolist() == [4, 1, 7, 2, 5]  # no limit: by loss alone
    brute = sorted((v, i) for i, v in enumerate(loss.tolist()) if math.isfinite(v) and not fit[i] > 0.5)
    assert top_within_limit(loss, fit, 0.5, k=8).tolist() == [i for _, i in brute]


def test_the_prior_fit_limit_is_the_unguided_95_percent_quantile():
    fits = torch.tensor([0.3, 0.1, math.nan, 0.2, 0.5, 0.4])  # NaN (a failed chain) left out: 5 values
    ordered = sorted(v for v in fits.tolist() if not math.isnan(v))
    position = 0.95 * (len(ordered) - 1)  # linear interpolation between order statistics
    low = ordered[int(position)]
    expected = low + (position - int(position)) * (ordered[int(position) + 1] - low)
    assert prior_fit_limit(fits) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("kind", "steps", "min_t", "scale"), [("uniform", 290, 250, 0.1), ("bimodal", 125, 0, 0.1),
                                                                ("unimodal", 130, 0, 0.2)])  # fmt: skip
def test_the_paper_protocol_per_target(kind, steps, min_t, scale):
    config, zeta = paper_settings(kind)
    assert (config.num_steps, config.guidance_min_t, zeta.scale) == (steps, min_t, scale)
    assert config.loss.name == "sliced_wasserstein" and (config.loss.p, config.loss.n_projections) == (1, 50)
    assert config.grad == "full" and zeta.normalize


@pytest.mark.parametrize("kind", ["uniform", "bimodal", "unimodal"])
def test_the_study_protocol_is_the_paper_protocol_with_the_studys_changes(kind):
    paper, paper_zeta = paper_settings(kind)
    study, study_zeta = study_settings(kind)
    uniform = {"guidance_min_t": 100, "loss": MMDLoss()} if kind == "uniform" else {}
    changed = {"grad": "identity", "cleanup_eta": 1.0} | uniform
    assert study == paper.model_copy(update=changed)
    assert study_zeta == paper_zeta.model_copy(update={"scale": 0.2 if kind == "uniform" else paper_zeta.scale})


@pytest.mark.parametrize(("example", "protocol"), [("digits_paper.yaml", paper_settings),
                                                  ("digits_study.yaml", study_settings)])  # fmt: skip
def test_the_examples_are_the_bench_protocols_on_the_uniform_target(example, protocol):
    from cdm_dist.driver.campaign import load_config

    campaign = load_config(Path(__file__).resolve().parents[2] / "examples" / example)
    config, zeta = protocol("uniform")
    assert campaign.method.mlgd() == config and campaign.chains.zeta == [zeta]
    assert campaign.chains.count == PAPER_SEEDS and campaign.problem.args["fast_steps"] == PAPER_FAST_STEPS
    assert campaign.problem.args["digits_target"] == "uniform"


def test_an_unknown_protocol_is_refused_by_name(tmp_path):
    with pytest.raises(InputError, match=r"^--protocol: unknown 'mnist'; expected one of \['default', 'paper', 'st"):
        bench_digits(str(tmp_path / "d.json"), protocol="mnist")
    assert not (tmp_path / "d.json").exists()


def test_the_heldout_prior_fit_scores_each_rotated_heldout_digit_on_its_own(tiny_checkpoints):
    """The limit's reference: every held-out digit at its seeded random rotation, scored as a batch, equals each digit
    rotated and scored alone (prior_fit gives every row the same noise, so rows do not interact)."""
    from cdm_dist.chains.priors import prior_fit
    from cdm_dist.problems.digits import base_digits, rotate, to_model_space
    from cdm_dist.problems.shipped import digits_problem

    problem = digits_problem("uniform", tiny_checkpoints("digits"))
    scores = heldout_prior_fit(problem, seed=3)
    images, _ = base_digits("heldout")
    assert scores.shape == (len(images),) and bool(scores.isfinite().all())
    turns = torch.rand(len(images), generator=torch.Generator().manual_seed(HELDOUT_ROTATION_SEED))
    for k in (0, 7, len(images) - 1):
        alone = to_model_space(rotate(images[k : k + 1], 2 * math.pi * turns[k : k + 1]))
        assert float(prior_fit(problem.prior, alone, 3)[0]) == pytest.approx(float(scores[k]), rel=1e-4)
    assert float(prior_fit(problem.prior, alone, 4)[0]) != pytest.approx(float(scores[k]), rel=1e-4)  # seeded noise


def test_the_study_protocol_bench_runs_its_settings_and_judges_its_top_5(tmp_path, tiny_checkpoints, monkeypatch):
    import benchmarks.digits as bench

    scored = []  # the tiny prior's held-out scores, scaled so that its chains fall within the limit

    def loose(problem, seed):
        scored.append(10 * heldout_prior_fit(problem, seed))
        return scored[-1]

    monkeypatch.setattr(bench, "heldout_prior_fit", loose)
    out = tmp_path / "paper.json"
    folder = str(tiny_checkpoints("digits"))
    payload = bench_digits(str(out), ("uniform",), 3, quick=True, checkpoints=folder, protocol="study")
    (row,) = payload["rows"]
    used = payload["settings"]["uniform"]
    assert used["mlgd"]["guidance_min_t"] == 100 and used["mlgd"]["loss"]["name"] == "mmd" and used["fast_steps"] == 6
    assert used["mlgd"]["grad"] == row["grad"] == "identity" and used["mlgd"]["cleanup_eta"] == 1.0
    assert used["zeta"][0]["scale"] == 0.2
    assert len(scored) == 1 and row["prior_fit_limit"] == pytest.approx(prior_fit_limit(scored[0]), rel=1e-12)
    assert row["chains"] == 3 and row["num_steps"] == 10 and len(row["top5_seeds"]) == 3 - row["chains_over_limit"]
    assert row["top5_seeds"] and row["top5_zeros"] == row["top5_judged_digits"].count(0)
    assert sum(row["judged_within_limit"].values()) == 3 - row["chains_over_limit"]  # every chain within, judged
    assert row["zeros_within_limit"] == row["judged_within_limit"].get("0", 0) >= row["top5_zeros"]
    assert row["top5_judged_by_block"] is None  # one block
    judged = zip(row["top5_judged_digits"], row["top5_judge_confidence"], strict=True)
    assert all(c >= 0.7 for d, c in judged if d >= 0)  # a digit only at confidence >= 0.7
    assert (tmp_path / "digits_study_uniform_top5.png").is_file() and out.with_suffix(".md").is_file()


def test_the_zeros_study_judges_each_trials_top_5_within_the_study_limit(tmp_path):
    """benchmarks.digits_tune reads a `cdm tune` folder: per trial, its chains from the campaign folder, the top 5
    within the study's prior_fit limit, judged; a trial over the limit is infeasible and sorts last."""
    import optuna

    from benchmarks.digits_tune import analyse, open_study
    from cdm_dist.driver.campaign import load_config
    from cdm_dist.driver.execution import MicroBatchResult
    from cdm_dist.driver.store import CampaignStore
    from cdm_dist.problems.digits import base_digits, rotate, to_model_space
    from tuning.study import CAMPAIGN_DIR, PRIOR_FIT_LIMIT

    example = Path(__file__).resolve().parents[2] / "examples" / "tune_digits_zeros.yaml"
    config = load_config(example, [f"output={tmp_path}"])
    images, labels = base_digits("heldout")
    zeros, ones = images[labels == 0][:3], images[labels == 1][:3]
    x = to_model_space(rotate(torch.cat([zeros, ones]), torch.full((6,), 0.5)))  # three 0s, three 1s
    folder = tmp_path / "study-tune-digits-zeros"
    folder.mkdir()
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(folder / "optuna.journal")))
    study = optuna.create_study(study_name="tune-digits-zeros", storage=storage)
    study.set_user_attr(PRIOR_FIT_LIMIT, 0.5)
    space = {"method.grad": optuna.distributions.CategoricalDistribution(["full", "identity"])}
    fits = {"full": [0.1, 0.9, 0.2, 0.1, 0.1, 0.1], "identity": [0.9] * 6}  # chain 1 (a 0) over the limit
    for value, grad in ((0.3, "full"), (0.1, "identity")):
        store = CampaignStore.create(config.model_copy(update={"name": f"trial-{grad}"}))
        loss = torch.tensor([0.1, 0.05, 0.2, 0.3, 0.4, 0.5])
        store.save_result(MicroBatchResult(0, x, loss, torch.zeros(6, dtype=torch.bool),
                                           {"prior_fit": torch.tensor(fits[grad])}), torch.zeros(6, 1))  # fmt: skip
        trial = optuna.trial.create_trial(
            params={"method.grad": grad}, distributions=space, value=value,
            user_attrs={CAMPAIGN_DIR: str(store.root)},
            system_attrs={"constraints:prior_fit": float(torch.tensor(fits[grad]).median()) - 0.5},
        )  # fmt: skip
        study.add_trial(trial)
    assert open_study(folder).study_name == "tune-digits-zeros"
    payload = analyse(folder, str(tmp_path / "zeros.json"), pictures=False)
    best, over = payload["rows"]
    assert (best["method.grad"], best["feasible"], over["feasible"]) == ("full", True, False)  # 0.3 feasible first
    assert best["top5_chains"] == [0, 2, 3, 4, 5] and best["within_limit"] == 5
    assert best["top5_judged_digits"][:2] == [0, 0] and best["top5_zeros"] == 2 and best["zeros_within_limit"] == 2
    assert best["zeros_all"] == 3 and 0 <= best["top5_spread_mean"] <= 1
    assert over["top5_chains"] == [] and over["within_limit"] == 0
    assert set(payload["importances"]) == {"objective", "zeros_within_limit"} and (tmp_path / "zeros.md").is_file()


def test_a_study_run_replaces_only_its_own_rows_of_a_cell():
    from benchmarks.digits_study import merge_rows

    old = [{"scale": 0.2, "seeds": 32, "top5_zeros": 3}, {"scale": 0.3, "seeds": 32, "top5_zeros": 3},
           {"scale": 0.2, "seeds": 64, "first_seed": 64, "top5_zeros": 0}]  # fmt: skip
    new = [{"scale": 0.2, "seeds": 32, "first_seed": 0, "top5_zeros": 4}]
    assert merge_rows(old, new) == [old[1], old[2], new[0]]
    assert merge_rows([], new) == new and merge_rows(old, []) == old


def test_block_tops_are_each_blocks_own_top_5_within_the_limit():
    """Against a plain loop: per block of 4 seeds, the lowest losses among the chains within the limit."""
    from benchmarks.digits import block_tops

    loss = torch.tensor([5.0, 1.0, 3.0, 2.0, 9.0, 8.0, 0.5, 7.0, 4.0, 6.0])
    fit = torch.tensor([0.1, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, float("nan"), 0.1])  # seed 1 over, 8 unscored
    tops = [t.tolist() for t in block_tops(loss, fit, limit=0.5, block=4)]
    expected = []
    for first in range(0, 10, 4):
        ok = [i for i in range(first, min(first + 4, 10)) if not fit[i] > 0.5]
        expected.append(sorted(ok, key=lambda i: float(loss[i]))[:5])
    assert tops == expected == [[3, 2, 0], [6, 7, 5, 4], [8, 9]]
