"""`cdm bench ray`: the same chains in-process, on colocated replicas and on split prior/sampler actors."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import ray

from actors.coordinator import RayExecutor, connect
from cdm_dist.bench.report import markdown_table, write_report
from cdm_dist.campaign import CampaignConfig, load_config
from cdm_dist.runner import CampaignDriver, run_campaign
from cdm_dist.store import CampaignStore
from cdm_dist.worker import LocalExecutor


def bench_config(output: str, quick: bool, chains: int, n_c: int | None) -> list[str]:
    """The campaign every executor runs: MLGD-F on the 5D mixture, full gradient through Tweedie."""
    n_c = n_c or (32 if quick else 250)
    return [
        "name=bench-ray",
        "problem.name=gmm5d",
        f"method.num_steps={6 if quick else 30}",
        f"method.n_c={n_c}",
        f"method.target_batch={n_c}",
        "method.n_guess=5",
        f"chains.count={chains}",
        f"resources.micro_batch={max(1, chains // 4)}",
        "resources.checkpoint_every=10",
        "tracking.enabled=false",
        f"output={output}",
    ]


def _warm_up(executor: Any, config: CampaignConfig, root: str) -> None:
    """Run the first micro-batch once so every actor has loaded its models and caches before timing."""
    warm = config.model_copy(update={"output": os.path.join(root, "warm")})
    driver = CampaignDriver(warm, CampaignStore.create(warm))
    executor.execute(driver.restore()[:1], driver)


def _measure(config: CampaignConfig, root: str, in_flight: int | None = None) -> dict[str, Any]:
    executor = LocalExecutor(config) if config.resources.executor == "local" else RayExecutor(config)
    try:
        _warm_up(executor, config, root)
        report = run_campaign(config, executor, CampaignStore.create(config), progress=False)
    finally:
        executor.close()
    busy = getattr(executor, "busy_fraction", None) or None
    return {
        "executor": report.executor,
        "micro_batches": in_flight or 1,
        "replicas": None if config.resources.executor == "local" else config.resources.replicas,
        "chain_steps_per_s": report.chain_steps / report.wall_seconds,
        "actor_busy_fraction": min(busy.values()) if busy else None,
        "busy_by_role": busy,
        "step_ms": 1000
        * report.wall_seconds
        / (config.method.num_steps * len(report.rows) / config.resources.micro_batch),
        "best_final_loss": min(r.final_loss for r in report.rows),
    }


def bench_ray(json_path: str | None, chains: int = 64, quick: bool = False, n_c: int | None = None) -> dict[str, Any]:
    """Throughput of every executor on the same chains; Ray overhead = 1 - best Ray / in-process."""
    started = not ray.is_initialized()
    connect(None, num_cpus=os.cpu_count() or 1)
    cores = int(ray.cluster_resources().get("CPU", 1))
    rows = []
    with tempfile.TemporaryDirectory() as root:
        base = bench_config(root, quick, chains, n_c)

        def config(*extra: str) -> CampaignConfig:
            return load_config(None, [*base, *extra])

        rows.append(_measure(config("resources.executor=local", f"resources.threads={cores}"), root))
        rows.append(_measure(config("resources.placement=colocated", "resources.replicas=1",
                                    f"resources.threads={cores}", f"resources.num_cpus={cores}"), root))  # fmt: skip
        if cores >= 2:
            rows.append(_measure(config("resources.placement=colocated", f"resources.replicas={cores}"), root))
        per_actor = max(1, cores // 2)
        for in_flight in (1, 2, 4):
            split = config(
                "resources.placement=split",
                f"resources.in_flight={in_flight}",
                f"resources.threads={per_actor}",
                f"resources.num_cpus={cores / 2}",
            )
            rows.append(_measure(split, root, in_flight))
    if started:
        ray.shutdown()
    local = rows[0]["chain_steps_per_s"]
    best_ray = max(r["chain_steps_per_s"] for r in rows[1:])
    same_threads = rows[1]["chain_steps_per_s"]  # one colocated replica with the in-process thread count
    payload = {
        "rows": rows,
        "ray_overhead": 1 - best_ray / local,
        "ray_overhead_same_threads": 1 - same_threads / local,
        "cores": cores,
        "chains": chains,
        "quick": quick,
    }
    columns = ["executor", "replicas", "micro_batches", "chain_steps_per_s", "actor_busy_fraction", "step_ms"]
    markdown = markdown_table(rows, columns) + (
        f"\nray_overhead = {payload['ray_overhead']:.3f}; one replica with the same threads: "
        f"{payload['ray_overhead_same_threads']:.3f} ({cores} cores)\n"
    )
    write_report(payload, json_path, markdown)
    return payload
