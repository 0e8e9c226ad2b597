"""The executor contract: what a campaign driver hands an executor (jobs) and what it gets back (chunks, results).

Executors only move work: in-process (cdm_dist.driver.worker.LocalExecutor) or on Ray actors (actors.coordinator). The
driver (cdm_dist.driver.runner) owns every side effect, so a campaign gives the same files, runs and numbers whichever
executor ran it. Choosing one is cdm_dist.driver.launch's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from cdm_dist.chains.mlgd import Checkpoint, GradRequest, step_of
from cdm_dist.driver.campaign import MicroBatch

__all__ = [
    "Checkpoint",
    "Chunk",
    "Executor",
    "Job",
    "MicroBatchResult",
    "ProbeWorker",
    "Sink",
    "SystemMetricsSource",
    "chunk_end",
    "step_of",
]


@dataclass
class Chunk:
    """The state after some steps of one micro-batch, and the guidance loss of each step taken."""

    checkpoint: Checkpoint
    first_step: int  # the step index of losses[:, 0]
    losses: torch.Tensor  # (B, k)

    @property
    def step(self) -> int:
        """Reverse steps done after this chunk."""
        return self.checkpoint.step


@dataclass
class MicroBatchResult:
    """A finished micro-batch: x* per chain, held-out loss, metrics, and per-chain pictures (PNG bytes by name)."""

    index: int
    x: torch.Tensor  # (B, *event)
    final_loss: torch.Tensor  # (B,), inf where failed
    failed: torch.Tensor  # (B,) bool
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,)
    pictures: list[dict[str, bytes]] = field(default_factory=list)  # per chain: e.g. {"samples": PNG, "decoded": PNG}


@dataclass
class Job:
    """A micro-batch to run from a checkpoint (None: from the start)."""

    batch: MicroBatch
    checkpoint: Checkpoint | None = None


class Sink(Protocol):
    """What executors report to (the campaign driver)."""

    def on_chunk(self, batch: MicroBatch, chunk: Chunk) -> None: ...
    def on_result(self, batch: MicroBatch, result: MicroBatchResult) -> None: ...
    def restart_point(self, batch: MicroBatch) -> Checkpoint | None: ...
    def on_failed(self, batch: MicroBatch, reason: str, event_shape: tuple[int, ...]) -> None: ...


class ProbeWorker(Protocol):
    """A worker's stages of one guided step, called and waited for (`cdm check`; cdm_dist.driver.worker.ChainWorker)."""

    def probe_denoise(self, batch: MicroBatch, checkpoint: Checkpoint) -> dict[str, Any]: ...
    def probe_matching_grad(self, batch: MicroBatch, request: GradRequest) -> dict[str, Any]: ...
    def probe_advance(self, batch: MicroBatch, loss: torch.Tensor, grad: torch.Tensor) -> dict[str, Any]: ...
    def forget(self, batch: MicroBatch) -> None: ...


class Executor(Protocol):
    """Runs jobs to completion, reporting every chunk and result to the sink."""

    name: str

    def execute(self, jobs: list[Job], sink: Sink) -> None: ...
    def probe_workers(self) -> tuple[ProbeWorker, ProbeWorker]: ...  # the workers playing the prior and the sampler
    def infos(self) -> list[dict[str, Any]]: ...  # what each worker built, and its peak memory
    def close(self) -> None: ...


@runtime_checkable
class SystemMetricsSource(Protocol):
    """An executor that can put MLflow's system-metrics monitor on each of its machines."""

    def start_system_metrics(self, run_id: str, uri: str, seconds: float) -> dict[str, str]: ...  # node -> address
    def stop_system_metrics(self) -> None: ...


def chunk_end(step: int, every: int, num_steps: int) -> int:
    """The next checkpoint boundary after `step`."""
    return min((step // every + 1) * every, num_steps)
