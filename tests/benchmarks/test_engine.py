"""`cdm bench engine`: its report, the profiler's accounting, and its flags."""

import json

import pytest
import torch

import benchmarks.engine as engine
from benchmarks.engine import PARTS, StepProfile, bench_engine, profiled
from cdm_cli.main import main
from cdm_dist.chains import losses, mlgd, rng


def test_bench_engine_reports_every_cell_with_a_profile(tmp_path):
    path = tmp_path / "engine.json"
    payload = bench_engine(str(path), ("gmm2d",), n_cs=(4,), n_guesses=(1, 2), batches=(1, 3), repeats=1)
    assert json.loads(path.read_text())["settings"]["grad"] == "identity"
    assert (tmp_path / "engine.md").read_text().count("| gmm2d |") == 4
    rows = payload["rows"]
    assert [(r["n_guess"], r["batch"]) for r in rows] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    for row in rows:
        assert row["chains_per_s"] > 0 and row["one_at_a_time_chains_per_s"] > 0
        fractions = row["profile_fraction"]
        assert set(fractions) == {*PARTS, "python_other"}
        assert all(0 <= v <= 1 for v in fractions.values()) and sum(fractions.values()) == pytest.approx(1, abs=1e-6)
        assert fractions["target_block"] > 0 and fractions["sampler"] > 0  # 1000 target samples: per-chain batches
    # one chain alone is the same computation as itself alone: bitwise
    assert all(r["max_abs_x_difference_alone"] == 0 for r in rows if r["batch"] == 1)


def test_the_authors_setting_has_a_constant_target_block(tmp_path):
    """250 fixed target samples and a bandwidth fixed from them: the target block is prepared once, never per step."""
    payload = bench_engine(None, ("gmm2d",), n_cs=(4,), n_guesses=(1,), batches=(2,), repeats=1, setting="authors")
    assert payload["settings"]["target_size"] == 250 and payload["settings"]["loss"]["bandwidth"] == "target"
    (row,) = payload["rows"]
    assert row["profile_fraction"]["target_block"] == 0 and row["chains_per_s"] > 0


def test_the_profile_counts_each_parts_own_time(monkeypatch):
    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr(engine.time, "perf_counter", lambda: next(clock))
    profile = StepProfile()
    inner = profile.wrap("sampler", lambda: None)  # 1 tick
    outer = profile.wrap("loss_forward", lambda: inner())  # 3 ticks in all, 1 of them the sampler's
    outer()
    assert profile.seconds["sampler"] == 1 and profile.seconds["loss_forward"] == 2


def test_profiling_restores_what_it_wrapped():
    from cdm_dist.problems.builtins import gmm_problem

    problem = gmm_problem("gmm2d")
    runner = engine._runner(problem, 4, 1, range(2), "float32")
    saved = (losses.target_pairs, torch.autograd.grad, mlgd.ddim_step_from_x0, rng.ChainStreams.normal)
    with profiled(runner) as profile:
        next(runner.states())
    assert profile.seconds["denoiser"] > 0 and profile.seconds["rng"] > 0
    assert (losses.target_pairs, torch.autograd.grad, mlgd.ddim_step_from_x0, rng.ChainStreams.normal) == saved
    assert "denoise" not in vars(runner.prior_side.prior) and "sample" not in vars(problem.fast_sampler)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--n-c", "1"], "--n-c: each must be >= 2"),
        (["--batches", "0,8"], "--batches: each must be >= 1"),
        (["--problems", "gmm3d"], "--problems: unknown ['gmm3d']"),
    ],
)
def test_bad_engine_flags_are_one_line_and_exit_2(tmp_path, capsys, flags, message):
    assert main(["bench", "engine", *flags, "--json", str(tmp_path / "e.json")]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
