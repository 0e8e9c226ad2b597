"""How a lane's stages travel between its prior and sampler actors: one Transport interface, two implementations.

- CompiledTransport: a Ray Compiled Graph per lane (shared memory on CPU, accelerator transport between GPUs).
- TaskTransport: the same stages as Ray tasks whose ObjectRefs go actor to actor (the driver waits only on the last).

Both unroll one chunk of `steps` steps for every slot as

    prior.stage_prior -> sampler.stage_sampler -> prior.stage_prior -> ... -> prior.stage_end

bound slot by slot within each step, so the prior works on slot 1 while the sampler answers slot 0. A transport moves
the stages' messages; what a stage does is actors/stages.py's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import ray

from actors.stages import SlotOutput, SlotPlan
from cdm_dist.errors import InputError

log = logging.getLogger(__name__)
Outputs = list[SlotOutput | BaseException | None]


class LaneFault(Exception):
    """An actor of the lane died: every slot goes back to its checkpoint."""


class Transport(Protocol):
    """Runs one chunk for every slot of a lane."""

    def build(self) -> None: ...  # (re)connect the actors, after a start or a restart
    def run(self, plans: list[SlotPlan | None]) -> Outputs: ...  # an actor's death raises LaneFault
    def run_idle(self) -> None: ...  # one chunk in which every stage does nothing (Ray's own cost)
    def teardown(self) -> None: ...


def _get(ref: Any, get: Callable[[Any], Any]) -> Any:
    """A stage's output; an application error stays in its slot, an actor's death is a LaneFault."""
    try:
        return get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(exc, ray.exceptions.RayActorError) or isinstance(cause, ray.exceptions.RayActorError):
            raise LaneFault(str(exc)) from exc  # a stage's input came from an actor that died
        return exc


class TaskTransport:
    """The stages as Ray tasks, their ObjectRefs passed actor to actor."""

    def __init__(self, prior: Any, sampler: Any, slots: int, steps: int) -> None:
        self.prior, self.sampler, self.slots, self.steps = prior, sampler, slots, steps

    def build(self) -> None:
        """Nothing to connect: tasks find their actors by handle."""

    def run(self, plans: list[SlotPlan | None], every_slot: bool = False) -> Outputs:
        try:
            active = [i for i, p in enumerate(plans) if p is not None or every_slot]
            current: list[Any] = [plans[i] for i in active]
            for _ in range(self.steps):  # submitted slot by slot within each step: each actor runs them in order
                begun = [self.prior.stage_prior.remote(c) for c in current]
                current = [self.sampler.stage_sampler.remote(b) for b in begun]
            ends = [self.prior.stage_end.remote(c) for c in current]
            outputs: Outputs = [None] * len(plans)
            for i, ref in zip(active, ends, strict=True):
                outputs[i] = _get(ref, ray.get)
            return outputs
        except ray.exceptions.RayActorError as exc:
            raise LaneFault(str(exc)) from exc

    def run_idle(self) -> None:
        self.run([None] * self.slots, every_slot=True)

    def teardown(self) -> None:
        """Nothing to release."""


class CompiledTransport:
    """The stages as one Ray Compiled Graph per lane, executed once per chunk."""

    def __init__(self, prior: Any, sampler: Any, slots: int, steps: int, accelerator: bool) -> None:
        self.prior, self.sampler, self.slots, self.steps = prior, sampler, slots, steps
        self.accelerator = accelerator
        self.graph: Any = None
        self.seconds_per_step = 0.0  # running mean of a chunk's seconds per slot-step

    def build(self) -> None:
        from ray.dag import InputNode, MultiOutputNode

        with InputNode() as plans:
            current = [plans[i] for i in range(self.slots)]
            for _ in range(self.steps):
                begun = [self._moved(self.prior.stage_prior.bind(c)) for c in current]
                current = [self._moved(self.sampler.stage_sampler.bind(b)) for b in begun]
            outputs = MultiOutputNode([self.prior.stage_end.bind(c) for c in current])
        self.graph = outputs.experimental_compile(_submit_timeout=-1, _max_inflight_executions=2)

    def _moved(self, node: Any) -> Any:
        return node.with_tensor_transport("accelerator") if self.accelerator else node

    def run(self, plans: list[SlotPlan | None]) -> Outputs:
        try:
            tic = time.perf_counter()
            refs = self.graph.execute(*plans)
            steps = sum(p.until - p.checkpoint_step for p in plans if p is not None and not p.finish)
            # Ray 2.60's channel reader spins a core while it waits (ray-project/ray#55128): sleep through most of
            # the chunk first, so the driver does not take a core from the actors
            time.sleep(0.8 * self.seconds_per_step * steps)
            outputs = [_get(ref, lambda r: r.get(timeout=-1)) for ref in refs]
            if steps and not any(p is not None and p.finish for p in plans):
                per_step = (time.perf_counter() - tic) / steps
                self.seconds_per_step = min(per_step, 0.7 * self.seconds_per_step + 0.3 * per_step or per_step)
            return outputs
        except (ray.exceptions.RayActorError, ray.exceptions.RayChannelError) as exc:
            raise LaneFault(str(exc)) from exc

    def run_idle(self) -> None:
        [r.get(timeout=-1) for r in self.graph.execute(*[None] * self.slots)]

    def teardown(self) -> None:
        if self.graph is not None:
            try:
                self.graph.teardown()
            except Exception as exc:  # a graph whose actor died is torn down already
                log.debug("teardown: %s", exc)
            self.graph = None


def compiled_graphs_available() -> str | None:
    """Why this Ray cannot compile graphs, or None when it can."""
    try:
        from ray.dag import InputNode, MultiOutputNode  # noqa: F401
    except Exception as exc:
        return f"ray.dag is not importable ({exc})"
    return None


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


def make_transport(prior: Any, sampler: Any, slots: int, steps: int, compiled: bool, accelerator: bool) -> Transport:
    """A compiled-graph or a task transport for one lane."""
    if compiled:
        return CompiledTransport(prior, sampler, slots, steps, accelerator)
    return TaskTransport(prior, sampler, slots, steps)
