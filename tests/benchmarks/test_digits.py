import math
from pathlib import Path

import pytest
import torch

from benchmarks.digits import (
    PAPER_FAST_STEPS,
    PAPER_SEEDS,
    bench_digits,
    paper_settings,
    prior_fit_limit,
    top_within_limit,
)
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


def test_the_paper_example_is_the_bench_protocol_on_the_uniform_target():
    from cdm_dist.driver.campaign import load_config

    campaign = load_config(Path(__file__).resolve().parents[2] / "examples" / "digits_paper.yaml")
    config, zeta = paper_settings("uniform")
    assert campaign.method.mlgd() == config and campaign.chains.zeta == [zeta]
    assert campaign.chains.count == PAPER_SEEDS and campaign.problem.args["fast_steps"] == PAPER_FAST_STEPS
    assert campaign.problem.args["digits_target"] == "uniform"


def test_an_unknown_protocol_is_refused_by_name(tmp_path):
    with pytest.raises(InputError, match=r"^--protocol: unknown 'mnist'; expected one of \['default', 'paper'\]"):
        bench_digits(str(tmp_path / "d.json"), protocol="mnist")


def test_the_paper_protocol_bench_runs_its_settings_and_judges_its_top_5(tmp_path, tiny_checkpoints):
    out = tmp_path / "paper.json"
    folder = str(tiny_checkpoints("digits"))
    payload = bench_digits(str(out), ("uniform",), 3, quick=True, checkpoints=folder, protocol="paper")
    (row,) = payload["rows"]
    used = payload["settings"]["uniform"]
    assert used["mlgd"]["guidance_min_t"] == 250 and used["mlgd"]["loss"]["p"] == 1 and used["fast_steps"] == 6
    assert row["chains"] == 3 and row["num_steps"] == 10 and len(row["top5_seeds"]) == 3 - row["chains_over_limit"]
    assert row["top5_zeros"] == row["top5_judged_digits"].count(0)
    judged = zip(row["top5_judged_digits"], row["top5_judge_confidence"], strict=True)
    assert all(c >= 0.7 for d, c in judged if d >= 0)  # a digit only at confidence >= 0.7
    assert (tmp_path / "digits_paper_uniform_top5.png").is_file() and out.with_suffix(".md").is_file()
