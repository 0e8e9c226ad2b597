"""`cdm bench batching`: the same MLGD-F chains run as one batch and one at a time."""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm import tqdm

from benchmarks.gmm import settings
from benchmarks.report import environment, markdown_table, write_report
from cdm_dist.chains.mlgd import Chains
from cdm_dist.driver.methods import run_method
from cdm_dist.problems.builtins import gmm_problem


def bench_batching(
    json_path: str | None, chains: int = 256, quick: bool = False, device: str = "cpu", n_c: int | None = None
) -> dict[str, Any]:
    """Throughput of B chains batched vs sequential on the 2D problem; also checks both give the same x."""
    dev = torch.device(device)
    s = settings(quick, n_c)
    problem = gmm_problem("gmm2d")
    batch = Chains.make(range(chains), s["zeta"])

    def timed(fn: Any) -> tuple[Any, float]:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return out, time.perf_counter() - start

    batched, t_batched = timed(lambda: run_method(problem, "mlgd_f", batch, s["mlgd"], dev))

    def one_at_a_time() -> torch.Tensor:
        xs = [
            run_method(problem, "mlgd_f", batch[i : i + 1], s["mlgd"], dev).x
            for i in tqdm(range(chains), desc="sequential")
        ]
        return torch.cat(xs)

    sequential_x, t_sequential = timed(one_at_a_time)
    payload = {
        "chains": chains,
        "batched_chains_per_s": chains / t_batched,
        "sequential_chains_per_s": chains / t_sequential,
        "ratio": t_sequential / t_batched,
        "max_abs_x_difference": float((batched.x - sequential_x).abs().max()),
        "settings": s["mlgd"].model_dump(),
        "environment": environment(dev),
        "quick": quick,
    }
    cols = ["chains", "batched_chains_per_s", "sequential_chains_per_s", "ratio", "max_abs_x_difference"]
    write_report(payload, json_path, markdown_table([payload], cols))
    return payload
