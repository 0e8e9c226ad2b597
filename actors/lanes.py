"""Split placement, a chunk at a time: each replica's prior and sampler actors run `in_flight` micro-batches through
`checkpoint_every` steps per execution, and every tensor goes actor to actor.

One execution of a replica's lane is one chunk for each of its slots, unrolled as

    prior.stage_prior -> sampler.stage_sampler -> prior.stage_prior -> ... -> prior.stage_end

and bound slot by slot within each step, so the prior advances slot 1 while the sampler works on slot 0: with two
or more slots both actors stay busy. The prior holds the chains' state between chunks; the driver sends a SlotPlan
per slot and gets back only the chunk's checkpoint and losses, or the finished result.

transport "compiled": a Ray Compiled Graph per lane (shared memory on CPU, accelerator transport between GPUs).
transport "tasks": the same stages as Ray tasks whose ObjectRefs go actor to actor (the driver waits only on the
last stage).

Lanes are driven by one thread each; several campaigns (a study's trials) may share them: each execute() call
queues its jobs and handles its own micro-batches' chunks and results on its own thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from cdm_dist.errors import InputError
from cdm_dist.execution import Checkpoint, Job, Sink, chunk_end, step_of
from cdm_dist.worker import LostStepError, SlotOutput, SlotPlan

log = logging.getLogger(__name__)
RESTART_WAIT_S = 300.0
PING_BACKOFF_S = (0.2, 5.0)


def compiled_graphs_available() -> str | None:
    """Why this Ray cannot compile graphs, or None when it can."""
    try:
        from ray.dag import InputNode, MultiOutputNode  # noqa: F401
    except Exception as exc:
        return f"ray.dag is not importable ({exc})"
    return None


@dataclass
class Flight:
    """A micro-batch in a lane's slot."""

    job: Job
    owner: Call
    step: int
    load: bool = True  # the prior must load job.checkpoint (a start, or a restart)
    start: bool = True
    retries: int = 0


@dataclass
class Call:
    """One execute() call: its sink's messages, handled on its own thread."""

    inbox: queue.Queue = field(default_factory=queue.Queue)
    remaining: int = 0


class LaneFault(Exception):
    """An actor of the lane died: every slot goes back to its checkpoint."""


class Lane:
    """A replica's prior and sampler actors running chunks for `slots` micro-batches at a time."""

    def __init__(self, replica: Any, slots: int, steps: int, compiled: bool, accelerator: bool) -> None:
        self.replica, self.slots, self.steps = replica, slots, steps
        self.compiled, self.accelerator = compiled, accelerator
        self.graph: Any = None
        self.driver_bytes = 0  # tensor bytes of plans sent and outputs received
        self.executions = 0
        self.seconds_per_step = 0.0  # running mean of a chunk's seconds per slot-step (compiled graphs)

    def build(self) -> None:
        """Compile the lane's graph (transport 'compiled')."""
        if not self.compiled:
            return
        from ray.dag import InputNode, MultiOutputNode

        prior, sampler = self.replica.prior, self.replica.sampler
        with InputNode() as plans:
            current = [plans[i] for i in range(self.slots)]
            for _ in range(self.steps):
                begun = [self._transport(prior.stage_prior.bind(c)) for c in current]
                current = [self._transport(sampler.stage_sampler.bind(b)) for b in begun]
            outputs = MultiOutputNode([prior.stage_end.bind(c) for c in current])
        self.graph = outputs.experimental_compile(_submit_timeout=-1, _max_inflight_executions=2)

    def _transport(self, node: Any) -> Any:
        return node.with_tensor_transport("accelerator") if self.accelerator else node

    def run(self, plans: list[SlotPlan | None]) -> list[SlotOutput | BaseException | None]:
        """One chunk for every slot; an application error stays in its slot, an actor's death is a LaneFault."""
        self.driver_bytes += sum(tensor_bytes(p.checkpoint) for p in plans if p is not None)
        try:
            if self.compiled:
                tic = time.perf_counter()
                refs = self.graph.execute(*plans)
                steps = sum(p.until - p.checkpoint_step for p in plans if p is not None and not p.finish)
                # Ray 2.60's channel reader spins a core while it waits (ray-project/ray#55128): sleep through most
                # of the chunk first, so the driver does not take a core from the actors
                time.sleep(0.8 * self.seconds_per_step * steps)
                outputs = [self._get(ref, lambda r: r.get(timeout=-1)) for ref in refs]
                if steps and not any(p is not None and p.finish for p in plans):
                    per_step = (time.perf_counter() - tic) / steps
                    self.seconds_per_step = min(per_step, 0.7 * self.seconds_per_step + 0.3 * per_step or per_step)
            else:
                outputs = self._run_tasks(plans)
        except (ray.exceptions.RayActorError, ray.exceptions.RayChannelError) as exc:
            raise LaneFault(str(exc)) from exc
        self.executions += 1
        self.driver_bytes += sum(tensor_bytes(o) for o in outputs if isinstance(o, SlotOutput))
        return outputs

    def overhead_us_per_stage(self, executions: int = 30) -> float:
        """Ray's own cost per stage: executions whose stages all do nothing (every slot idle), timed."""
        idle: list[SlotPlan | None] = [None] * self.slots
        run = (lambda: [r.get(timeout=-1) for r in self.graph.execute(*idle)]) if self.compiled else (
            lambda: self._run_tasks(idle, every_slot=True)
        )  # fmt: skip
        run()
        tic = time.perf_counter()
        for _ in range(executions):
            run()
        stages = self.slots * (2 * self.steps + 1)
        return 1e6 * (time.perf_counter() - tic) / executions / stages

    def _run_tasks(
        self, plans: list[SlotPlan | None], every_slot: bool = False
    ) -> list[SlotOutput | BaseException | None]:
        prior, sampler = self.replica.prior, self.replica.sampler
        active = [i for i, p in enumerate(plans) if p is not None or every_slot]
        current: list[Any] = [plans[i] for i in active]
        for _ in range(self.steps):  # submitted slot by slot within each step: each actor runs them in this order
            begun = [prior.stage_prior.remote(c) for c in current]
            current = [sampler.stage_sampler.remote(b) for b in begun]
        ends = [prior.stage_end.remote(c) for c in current]
        outputs: list[Any] = [None] * len(plans)
        for i, ref in zip(active, ends, strict=True):
            outputs[i] = self._get(ref, ray.get)
        return outputs

    @staticmethod
    def _get(ref: Any, get: Callable[[Any], Any]) -> Any:
        try:
            return get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(exc, ray.exceptions.RayActorError) or isinstance(cause, ray.exceptions.RayActorError):
                raise LaneFault(str(exc)) from exc  # a stage's input came from an actor that died
            return exc  # an application error: that slot only

    def teardown(self) -> None:
        if self.graph is not None:
            try:
                self.graph.teardown()
            except Exception as exc:  # a graph whose actor died is torn down already
                log.debug("teardown: %s", exc)
            self.graph = None


class LanePool:
    """The split replicas as lanes, one thread each, taking micro-batches from a shared queue."""

    def __init__(self, executor: Any, compiled: bool, accelerator: bool) -> None:
        resources = executor.resources
        self.executor, self.every = executor, resources.checkpoint_every
        self.lanes = [
            Lane(r, resources.in_flight, resources.checkpoint_every, compiled, accelerator) for r in executor.replicas
        ]
        self.pending: list[Flight] = []
        self.condition = threading.Condition()
        self.closed = False
        self.threads: list[threading.Thread] = []
        for lane in self.lanes:
            lane.build()
        for lane in self.lanes:
            thread = threading.Thread(target=self._drive, args=(lane,), name=f"lane-{lane.replica.index}", daemon=True)
            thread.start()
            self.threads.append(thread)

    # -- the caller's side ------------------------------------------------------------------------------
    def execute(self, jobs: list[Job], sink: Sink) -> None:
        """Queue the jobs; handle their chunks, results, roll-backs and failures on this thread until all are done."""
        call = Call(remaining=len(jobs))
        with self.condition:
            self.pending += [Flight(job, call, step_of(job.checkpoint), start=job.checkpoint is None) for job in jobs]
            self.condition.notify_all()
        while call.remaining:
            kind, batch, value = call.inbox.get()
            if kind == "chunk":
                sink.on_chunk(batch, value)
            elif kind == "rollback":
                sink.restart_point(batch)
            elif kind == "result":
                sink.on_result(batch, value)
                call.remaining -= 1
            else:
                sink.on_failed(batch, value, self.executor.event_shape)
                call.remaining -= 1

    def close(self) -> None:
        with self.condition:
            self.closed = True
            self.condition.notify_all()
        for thread in self.threads:
            thread.join(timeout=60)
        for lane in self.lanes:
            lane.teardown()

    # -- a lane's thread --------------------------------------------------------------------------------
    def _drive(self, lane: Lane) -> None:
        slots: list[Flight | None] = [None] * lane.slots
        while True:
            with self.condition:
                while not self.closed and not self.pending and not any(slots):
                    self.condition.wait()
                if self.closed:
                    return
                for i, flight in enumerate(slots):
                    if flight is None and self.pending:
                        slots[i] = self.pending.pop(0)
                        job = slots[i].job
                        self.executor.assignments.append((job.batch.campaign, job.batch.index, lane.replica.index))
            plans = [self._plan(f) for f in slots]
            try:
                outputs = lane.run(plans)
            except LaneFault as fault:
                if not self._recover(lane, slots, str(fault)):
                    return
                continue
            except Exception as exc:  # a bug: fail this lane's micro-batches, keep the campaign going
                log.exception("lane %d stopped", lane.replica.index)
                self._give_up(lane, slots, f"{type(exc).__name__}: {exc}")
                return
            for i, (flight, output) in enumerate(zip(slots, outputs, strict=True)):
                if flight is not None and not self._take(flight, output):
                    slots[i] = None

    def _plan(self, flight: Flight | None) -> SlotPlan | None:
        if flight is None:
            return None
        num_steps = flight.job.batch.method.num_steps
        until = chunk_end(flight.step, self.every, num_steps) if flight.step < num_steps else num_steps
        checkpoint = flight.job.checkpoint if flight.load else None
        plan = SlotPlan(
            flight.job.batch, until, checkpoint, finish=flight.step >= num_steps, start=flight.start,
            checkpoint_step=flight.step,
        )  # fmt: skip
        flight.load = flight.start = False
        return plan

    def _take(self, flight: Flight, output: SlotOutput | BaseException | None) -> bool:
        """Hand a slot's output to its caller; False when the micro-batch leaves the slot."""
        batch, owner = flight.job.batch, flight.owner
        if isinstance(output, BaseException):
            flight.load, flight.step = True, step_of(flight.job.checkpoint)
            owner.inbox.put(("rollback", batch, None))
            if isinstance(output, LostStepError):
                return True
            flight.retries += 1
            if flight.retries > self.executor.resources.max_retries:
                reason = f"{type(output).__name__} after {flight.retries - 1} retries: {str(output).splitlines()[-1]}"
                owner.inbox.put(("failed", batch, reason))
                return False
            return True
        if output.result is not None:
            owner.inbox.put(("result", batch, output.result))
            return False
        flight.job.checkpoint, flight.step = output.chunk.checkpoint, output.step
        owner.inbox.put(("chunk", batch, output.chunk))
        return True

    def _recover(self, lane: Lane, slots: list[Flight | None], reason: str) -> bool:
        """An actor died: roll every slot back, wait for Ray to restart the actors, rebuild; False if it stays dead
        (its micro-batches then go back to the queue for the other lanes)."""
        lane.teardown()
        for flight in slots:
            if flight is not None:
                flight.load, flight.step = True, step_of(flight.job.checkpoint)
                flight.owner.inbox.put(("rollback", flight.job.batch, None))
        if self._wait_alive(lane):
            try:
                lane.build()
                return True
            except Exception as exc:
                reason = f"could not rebuild its graph: {exc}"
        lane.replica.dead = True
        log.warning("replica %d is gone (%s); its micro-batches move to the others", lane.replica.index, reason)
        with self.condition:
            self.pending = [f for f in slots if f is not None] + self.pending
            live = [x for x in self.lanes if not x.replica.dead]
            if not live:
                self._fail_all(self.pending, "no live replica is left")
                self.pending = []
            self.condition.notify_all()
        return False

    def _wait_alive(self, lane: Lane) -> bool:
        from actors.coordinator import _actor_state

        deadline, backoff = time.monotonic() + RESTART_WAIT_S, PING_BACKOFF_S[0]
        for actor in lane.replica.actors:
            while True:
                try:
                    ray.get(actor.ping.remote(), timeout=30)
                    break
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    if _actor_state(actor) == "DEAD" or time.monotonic() > deadline:
                        return False
                    time.sleep(backoff)
                    backoff = min(2 * backoff, PING_BACKOFF_S[1])
        return True

    def _give_up(self, lane: Lane, slots: list[Flight | None], reason: str) -> None:
        lane.replica.dead = True
        self._fail_all([f for f in slots if f is not None], reason)

    @staticmethod
    def _fail_all(flights: list[Flight], reason: str) -> None:
        for flight in flights:
            flight.owner.inbox.put(("failed", flight.job.batch, reason))


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a plan, checkpoint or output (what passes through the driver)."""
    if value is None:
        return 0
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Checkpoint):
        return tensor_bytes(value.x) + tensor_bytes(value.failed)
    if isinstance(value, SlotOutput):
        chunk, result = value.chunk, value.result
        total = 0
        if chunk is not None:
            total += tensor_bytes(chunk.checkpoint) + tensor_bytes(chunk.losses)
        if result is not None:
            total += tensor_bytes(result.x) + tensor_bytes(result.final_loss)
        return total
    return 0


def resolve_transport(requested: str, split: bool) -> tuple[bool, str | None]:
    """(use compiled graphs, a log line when auto falls back to tasks); InputError where `compiled` cannot be had.

    auto picks compiled graphs wherever Ray can compile them (`cdm bench ray` on 2 CPU cores: as fast as tasks or
    faster on every problem, at 20-40 µs per stage against 280-590 µs) and Ray tasks otherwise."""
    if requested == "tasks":
        return False, None
    if not split:
        if requested == "compiled":
            raise InputError(
                "resources.transport: compiled graphs connect the split placement's prior and sampler actors; a "
                "colocated replica has no partner (use placement: split, or transport: auto or tasks)"
            )
        return False, None
    why = compiled_graphs_available()
    if requested == "compiled":
        if why is not None:
            raise InputError(f"resources.transport: Ray cannot compile graphs here: {why}")
        return True, None
    if why is not None:
        return False, f"transport auto: Ray tasks between the actors ({why})"
    return True, None
