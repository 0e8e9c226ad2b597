"""cdm bench tune: default vs tuned per problem, and the tuning wall time at 1 and K parallel trials."""

import json

import pytest

from benchmarks.tune import STUDIES
from cdm_cli.main import main
from cdm_dist.driver.campaign import load_config


def test_bench_tune_quick_reports_both_problems(tmp_path, postgres_server):
    out = tmp_path / "tune.json"
    assert main(["bench", "tune", "--quick", "--parallel", "2", "--processes", "2", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert [(r["problem"], r["config"]) for r in payload["rows"]] == [
        ("gmm5d", "default"), ("gmm5d", "tuned"), ("digits", "default"), ("digits", "tuned"),
    ]  # fmt: skip
    for problem in STUDIES:
        default, tuned = (r for r in payload["rows"] if r["problem"] == problem)
        improvement = 1 - tuned["median_heldout_loss"] / default["median_heldout_loss"]
        assert payload["heldout_improvement"][problem] == pytest.approx(improvement)
        space = load_config(STUDIES[problem]).tune.space
        assert set(payload["best_params"][problem]) <= set(space)
        timing = [t for t in payload["tuning"] if t["problem"] == problem]
        assert [(t["parallel"], t["trials"]) for t in timing] == [(1, 4), (2, 4)]
        assert all(t["chain_steps_run"] > 0 and t["chain_steps_saved_by_pruning"] >= 0 for t in timing)
        assert all(0 <= t["infeasible"] <= t["trials"] and t["prior_fit_limit"] > 0 for t in timing)
        assert default["median_prior_fit"] > 0 and tuned["median_prior_fit"] > 0
    assert payload["rows"][0]["median_l2_gmm"] is not None and payload["rows"][2]["median_l2_gmm"] is None
    assert (tmp_path / "tune.md").read_text().startswith("| problem | config |")
    # one study shared by two processes, then by two of which one is killed mid-trial: exactly N counted either way
    shared = payload["shared_study"]
    assert [(r["processes"], r["killed"]) for r in shared] == [(2, 0), (2, 1)]
    assert all(r["counted"] == r["trials"] == 4 and r["chain_steps_run"] > 0 for r in shared)
    assert (shared[0]["trials_died"], shared[0]["trials_retried"]) == (0, 0) and shared[0]["exit_codes"] == [0, 0]
    assert (shared[1]["trials_died"], shared[1]["trials_retried"]) == (1, 1) and shared[1]["exit_codes"][1] == 0


def test_bench_tune_rejects_an_unknown_problem(capsys):
    assert main(["bench", "tune", "--problems", "gmm5d,gmm7d"]) == 2
    assert "--problems: unknown ['gmm7d']" in capsys.readouterr().err
