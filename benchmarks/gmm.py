"""`cdm bench gmm`: MLGD-F, MLGD, best-of-N and D-Flow on the 2D, 5D and 10D Gaussian-mixture problems."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks.report import environment, markdown_table, write_report
from cdm_dist.chains.baselines import BestOfNConfig, DFlowConfig
from cdm_dist.chains.config import MLGDConfig, ZetaConfig
from cdm_dist.chains.mlgd import Chains
from cdm_dist.chains.profiling import track_peak_memory
from cdm_dist.driver.methods import METHODS, run_method
from cdm_dist.problems.builtins import gmm_problem
from cdm_dist.problems.shipped import learned_gmm_problem

SUCCESS_L2 = 0.01
REFERENCE = Path(__file__).resolve().parent / "reference" / "gmm_2d_cond_1d.json"  # the published figures


def settings(quick: bool, n_c: int | None = None, dtype: str = "float64") -> dict[str, Any]:
    """The benchmark's method settings, for exact and learned models alike: the paper's 100 steps and n_c = 250 by
    default, with 12 smoothing guesses, DDIM eta = 0.3 and guidance steps capped at the noise scale, which keep
    chains out of the mixture's side basins (README, "Gaussian mixtures")."""
    n_c = n_c or (32 if quick else 250)
    steps = 10 if quick else 100
    mlgd = MLGDConfig(num_steps=steps, n_c=n_c, target_batch=n_c, n_guess=12, eta=0.3, grad="identity", dtype=dtype)
    zeta = ZetaConfig(kind="linear", scale=10.0, final=0.1, trust_radius=1.0)
    return {
        "mlgd": mlgd,
        "zeta": zeta,
        "full_chain_steps": 10 if quick else 100,
        "fast_steps": 8,  # Euler steps of the learned fast sampler (models = "learned")
        "best_of_n": BestOfNConfig(n=8 if quick else 256, num_steps=steps),
        "dflow": DFlowConfig(num_steps=5 if quick else 20, iterations=2 if quick else 10),
    }


def _row(method: str, dim: int, n: int, seconds: float, peak_mb: float, result: Any, unique: bool) -> dict[str, Any]:
    ok = ~result.failed
    l2 = result.metrics["l2_gmm"][ok]
    x_err = result.metrics["x_err"][ok]
    return {
        "method": method,
        "dim": dim,
        "chains": n,
        "seconds_per_chain": seconds / n,
        "peak_memory_mb": peak_mb,
        "l2_gmm_mean": float(l2.mean()) if len(l2) else None,
        "l2_gmm_median": float(l2.median()) if len(l2) else None,
        "x_err_median": float(x_err.median()) if unique and len(x_err) else None,
        "x_err_max": float(x_err.max()) if unique and len(x_err) else None,
        "success_rate": float((result.metrics["l2_gmm"] <= SUCCESS_L2).float().mean()),
        "heldout_loss_median": float(result.final_loss[ok].median()) if len(l2) else None,
        "failed": int(result.failed.sum()),
    }


def bench_gmm(
    json_path: str | None,
    dims: tuple[int, ...] = (2, 5, 10),
    methods: tuple[str, ...] = METHODS,
    chains: int = 25,
    quick: bool = False,
    device: str = "cpu",
    out_dir: str | None = None,
    n_c: int | None = None,
    models: str = "exact",
    checkpoints: str | None = None,
    full_chain_steps: int | None = None,
    sampler_kinds: tuple[str, ...] = ("flow",),
    dtype: str = "float64",
) -> dict[str, Any]:
    """Run every method on every problem and write the rows; problem parameters are saved next to the JSON.

    models = "learned" swaps in the trained prior and flow sampler (checkpoints/<gmmNd>/, default the shipped
    ones); targets and exact metrics stay those of the true mixture. Each further sampler kind (e.g. one_step, the
    flow's one-step distillation) adds MLGD-F rows with that fast sampler (the other methods do not use it)."""
    dev = torch.device(device)
    rows = []
    used: dict[str, dict[str, Any]] = {}
    params_dir = Path(out_dir or (Path(json_path).parent if json_path else "."))
    kinds = sampler_kinds if models == "learned" else ("flow",)
    runs = [(kind, m) for i, kind in enumerate(kinds) for m in methods if i == 0 or m == "mlgd_f"]
    with tqdm(total=len(dims) * len(runs), desc="bench gmm", unit="run") as bar:
        for dim, kind in ((d, k) for d in dims for k in kinds):
            s = settings(quick, n_c, dtype)
            if full_chain_steps is not None:
                s["full_chain_steps"] = full_chain_steps
            if kind == "one_step":
                s["fast_steps"] = 1
            used[str(dim) if kind == kinds[0] else f"{dim}-{kind}"] = {k: _dump(v) for k, v in s.items()}
            name = f"gmm{dim}d"
            if models == "learned":
                folder = f"{checkpoints}/{name}" if checkpoints else None
                problem = learned_gmm_problem(name, folder, s["fast_steps"], s["full_chain_steps"], sampler_kind=kind)
            else:
                problem = gmm_problem(name, full_chain_steps=s["full_chain_steps"])
            if json_path and kind == kinds[0]:
                params_dir.mkdir(parents=True, exist_ok=True)
                (params_dir / f"gmm{dim}d_params.json").write_text(json.dumps(problem.params, indent=1))
            for method in (m for k, m in runs if k == kind):
                bar.set_postfix(dim=dim, method=method)
                batch = Chains.make(range(chains), s["zeta"])
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                start = time.perf_counter()
                with track_peak_memory(dev) as peak:
                    result = run_method(problem, method, batch, s["mlgd"], dev, s["best_of_n"], s["dflow"])
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                seconds = time.perf_counter() - start
                row = _row(method, dim, chains, seconds, peak.mb, result, problem.x_star_unique)
                row["memory_method"] = peak.method
                row["models"] = models
                row["sampler_kind"] = kind if models == "learned" else "exact"
                row["fast_steps"] = s["fast_steps"] if models == "learned" and method == "mlgd_f" else None
                rows.append(row)
                bar.update()
    payload = {
        "models": models,
        "rows": rows,
        "settings": used,
        "environment": environment(dev),
        "quick": quick,
        "published": json.loads(REFERENCE.read_text()).get("published_results"),
    }
    columns = [
        "models",
        "method",
        "sampler_kind",
        "fast_steps",
        "dim",
        "chains",
        "seconds_per_chain",
        "peak_memory_mb",
        "l2_gmm_mean",
        "l2_gmm_median",
        "x_err_median",
        "x_err_max",
        "success_rate",
        "heldout_loss_median",
        "failed",
    ]
    write_report(payload, json_path, markdown_table(rows, columns))
    return payload


def _dump(value: Any) -> Any:
    return value.model_dump() if hasattr(value, "model_dump") else value
