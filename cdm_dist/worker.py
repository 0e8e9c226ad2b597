"""The work a campaign does on one device, as plain methods, for one role:

- "both" (in-process and colocated replicas): whole chunks of steps and the final evaluation;
- "prior" (split placement): x̂0 (denoise), the VJP and reverse step (advance), unguided steps, prior_fit;
- "sampler" (split placement): the matching loss and its gradient, the final evaluation and pictures.

Each worker resolves the problem spec itself and builds only its role's parts (nothing is pickled from the driver).
Ray actors wrap this class unchanged (actors/), so every executor runs the same code and gets the same numbers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cdm_dist.campaign import CampaignConfig, MicroBatch
from cdm_dist.errors import InputError
from cdm_dist.execution import Checkpoint, Chunk, Job, MicroBatchResult, Sink, chunk_end, step_of
from cdm_dist.mlgd import ChainState, Denoised, PriorSide, SamplerSide
from cdm_dist.registry import ProblemSource, resolve_problem

ROLES = ("both", "prior", "sampler")
PICTURE_SAMPLES = 512  # conditional samples at x* drawn for a chain's picture (fixed noise, not for selection)


@dataclass
class SlotPlan:
    """The driver's request for one in-flight slot of a split chunk: advance the micro-batch to step `until` (from
    `checkpoint` when given, else from the state the prior holds), or evaluate it (finish)."""

    batch: MicroBatch
    until: int
    checkpoint: Checkpoint | None = None
    finish: bool = False
    start: bool = False  # the micro-batch's first plan: start from x_T when no checkpoint is given
    checkpoint_step: int = 0  # the step the micro-batch stands at (the driver's view), for timing estimates


@dataclass
class Relay:
    """What one split stage hands the next, actor to actor: x̂0 and the guess radius (prior -> sampler), the loss
    and dL/dx̂0 (sampler -> prior), the final state to evaluate, or the evaluated result."""

    batch: MicroBatch
    step: int
    x0: torch.Tensor | None = None  # (B, *event)
    radius: float = 0.0
    loss: torch.Tensor | None = None  # (B,)
    grad: torch.Tensor | None = None  # (B, *event)
    final: Checkpoint | None = None
    result: MicroBatchResult | None = None


@dataclass
class SlotOutput:
    """What the driver gets back for a slot: the chunk (at a checkpoint boundary) or the finished result."""

    key: tuple[str, int]
    step: int
    chunk: Chunk | None = None
    result: MicroBatchResult | None = None


@dataclass
class Resident:
    """A micro-batch's chain state held by the prior between chunks (split placement)."""

    state: ChainState
    first: int  # the step the current chunk began at
    losses: list[torch.Tensor] = field(default_factory=list)  # (B,) per step taken in this chunk
    denoised: Denoised | None = None  # the step the sampler is working on
    until: int = 0
    batch: MicroBatch | None = None


def system_metrics_monitor(run_id: str, uri: str, seconds: float, node_id: str) -> Any:
    """MLflow's SystemMetricsMonitor (CPU, memory, disk, network, GPU where present) logging to a run under
    system/<node_id>/..., started."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    from cdm_dist.tracking import resolve_uri

    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=seconds, resume_logging=True, node_id=node_id, tracking_uri=resolve_uri(uri)
    )
    monitor.start()
    return monitor


def pick_device(preference: str, has_gpu: bool) -> torch.device:
    """CUDA when asked for (or 'auto' with a GPU assigned and visible), else CPU."""
    if preference == "cuda" or (preference == "auto" and has_gpu and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def module_stats(obj: Any) -> dict[str, Any]:
    """Parameters and weight dtypes of the torch modules an object holds (one level of attributes deep)."""
    seen: dict[int, torch.nn.Module] = {}
    for value in [obj, *vars(obj).values()] if hasattr(obj, "__dict__") else [obj]:
        candidates = [value, *vars(value).values()] if hasattr(value, "__dict__") else [value]
        for candidate in candidates:
            if isinstance(candidate, torch.nn.Module):
                seen.setdefault(id(candidate), candidate)
    params = [p for module in seen.values() for p in module.parameters()]
    return {
        "parameters": sum(p.numel() for p in params),
        "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in params}),
    }


class ProbeMixin:
    """One guided step taken stage by stage, timed and checked (for `cdm check`); mixed into ChainWorker."""

    def probe_denoise(self, batch: MicroBatch, checkpoint: Checkpoint) -> dict[str, Any]:
        """Prior: x̂0 at the checkpoint's step, with ε̂ and x̂0 checked finite."""
        torch_sync(self.device)
        tic = time.perf_counter()
        x0, radius = self.denoise(batch, checkpoint)
        torch_sync(self.device)
        seconds = time.perf_counter() - tic
        eps = self._pending[batch.key][1].eps
        return {
            "x0": x0,
            "radius": radius,
            "seconds": seconds,
            "eps_finite": bool(torch.isfinite(eps).all()),
            "x0_finite": bool(torch.isfinite(x0).all()),
            "eps_abs_max": float(eps.abs().max()),
            "x0_abs_max": float(x0.abs().max()),
        }

    def probe_matching_grad(self, batch: MicroBatch, step: int, x0: torch.Tensor, radius: float) -> dict[str, Any]:
        """Sampler: y at x̂0 (shape and finiteness), then the matching loss and dL/dx̂0, timed."""
        side = self._sampler_side(batch)
        shape = tuple(x0.shape[1:])
        eta = torch.randn(x0.shape[0], side.config.n_c, *side.sampler.noise_shape, dtype=side.dtype)
        try:
            with torch.no_grad():
                y = side.sampler.sample(x0.to(self.device, side.dtype), eta.to(self.device))
        except Exception as exc:
            raise InputError(
                f"problem.sampler: cannot take x of shape {list(shape)} from the prior ({type(exc).__name__}: {exc})"
            ) from None
        expected = (x0.shape[0], side.config.n_c, side.sampler.y_dim)
        if tuple(y.shape) != expected:
            raise InputError(
                f"problem.sampler: sample(x, eta) gave y of shape {list(y.shape)}; the contract is (B, n_c, y_dim) = "
                f"{list(expected)}"
            )
        torch_sync(self.device)
        tic = time.perf_counter()
        loss, grad = self.matching_grad(batch, step, (x0, radius))
        torch_sync(self.device)
        return {
            "seconds": time.perf_counter() - tic,
            "y_shape": list(y.shape),
            "y_finite": bool(torch.isfinite(y).all()),
            "loss": loss.tolist(),
            "grad_x0": grad,
        }

    def probe_advance(self, batch: MicroBatch, loss: torch.Tensor, grad: torch.Tensor) -> dict[str, Any]:
        """Prior: the VJP through Tweedie and the reverse step, timed; dL/dx_t per chain."""
        state, denoised = self._pending.pop(batch.key)
        side = self._prior_side(batch)
        torch_sync(self.device)
        tic = time.perf_counter()
        after = side.advance(state, denoised, loss, grad)
        torch_sync(self.device)
        return {
            "seconds": time.perf_counter() - tic,
            "grad_x_norm": after.grad_norm.cpu().tolist(),
            "x_finite": bool(torch.isfinite(after.x).all()) and not bool(after.failed.any()),
        }

    def memory(self) -> dict[str, Any]:
        """Peak memory of this worker (CUDA's peak allocation on a GPU, else the process's peak resident size), and
        its resident size now."""
        import resource

        import psutil

        rss = {"rss_mb": psutil.Process().memory_info().rss / 2**20}
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            return rss | {"peak_memory_mb": peak, "memory": "cuda_peak"}
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return rss | {"peak_memory_mb": peak, "memory": "cpu_max_rss"}


def torch_sync(device: torch.device) -> None:
    """Wait for the device (CUDA work is asynchronous), so timings cover the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_shapes(event_shape: tuple[int, ...], sampler_x_shape: tuple[int, ...] | None, spec: Any) -> None:
    """The prior's x chains into the sampler (when the sampler declares the x it takes)."""
    if sampler_x_shape is not None and tuple(sampler_x_shape) != tuple(event_shape):
        raise InputError(
            f"problem {spec.label()}: the prior's x has shape {list(event_shape)} but the sampler takes x of shape "
            f"{list(sampler_x_shape)}"
        )


class ChainWorker(ProbeMixin):
    """Builds its role's parts of the campaign's problem and runs micro-batches (or their halves)."""

    def __init__(self, config: CampaignConfig, role: str = "both", device: str | None = None) -> None:
        if role not in ROLES:
            raise ValueError(f"role: unknown {role!r}; expected one of {ROLES}")
        torch.set_num_threads(config.resources.threads)
        self.config, self.role = config, role
        self.device = torch.device(device) if device else torch.device("cpu")
        self.problem: ProblemSource = resolve_problem(config.problem, self.device)
        self._prior_sides: dict[tuple[str, int], PriorSide] = {}
        self._sampler_sides: dict[tuple[str, int], SamplerSide] = {}
        self._pending: dict[tuple[str, int], tuple[ChainState, Denoised]] = {}
        self._resident: dict[tuple[str, int], Resident] = {}
        # x̂0 and gradients stay on the device when compiled graphs move them accelerator to accelerator
        self.device_messages = self.device.type == "cuda" and config.resources.transport == "compiled"
        self._busy = 0.0
        self._started = time.perf_counter()
        self.build_parts()

    @property
    def has_prior(self) -> bool:
        return self.role in ("both", "prior")

    @property
    def has_sampler(self) -> bool:
        return self.role in ("both", "sampler")

    def build_parts(self) -> None:
        """Build this role's parts now, so a bad spec fails when the worker starts, not mid-campaign."""
        if self.has_prior:
            self.problem.prior  # noqa: B018
        if self.has_sampler:
            sampler, target = self.problem.sampler(self.config.method.name), self.problem.target
            if target.dim != sampler.y_dim:
                raise InputError(
                    f"{target.source}: target samples have dimension {target.dim}; the sampler of problem "
                    f"{self.config.problem.label()} produces d_y = {sampler.y_dim}"
                )
            self.problem.metrics  # noqa: B018
            self.problem.decoder  # noqa: B018
        if self.role == "both":
            check_shapes(self.problem.prior.event_shape, self.problem.fast_sampler.x_shape, self.config.problem)

    # -- bookkeeping ------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Who this worker is: role, process, device, the parts it built and how long they took to load."""
        parts: dict[str, Any] = {}
        if self.has_prior:
            parts["prior"] = module_stats(self.problem.prior)
        if self.has_sampler:
            sampler = self.problem.sampler(self.config.method.name)
            parts["sampler"] = module_stats(getattr(sampler, "inner", sampler))  # the decoder counts apart
            if self.problem.decoder is not None:
                parts["decoder"] = module_stats(self.problem.decoder)
        return {
            "role": self.role,
            "pid": os.getpid(),
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "event_shape": list(self.problem.prior.event_shape) if self.has_prior else None,
            "y_dim": self.problem.fast_sampler.y_dim if self.has_sampler else None,
            "x_shape": _shape(self.problem.fast_sampler.x_shape) if self.has_sampler else None,
            "built": dict(self.problem.built),
            "load_seconds": dict(self.problem.load_seconds),
            "parts": parts,
        }

    def ping(self) -> int:
        """An answer (the process id) once the worker is up."""
        return os.getpid()

    def busy_seconds(self) -> tuple[float, float]:
        """Seconds spent working and seconds alive."""
        return self._busy, time.perf_counter() - self._started

    def _prior_side(self, batch: MicroBatch) -> PriorSide:
        if batch.key not in self._prior_sides:
            self._prior_sides[batch.key] = PriorSide(self.problem.prior, batch.chains, batch.method.mlgd(), self.device)
        return self._prior_sides[batch.key]

    def _sampler_side(self, batch: MicroBatch) -> SamplerSide:
        if batch.key not in self._sampler_sides:
            sampler = self.problem.sampler(batch.method.name)
            self._sampler_sides[batch.key] = SamplerSide(
                sampler, self.problem.target, batch.chains, batch.method.mlgd(), self.device
            )
        return self._sampler_sides[batch.key]

    def _state(self, batch: MicroBatch, checkpoint: Checkpoint | None) -> ChainState:
        side = self._prior_side(batch)
        return side.initial_state() if checkpoint is None else side.resume(checkpoint)

    # -- colocated / in-process (and the prior's unguided steps when split): many steps at once ----------
    def run(self, batch: MicroBatch, checkpoint: Checkpoint | None, until: int) -> Chunk:
        """Steps from the checkpoint up to step `until`; guided steps need both sides (role 'both')."""
        tic = time.perf_counter()
        prior, state = self._prior_side(batch), self._state(batch, checkpoint)
        first, losses = state.step, []
        while state.step < until:
            denoised = prior.denoise(state)
            if prior.guided[state.step]:
                if not self.has_sampler:
                    raise RuntimeError(f"step {state.step} is guided: the prior worker cannot run it alone")
                loss, grad = self._sampler_side(batch).matching_grad(denoised.x0, state.step, denoised.radius)
                state = prior.advance(state, denoised, loss, grad)
            else:
                state = prior.advance(state, denoised)
            losses.append(state.loss.cpu())
        self._busy += time.perf_counter() - tic
        stacked = torch.stack(losses, 1) if losses else torch.empty(len(batch.chains), 0, dtype=torch.float64)
        return Chunk(state.checkpoint(), first, stacked)

    def finish(self, batch: MicroBatch, checkpoint: Checkpoint) -> MicroBatchResult:
        """CDMO refinement, held-out loss, exact metrics and pictures of the final states; with the prior here
        (role 'both') also prior_fit, else the prior's worker adds it (`prior_fit`)."""
        tic = time.perf_counter()
        side = self._sampler_side(batch)
        result = side.evaluate(checkpoint, self.problem.metrics)
        if self.has_prior:
            result.metrics["prior_fit"] = self._prior_side(batch).prior_fit(result.x, result.failed)
        pictures = self._pictures(batch, side, result.x, result.final_loss, result.failed) if batch.pictures else []
        self._prior_sides.pop(batch.key, None)
        self._sampler_sides.pop(batch.key, None)
        self._busy += time.perf_counter() - tic
        metrics = {k: v.cpu() for k, v in result.metrics.items()}
        return MicroBatchResult(
            batch.index, result.x.cpu(), result.final_loss.cpu(), result.failed.cpu(), metrics, pictures
        )

    def prior_fit(self, batch: MicroBatch, result: MicroBatchResult) -> MicroBatchResult:
        """The sampler worker's result with each x*'s prior_fit added (split placement)."""
        tic = time.perf_counter()
        side = PriorSide(self.problem.prior, batch.chains, batch.method.mlgd(), self.device)
        result.metrics["prior_fit"] = side.prior_fit(result.x, result.failed).cpu()
        self._prior_sides.pop(batch.key, None)
        self._busy += time.perf_counter() - tic
        return result

    @torch.no_grad()
    def _pictures(
        self, batch: MicroBatch, side: SamplerSide, x: torch.Tensor, losses: torch.Tensor, failed: torch.Tensor
    ) -> list[dict[str, bytes]]:
        """Per chain: its conditional samples against the target, and x* as an image (decoded for latent priors)."""
        from cdm_dist.pictures import image_png, samples_vs_target_png

        eta = torch.randn(  # fixed noise, for the pictures only
            len(batch.chains), PICTURE_SAMPLES, *side.sampler.noise_shape,
            generator=torch.Generator().manual_seed(0), dtype=side.dtype,
        ).to(self.device)  # fmt: skip
        y = side.sampler.sample(x, eta).cpu()
        decoder = self.problem.decoder
        images = decoder(x).cpu() if decoder is not None else x.cpu() if x.dim() == 4 and x.shape[1] in (1, 3) else None
        pictures = []
        for row, chain in enumerate(batch.chain_ids):
            if bool(failed[row]):
                pictures.append({})
                continue
            title = f"chain {chain}: held-out loss {losses[row].item():.4g}"
            made = {"samples": samples_vs_target_png(y[row], self.problem.target.samples, title)}
            if images is not None:
                made["image"] = image_png(images[row], scale=max(1, 128 // images.shape[-1]))
            pictures.append(made)
        return pictures

    # -- split placement: the halves of one guided step -------------------------------------------------
    def denoise(self, batch: MicroBatch, checkpoint: Checkpoint) -> tuple[torch.Tensor, float]:
        """Prior: x̂0 (B, *event) and the guess radius at the micro-batch's step; keeps the rest until `advance`."""
        tic = time.perf_counter()
        state = self._state(batch, checkpoint)
        denoised = self._prior_side(batch).denoise(state)
        self._pending[batch.key] = (state, denoised)
        self._busy += time.perf_counter() - tic
        return denoised.x0.cpu(), denoised.radius

    def matching_grad(
        self, batch: MicroBatch, step: int, denoised: tuple[torch.Tensor, float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampler: the smoothed matching loss (B,) and dL/dx̂0 (B, *event) at step `step`."""
        tic = time.perf_counter()
        x0, radius = denoised
        loss, grad = self._sampler_side(batch).matching_grad(x0, step, radius)
        self._busy += time.perf_counter() - tic
        return loss.cpu(), grad.cpu()

    def advance(self, batch: MicroBatch, loss_and_grad: tuple[torch.Tensor, torch.Tensor]) -> Chunk:
        """Prior: the VJP through Tweedie and the reverse step, for the step `denoise` began."""
        tic = time.perf_counter()
        if batch.key not in self._pending:
            raise LostStepError(f"micro-batch {batch.key}: no denoised step pending (worker restarted?)")
        state, denoised = self._pending.pop(batch.key)
        loss, grad = loss_and_grad
        state = self._prior_side(batch).advance(state, denoised, loss, grad)
        self._busy += time.perf_counter() - tic
        return Chunk(state.checkpoint(), state.step - 1, state.loss.cpu()[:, None])

    # -- split placement, a chunk at a time: the prior holds the chain state, tensors go actor to actor ------
    def stage_prior(self, message: SlotPlan | Relay | None) -> Relay | None:
        """Prior: finish the step the sampler worked on (advance), then begin the next one: x̂0 for the sampler at a
        guided step, the whole step at an unguided one. A SlotPlan starts the chunk (loading a checkpoint if given)."""
        if message is None:
            return None
        tic = time.perf_counter()
        if isinstance(message, SlotPlan):
            resident = self._load(message)
            if message.finish:
                relay = Relay(message.batch, resident.state.step, final=resident.state.checkpoint())
                self._busy += time.perf_counter() - tic
                return relay
        else:
            if message.result is not None:  # a finished micro-batch passes through
                return message
            resident = self._finish_step(message)
        relay = self._begin_step(resident)
        self._busy += time.perf_counter() - tic
        return relay

    def stage_sampler(self, relay: Relay | None) -> Relay | None:
        """Sampler: the matching loss and its gradient at x̂0, or the final evaluation; anything else passes."""
        if relay is None or (relay.x0 is None and relay.final is None):
            return relay
        if relay.final is not None:  # finish counts its own busy time
            return Relay(relay.batch, relay.step, result=self.finish(relay.batch, relay.final))
        tic = time.perf_counter()
        loss, grad = self._sampler_side(relay.batch).matching_grad(relay.x0, relay.step, relay.radius)
        self._busy += time.perf_counter() - tic
        return Relay(relay.batch, relay.step, loss=loss, grad=grad)

    def stage_end(self, relay: Relay | None) -> SlotOutput | None:
        """Prior: the chunk's last advance; returns the chunk (checkpoint + losses), or the result with prior_fit."""
        if relay is None:
            return None
        if relay.result is not None:  # prior_fit counts its own busy time
            result = self.prior_fit(relay.batch, relay.result)
            self._resident.pop(relay.batch.key, None)
            return SlotOutput(relay.batch.key, relay.batch.method.num_steps, result=result)
        tic = time.perf_counter()
        resident = self._finish_step(relay)
        state = resident.state
        losses = torch.stack(resident.losses, 1) if resident.losses else torch.empty(len(state.x), 0)
        output = SlotOutput(relay.batch.key, state.step, Chunk(state.checkpoint(), resident.first, losses))
        resident.first, resident.losses = state.step, []
        self._busy += time.perf_counter() - tic
        return output

    def _load(self, plan: SlotPlan) -> Resident:
        key = plan.batch.key
        if plan.checkpoint is not None or plan.start:
            state = self._state(plan.batch, plan.checkpoint)
            self._resident[key] = Resident(state, state.step)
        if key not in self._resident:
            raise LostStepError(f"micro-batch {key}: the prior holds no state for it (worker restarted?)")
        resident = self._resident[key]
        resident.until, resident.batch = plan.until, plan.batch
        return resident

    def _finish_step(self, relay: Relay) -> Resident:
        """Apply the sampler's gradient to the pending step (an unguided step was finished by _begin_step)."""
        if relay.batch.key not in self._resident:
            raise LostStepError(f"micro-batch {relay.batch.key}: the prior holds no state for it (worker restarted?)")
        resident = self._resident[relay.batch.key]
        if relay.grad is not None:
            resident.state = self._prior_side(relay.batch).advance(
                resident.state, resident.denoised, relay.loss, relay.grad
            )
            resident.denoised = None
            resident.losses.append(resident.state.loss.cpu())
        return resident

    def _begin_step(self, resident: Resident) -> Relay:
        """x̂0 of the next step for the sampler, or the whole step when it is unguided (or nothing past `until`)."""
        state, batch = resident.state, resident.batch
        if state.step >= resident.until:
            return Relay(batch, state.step)
        side = self._prior_side(batch)
        denoised = side.denoise(state)
        if side.guided[state.step]:
            resident.denoised = denoised
            x0 = denoised.x0 if self.device_messages else denoised.x0.cpu()
            return Relay(batch, state.step, x0=x0, radius=denoised.radius)
        resident.state = side.advance(state, denoised)
        resident.losses.append(resident.state.loss.cpu())
        return Relay(batch, resident.state.step)


def _shape(shape: tuple[int, ...] | None) -> list[int] | None:
    return None if shape is None else list(shape)


class LostStepError(RuntimeError):
    """The prior lost the half-done step of a micro-batch; the coordinator restarts it from its checkpoint."""


class LocalExecutor:
    """In-process: one worker (role 'both') runs every micro-batch, chunk by chunk."""

    name = "local"

    def __init__(self, config: CampaignConfig) -> None:
        device = pick_device(config.resources.device, has_gpu=True)
        self.worker = ChainWorker(config, "both", str(device))
        self.every = config.resources.checkpoint_every
        self.event_shape = tuple(self.worker.problem.prior.event_shape)

    def execute(self, jobs: list[Job], sink: Sink) -> None:
        """Round-robin: one chunk of every micro-batch in turn, so all reach each checkpoint step together."""
        active = list(jobs)
        while active:
            for job in list(active):
                num_steps = job.batch.method.num_steps
                step = step_of(job.checkpoint)
                if step >= num_steps:
                    sink.on_result(job.batch, self.worker.finish(job.batch, job.checkpoint))
                    active.remove(job)
                    continue
                chunk = self.worker.run(job.batch, job.checkpoint, chunk_end(step, self.every, num_steps))
                sink.on_chunk(job.batch, chunk)
                job.checkpoint = chunk.checkpoint

    def caller(self, role: str) -> Callable[..., Any]:
        """call(method, *args) on the worker that plays `role` (in-process: the one worker)."""
        return lambda method, *args: getattr(self.worker, method)(*args)

    def infos(self) -> list[dict[str, Any]]:
        """What each worker built (one here)."""
        return [self.worker.info() | self.worker.memory()]

    def start_system_metrics(self, run_id: str, uri: str, seconds: float) -> dict[str, str]:
        """MLflow's system-metrics monitor for this machine, on the run; returns node id -> address."""
        import socket

        self._monitor = system_metrics_monitor(run_id, uri, seconds, socket.gethostname())
        return {socket.gethostname(): "localhost"}

    def stop_system_metrics(self) -> None:
        if getattr(self, "_monitor", None) is not None:
            self._monitor.finish()
            self._monitor = None

    def close(self) -> None:
        """Nothing to release in-process."""
