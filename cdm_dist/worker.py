"""The work a campaign does on one device, as plain methods: whole chunks of steps (colocated or in-process),
or the split halves of a step (prior: denoise and advance; sampler: matching loss and its gradient).

Ray actors wrap this class unchanged (actors/), so every executor runs the same code and gets the same numbers.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from cdm_dist.campaign import CampaignConfig, MicroBatch, build_problem
from cdm_dist.mlgd import ChainState, Denoised, GuidedChains

Checkpoint = dict[str, Any]  # {"step": int, "x": (B, *event), "failed": (B,)}


@dataclass
class Chunk:
    """The state after some steps of one micro-batch, and the guidance loss of each step taken."""

    checkpoint: Checkpoint
    first_step: int  # the step index of losses[:, 0]
    losses: torch.Tensor  # (B, k)


@dataclass
class MicroBatchResult:
    """A finished micro-batch: x* per chain, held-out loss, exact metrics and held-out y for pictures."""

    index: int
    x: torch.Tensor  # (B, *event)
    final_loss: torch.Tensor  # (B,), inf where failed
    failed: torch.Tensor  # (B,) bool
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,)
    y: torch.Tensor | None = None  # (B, n, d_y) held-out conditional samples at x*


def pick_device(preference: str, has_gpu: bool) -> torch.device:
    """CUDA when asked for (or 'auto' with a GPU assigned and visible), else CPU."""
    if preference == "cuda" or (preference == "auto" and has_gpu and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class ChainWorker:
    """Loads the campaign's problem itself (nothing is pickled from the driver) and runs micro-batches."""

    PICTURE_SAMPLES = 512

    def __init__(self, config: CampaignConfig, role: str = "both", device: str | None = None) -> None:
        if role not in ("both", "prior", "sampler"):
            raise ValueError(f"role: unknown {role!r}")
        torch.set_num_threads(config.resources.threads)
        self.config, self.role = config, role
        self.device = torch.device(device) if device else torch.device("cpu")
        self.problem = build_problem(config.problem)
        self._runners: dict[tuple[str, int], GuidedChains] = {}
        self._pending: dict[tuple[str, int], tuple[ChainState, Denoised]] = {}
        self._busy = 0.0
        self._started = time.perf_counter()

    # -- bookkeeping ------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Who this worker is: role, process and device."""
        return {"role": self.role, "pid": os.getpid(), "device": str(self.device), "threads": torch.get_num_threads()}

    def busy_seconds(self) -> tuple[float, float]:
        """Seconds spent working and seconds alive."""
        return self._busy, time.perf_counter() - self._started

    def _runner(self, batch: MicroBatch) -> GuidedChains:
        if batch.key not in self._runners:
            sampler = self.problem.sampler(batch.method.name)
            self._runners[batch.key] = GuidedChains(
                self.problem.prior, sampler, self.problem.target, batch.chains, batch.method.mlgd(), self.device
            )
        return self._runners[batch.key]

    def _state(self, batch: MicroBatch, checkpoint: Checkpoint | None) -> ChainState:
        runner = self._runner(batch)
        return runner.initial_state() if checkpoint is None else runner.resume(checkpoint)

    # -- colocated / in-process: many steps at once -----------------------------------------------------
    def run(self, batch: MicroBatch, checkpoint: Checkpoint | None, until: int) -> Chunk:
        """Steps from the checkpoint up to step `until` (exclusive of later steps)."""
        tic = time.perf_counter()
        runner, state = self._runner(batch), self._state(batch, checkpoint)
        first, losses = state.step, []
        while state.step < until:
            state = runner.step(state)
            losses.append(state.loss.cpu())
        self._busy += time.perf_counter() - tic
        stacked = torch.stack(losses, 1) if losses else torch.empty(len(batch.chains), 0, dtype=torch.float64)
        return Chunk(state.checkpoint(), first, stacked)

    def finish(self, batch: MicroBatch, checkpoint: Checkpoint) -> MicroBatchResult:
        """CDMO refinement, held-out loss and exact metrics of the final states."""
        tic = time.perf_counter()
        runner = self._runner(batch)
        result = runner.finish(runner.resume(checkpoint), self.problem.metrics)
        eta = torch.randn(  # only for the picture: fixed noise, not used for selection
            len(batch.chains),
            self.PICTURE_SAMPLES,
            *runner.sampler.noise_shape,
            generator=torch.Generator().manual_seed(0),
            dtype=runner.dtype,
        ).to(self.device)
        with torch.no_grad():
            y = runner.sampler.sample(result.x, eta).cpu()
        self._runners.pop(batch.key, None)
        self._busy += time.perf_counter() - tic
        metrics = {k: v.cpu() for k, v in result.metrics.items()}
        return MicroBatchResult(batch.index, result.x.cpu(), result.final_loss.cpu(), result.failed.cpu(), metrics, y)

    # -- split placement: the halves of one guided step -------------------------------------------------
    def denoise(self, batch: MicroBatch, checkpoint: Checkpoint) -> torch.Tensor:
        """Prior: x̂0 of the micro-batch at its step; keeps what the VJP needs until `advance`."""
        tic = time.perf_counter()
        state = self._state(batch, checkpoint)
        denoised = self._runner(batch).denoise(state)
        self._pending[batch.key] = (state, denoised)
        self._busy += time.perf_counter() - tic
        return denoised.x0.cpu()

    def matching_grad(self, batch: MicroBatch, step: int, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampler: the smoothed matching loss (B,) and dL/dx̂0 (B, *event) at step `step`."""
        tic = time.perf_counter()
        loss, grad = self._runner(batch).matching_grad(x0, step)
        self._busy += time.perf_counter() - tic
        return loss.cpu(), grad.cpu()

    def advance(self, batch: MicroBatch, loss_and_grad: tuple[torch.Tensor, torch.Tensor]) -> Chunk:
        """Prior: the VJP through Tweedie and the reverse step, for the step `denoise` began."""
        tic = time.perf_counter()
        if batch.key not in self._pending:
            raise LostStepError(f"micro-batch {batch.key}: no denoised step pending (worker restarted?)")
        state, denoised = self._pending.pop(batch.key)
        loss, grad = loss_and_grad
        state = self._runner(batch).advance(state, denoised, loss, grad)
        self._busy += time.perf_counter() - tic
        return Chunk(state.checkpoint(), state.step - 1, state.loss.cpu()[:, None])


class LostStepError(RuntimeError):
    """The prior lost the half-done step of a micro-batch; the coordinator restarts it from its checkpoint."""
