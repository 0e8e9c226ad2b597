"""The work a campaign does on one device, for one role:

- "both" (in-process and colocated replicas): whole chunks of steps and the final evaluation;
- "prior" / "sampler" (split placement, actors/): each builds only its half; actors/stages.py drives the guided step
  across them.

Every step is `cdm_dist.chains.mlgd.guided_step`, driven here (`run`, the probes) or by actors/stages.py. Each worker
resolves the problem spec itself and builds only its role's parts (nothing is pickled from the driver).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from cdm_dist.chains.allocator import keep_large_allocations
from cdm_dist.chains.mlgd import (
    ChainState,
    GradAnswer,
    GradRequest,
    GuidedStep,
    PriorSide,
    SamplerSide,
    begin_step,
    drive_step,
    finish_step,
    guided_step,
)
from cdm_dist.chains.profiling import named_modules, profile_modules
from cdm_dist.chains.targets import HELDOUT_ROWS, subsample
from cdm_dist.driver.campaign import CampaignConfig, MicroBatch
from cdm_dist.driver.execution import Checkpoint, Chunk, Job, MicroBatchResult, Sink, chunk_end, step_of
from cdm_dist.errors import InputError, first_line
from cdm_dist.problems.registry import ProblemSource, resolve_problem

ROLES = ("both", "prior", "sampler")
PICTURE_SAMPLES = 512  # conditional samples at x* drawn for a chain's picture (fixed noise, not for selection)


def system_metrics_monitor(run_id: str, uri: str, seconds: float, node_id: str) -> Any:
    """MLflow's SystemMetricsMonitor (CPU, memory, disk, network, GPU where present) logging to a run under
    system/<node_id>/..., started."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    from cdm_dist.driver.tracking import resolve_uri

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


class ChainWorker:
    """Builds its role's parts of the campaign's problem and drives guided steps (cdm_dist.chains.mlgd.guided_step) for
    micro-batches: whole chunks (role 'both'), or stage by stage for `cdm check` (the probes)."""

    def __init__(self, config: CampaignConfig, role: str = "both", device: str | None = None) -> None:
        if role not in ROLES:
            raise ValueError(f"role: unknown {role!r}; expected one of {ROLES}")
        torch.set_num_threads(config.resources.threads)
        keep_large_allocations()
        self.config, self.role = config, role
        self.device = torch.device(device) if device else torch.device("cpu")
        self.problem: ProblemSource = resolve_problem(config.problem, self.device)
        self._prior_sides: dict[tuple[str, int], PriorSide] = {}
        self._sampler_sides: dict[tuple[str, int], SamplerSide] = {}
        self._probes: dict[tuple[str, int], GuidedStep] = {}  # steps paused at their gradient request
        self._sources: dict[str, torch.Tensor] = {}  # source file -> x_src (1, *event)
        self._source_losses: dict[tuple[str, str], float] = {}  # (source file, method) -> its held-out loss
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
        self.source()  # a bad source stops the worker's start

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
            "prior_reading": getattr(self.problem.prior, "reading", None) if self.has_prior else None,
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

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Count the time spent inside as working time."""
        tic = time.perf_counter()
        try:
            yield
        finally:
            self._busy += time.perf_counter() - tic

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

    # -- the source of an editing campaign --------------------------------------------------------------
    def source(self, file: str | None = None) -> torch.Tensor | None:
        """x_src (1, *event) of an editing campaign (chains.source.file, or `file`) on this worker's device, read
        once; an image is encoded by the latent prior's VAE (the decoder part). None when there is no source."""
        file = file or self.config.chains.source_file
        if file is None:
            return None
        if file not in self._sources:
            from cdm_dist.models.sources import is_image, load_source

            decoder = self.problem.decoder if is_image(file) else None  # (a tensor source needs no VAE)
            encode = getattr(decoder, "encode", None)
            if decoder is not None and encode is None:
                raise InputError(
                    f"chains.source.file: {file} is an image, but the problem's decoder (a factory) cannot encode it; "
                    "give the source as a .npy / .safetensors tensor in the prior's event shape"
                )
            self._sources[file] = load_source(file, self.event_shape, encode).to(self.device)
        return self._sources[file]

    @property
    def event_shape(self) -> tuple[int, ...]:
        """x's shape: the prior's, or (the sampler alone) the decoder's latent shape or the sampler's x_shape."""
        if self.has_prior:
            return tuple(self.problem.prior.event_shape)
        prior = self.problem.part_spec("prior")
        shape = getattr(prior, "event_shape", None) or self.problem.fast_sampler.x_shape
        if shape is None:
            from cdm_dist.models.adapters import infer_event_shape
            from cdm_dist.models.spec import DiffusersPriorSpec, read_json

            if not isinstance(prior, DiffusersPriorSpec):
                raise InputError("chains.source: the sampler worker cannot tell x's shape; set the sampler's x_shape")
            config = read_json(prior.model_folder / "config.json", "not a diffusers folder for the model")
            shape = infer_event_shape(config, prior.model_class or config.get("_class_name", ""), "problem.prior")
        return tuple(shape)

    def source_loss(self, batch: MicroBatch) -> float | None:
        """The held-out loss of the batch's source (once per source and method), None without one."""
        if batch.source is None:
            return None
        key = (batch.source, batch.method.model_dump_json())
        if key not in self._source_losses:
            self._source_losses[key] = self.sampler_side(batch).source_loss(self.source(batch.source))
        return self._source_losses[key]

    # -- a micro-batch's halves of the chain loop -------------------------------------------------------
    def prior_side(self, batch: MicroBatch) -> PriorSide:
        """The prior's half for a micro-batch (made once, kept until the micro-batch is finished)."""
        if batch.key not in self._prior_sides:
            self._prior_sides[batch.key] = PriorSide(
                self.problem.prior, batch.chains, batch.method.mlgd(), self.device, self.source(batch.source)
            )
        return self._prior_sides[batch.key]

    def sampler_side(self, batch: MicroBatch) -> SamplerSide:
        """The sampler's half for a micro-batch (made once, kept until the micro-batch is finished)."""
        if batch.key not in self._sampler_sides:
            sampler = self.problem.sampler(batch.method.name)
            self._sampler_sides[batch.key] = SamplerSide(
                sampler, self.problem.target, batch.chains, batch.method.mlgd(), self.device
            )
        return self._sampler_sides[batch.key]

    def start_state(self, batch: MicroBatch, checkpoint: Checkpoint | None) -> ChainState:
        """x_T (no checkpoint) or the checkpoint's state, on this worker's device."""
        side = self.prior_side(batch)
        return side.initial_state() if checkpoint is None else side.resume(checkpoint)

    # -- in-process and colocated: many steps at once ---------------------------------------------------
    def run(self, batch: MicroBatch, checkpoint: Checkpoint | None, until: int) -> Chunk:
        """Guided steps from the checkpoint up to step `until`, each answered by this worker's sampler side."""
        with self.busy():
            prior, state, answer = self.prior_side(batch), self.start_state(batch, checkpoint), self._answer(batch)
            first, losses = state.step, []
            while state.step < until:
                state = drive_step(guided_step(prior, state), answer)
                losses.append(state.loss.cpu())
        stacked = torch.stack(losses, 1) if losses else torch.empty(len(batch.chains), 0, dtype=torch.float64)
        return Chunk(state.checkpoint(), first, stacked)

    def _answer(self, batch: MicroBatch) -> Callable[[GradRequest], GradAnswer]:
        if self.has_sampler:
            return self.sampler_side(batch).matching_grad

        def refuse(request: GradRequest) -> GradAnswer:
            raise RuntimeError(f"step {request.step} is guided: the prior worker cannot run it alone")

        return refuse

    def finish(self, batch: MicroBatch, checkpoint: Checkpoint) -> MicroBatchResult:
        """CDMO refinement, held-out loss, exact metrics and pictures of the final states; with the prior here
        (role 'both') also prior_fit, else the prior's worker adds it (`add_prior_fit`)."""
        with self.busy():
            side = self.sampler_side(batch)
            result = side.evaluate(checkpoint, self.problem.metrics, self.source_loss(batch))
            if self.has_prior:
                result.metrics["prior_fit"] = self.prior_side(batch).fit_scores(result.x, result.failed)
            pictures = self._pictures(batch, side, result.x, result.final_loss, result.failed) if batch.pictures else []
            self.forget(batch)
        metrics = {k: v.cpu() for k, v in result.metrics.items()}
        return MicroBatchResult(
            batch.index, result.x.cpu(), result.final_loss.cpu(), result.failed.cpu(), metrics, pictures
        )

    def add_prior_fit(self, batch: MicroBatch, result: MicroBatchResult) -> MicroBatchResult:
        """The sampler worker's result with each x*'s prior_fit added (split placement)."""
        with self.busy():
            result.metrics["prior_fit"] = self.prior_side(batch).fit_scores(result.x, result.failed).cpu()
            self.forget(batch)
        return result

    def forget(self, batch: MicroBatch) -> None:
        """Drop what this worker keeps for a finished micro-batch."""
        self._prior_sides.pop(batch.key, None)
        self._sampler_sides.pop(batch.key, None)
        self._probes.pop(batch.key, None)

    @torch.no_grad()
    def _pictures(
        self, batch: MicroBatch, side: SamplerSide, x: torch.Tensor, losses: torch.Tensor, failed: torch.Tensor
    ) -> list[dict[str, bytes]]:
        """Per chain: its conditional samples against the target, and x* as an image (decoded for latent priors)."""
        from cdm_dist.driver.pictures import image_png, samples_vs_target_png

        eta = torch.randn(  # fixed noise, for the pictures only
            len(batch.chains), PICTURE_SAMPLES, *side.sampler.noise_shape,
            generator=torch.Generator().manual_seed(0), dtype=side.dtype,
        ).to(self.device)  # fmt: skip
        y = side.sampler.sample(x, eta).cpu()
        decoder = self.problem.decoder
        images = decoder(x).cpu() if decoder is not None else x.cpu() if x.dim() == 4 and x.shape[1] in (1, 3) else None
        pictures = []
        shown = subsample(self.problem.target.samples, HELDOUT_ROWS, 0)  # a huge target: a scatter of 10^4 points
        for row, chain in enumerate(batch.chain_ids):
            if bool(failed[row]):
                pictures.append({})
                continue
            title = f"chain {chain}: held-out loss {losses[row].item():.4g}"
            made = {"samples": samples_vs_target_png(y[row], shown, title)}
            if images is not None:
                made["image"] = image_png(images[row], scale=max(1, 128 // images.shape[-1]))
            pictures.append(made)
        return pictures

    # -- `cdm check`: one guided step driven stage by stage, timed and checked --------------------------
    def probe_denoise(self, batch: MicroBatch, checkpoint: Checkpoint) -> dict[str, Any]:
        """Prior: the step at the checkpoint run up to its gradient request (Tweedie's x̂0), timed; x̂0 checked."""
        step = guided_step(self.prior_side(batch), self.start_state(batch, checkpoint))
        torch_sync(self.device)
        tic = time.perf_counter()
        with profile_modules(named_modules(self.problem.prior), self.device) as modules:
            request = begin_step(step)
        torch_sync(self.device)
        seconds = time.perf_counter() - tic
        if not isinstance(request, GradRequest):
            raise ValueError(f"step {checkpoint.step} is not guided: there is no gradient to probe")
        self._probes[batch.key] = step
        x0 = request.x0.cpu()
        return {
            "request": GradRequest(request.step, x0, request.radius),
            "seconds": seconds,
            "x0_finite": bool(torch.isfinite(x0).all()),
            "x0_abs_max": float(x0.abs().max()),
            "modules": {name: profile.to_json() for name, profile in modules.items()},
        }

    def probe_matching_grad(self, batch: MicroBatch, request: GradRequest) -> dict[str, Any]:
        """Sampler: y at x̂0 (shape and finiteness), then the answer to the request (loss and dL/dx̂0), timed."""
        side = self.sampler_side(batch)
        x0 = request.x0
        eta = torch.randn(x0.shape[0], side.config.n_c, *side.sampler.noise_shape, dtype=side.dtype)
        x = x0.to(self.device, side.dtype).requires_grad_(True)
        try:
            with torch.enable_grad():
                y = side.sampler.sample(x, eta.to(self.device))
        except Exception as exc:
            raise InputError(
                f"problem.sampler: cannot take x of shape {list(x0.shape[1:])} from the prior "
                f"({type(exc).__name__}: {first_line(exc)})"
            ) from None
        check_samples(y, (x0.shape[0], side.config.n_c, side.sampler.y_dim))
        torch_sync(self.device)
        tic = time.perf_counter()
        with profile_modules(named_modules(side.sampler), self.device) as modules:
            loss, grad = side.matching_grad(request)
        torch_sync(self.device)
        return {
            "seconds": time.perf_counter() - tic,
            "modules": {name: profile.to_json() for name, profile in modules.items()},
            "y_shape": list(y.shape),
            "y_finite": bool(torch.isfinite(y).all()),
            "loss": loss.tolist(),
            "grad_x0": grad.cpu(),
        }

    def probe_advance(self, batch: MicroBatch, loss: torch.Tensor, grad: torch.Tensor) -> dict[str, Any]:
        """Prior: the paused step finished with the answer (the VJP through Tweedie and the reverse step), timed."""
        step = self._probes.pop(batch.key)
        torch_sync(self.device)
        tic = time.perf_counter()
        after = finish_step(step, (loss, grad))
        torch_sync(self.device)
        return {
            "seconds": time.perf_counter() - tic,
            "grad_x_norm": after.grad_norm.cpu().tolist(),
            "x_finite": bool(torch.isfinite(after.x).all()) and not bool(after.failed.any()),
        }


def check_samples(y: object, expected: tuple[int, ...]) -> None:
    """The fast sampler's contract at the probe: a floating tensor y of shape (B, n_c, y_dim) with a gradient path
    back to x (MLGD-F backpropagates the matching loss through it)."""
    if not isinstance(y, torch.Tensor):
        raise InputError(f"problem.sampler: sample(x, eta) returned a {type(y).__name__}, not a torch.Tensor")
    if tuple(y.shape) != expected:
        raise InputError(
            f"problem.sampler: sample(x, eta) gave y of shape {list(y.shape)}; the contract is (B, n_c, y_dim) = "
            f"{list(expected)}"
        )
    if not y.is_floating_point():
        raise InputError(f"problem.sampler: sample(x, eta) gave y of dtype {y.dtype}; it must be a floating dtype")
    if not y.requires_grad:
        raise InputError(
            "problem.sampler: sample(x, eta) gave y with no gradient path to x (detached, through numpy, or under "
            "torch.no_grad); MLGD-F backpropagates the matching loss through the sampler, so y must be computed from x "
            "with torch operations"
        )


def _shape(shape: tuple[int, ...] | None) -> list[int] | None:
    return None if shape is None else list(shape)


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

    def probe_workers(self) -> tuple[ChainWorker, ChainWorker]:
        """The workers playing the prior and the sampler (in-process: the one worker, twice)."""
        return self.worker, self.worker

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
