"""The campaign driver: hands micro-batches to an executor, checkpoints them, tracks them, ranks the chains.

Executors (in-process here, Ray in actors/) only move work; this module owns every side effect, so a campaign
gives the same files, runs and numbers whichever executor ran it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from cdm_dist.campaign import CampaignConfig, MicroBatch, micro_batches
from cdm_dist.pictures import samples_vs_target
from cdm_dist.store import CampaignStore
from cdm_dist.worker import ChainWorker, Checkpoint, Chunk, MicroBatchResult, pick_device


@dataclass
class Job:
    """A micro-batch to run from a checkpoint (None: from the start)."""

    batch: MicroBatch
    checkpoint: Checkpoint | None = None


class Sink(Protocol):
    """What executors report to."""

    def on_chunk(self, batch: MicroBatch, chunk: Chunk) -> None: ...
    def on_result(self, batch: MicroBatch, result: MicroBatchResult) -> None: ...
    def restart_point(self, batch: MicroBatch) -> Checkpoint | None: ...
    def on_failed(self, batch: MicroBatch, reason: str) -> None: ...


class Executor(Protocol):
    """Runs jobs to completion, reporting every chunk and result to the sink."""

    name: str

    def execute(self, jobs: list[Job], sink: Sink) -> None: ...
    def close(self) -> None: ...


def chunk_end(step: int, every: int, num_steps: int) -> int:
    """The next checkpoint boundary after `step`."""
    return min((step // every + 1) * every, num_steps)


class LocalExecutor:
    """In-process: one worker runs every micro-batch, chunk by chunk."""

    name = "local"

    def __init__(self, config: CampaignConfig) -> None:
        device = pick_device(config.resources.device, has_gpu=True)
        self.worker = ChainWorker(config, "both", str(device))
        self.every = config.resources.checkpoint_every

    def execute(self, jobs: list[Job], sink: Sink) -> None:
        """Round-robin: one chunk of every micro-batch in turn, so all reach each checkpoint step together."""
        active = list(jobs)
        while active:
            for job in list(active):
                num_steps = job.batch.method.num_steps
                step = 0 if job.checkpoint is None else int(job.checkpoint["step"])
                if step >= num_steps:
                    sink.on_result(job.batch, self.worker.finish(job.batch, job.checkpoint))
                    active.remove(job)
                    continue
                chunk = self.worker.run(job.batch, job.checkpoint, chunk_end(step, self.every, num_steps))
                sink.on_chunk(job.batch, chunk)
                job.checkpoint = chunk.checkpoint

    def close(self) -> None:
        """Nothing to release in-process."""


@dataclass
class ChainRow:
    """One chain's outcome."""

    chain: int
    seed: int
    zeta: str
    final_loss: float
    failed: bool
    metrics: dict[str, float]
    x_path: str
    run_id: str | None


@dataclass
class CampaignReport:
    """What `cdm run` prints and writes."""

    campaign_run_id: str | None
    experiment: str
    output_dir: str
    executor: str
    rows: list[ChainRow]
    topk: list[ChainRow]
    wall_seconds: float
    chain_steps: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        ok = [r for r in self.rows if not r.failed]
        return {
            "campaign_run_id": self.campaign_run_id,
            "experiment": self.experiment,
            "chains_total": len(self.rows),
            "chains_ok": len(ok),
            "chains_failed": len(self.rows) - len(ok),
            "topk": [
                {"chain": r.chain, "seed": r.seed, "final_loss": r.final_loss, "x_path": r.x_path, "run_id": r.run_id}
                | ({"metrics": r.metrics} if r.metrics else {})
                for r in self.topk
            ],
            "output_dir": self.output_dir,
            "executor": self.executor,
            "wall_seconds": self.wall_seconds,
            "chain_steps": self.chain_steps,
            "chain_steps_per_s": self.chain_steps / self.wall_seconds if self.wall_seconds > 0 else None,
            **self.extra,
        }


class CampaignDriver:
    """Receives chunks and results from an executor; keeps checkpoints, history, progress and tracking."""

    def __init__(
        self,
        config: CampaignConfig,
        store: CampaignStore,
        tracker: Any | None = None,
        target: torch.Tensor | None = None,
        on_chunk: Callable[[MicroBatch, Chunk], None] | None = None,
        progress: bool = True,
    ) -> None:
        self.config, self.store, self.tracker, self.target, self.hook = config, store, tracker, target, on_chunk
        self.num_steps = config.method.num_steps
        self.batches = micro_batches(config)
        self.results: dict[int, MicroBatchResult] = {}
        self.history: dict[int, torch.Tensor] = {}  # (B, T) guidance loss per step (NaN where unguided)
        self.step: dict[int, int] = {}  # steps reached per micro-batch
        self.saved: dict[int, tuple[Checkpoint | None, torch.Tensor]] = {}  # the last checkpoint
        self.steps_run = 0  # chain-steps run by this driver, counting redone ones
        total = sum(len(b.chains) for b in self.batches) * self.num_steps
        self.bar = tqdm(total=total, desc=config.name, unit="chain-step", disable=not progress, dynamic_ncols=True)

    def restore(self) -> list[Job]:
        """Load finished micro-batches and checkpoints from the store; the rest are the jobs to run."""
        jobs = []
        for batch in self.batches:
            finished = self.store.load_result(batch.index)
            if finished is not None:
                self.results[batch.index], self.history[batch.index] = finished
                self.bar.update(len(batch.chains) * self.num_steps)
                continue
            saved = self.store.load_checkpoint(batch.index)
            checkpoint = None
            history = torch.full((len(batch.chains), self.num_steps), math.nan, dtype=torch.float64)
            if saved is not None:
                checkpoint, history = saved
            self.step[batch.index] = 0 if checkpoint is None else int(checkpoint["step"])
            self.bar.update(len(batch.chains) * self.step[batch.index])
            self.history[batch.index] = history
            self.saved[batch.index] = (checkpoint, history.clone())
            jobs.append(Job(batch, checkpoint))
        return jobs

    # -- the Sink protocol --------------------------------------------------------------------------------
    def on_chunk(self, batch: MicroBatch, chunk: Chunk) -> None:
        """Record losses; checkpoint on every `checkpoint_every` boundary and at the end."""
        k = chunk.losses.shape[1]
        self.history[batch.index][:, chunk.first_step : chunk.first_step + k] = chunk.losses.double()
        step = int(chunk.checkpoint["step"])
        self.step[batch.index] = step
        if step % self.config.resources.checkpoint_every == 0 or step == self.num_steps:
            history = self.history[batch.index].clone()
            self.store.save_checkpoint(batch.index, chunk.checkpoint, history)
            self.saved[batch.index] = (chunk.checkpoint, history)
        self.steps_run += len(batch.chains) * k
        self.bar.update(len(batch.chains) * k)
        if self.hook is not None:
            self.hook(batch, chunk)

    def restart_point(self, batch: MicroBatch) -> Checkpoint | None:
        """Roll a micro-batch back to its last checkpoint (after its worker died) and return it."""
        checkpoint, history = self.saved[batch.index]
        step_then = 0 if checkpoint is None else int(checkpoint["step"])
        self.bar.update(-len(batch.chains) * (self.step[batch.index] - step_then))
        self.history[batch.index], self.step[batch.index] = history.clone(), step_then
        return checkpoint

    def on_result(self, batch: MicroBatch, result: MicroBatchResult) -> None:
        """Save x* and results, log the chains to MLflow, update the best loss so far."""
        history = self.history[batch.index]
        self.store.save_result(result, batch.chain_ids, history)
        self.results[batch.index] = result
        done = sum(len(self.batches[i].chains) for i in self.results)
        if self.tracker is not None:
            self.tracker.log_micro_batch(batch, result, history, self._artifacts(batch, result))
            self.tracker.log_progress(done, self.best_loss(), len(self.results))
        self.bar.set_postfix(chains_done=done, best_loss=f"{self.best_loss():.4g}")

    def on_failed(self, batch: MicroBatch, reason: str) -> None:
        """A micro-batch that kept failing: its chains are marked failed and the campaign goes on."""
        checkpoint, _ = self.saved[batch.index]
        n = len(batch.chains)
        x = checkpoint["x"] if checkpoint is not None else torch.zeros(n, 1, dtype=torch.float64)
        tqdm.write(f"micro-batch {batch.index}: chains {list(batch.chain_ids)} failed: {reason}")
        failed = torch.ones(n, dtype=torch.bool)
        self.on_result(batch, MicroBatchResult(batch.index, x, torch.full((n,), math.inf), failed))

    # -- results ----------------------------------------------------------------------------------------
    def best_loss(self) -> float:
        finite = [r.final_loss[~r.failed] for r in self.results.values()]
        losses = torch.cat(finite) if finite else torch.empty(0)
        return float(losses.min()) if len(losses) else math.inf

    def _artifacts(self, batch: MicroBatch, result: MicroBatchResult) -> list[list[Path]]:
        """x* (.npy) and, for chains that finished, a picture of their samples against the target."""
        paths = []
        for row, chain in enumerate(batch.chain_ids):
            files = [self.store.chain_x_path(chain)]
            if result.y is not None and self.target is not None and not bool(result.failed[row]):
                png = self.store.chain_x_path(chain).with_suffix(".png")
                title = f"chain {chain}: held-out loss {result.final_loss[row].item():.4g}"
                files.append(samples_vs_target(result.y[row], self.target, png, title))
            paths.append(files)
        return paths

    def rows(self) -> list[ChainRow]:
        """Every chain's outcome, in chain order."""
        child_ids = self.tracker.child_ids if self.tracker is not None else {}
        rows = []
        for batch in self.batches:
            result = self.results[batch.index]
            for row, chain in enumerate(batch.chain_ids):
                failed = bool(result.failed[row])
                rows.append(
                    ChainRow(
                        chain=chain,
                        seed=batch.chains.seeds[row],
                        zeta=zeta_label(batch.chains.zetas[row]),
                        final_loss=math.inf if failed else result.final_loss[row].item(),
                        failed=failed,
                        metrics={k: v[row].item() for k, v in result.metrics.items()},
                        x_path=str(self.store.chain_x_path(chain)),
                        run_id=child_ids.get(chain),
                    )
                )
        return rows

    def close(self) -> None:
        self.bar.close()


def zeta_label(zeta: Any) -> str:
    """A short label of a zeta schedule: its non-default fields."""
    changed = zeta.model_dump(exclude_defaults=True)
    return ",".join(f"{k}={v}" for k, v in changed.items()) or "constant"


def top_k(rows: list[ChainRow], k: int) -> list[ChainRow]:
    """The k chains with the lowest held-out loss; failed chains never qualify."""
    return sorted((r for r in rows if not r.failed and math.isfinite(r.final_loss)), key=lambda r: r.final_loss)[:k]


def run_campaign(
    config: CampaignConfig,
    executor: Executor,
    store: CampaignStore,
    on_chunk: Callable[[MicroBatch, Chunk], None] | None = None,
    progress: bool = True,
    parent_tags: dict[str, str] | None = None,
    target: torch.Tensor | None = None,
) -> CampaignReport:
    """Run (or finish, for a store with progress in it) a campaign; returns its report.

    parent_tags go on the campaign's MLflow run (e.g. mlflow.parentRunId to nest it under a study); target is the
    target samples (S_G, for pictures), built from the config when not given."""
    from cdm_dist.campaign import build_problem, campaign_chains

    tracker = None
    if target is None:
        target = build_problem(config.problem).target.samples
    if config.tracking.enabled:
        from cdm_dist.tracking import CampaignTracker

        tracker = CampaignTracker(config)
        chains = campaign_chains(config)
        table = [(k, s, zeta_label(z)) for k, (s, z) in enumerate(zip(chains.seeds, chains.zetas, strict=True))]
        store.save_tracking(tracker.start(store.load_tracking(), store.root, table, parent_tags))
    driver = CampaignDriver(config, store, tracker, target, on_chunk, progress)
    tic = time.perf_counter()
    try:
        jobs = driver.restore()
        executor.execute(jobs, driver)
    except BaseException as exc:
        if tracker is not None:
            tracker.abort("KILLED" if type(exc).__name__ == "TrialPruned" else "FAILED")
        raise
    finally:
        driver.close()
    wall = time.perf_counter() - tic
    rows = driver.rows()
    report = CampaignReport(
        campaign_run_id=tracker.parent_id if tracker else None,
        experiment=config.tracking.experiment,
        output_dir=str(store.root),
        executor=executor.name,
        rows=rows,
        topk=top_k(rows, config.topk),
        wall_seconds=wall,
        chain_steps=driver.steps_run,
    )
    if tracker is not None:
        ok = [r.final_loss for r in rows if not r.failed]
        summary = {
            "chains_total": len(rows),
            "chains_ok": len(ok),
            "chains_failed": len(rows) - len(ok),
            "best_final_loss": min(ok) if ok else math.inf,
            "median_final_loss": float(torch.tensor(ok).median()) if ok else math.inf,
            "wall_seconds": wall,
            "chain_steps_per_s": driver.steps_run / wall if wall > 0 else 0.0,
        }
        tracker.finish(summary)
    write_json(store.root / "report.json", report.to_json())
    return report


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """JSON with a trailing newline, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def format_topk(rows: list[ChainRow]) -> str:
    """The top-k table printed by `cdm run`."""
    metric_names = sorted({k for r in rows for k in r.metrics})
    header = ["rank", "chain", "seed", "final_loss", *metric_names, "zeta", "x_path"]
    lines = [header]
    for rank, r in enumerate(rows, start=1):
        metrics = [f"{r.metrics[m]:.4g}" for m in metric_names]
        lines.append([str(rank), str(r.chain), str(r.seed), f"{r.final_loss:.5g}", *metrics, r.zeta, r.x_path])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines)


def make_executor(config: CampaignConfig, address: str | None = None) -> Executor:
    """In-process, or Ray (colocated or split) per config.resources."""
    if config.resources.executor == "local":
        return LocalExecutor(config)
    from actors.coordinator import RayExecutor

    return RayExecutor(config, address)
