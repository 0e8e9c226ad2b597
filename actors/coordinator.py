"""The Ray executor: many micro-batches of chains on prior/sampler actors, fault tolerant.

colocated: each replica actor holds both models and runs whole chunks of steps for the micro-batches it is given
    (Ray tasks, at most `in_flight` per replica, each new one on the least loaded replica).
split: per replica a prior actor and a sampler actor, each pinned to its own GPU and building only its own role's
    models, driven as a lane (actors/lanes.py): one Ray Compiled Graph execution (or chain of tasks) per chunk of
    `checkpoint_every` steps for `in_flight` micro-batches at once; x̂0 and gradients go actor to actor, and the
    driver gets only the chunks' checkpoints and losses.

A micro-batch whose actor dies restarts from its last checkpoint once Ray has restarted the actor (max_restarts),
without using a retry; a micro-batch that fails on a live actor uses one of resources.max_retries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.auth import check_cluster_accepts
from actors.lanes import LanePool, tensor_bytes
from actors.liveness import PING_BACKOFF_S, RESTART_WAIT_S, actor_state, last_line
from actors.transport import resolve_transport
from actors.workers import NodeMonitor, RemoteWorker
from cdm_dist.driver.campaign import CampaignConfig, RuntimeEnvConfig
from cdm_dist.driver.execution import Job, Sink, chunk_end, step_of
from cdm_dist.driver.preconditions import actor_bundle, capacity_error, ray_address_answers
from cdm_dist.driver.worker import check_shapes
from cdm_dist.errors import InputError, input_error_of

log = logging.getLogger(__name__)
PLACEMENT_TIMEOUT_S = 120.0
PARKED = object()  # _recover's answer for a micro-batch waiting for its actor


def connect(address: str | None = None, runtime_env: RuntimeEnvConfig | None = None, **init_kwargs: Any) -> bool:
    """Join `address` (or RAY_ADDRESS), or start a fresh local Ray, with the campaign's runtime_env as the job's (Ray
    uploads local working_dir / py_modules then, and every actor inherits them). Returns whether the runtime_env
    still has to go on each actor: when Ray was already running in this process (remote URIs and settings only)."""
    field = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    if address not in (None, "auto", "local"):
        ray_address_answers(address, field)  # before ray.init, which waits a long time on a silent port
        if not address.startswith("ray://"):
            check_cluster_accepts(address, field)  # a token from the environment or Ray's file, or one line
    if ray.is_initialized():
        if runtime_env is not None and runtime_env.local_paths():
            raise InputError(
                f"resources.runtime_env: {runtime_env.local_paths()} are local paths, which Ray uploads only when "
                "cdm starts or joins Ray itself (ray.init), but Ray was already running in this process; use a "
                "remote URI (e.g. gcs://, s3://, https://...zip) or let cdm connect"
            )
        return runtime_env is not None
    servers_off = contextlib.nullcontext()
    if address is None:  # "local": a new cluster, never a stale one recorded by an earlier `ray start`
        address = "local"
        init_kwargs.setdefault("include_dashboard", False)
        init_kwargs.setdefault("dashboard_host", "127.0.0.1")  # if asked for: this machine only
        init_kwargs.setdefault("_temp_dir", str(private_temp_dir()))
        if not init_kwargs["include_dashboard"]:  # its metrics pages are the only reader of Ray's metrics
            system = init_kwargs.setdefault("_system_config", {})
            system.setdefault("enable_metrics_collection", False)  # no Prometheus export on the node's agent
            servers_off = environment(METRICS_SERVERS_OFF)
    if runtime_env is not None:
        init_kwargs["runtime_env"] = runtime_env.ray_dict()
    try:
        with servers_off:
            ray.init(address=address, log_to_driver=True, **init_kwargs)
    except ray.exceptions.RuntimeEnvSetupError as exc:
        raise InputError(f"resources.runtime_env: Ray could not set it up ({last_line(exc)})") from None
    return False


# The head's autoscaler monitor and dashboard process serve Prometheus metrics without a token, on fixed ports
# (Ray's AUTOSCALER_METRIC_PORT, DASHBOARD_METRIC_PORT); Ray has no switch for them, but they skip their server when
# it fails to start, as on a port number that cannot be bound. Set only while ray.init starts the processes.
METRICS_SERVERS_OFF = {"AUTOSCALER_METRIC_PORT": "-1", "DASHBOARD_METRIC_PORT": "-1"}
SOCKET_PATH_MAX = 107  # bytes in a Unix socket's path (Linux sun_path, less its final NUL)
RAY_SOCKET_TAIL = len("/r/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")  # what Ray adds


def private_temp_dir(base: str | None = None) -> Path:
    """The folder a local Ray keeps its session in (logs, sockets, runtime_resources): BASE/cdm-ray-UID/r, whose
    parent is this user's alone (0700; Ray makes its own folders 0777), BASE the system's temp folder or /tmp where
    that is too long for Ray's socket paths. A parent that is not this user's own folder is refused."""
    base = base or tempfile.gettempdir()
    if len(os.fsencode(base)) + len("/cdm-ray-4294967295") + RAY_SOCKET_TAIL > SOCKET_PATH_MAX:
        base = "/tmp"
    private = Path(base) / f"cdm-ray-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        private.mkdir(mode=0o700)
    info = private.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise InputError(f"{private}: not a folder of this user's; cdm keeps a local Ray's files there (remove it)")
    if stat.S_IMODE(info.st_mode) != 0o700:
        private.chmod(0o700)
    return private / "r"


@contextlib.contextmanager
def environment(variables: dict[str, str]) -> Iterator[None]:
    """These environment variables set while inside, as they were after."""
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass
class Replica:
    """The actors of one replica: (worker,) when colocated, (prior, sampler) when split."""

    index: int
    group: Any
    prior: Any
    sampler: Any
    dead: bool = False  # an actor of it did not come back (restarts exhausted, or RESTART_WAIT_S passed)

    @property
    def actors(self) -> list[Any]:
        return [self.prior] if self.prior is self.sampler else [self.prior, self.sampler]


@dataclass
class TaskFlight:
    """A micro-batch on its way through a colocated replica."""

    job: Job
    replica: Replica
    step: int
    stage: str = ""
    retries: int = 0  # failures on a live actor (an actor's death is not the micro-batch's fault)
    waiting_for: Any = None  # the actor whose restart this micro-batch waits for
    waiting_since: float = 0.0
    backoff: float = 0.0

    @property
    def num_steps(self) -> int:
        return self.job.batch.method.num_steps


class RayExecutor:
    """Runs a campaign's micro-batches on Ray actors, colocated or split."""

    def __init__(self, config: CampaignConfig, address: str | None = None) -> None:
        self.split = config.resources.placement == "split"
        self.compiled, fallback = resolve_transport(config.resources.transport, self.split)
        if fallback:
            log.warning(fallback)
        transport = "compiled" if self.compiled else "tasks"
        resources = config.resources.model_copy(update={"transport": transport})
        self.config = config.model_copy(update={"resources": resources})  # the workers see the transport in use
        self.resources = resources
        self.name = config.resources.executor_name
        self.transport = transport
        self.lanes: LanePool | None = None  # split: made at the first campaign
        self._lanes_lock = threading.Lock()
        self.per_actor_env = connect(address, config.resources.runtime_env)
        self._check_capacity()
        self._check_metrics_store()
        self.replicas: list[Replica] = []
        try:
            for r in range(self.resources.replicas):
                self.replicas.append(self._start_replica(r))
            self.worker_infos = self._ready()
        except BaseException:
            self.close()
            raise
        self.event_shape = tuple(next(i["event_shape"] for i in self.worker_infos if i["event_shape"] is not None))
        self.busy_fraction: dict[str, float] = {}
        self.wall_seconds = 0.0
        self.assignments: list[tuple[str, int, int]] = []  # (campaign, micro-batch, replica) as they started
        self._colocated_bytes = 0

    # -- actors -----------------------------------------------------------------------------------------
    def _bundle(self) -> dict[str, float]:
        return actor_bundle(self.resources)

    def _check_capacity(self) -> None:
        """The cluster holds every replica: in total, and each replica's actors on one node (STRICT_PACK)."""
        per_replica = 2 if self.split else 1
        too_much = capacity_error(self.resources, ray.cluster_resources(), "the Ray cluster")
        if too_much:
            raise InputError(too_much)
        nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
        replica = {k: v * per_replica for k, v in self._bundle().items()}
        for index in range(self.resources.replicas):  # first fit
            node = next((n for n in nodes if all(n.get(k, 0.0) + 1e-9 >= v for k, v in replica.items())), None)
            if node is None:
                shapes = [{k: n.get(k, 0.0) for k in replica} for n in nodes]
                raise InputError(
                    f"resources: replica {index + 1} of {self.resources.replicas} needs {replica} on one node (its "
                    f"actors share a node), but the nodes have {shapes} left"
                )
            for k, v in replica.items():
                node[k] -= v

    def _start_replica(self, index: int) -> Replica:
        """A placement group (one node) holding the replica's actors, each on its own bundle."""
        roles = ["prior", "sampler"] if self.split else ["both"]
        group = placement_group([self._bundle() for _ in roles], strategy="STRICT_PACK")
        try:
            ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(group)
            raise InputError(
                f"resources: no node can hold replica {index} ({len(roles)} x {self._bundle()}) within "
                f"{PLACEMENT_TIMEOUT_S:.0f} s"
            ) from None
        runtime_env = self.resources.runtime_env.ray_dict() if self.per_actor_env else None
        actors = [
            RemoteWorker.options(
                num_cpus=self.resources.num_cpus,
                num_gpus=self.resources.num_gpus,
                max_restarts=self.resources.max_restarts,
                max_task_retries=0,
                runtime_env=runtime_env,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=b),
            ).remote(self.config, role)
            for b, role in enumerate(roles)
        ]
        return Replica(index, group, actors[0], actors[-1])

    def _ready(self) -> list[dict[str, Any]]:
        """Wait until every actor has built its models; bad input one of them met is raised here as one line."""
        try:
            infos = self.actor_info()
        except ray.exceptions.RuntimeEnvSetupError as exc:
            raise InputError(f"resources.runtime_env: Ray could not set it up ({last_line(exc)})") from None
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(f"an actor died while loading its models: {last_line(exc)}") from None
        errors = [i["init_error"] for i in infos if i.get("init_error")]
        if errors:
            raise InputError(errors[0])
        if self.split:
            priors, samplers = infos[0::2], infos[1::2]
            for prior, sampler in zip(priors, samplers, strict=True):
                check_shapes(tuple(prior["event_shape"]), sampler["x_shape"], self.config.problem)
        return infos

    def actor_info(self) -> list[dict[str, Any]]:
        """Per actor: role, pid, device, node id, pinned GPU ids and what it built (blocks until they are up)."""
        return ray.get([a.info.remote() for r in self.replicas for a in r.actors])

    def probe_workers(self) -> tuple[Any, Any]:
        """Replica 0's actors playing the prior and the sampler (one actor when colocated), each method call waited
        for, so `cdm check` drives them as it drives in-process workers."""
        replica = self.replicas[0]
        return BlockingActor(replica.prior), BlockingActor(replica.sampler)

    def infos(self) -> list[dict[str, Any]]:
        """What each actor built, with its peak memory."""
        actors = [a for r in self.replicas for a in r.actors]
        return [info | memory for info, memory in zip(self.actor_info(), ray.get([a.memory.remote() for a in actors]),
                                                      strict=True)]  # fmt: skip

    def close(self) -> None:
        self.stop_system_metrics()
        if self.lanes is not None:
            self.lanes.close()
            self.lanes = None
        for replica in self.replicas:
            for actor in replica.actors:
                ray.kill(actor, no_restart=True)
            remove_placement_group(replica.group)
        self.replicas = []

    # -- the event loop ---------------------------------------------------------------------------------
    def execute(self, jobs: list[Job], sink: Sink) -> None:
        """Run every job to its result: split replicas as lanes (actors/lanes.py), colocated replicas chunk by chunk
        with at most `in_flight` micro-batches per live replica, each new one on the least loaded replica.

        Several campaigns (the trials of a study) may call this at once from their own threads."""
        busy_before = self._busy()
        tic = time.perf_counter()
        if self.split:
            with self._lanes_lock:
                if self.lanes is None:
                    accelerator = self.compiled and all(i["device"].startswith("cuda") for i in self.worker_infos)
                    self.lanes = LanePool(
                        self.replicas, self.resources, self.event_shape, self.compiled, accelerator,
                        on_assign=lambda campaign, batch, replica: self.assignments.append((campaign, batch, replica)),
                    )  # fmt: skip
            self.lanes.execute(jobs, sink)
        else:
            self._execute_colocated(jobs, sink)
        self.wall_seconds = time.perf_counter() - tic
        busy_after = self._busy()
        self.busy_fraction = {
            role: (busy_after[role] - busy_before.get(role, 0.0)) / self.wall_seconds / count
            for role, count in self._role_counts().items()
        }

    def start_system_metrics(self, run_id: str, uri: str, seconds: float) -> dict[str, str]:
        """One MLflow system-metrics monitor per alive Ray node, on the run; returns node id -> node address."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = {n["NodeID"][:12]: n for n in ray.nodes() if n.get("Alive")}
        self.monitors = [
            NodeMonitor.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
                runtime_env=self.resources.runtime_env.ray_dict() if self.per_actor_env else None,
            ).remote(run_id, uri, seconds, short)
            for short, node in nodes.items()
        ]
        ray.get([m.__ray_ready__.remote() for m in self.monitors])
        return {short: node["NodeManagerAddress"] for short, node in nodes.items()}

    def stop_system_metrics(self) -> None:
        for monitor in getattr(self, "monitors", []):
            try:
                ray.get(monitor.stop.remote(), timeout=60)
            except ray.exceptions.RayError as exc:
                log.warning("a system-metrics monitor did not stop cleanly: %s", last_line(exc))
            ray.kill(monitor)
        self.monitors = []

    def _check_metrics_store(self) -> None:
        """System metrics are written by each node: a store that is a file on this machine takes no others'."""
        tracking = self.config.tracking
        if not (tracking.enabled and tracking.system_metrics) or tracking.uri.startswith(("http://", "https://")):
            return
        if "://" in tracking.uri and not tracking.uri.startswith(("sqlite:", "file:")):
            return  # a database server every node can reach
        here = ray.util.get_node_ip_address()
        others = sorted({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")} - {here})
        if others:
            raise InputError(
                f"tracking.system_metrics: the MLflow store {tracking.uri} is a file on this machine, and the "
                f"cluster's nodes {others} cannot write to it; use an MLflow server (tracking.uri: http://...)"
            )

    @property
    def driver_bytes(self) -> int:
        """Tensor bytes that passed through the driver: split lanes' plans and outputs, colocated chunks and results
        (checkpoints, losses, x*)."""
        lanes = sum(lane.driver_bytes for lane in self.lanes.lanes) if self.lanes is not None else 0
        return lanes + self._colocated_bytes

    def _execute_colocated(self, jobs: list[Job], sink: Sink) -> None:
        waiting = list(jobs)
        in_flight: dict[ray.ObjectRef, TaskFlight] = {}
        parked: list[tuple[float, TaskFlight]] = []  # (when to ping again, flight) for actors still restarting
        active = {replica.index: 0 for replica in self.replicas}  # micro-batches of this call per replica
        while waiting or in_flight or parked:
            while waiting:
                replica = self._least_loaded(active)
                if replica is None:
                    for job in waiting:
                        sink.on_failed(job.batch, "no live replica is left", self.event_shape)
                    waiting = []
                elif active[replica.index] < self.resources.in_flight:
                    job = waiting.pop(0)
                    active[replica.index] += 1
                    self.assignments.append((job.batch.campaign, job.batch.index, replica.index))
                    flight = TaskFlight(job, replica, step_of(job.checkpoint))
                    in_flight[self._submit(flight)] = flight
                else:
                    break
            now = time.monotonic()
            for due, flight in [p for p in parked if p[0] <= now]:
                parked.remove((due, flight))
                in_flight[self._ping(flight)] = flight
            timeout = max(0.0, min(due for due, _ in parked) - now) if parked else None
            if not in_flight:
                time.sleep(timeout or 0.0)
                continue
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=timeout)
            if not done:
                continue
            flight = in_flight.pop(done[0])
            try:
                value = ray.get(done[0])
            except ray.exceptions.RayError as exc:
                nxt = self._recover(flight, sink, exc, active, parked)
            else:
                nxt = self._take_output(flight, value, sink)
            if nxt is PARKED:
                continue
            if nxt is None:
                active[flight.replica.index] -= 1
            else:
                in_flight[nxt] = flight

    def _least_loaded(self, active: dict[int, int]) -> Replica | None:
        live = [r for r in self.replicas if not r.dead]
        return min(live, key=lambda r: (active[r.index], r.index)) if live else None

    def _submit(self, flight: TaskFlight) -> ray.ObjectRef:
        """The next task of a micro-batch on its colocated actor, from its current checkpoint."""
        job, actor, step = flight.job, flight.replica.prior, flight.step
        num_steps = flight.num_steps
        if step >= num_steps:
            flight.stage = "finish"
            return actor.finish.remote(job.batch, job.checkpoint)
        flight.stage = "run"
        return actor.run.remote(job.batch, job.checkpoint, chunk_end(step, self.resources.checkpoint_every, num_steps))

    def _take_output(self, flight: TaskFlight, value: Any, sink: Sink) -> ray.ObjectRef | None:
        """Hand a finished task's output on; returns the next task or None when the micro-batch is done."""
        if flight.stage == "ping":  # the actor it waited for is back: go on from the checkpoint
            flight.waiting_for = None
            return self._submit(flight)
        if flight.stage == "finish":
            self._colocated_bytes += tensor_bytes(value.x) + tensor_bytes(value.final_loss)
            sink.on_result(flight.job.batch, value)
            return None
        self._colocated_bytes += tensor_bytes(value.checkpoint) + tensor_bytes(value.losses)
        sink.on_chunk(flight.job.batch, value)  # a chunk of steps is done
        flight.job.checkpoint, flight.step = value.checkpoint, value.step
        return self._submit(flight)

    # -- faults -----------------------------------------------------------------------------------------
    def _recover(
        self,
        flight: TaskFlight,
        sink: Sink,
        error: Exception,
        active: dict[int, int],
        parked: list[tuple[float, TaskFlight]],
    ) -> ray.ObjectRef | object | None:
        """A stage failed. An actor that died (or restarted and lost the half-done step) is waited for, and the
        micro-batch goes on from its last checkpoint without using a retry; a micro-batch that failed on a live
        actor uses one, and after resources.max_retries its chains are marked failed."""
        cause = input_error_of(error)
        if cause is not None:  # bad input fails again on any retry: the campaign stops with it
            raise InputError(str(cause)) from None
        if flight.stage == "ping":
            return self._wait_more(flight, sink, active, parked)
        flight.job.checkpoint = sink.restart_point(flight.job.batch)
        flight.step = step_of(flight.job.checkpoint)
        if isinstance(error, ray.exceptions.RayActorError):
            flight.waiting_for = flight.replica.prior
            flight.waiting_since, flight.backoff = time.monotonic(), PING_BACKOFF_S[0]
            return self._ping(flight)  # it may be back already
        flight.retries += 1
        if flight.retries > self.resources.max_retries:
            reason = f"{type(error).__name__} after {flight.retries - 1} retries: {last_line(error)}"
            sink.on_failed(flight.job.batch, reason, self.event_shape)
            return None
        if not self._move(flight, active, exclude=None):
            sink.on_failed(flight.job.batch, "no live replica is left", self.event_shape)
            return None
        return self._submit(flight)

    def _wait_more(
        self, flight: TaskFlight, sink: Sink, active: dict[int, int], parked: list[tuple[float, TaskFlight]]
    ) -> ray.ObjectRef | object | None:
        """The actor is not back yet: ping again later, unless Ray says it is dead for good or the wait is over."""
        state = actor_state(flight.waiting_for)
        if state == "DEAD" or time.monotonic() - flight.waiting_since > RESTART_WAIT_S:
            flight.replica.dead = True
            flight.waiting_for = None
            if not self._move(flight, active, exclude=flight.replica):
                sink.on_failed(flight.job.batch, "its actor died and no live replica is left", self.event_shape)
                return None
            return self._submit(flight)
        parked.append((time.monotonic() + flight.backoff, flight))
        flight.backoff = min(2 * flight.backoff, PING_BACKOFF_S[1])
        return PARKED

    def _move(self, flight: TaskFlight, active: dict[int, int], exclude: Replica | None) -> bool:
        """Put the flight on the least loaded live replica (its own first among equals); False when none is left."""
        live = [r for r in self.replicas if not r.dead and r is not exclude]
        if not live:
            return False
        active[flight.replica.index] -= 1
        flight.replica = min(live, key=lambda r: (active[r.index], r is not flight.replica, r.index))
        active[flight.replica.index] += 1
        return True

    def _ping(self, flight: TaskFlight) -> ray.ObjectRef:
        flight.stage = "ping"
        return flight.waiting_for.ping.remote()

    def _busy(self) -> dict[str, float]:
        """Busy seconds summed per role over live actors (an actor that restarted starts again at 0)."""
        totals: dict[str, float] = {}
        for replica in self.replicas:
            for actor, role in zip(replica.actors, self._roles(), strict=True):
                try:
                    busy, _ = ray.get(actor.busy_seconds.remote(), timeout=60)
                except ray.exceptions.RayError:
                    busy = 0.0
                totals[role] = totals.get(role, 0.0) + busy
        return totals

    def _roles(self) -> list[str]:
        return ["prior", "sampler"] if self.split else ["replica"]

    def _role_counts(self) -> dict[str, int]:
        return {role: len(self.replicas) for role in self._roles()}


class BlockingActor:
    """An actor whose method calls return their results (ray.get of the remote call)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def __getattr__(self, method: str) -> Callable[..., Any]:
        remote = getattr(self.actor, method).remote
        return lambda *args: ray.get(remote(*args))
