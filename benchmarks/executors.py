"""`cdm bench ray`: the same chains in-process, on colocated replicas, and on split prior/sampler actors over Ray tasks
and over compiled graphs, with 1, 2 and 4 micro-batches in flight, on four problems:

- gmm5d: the exact 5D mixture (its prior costs almost nothing: the sampler does all the work);
- digits: the shipped learned models (UNet2DModel prior, CNN flow sampler), full gradient through the prior, n_c 32;
- latent: the tiny latent models (UNet2DConditionModel prior with classifier-free guidance; VAE decoder + image
  sampler), full gradient, n_c 24;
- balanced: a synthetic pair whose prior and sampler each cost 10 ms of CPU per call (the pipeline itself).
The learned problems' n_c give the two actors comparable work (measured: with pictures off, n_c 16 / 8 left the
sampler at 0.64 / 0.35 busy behind the prior), so the pipeline is what shows.

Per row: chain-steps/s (after a warm-up micro-batch), each actor's busy fraction, the tensor bytes through the
driver per chain-step (in all, and between checkpoints), and the Ray overhead per stage (stages that do nothing).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from actors.coordinator import RayExecutor, connect
from benchmarks.report import markdown_table, write_report
from cdm_dist.driver.campaign import CampaignConfig, load_config
from cdm_dist.driver.runner import CampaignDriver, run_campaign
from cdm_dist.driver.store import CampaignStore
from cdm_dist.driver.worker import LocalExecutor

IN_FLIGHT = (1, 2, 4)
COLUMNS = ["problem", "executor", "transport", "micro_batches", "chain_steps_per_s", "busy_prior", "busy_sampler",
           "driver_bytes_per_step", "driver_bytes_between_checkpoints", "overhead_us_per_stage"]  # fmt: skip


def problem_settings(problem: str, root: Path, quick: bool, n_c: int | None) -> list[str]:
    """The campaign settings of one benchmark problem (every executor runs the same chains)."""
    steps = 6 if quick else 20
    common = [f"method.num_steps={steps}", "method.grad=full", "resources.checkpoint_every=5"]
    if problem == "gmm5d":
        n = n_c or (32 if quick else 250)
        return [*common, "problem.name=gmm5d", f"method.n_c={n}", f"method.target_batch={n}", "method.n_guess=5"]
    if problem == "balanced":  # prior and sampler of the same, known cost: 10 ms of CPU per call each
        steps = 12 if quick else 60  # amortizes the end's 6 prior_fit calls, which have no sampler counterpart
        tiny = "cdm_dist.models.tiny"
        spec = {"prior": {"factory": f"{tiny}:BusyGaussianPrior"}, "sampler": {"factory": f"{tiny}:BusyLinearSampler"},
                "target": {"factory": f"{tiny}:gaussian_target"}}  # fmt: skip
        return [f"method.num_steps={steps}", "method.grad=identity", "resources.checkpoint_every=5",
                f"problem={spec}", "method.n_c=16", "method.target_batch=16", "method.n_guess=1"]  # fmt: skip
    if problem == "digits":
        n = n_c or (8 if quick else 32)  # the sampler's share close to the prior's full-gradient step
        return [*common, "problem.name=digits", f"method.n_c={n}", "method.n_guess=1", "method.dtype=float32"]
    from benchmarks.models import latent_problem
    from cdm_dist.models.tiny import save_tiny_latent_pipeline

    folder = root / "latent"
    if not folder.is_dir():
        save_tiny_latent_pipeline(folder)
    n = n_c or (8 if quick else 24)  # the sampler's share close to the prior's (CFG: two UNet passes)
    spec = latent_problem(folder, "tiny")  # with classifier-free guidance: two UNet passes per step on the prior
    spec["prior"]["conditioning"] |= {"guidance_scale": 3.0, "negative_file": str(folder / "negative.safetensors")}
    return [*common, f"problem={spec}", f"method.n_c={n}", f"method.target_batch={n}", "method.n_guess=1",
            "method.dtype=float32"]  # fmt: skip


def _warm_up(executor: Any, config: CampaignConfig, root: str) -> None:
    """Run the first micro-batch once so every actor has loaded its models (and a lane compiled its graph)."""
    warm = config.model_copy(update={"output": os.path.join(root, "warm"), "name": f"{config.name}-warm"})
    driver = CampaignDriver(warm, CampaignStore.create(warm))
    executor.execute(driver.restore()[:1], driver)


def _measure(config: CampaignConfig, root: str, problem: str, in_flight: int | None) -> dict[str, Any]:
    executor = LocalExecutor(config) if config.resources.executor == "local" else RayExecutor(config)
    try:
        _warm_up(executor, config, root)
        bytes_before = getattr(executor, "driver_bytes", 0)
        report = run_campaign(config, executor, CampaignStore.create(config), progress=False)
        bytes_run = getattr(executor, "driver_bytes", 0) - bytes_before
        overhead = _overhead_us_per_stage(executor) if config.resources.executor == "ray" else None
    finally:
        executor.close()
    busy = getattr(executor, "busy_fraction", None) or {}
    split = config.resources.placement == "split" and config.resources.executor == "ray"
    between = 0.0 if split else None  # split lanes move tensors through the driver only at chunk ends
    return {
        "problem": problem,
        "executor": report.executor,
        "transport": getattr(executor, "transport", None) if config.resources.executor == "ray" else None,
        "replicas": None if config.resources.executor == "local" else config.resources.replicas,
        "micro_batches": in_flight or 1,
        "chain_steps_per_s": report.chain_steps / report.wall_seconds,
        "busy_prior": busy.get("prior", busy.get("replica")),
        "busy_sampler": busy.get("sampler", busy.get("replica")),
        "driver_bytes_per_step": bytes_run / report.chain_steps if config.resources.executor == "ray" else None,
        "driver_bytes_between_checkpoints": between,
        "overhead_us_per_stage": overhead,
        "best_final_loss": min(r.final_loss for r in report.rows),
    }


def _overhead_us_per_stage(executor: RayExecutor, executions: int = 30) -> float:
    """Ray's own cost per stage: split lanes run chunks whose stages do nothing; a colocated replica answers pings."""
    if executor.lanes is not None:
        lane = executor.lanes.lanes[0]
        return lane.overhead_us_per_stage(executions)
    actor = executor.replicas[0].prior
    ray.get(actor.ping.remote())
    tic = time.perf_counter()
    for _ in range(executions):
        ray.get(actor.ping.remote())
    return 1e6 * (time.perf_counter() - tic) / executions


def bench_ray(
    json_path: str | None,
    chains: int = 32,
    quick: bool = False,
    n_c: int | None = None,
    problems: tuple[str, ...] = ("gmm5d", "digits", "latent", "balanced"),
) -> dict[str, Any]:
    """Every executor and transport on every problem; Ray overhead = 1 - best Ray / in-process (per problem)."""
    started = not ray.is_initialized()
    connect(None, num_cpus=os.cpu_count() or 1)
    cores = int(ray.cluster_resources().get("CPU", 1))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for problem in problems:
            base = [
                "name=bench-ray", f"chains.count={chains}", f"resources.micro_batch={max(1, chains // 4)}",
                "tracking.enabled=false", "pictures=false", f"output={root / problem}",
                *problem_settings(problem, root, quick, n_c),
            ]  # fmt: skip

            def config(*extra: str, base: list[str] = base) -> CampaignConfig:
                return load_config(None, [*base, *extra])

            rows.append(_measure(config("resources.executor=local", f"resources.threads={cores}"), tmp, problem, None))
            rows.append(_measure(config("resources.placement=colocated", "resources.replicas=1",
                                        f"resources.threads={cores}", f"resources.num_cpus={cores}"), tmp, problem,
                                 None))  # fmt: skip
            if cores >= 2 and not quick:
                rows.append(_measure(config("resources.placement=colocated", f"resources.replicas={cores}"), tmp,
                                     problem, None))  # fmt: skip
            per_actor = max(1, cores // 2)
            for transport in ("tasks", "compiled"):
                for in_flight in IN_FLIGHT[:2] if quick else IN_FLIGHT:
                    split = config(
                        "resources.placement=split",
                        f"resources.transport={transport}",
                        f"resources.in_flight={in_flight}",
                        f"resources.threads={per_actor}",
                        f"resources.num_cpus={cores / 2}",
                    )
                    rows.append(_measure(split, tmp, problem, in_flight))
    if started:
        ray.shutdown()
    overheads = {}
    for problem in problems:
        mine = [r for r in rows if r["problem"] == problem]
        local = mine[0]["chain_steps_per_s"]
        overheads[problem] = 1 - max(r["chain_steps_per_s"] for r in mine[1:]) / local
    payload = {
        "rows": rows,
        "ray_overhead": statistics.mean(overheads.values()),
        "ray_overhead_by_problem": overheads,
        "cores": cores,
        "chains": chains,
        "quick": quick,
    }
    markdown = markdown_table(rows, COLUMNS) + (
        "\nray_overhead (1 - best Ray / in-process) by problem: "
        + ", ".join(f"{k} {v:.3f}" for k, v in overheads.items())
        + f" ({cores} cores)\n"
    )
    write_report(payload, json_path, markdown)
    return payload
