"""`cdm bench editing --quick`: its report's shape and the figures' arithmetic."""

import json

import pytest

from benchmarks.editing import bench_editing


def test_bench_editing_compares_mlgd_f_with_the_time_matched_sdedit_search(tmp_path):
    payload = bench_editing(str(tmp_path / "editing.json"), chains=2, quick=True, strengths=(0.5,), sources=1)
    assert json.loads((tmp_path / "editing.json").read_text())["rows"] == payload["rows"]
    assert (tmp_path / "editing.md").read_text().count("\n|---|") == 2  # per source, and the summary
    (summary,) = payload["summary"]
    assert summary["sources"] == 1 and summary["mlgd_f_wins"] in (0, 1)
    (row,) = payload["rows"]
    assert row["strength"] == 0.5 and row["start_step"] == payload["num_steps"] // 2
    assert row["mlgd_f_chains"] == 2 and row["sdedit_variations"] >= 2  # at least one round of as many
    for method in ("mlgd_f", "sdedit"):
        expected = (row["source_rescored"] - row[f"{method}_best_rescored"]) / row["source_rescored"]
        assert row[f"{method}_best_improvement"] == pytest.approx(expected, rel=1e-12)
    assert row["source_rescored"] > 0  # the MMD (a root) of the source: the improvements are ratios
