"""The campaign driver: hands micro-batches to an executor, checkpoints them, writes results, ranks the chains, and
tells the campaign's callbacks (tracking, pruning, progress) what happened.

Executors (cdm_dist.driver.worker.LocalExecutor, actors.coordinator.RayExecutor) only move work; this module owns every
side effect, so a campaign gives the same files and numbers whichever executor ran it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cdm_dist.driver.callbacks import CampaignCallback, CampaignInfo, ChainInfo, ProgressBar
from cdm_dist.driver.callbacks import Progress as ProgressState
from cdm_dist.driver.campaign import CampaignConfig, MicroBatch, campaign_chains, micro_batches, zeta_labels
from cdm_dist.driver.execution import Checkpoint, Chunk, Executor, Job, MicroBatchResult, SystemMetricsSource, step_of
from cdm_dist.driver.report import SMALL_X, CampaignReport, ChainRow, top_k
from cdm_dist.driver.store import CampaignStore


class CampaignDriver:
    """The executor's sink: keeps checkpoints, histories and results in the store and reports to the callbacks."""

    def __init__(
        self, config: CampaignConfig, store: CampaignStore, callbacks: Sequence[CampaignCallback] = ()
    ) -> None:
        self.config, self.store, self.callbacks = config, store, list(callbacks)
        self.num_steps = config.method.num_steps
        self.batches = micro_batches(config)
        self.results: dict[int, MicroBatchResult] = {}
        self.history: dict[int, torch.Tensor] = {}  # (B, T) guidance loss per step (NaN where unguided)
        self.step: dict[int, int] = {}  # steps reached per micro-batch
        self.saved: dict[int, tuple[Checkpoint | None, torch.Tensor]] = {}  # the last checkpoint
        self.steps_run = 0  # chain-steps run by this driver, counting redone ones
        self.failed_batches: dict[int, str] = {}  # micro-batches that kept failing in this run -> why

    def restore(self) -> list[Job]:
        """Load finished micro-batches and checkpoints from the store; the rest are the jobs to run."""
        jobs = []
        for batch in self.batches:
            finished = self.store.load_result(batch.index)
            if finished is not None:
                self.results[batch.index], self.history[batch.index] = finished
                self.step[batch.index] = self.num_steps
                continue
            saved = self.store.load_checkpoint(batch.index)
            checkpoint = None
            history = torch.full((len(batch.chains), self.num_steps), math.nan, dtype=torch.float64)
            if saved is not None:
                checkpoint, history = saved
            self.step[batch.index] = step_of(checkpoint)
            self.history[batch.index] = history
            self.saved[batch.index] = (checkpoint, history.clone())
            jobs.append(Job(batch, checkpoint))
        return jobs

    def progress(self) -> ProgressState:
        """Chain-steps done (at the steps each micro-batch has reached), chains done and the best loss so far."""
        return ProgressState(
            chain_steps_done=sum(len(b.chains) * self.step.get(b.index, 0) for b in self.batches),
            chain_steps_total=sum(len(b.chains) for b in self.batches) * self.num_steps,
            chains_done=sum(len(self.batches[i].chains) for i in self.results),
            chains_total=sum(len(b.chains) for b in self.batches),
            best_loss=self.best_loss(),
        )

    # -- the Sink protocol --------------------------------------------------------------------------------
    def on_chunk(self, batch: MicroBatch, chunk: Chunk) -> None:
        """Record losses; checkpoint on every `checkpoint_every` boundary and at the end."""
        k = chunk.losses.shape[1]
        self.history[batch.index][:, chunk.first_step : chunk.first_step + k] = chunk.losses.double()
        step = chunk.step
        self.step[batch.index] = step
        if step % self.config.resources.checkpoint_every == 0 or step == self.num_steps:
            history = self.history[batch.index].clone()
            self.store.save_checkpoint(batch.index, chunk.checkpoint, history)
            self.saved[batch.index] = (chunk.checkpoint, history)
        self.steps_run += len(batch.chains) * k
        progress = self.progress()
        for callback in self.callbacks:
            callback.on_chunk(batch, chunk, progress)

    def restart_point(self, batch: MicroBatch) -> Checkpoint | None:
        """Roll a micro-batch back to its last checkpoint (after its worker died) and return it."""
        checkpoint, history = self.saved[batch.index]
        self.history[batch.index], self.step[batch.index] = history.clone(), step_of(checkpoint)
        return checkpoint

    def on_result(self, batch: MicroBatch, result: MicroBatchResult) -> None:
        """Write each chain's x* and pictures, tell the callbacks (tracking), then mark the micro-batch done."""
        history = self.history[batch.index]
        pictures = result.pictures or [{} for _ in batch.chain_ids]
        files = [
            self.store.save_chain_files(chain, result.x[row], pictures[row])
            for row, chain in enumerate(batch.chain_ids)
        ]
        self.results[batch.index] = result
        self.step[batch.index] = self.num_steps
        progress = self.progress()
        for callback in self.callbacks:
            callback.on_result(batch, result, history, files, progress)
        self.store.save_result(result, history)

    def on_failed(self, batch: MicroBatch, reason: str, event_shape: tuple[int, ...]) -> None:
        """A micro-batch that kept failing: its chains are marked failed and the campaign goes on."""
        checkpoint, _ = self.saved[batch.index]
        n = len(batch.chains)
        x = checkpoint.x if checkpoint is not None else torch.zeros(n, *event_shape, dtype=torch.float64)
        tqdm.write(f"micro-batch {batch.index}: chains {list(batch.chain_ids)} failed: {reason}")
        self.failed_batches[batch.index] = reason
        failed = torch.ones(n, dtype=torch.bool)
        self.on_result(batch, MicroBatchResult(batch.index, x, torch.full((n,), math.inf), failed))

    # -- results ------------------------------------------------------------------------------------------
    def best_loss(self) -> float:
        finite = [r.final_loss[~r.failed] for r in self.results.values()]
        losses = torch.cat(finite) if finite else torch.empty(0)
        return float(losses.min()) if len(losses) else math.inf

    def rows(self) -> list[ChainRow]:
        """Every chain's outcome, in chain order (run ids are filled in by the tracking callback)."""
        rows = []
        for batch in self.batches:
            result = self.results[batch.index]
            labels = zeta_labels(batch.chains.zetas)
            for row, chain in enumerate(batch.chain_ids):
                failed = bool(result.failed[row])
                rows.append(
                    ChainRow(
                        chain=chain,
                        seed=batch.chains.seeds[row],
                        zeta=labels[row],
                        final_loss=math.inf if failed else result.final_loss[row].item(),
                        failed=failed,
                        metrics={k: v[row].item() for k, v in result.metrics.items()},
                        x_path=str(self.store.chain_x_path(chain)),
                        run_id=None,
                        x=result.x[row].flatten().tolist() if result.x[row].numel() <= SMALL_X else None,
                    )
                )
        return rows


def campaign_info(config: CampaignConfig, store: CampaignStore) -> CampaignInfo:
    """The campaign table the callbacks get at the start."""
    chains = campaign_chains(config)
    labels = zeta_labels(chains.zetas)
    table = tuple(map(ChainInfo, range(len(labels)), chains.seeds, labels))
    return CampaignInfo(config, store.root, table)


def default_callbacks(
    config: CampaignConfig,
    store: CampaignStore,
    executor: Executor,
    progress: bool = True,
    parent_tags: dict[str, str] | None = None,
) -> list[CampaignCallback]:
    """A progress bar, MLflow tracking when the config enables it (parent_tags nest it, e.g. under a study), and
    per-node system metrics on the campaign run when asked for."""
    callbacks: list[CampaignCallback] = [ProgressBar(config.name, progress)]
    if config.tracking.enabled:
        from cdm_dist.driver.tracking import MLflowTracker, SystemMetrics

        tracker = MLflowTracker(config, store, parent_tags)
        callbacks.append(tracker)
        if config.tracking.system_metrics and isinstance(executor, SystemMetricsSource):
            callbacks.append(SystemMetrics(tracker, executor))
    return callbacks


def run_campaign(
    config: CampaignConfig,
    executor: Executor,
    store: CampaignStore,
    callbacks: Sequence[CampaignCallback] = (),
    progress: bool = True,
    parent_tags: dict[str, str] | None = None,
) -> CampaignReport:
    """Run (or finish, for a store with progress in it) a campaign; returns its report. `callbacks` come after the
    default ones (progress bar, MLflow tracking)."""
    everyone = [*default_callbacks(config, store, executor, progress, parent_tags), *callbacks]
    driver = CampaignDriver(config, store, everyone)
    tic = time.perf_counter()
    started: list[CampaignCallback] = []
    try:
        jobs = driver.restore()
        info, state = campaign_info(config, store), driver.progress()
        for callback in everyone:
            callback.on_start(info, state)
            started.append(callback)
        for index, result in driver.results.items():  # finished by an earlier driver
            batch = driver.batches[index]
            files = [store.chain_files(chain) for chain in batch.chain_ids]
            for callback in everyone:
                callback.on_restored(batch, result, driver.history[index], files)
        executor.execute(jobs, driver)
    except BaseException as exc:
        for callback in started:
            callback.on_end(None, exc)
        raise
    wall = time.perf_counter() - tic
    rows = driver.rows()
    report = CampaignReport(
        campaign_run_id=None,
        experiment=config.tracking.experiment,
        output_dir=str(store.root),
        executor=executor.name,
        rows=rows,
        topk=top_k(rows, config.topk, config.selection.prior_fit_limit),
        wall_seconds=wall,
        chain_steps=driver.steps_run,
        failed_batches=dict(driver.failed_batches),
    )
    for callback in everyone:
        callback.on_end(report, None)
    write_json(store.root / "report.json", report.to_json())
    return report


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """JSON with a trailing newline, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
