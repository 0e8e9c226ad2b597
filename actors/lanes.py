"""Split placement, a chunk at a time: each replica's prior and sampler actors run `in_flight` micro-batches through
`checkpoint_every` steps per execution of its lane, and every tensor goes actor to actor (actors/transport.py).

The prior holds the chains' state between chunks (actors/stages.py); the driver sends a SlotPlan per slot and gets
back only the chunk's checkpoint and losses, or the finished result.

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

import torch

from actors.liveness import wait_alive
from actors.stages import LostStepError, SlotOutput, SlotPlan
from actors.transport import LaneFault, Outputs, make_transport
from cdm_dist.driver.campaign import ResourcesConfig
from cdm_dist.driver.execution import Checkpoint, Job, Sink, chunk_end, step_of
from cdm_dist.errors import InputError, input_error_of

log = logging.getLogger(__name__)


@dataclass
class LaneFlight:
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


class Lane:
    """A replica's prior and sampler actors running chunks for `slots` micro-batches at a time over a transport."""

    def __init__(self, replica: Any, slots: int, steps: int, compiled: bool, accelerator: bool) -> None:
        self.replica, self.slots, self.steps = replica, slots, steps
        self.transport = make_transport(replica.prior, replica.sampler, slots, steps, compiled, accelerator)
        self.driver_bytes = 0  # tensor bytes of plans sent and outputs received
        self.executions = 0

    def run(self, plans: list[SlotPlan | None]) -> Outputs:
        """One chunk for every slot; an application error stays in its slot, an actor's death is a LaneFault."""
        self.driver_bytes += sum(tensor_bytes(p.checkpoint) for p in plans if p is not None)
        outputs = self.transport.run(plans)
        self.executions += 1
        self.driver_bytes += sum(tensor_bytes(o) for o in outputs if isinstance(o, SlotOutput))
        return outputs

    def overhead_us_per_stage(self, executions: int = 30) -> float:
        """Ray's own cost per stage: executions whose stages all do nothing (every slot idle), timed."""
        self.transport.run_idle()
        tic = time.perf_counter()
        for _ in range(executions):
            self.transport.run_idle()
        stages = self.slots * (2 * self.steps + 1)
        return 1e6 * (time.perf_counter() - tic) / executions / stages


class LanePool:
    """The split replicas as lanes, one thread each, taking micro-batches from a shared queue."""

    def __init__(
        self,
        replicas: list[Any],
        resources: ResourcesConfig,
        event_shape: tuple[int, ...],
        compiled: bool,
        accelerator: bool,
        on_assign: Callable[[str, int, int], None] = lambda campaign, batch, replica: None,
    ) -> None:
        self.every, self.max_retries, self.event_shape = resources.checkpoint_every, resources.max_retries, event_shape
        self.on_assign = on_assign  # (campaign, micro-batch, replica) as each micro-batch takes a slot
        self.lanes = [Lane(r, resources.in_flight, resources.checkpoint_every, compiled, accelerator) for r in replicas]
        self.pending: list[LaneFlight] = []
        self.condition = threading.Condition()
        self.closed = False
        self.threads: list[threading.Thread] = []
        for lane in self.lanes:
            lane.transport.build()
        for lane in self.lanes:
            thread = threading.Thread(target=self._drive, args=(lane,), name=f"lane-{lane.replica.index}", daemon=True)
            thread.start()
            self.threads.append(thread)

    # -- the caller's side ------------------------------------------------------------------------------
    def execute(self, jobs: list[Job], sink: Sink) -> None:
        """Queue the jobs; handle their chunks, results, roll-backs and failures on this thread until all are done."""
        call = Call(remaining=len(jobs))
        with self.condition:
            self.pending += [
                LaneFlight(job, call, step_of(job.checkpoint), start=job.checkpoint is None) for job in jobs
            ]
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
            elif kind == "input_error":
                with self.condition:  # the call's queued micro-batches do not start
                    self.pending = [f for f in self.pending if f.owner is not call]
                raise InputError(value)
            else:
                sink.on_failed(batch, value, self.event_shape)
                call.remaining -= 1

    def close(self) -> None:
        with self.condition:
            self.closed = True
            self.condition.notify_all()
        for thread in self.threads:
            thread.join(timeout=60)
        for lane in self.lanes:
            lane.transport.teardown()

    # -- a lane's thread --------------------------------------------------------------------------------
    def _drive(self, lane: Lane) -> None:
        slots: list[LaneFlight | None] = [None] * lane.slots
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
                        self.on_assign(job.batch.campaign, job.batch.index, lane.replica.index)
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

    def _plan(self, flight: LaneFlight | None) -> SlotPlan | None:
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

    def _take(self, flight: LaneFlight, output: SlotOutput | BaseException | None) -> bool:
        """Hand a slot's output to its caller; False when the micro-batch leaves the slot."""
        batch, owner = flight.job.batch, flight.owner
        if isinstance(output, BaseException):
            flight.load, flight.step = True, step_of(flight.job.checkpoint)
            owner.inbox.put(("rollback", batch, None))
            if isinstance(output, LostStepError):
                return True
            cause = input_error_of(output)
            if cause is not None:  # bad input fails again on any retry: the campaign stops with it
                owner.inbox.put(("input_error", batch, str(cause)))
                return False
            flight.retries += 1
            if flight.retries > self.max_retries:
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

    def _recover(self, lane: Lane, slots: list[LaneFlight | None], reason: str) -> bool:
        """An actor died: roll every slot back, wait for Ray to restart the actors, rebuild; False if it stays dead
        (its micro-batches then go back to the queue for the other lanes)."""
        lane.transport.teardown()
        for flight in slots:
            if flight is not None:
                flight.load, flight.step = True, step_of(flight.job.checkpoint)
                flight.owner.inbox.put(("rollback", flight.job.batch, None))
        if wait_alive(lane.replica.actors):
            try:
                lane.transport.build()
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

    def _give_up(self, lane: Lane, slots: list[LaneFlight | None], reason: str) -> None:
        lane.replica.dead = True
        self._fail_all([f for f in slots if f is not None], reason)

    @staticmethod
    def _fail_all(flights: list[LaneFlight], reason: str) -> None:
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
