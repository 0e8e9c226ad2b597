"""cdm bench precision: the paired float32 / float64 comparison and its bootstrap interval."""

import json

import pytest
import torch

from benchmarks.precision import paired_interval
from cdm_cli.main import main


def test_paired_interval_is_the_mean_difference_inside_its_interval():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(50, generator=gen, dtype=torch.float64)
    b = a - 0.1 + 0.01 * torch.randn(50, generator=gen, dtype=torch.float64)
    mean, low, high = paired_interval(a, b)
    assert mean == pytest.approx(sum((x - y) for x, y in zip(a.tolist(), b.tolist(), strict=True)) / 50, rel=1e-12)
    assert low < mean < high and low > 0.09 and high < 0.11  # the shift 0.1, with noise 0.01 / sqrt(50) around it
    assert paired_interval(a, a) == (0.0, 0.0, 0.0)


def test_bench_precision_quick_compares_the_same_chains(tmp_path):
    out = tmp_path / "precision.json"
    assert main(["bench", "precision", "--quick", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["dim"] == 2 and row["chains"] == 4
    assert row["l2_float32_better"] + row["l2_float64_better"] <= 4
    # the same seeds in both precisions: the chains agree to float32 rounding, not merely in distribution
    assert row["l2_relative_diff_median"] < 1e-2
    assert (tmp_path / "precision.md").read_text().startswith("| dim | chains |")


def test_bench_precision_needs_two_chains(capsys):
    assert main(["bench", "precision", "--chains", "1"]) == 2
    assert "--chains: must be >= 2" in capsys.readouterr().err
