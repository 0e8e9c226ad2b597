"""`cdm check`: a campaign's preflight. The problem spec is resolved exactly as the campaign's workers will resolve it
(same executor, roles and runtime_env); one guided step runs on two chains, stage by stage; each role reports its
load time, parameters, dtypes, device, stage times and peak memory, and the campaign's wall time is estimated.

Anything that would waste an expensive campaign is one InputError: shapes that do not chain up, non-finite ε̂, x̂0
or y, a matching loss whose gradient in x is zero or non-finite, a factory that raises or returns the wrong type.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from cdm_dist.chains.rng import Stream, chain_normal
from cdm_dist.chains.schedules import guided_mask
from cdm_dist.driver.campaign import CampaignConfig, MicroBatch, campaign_chains, check_config, micro_batches
from cdm_dist.driver.execution import Checkpoint, Executor
from cdm_dist.driver.launch import make_executor
from cdm_dist.errors import InputError, first_line, input_error_of

CHAINS = 2


def probe_batch(config: CampaignConfig, count: int = CHAINS) -> tuple[MicroBatch, int]:
    """The campaign's first `count` chains as a micro-batch, and the index of its first guided step (at which they
    have all started)."""
    chains = campaign_chains(config)[:count]
    method = config.method
    guided = torch.nonzero(guided_mask(method.num_steps, method.guidance_start, method.guidance_stop))[:, 0]
    started = guided[guided >= max(chains.start_steps)]  # editing chains: a step where every probe chain has started
    first = int(started[0]) if len(started) else int(guided[-1])
    return MicroBatch(0, 0, chains, method, f"{config.name}-check", source=config.chains.source_file), first


def check_campaign(config: CampaignConfig, address: str | None = None) -> dict[str, Any]:
    """Start the campaign's workers (one replica), take one guided step on two chains and report."""
    check_config(config)
    one = config.model_copy(update={"resources": config.resources.model_copy(update={"replicas": 1})})
    tic = time.perf_counter()
    executor = make_executor(one, address)
    try:
        started = time.perf_counter() - tic
        probe_step(one, executor)  # warm-up
        step = probe_step(one, executor)
        infos = executor.infos()  # peak memory after the step
    finally:
        executor.close()
    seconds = step.pop("seconds")
    modules = module_rows(config, step.pop("modules"))
    return {
        "problem": config.problem.label(),
        "executor": one.resources.executor_name,
        "start_seconds": started,
        "prior_reading": step.pop("prior_reading"),
        "workers": [_worker_row(info, seconds) for info in infos],
        "step": {**step, "seconds": seconds},
        "estimate": estimate(config, seconds),
        "modules": modules,
    }


def probe_step(config: CampaignConfig, executor: Executor) -> dict[str, Any]:
    """One guided step (cdm_dist.chains.mlgd.guided_step) of the campaign's first two chains, driven stage by stage on
    the executor's workers and checked at every stage; InputError for anything that would waste the campaign. Every
    `cdm run` and `cdm tune` takes it before it writes anything."""
    batch, step = probe_batch(config)
    prior, sampler = executor.probe_workers()
    infos = executor.infos()
    event = next(i["event_shape"] for i in infos if i.get("event_shape") is not None)
    seeds = torch.tensor(batch.chains.seeds, dtype=torch.int64)
    x_t = chain_normal(seeds, Stream.INIT, 0, tuple(event), torch.float64)  # x at the step: N(0, I)
    checkpoint = Checkpoint(step, x_t, torch.zeros(len(seeds), dtype=torch.bool))
    try:
        denoised = _stage("problem.prior: Tweedie's x̂0", prior.probe_denoise, batch, checkpoint)
        _check_denoised(denoised)
        grad = _stage("problem.sampler: the matching loss", sampler.probe_matching_grad, batch, denoised["request"])
        _check_grad(grad)
        loss = torch.tensor(grad["loss"], dtype=torch.float64)
        advanced = _stage("problem.prior: the guided step", prior.probe_advance, batch, loss, grad["grad_x0"])
        _check_advanced(advanced)
    finally:
        prior.forget(batch)
        sampler.forget(batch)
    return {
        "prior_reading": next((i["prior_reading"] for i in infos if i.get("prior_reading")), None),
        "chains": len(seeds),
        "step_index": step,
        "x0_abs_max": denoised["x0_abs_max"],
        "y_shape": grad["y_shape"],
        "loss": grad["loss"],
        "grad_x0_norm": grad["grad_x0"].flatten(1).norm(dim=1).tolist(),
        "grad_x_norm": advanced["grad_x_norm"],
        "seconds": {"denoise": denoised["seconds"], "matching_grad": grad["seconds"], "advance": advanced["seconds"]},
        "modules": {"prior": denoised["modules"], "sampler": grad["modules"]},
    }


def _stage(what: str, call: Any, *args: Any) -> dict[str, Any]:
    """One probe stage on a worker (in-process or a Ray actor): any error it raises is one InputError line."""
    try:
        return call(*args)
    except Exception as exc:
        cause = input_error_of(exc)
        if cause is not None:
            raise InputError(str(cause)) from None
        cause = getattr(exc, "cause", None) or exc  # a Ray task's error carries the worker's
        raise InputError(f"{what} failed at the probe step ({type(cause).__name__}: {first_line(cause)})") from None


def module_rows(config: CampaignConfig, profiles: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per module of each role (e.g. a generator's unet, controlnet, vae and embed): parameters, dtype, forward time
    and memory in the probe's step, and its forward time over the whole campaign (linear in the chains, as
    `estimate`; the sampler's modules run at guided steps only)."""
    method = config.method
    guided = int(guided_mask(method.num_steps, method.guidance_start, method.guidance_stop).sum())
    chain_scale = config.chains.count / CHAINS / config.resources.replicas
    rows = []
    for role, modules in profiles.items():
        steps = method.num_steps if role == "prior" else guided
        for name, profile in modules.items():
            rows.append({"role": role, "module": name, **profile,
                         "campaign_forward_seconds": profile["forward_seconds"] * steps * chain_scale})  # fmt: skip
    return rows


def _check_denoised(denoised: dict[str, Any]) -> None:
    if not denoised["x0_finite"]:
        raise InputError(
            "problem.prior: the noise prediction ε̂ is not finite at the first guided step (Tweedie's x̂0 is not)"
        )


def _check_grad(grad: dict[str, Any]) -> None:
    if not grad["y_finite"]:
        raise InputError("problem.sampler: the conditional samples y at x̂0 are not finite")
    g = grad["grad_x0"]
    if not bool(torch.isfinite(g).all()) or not all(math.isfinite(v) for v in grad["loss"]):
        raise InputError("problem.sampler: the matching loss or its gradient in x̂0 is not finite")
    if bool((g.flatten(1).abs().sum(1) == 0).any()):
        raise InputError(
            "problem.sampler: the matching loss has exactly zero gradient in x, so guidance cannot move x (does the "
            "sampler's output depend on x? a fresh ControlNet's zero-initialised output layers pass no gradient)"
        )


def _check_advanced(advanced: dict[str, Any]) -> None:
    if not advanced["x_finite"] or not all(math.isfinite(v) for v in advanced["grad_x_norm"]):
        raise InputError("problem.prior: the gradient through Tweedie's x̂0 (dL/dx_t) or the next x is not finite")
    if any(v == 0 for v in advanced["grad_x_norm"]):
        raise InputError("problem.prior: the loss gradient in x_t is exactly zero after the prior's Jacobian")


def _worker_row(info: dict[str, Any], seconds: dict[str, float]) -> dict[str, Any]:
    stages = {"both": list(seconds), "prior": ["denoise", "advance"], "sampler": ["matching_grad"]}[info["role"]]
    return {
        "role": info["role"],
        "device": info["device"],
        "pid": info["pid"],
        "load_seconds": info["load_seconds"],
        "parts": info["parts"],
        "peak_memory_mb": info["peak_memory_mb"],
        "memory": info["memory"],
        "stage_seconds": {k: seconds[k] for k in stages},
    }


def estimate(config: CampaignConfig, seconds: dict[str, float]) -> dict[str, Any]:
    """The campaign's wall time from one 2-chain step, assuming stage time grows linearly with the chains in a
    micro-batch (pessimistic on a GPU, which batches for free) and leaving out loading and final evaluation."""
    method, resources = config.method, config.resources
    guided = int(guided_mask(method.num_steps, method.guidance_start, method.guidance_stop).sum())
    unguided = method.num_steps - guided
    batches = micro_batches(config)
    scale = sum(len(b.chains) for b in batches) / CHAINS  # all chain-steps relative to the probe's
    prior_s = (seconds["denoise"] + seconds["advance"]) * method.num_steps * scale
    sampler_s = seconds["matching_grad"] * guided * scale
    pipelined = resources.placement == "split" and resources.executor == "ray" and resources.in_flight >= 2
    total = (max(prior_s, sampler_s) if pipelined else prior_s + sampler_s) / resources.replicas
    return {
        "chains": config.chains.count,
        "micro_batches": len(batches),
        "guided_steps": guided,
        "unguided_steps": unguided,
        "replicas": resources.replicas,
        "pipelined": pipelined,
        "campaign_seconds": total,
        "assumes": "stage time linear in the chains per micro-batch; loading and final evaluation left out",
    }


def format_check(report: dict[str, Any]) -> str:
    """The human-readable report `cdm check` prints."""
    step = report["step"]
    lines = [
        f"problem {report['problem']} on {report['executor']}: workers ready in {report['start_seconds']:.2f} s",
        *([describe_reading(report["prior_reading"])] if report["prior_reading"] else []),
        f"one guided step (step {step['step_index']}, {step['chains']} chains): y {step['y_shape']}, "
        f"loss {', '.join(f'{v:.4g}' for v in step['loss'])}, |dL/dx0| "
        f"{', '.join(f'{v:.3g}' for v in step['grad_x0_norm'])}, |dL/dx_t| "
        f"{', '.join(f'{v:.3g}' for v in step['grad_x_norm'])}",
    ]
    for worker in report["workers"]:
        parts = "; ".join(
            f"{name} {part['parameters']:,} params {'/'.join(part['dtypes']) or '-'}"
            for name, part in worker["parts"].items()
        )
        loads = ", ".join(f"{k} {v:.2f} s" for k, v in worker["load_seconds"].items())
        stages = ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in worker["stage_seconds"].items())
        lines.append(
            f"  {worker['role']:<8} {worker['device']:<6} {parts}; loaded {loads or '-'}; {stages}; peak "
            f"{worker['peak_memory_mb']:.0f} MB ({worker['memory']})"
        )
    if report.get("modules"):
        lines.append(f"  per module (one step, {CHAINS} chains; forward time includes checkpointed recomputation):")
        for row in report["modules"]:
            peak = "" if row["peak_mb"] is None else f", peak {row['peak_mb']:.0f} MB"
            lines.append(
                f"    {row['role']:<8} {row['module']:<20} {row['parameters']:>14,} params {row['dtype']:<9} "
                f"{row['calls']} call(s) {1000 * row['forward_seconds']:8.1f} ms, activations for backward "
                f"{row['saved_mb']:.1f} MB{peak}; campaign: about {row['campaign_forward_seconds']:.1f} s forward"
            )
    est = report["estimate"]
    lines.append(
        f"estimate: {est['chains']} chains x {est['guided_steps'] + est['unguided_steps']} steps in "
        f"{est['micro_batches']} micro-batches on {est['replicas']} replica(s): about {est['campaign_seconds']:.0f} s "
        f"({est['assumes']})"
    )
    return "\n".join(lines)


def describe_reading(reading: dict[str, str]) -> str:
    """How the prior's network output is read: its scheduler, the prediction type and where that came from."""
    return f"prior: {reading['scheduler']}, {reading['prediction_type']} from {reading['from']}"
