"""`cdm bench precision`: the same MLGD-F chains in float32 and float64 on the learned mixtures, compared chain by
chain (issue 24's default-precision question): l2_gmm and held-out loss per chain, their paired differences with
bootstrap intervals, and how many chains each precision wins."""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm import tqdm

from benchmarks.gmm import SUCCESS_L2, settings
from benchmarks.report import environment, markdown_table, write_report
from cdm_dist.chains.mlgd import Chains
from cdm_dist.driver.methods import run_method
from cdm_dist.problems.shipped import learned_gmm_problem

DTYPES = ("float32", "float64")


def paired_interval(a: torch.Tensor, b: torch.Tensor, draws: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """The mean of a - b over paired chains and its 95% percentile-bootstrap interval, a, b (N,)."""
    diff = (a - b).double()
    gen = torch.Generator().manual_seed(seed)
    index = torch.randint(len(diff), (draws, len(diff)), generator=gen)  # (draws, N)
    means = diff[index].mean(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(diff.mean()), low, high


def bench_precision(
    json_path: str | None, dims: tuple[int, ...] = (2, 5, 10), chains: int = 64, n_c: int = 64, quick: bool = False
) -> dict[str, Any]:
    """Per learned mixture: the same seeds in both precisions (one-step sampler, the gmm bench's settings)."""
    if quick:
        dims, chains = dims[:1], min(chains, 4)
    rows = []
    for dim in tqdm(dims, desc="bench precision"):
        problem = learned_gmm_problem(f"gmm{dim}d", sampler_kind="one_step")
        per: dict[str, dict[str, torch.Tensor]] = {}
        seconds: dict[str, float] = {}
        for dtype in DTYPES:
            s = settings(quick, n_c, dtype)
            start = time.perf_counter()
            result = run_method(problem, "mlgd_f", Chains.make(range(chains), s["zeta"]), s["mlgd"], "cpu")
            seconds[dtype] = time.perf_counter() - start
            per[dtype] = {"l2": result.metrics["l2_gmm"].double(), "heldout": result.final_loss.double()}
        f32, f64 = per["float32"], per["float64"]
        row: dict[str, Any] = {"dim": dim, "chains": chains}
        for name in ("l2", "heldout"):
            mean, low, high = paired_interval(f32[name], f64[name])
            row |= {
                f"{name}_mean_float32": float(f32[name].mean()),
                f"{name}_mean_float64": float(f64[name].mean()),
                f"{name}_median_float32": float(f32[name].median()),
                f"{name}_median_float64": float(f64[name].median()),
                f"{name}_paired_diff_mean": mean,
                f"{name}_paired_diff_ci95": [low, high],
                f"{name}_float32_better": int((f32[name] < f64[name]).sum()),
                f"{name}_float64_better": int((f64[name] < f32[name]).sum()),
            }
        row |= {
            "success_float32": float((f32["l2"] <= SUCCESS_L2).double().mean()),
            "success_float64": float((f64["l2"] <= SUCCESS_L2).double().mean()),
            "l2_relative_diff_median": float(((f32["l2"] - f64["l2"]).abs() / f64["l2"].clamp_min(1e-12)).median()),
            "seconds_float32": seconds["float32"],
            "seconds_float64": seconds["float64"],
        }
        rows.append(row)
    payload = {
        "rows": rows,
        "settings": {"sampler": "one_step", "n_c": n_c, "chains": chains, "gmm_bench_settings": True,
                     "success_l2": SUCCESS_L2},
        "environment": environment(torch.device("cpu")),
        "quick": quick,
    }  # fmt: skip
    columns = ["dim", "chains", "l2_mean_float32", "l2_mean_float64", "l2_paired_diff_mean", "l2_paired_diff_ci95",
               "l2_float32_better", "l2_float64_better", "success_float32", "success_float64",
               "heldout_median_float32", "heldout_median_float64", "heldout_paired_diff_ci95",
               "l2_relative_diff_median", "seconds_float32", "seconds_float64"]  # fmt: skip
    shown = [{k: f"[{v[0]:.3g}, {v[1]:.3g}]" if isinstance(v, list) else v for k, v in r.items()} for r in rows]
    write_report(payload, json_path, markdown_table(shown, columns))
    return payload
