"""The Ray executors against the in-process one: same chains, same numbers; pinning; faults."""

import time

import pytest
import ray
import torch

from actors.coordinator import RayExecutor
from cdm_dist.driver.callbacks import CampaignCallback
from cdm_dist.driver.runner import run_campaign
from cdm_dist.driver.store import CampaignStore
from cdm_dist.driver.worker import LocalExecutor


class OnChunk(CampaignCallback):
    """A callback calling `function(batch, chunk)` after every chunk."""

    def __init__(self, function):
        self.function = function

    def on_chunk(self, batch, chunk, progress):
        self.function(batch, chunk)


def _run(config, executor=None, on_chunk=None):
    executor = executor or (LocalExecutor(config) if config.resources.executor == "local" else RayExecutor(config))
    callbacks = [OnChunk(on_chunk)] if on_chunk else []
    try:
        return run_campaign(config, executor, CampaignStore.create(config), callbacks, progress=False)
    finally:
        executor.close()


def _assert_same_chains(report, reference, atol=1e-5):
    assert [r.chain for r in report.rows] == [r.chain for r in reference.rows]
    for got, want in zip(report.rows, reference.rows, strict=True):
        assert got.failed == want.failed
        assert got.final_loss == pytest.approx(want.final_loss, abs=atol)
        for name, value in want.metrics.items():
            assert got.metrics[name] == pytest.approx(value, abs=atol)
        x_got, x_want = (torch.from_numpy(__import__("numpy").load(r.x_path)) for r in (got, want))
        torch.testing.assert_close(x_got, x_want, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    from cdm_dist.driver.campaign import load_config

    root = tmp_path_factory.mktemp("reference")
    config = load_config(None, [f"output={root}", "resources.executor=local", *_SMALL])
    return _run(config)


_SMALL = [
    "method.num_steps=12",
    "method.n_c=16",
    "method.target_batch=16",
    "method.n_guess=2",
    "method.eta=0.5",
    "method.guidance_start=0.25",
    "method.refine_steps=2",
    "method.dtype=float64",  # as the small_campaign fixture
    "chains.count=6",
    "chains.zeta=[{kind: linear, scale: 3.0, final: 0.1}, {kind: rt, normalize: true}]",
    "resources.micro_batch=2",
    "resources.checkpoint_every=4",
    "resources.num_cpus=0.5",
    "tracking.enabled=false",
]


@pytest.mark.parametrize(
    ("executor", "replicas", "in_flight", "transport"),
    [
        ("ray_colocated", 2, 1, "tasks"),
        ("ray_split", 1, 1, "compiled"),
        ("ray_split", 2, 3, "compiled"),
        ("ray_split", 1, 2, "tasks"),
    ],
)
def test_every_executor_gives_the_same_chains(
    ray_cluster, small_campaign, local_reference, executor, replicas, in_flight, transport
):
    config = small_campaign(
        resources__executor="ray",
        resources__placement=executor.removeprefix("ray_"),
        resources__replicas=replicas,
        resources__in_flight=in_flight,
        resources__transport=transport,
    )
    executor_ = RayExecutor(config)
    report = _run(config, executor_)
    assert report.executor == executor and executor_.transport == transport
    _assert_same_chains(report, local_reference)


def test_split_actors_are_pinned_to_different_gpus_and_run_on_cpu(ray_cluster, small_campaign):
    config = small_campaign(resources__placement="split", resources__num_gpus=1)
    executor = RayExecutor(config)
    try:
        info = {i["role"]: i for i in executor.actor_info()}
    finally:
        executor.close()
    assert len(info["prior"]["gpu_ids"]) == 1 and len(info["sampler"]["gpu_ids"]) == 1
    assert info["prior"]["gpu_ids"] != info["sampler"]["gpu_ids"]
    assert info["prior"]["pid"] != info["sampler"]["pid"]
    assert info["prior"]["node_id"] == info["sampler"]["node_id"]  # one placement group, one node
    assert info["prior"]["device"] == info["sampler"]["device"] == "cpu"  # no CUDA here: logical GPUs only
    assert info["prior"]["threads"] == config.resources.threads


def test_too_many_actors_for_the_cluster_is_an_input_error(ray_cluster, small_campaign):
    from cdm_dist.errors import InputError

    config = small_campaign(resources__placement="split", resources__replicas=3, resources__num_cpus=1)
    with pytest.raises(InputError, match=r"resources\.num_cpus: 3 replica"):
        RayExecutor(config)


def _kill_and_wait(actor):
    """Kill an actor (Ray restarts it) and wait until a new instance (another process) answers; its info."""
    pid = ray.get(actor.info.remote())["pid"]
    ray.kill(actor, no_restart=False)
    for _ in range(600):
        try:
            info = ray.get(actor.info.remote(), timeout=60)
        except ray.exceptions.RayActorError:
            continue
        if info["pid"] != pid:
            return info
        time.sleep(0.05)  # the kill has not landed yet
    raise AssertionError("the actor did not come back")


@pytest.mark.parametrize(
    ("placement", "role", "transport"),
    [("colocated", "prior", "tasks"), ("split", "prior", "compiled"), ("split", "sampler", "compiled"),
     ("split", "prior", "tasks")],
)  # fmt: skip
def test_killing_an_actor_mid_campaign_loses_no_chain(
    ray_cluster, small_campaign, local_reference, placement, role, transport
):
    config = small_campaign(resources__placement=placement, resources__in_flight=2, resources__transport=transport)
    executor = RayExecutor(config)
    replica = executor.replicas[0]
    actor = replica.prior if role == "prior" else replica.sampler
    pid_before = ray.get(actor.info.remote())["pid"]
    restarted = []

    def kill_once(batch, chunk):
        if not restarted and batch.index == 1 and chunk.step >= 6:
            restarted.append(_kill_and_wait(actor)["pid"])

    report = _run(config, executor, on_chunk=kill_once)
    assert restarted and restarted[0] != pid_before, "the actor was not restarted"
    assert not any(r.failed for r in report.rows)
    _assert_same_chains(report, local_reference)


@pytest.mark.parametrize("transport", ["tasks", "compiled"])
def test_a_prior_that_restarted_between_chunks_costs_no_retry(ray_cluster, small_campaign, local_reference, transport):
    """The prior restarts after a chunk, so its chains' state is gone: with tasks the next chunk's stage raises
    LostStepError, with a compiled graph the graph is down; either way the micro-batches go on from their
    checkpoints without using a retry."""
    config = small_campaign(resources__placement="split", resources__max_retries=0, resources__transport=transport)
    executor = RayExecutor(config)
    restarted = []

    def restart_once(batch, chunk):
        if not restarted and batch.index == 1 and chunk.step == 8:
            restarted.append(_kill_and_wait(executor.replicas[0].prior))

    report = _run(config, executor, on_chunk=restart_once)
    assert restarted and not any(r.failed for r in report.rows)
    _assert_same_chains(report, local_reference)


def test_a_micro_batch_that_keeps_failing_on_a_live_actor_fails_only_its_chains(
    ray_cluster, small_campaign, local_reference, monkeypatch
):
    """Micro-batch 2's plans raise inside a live actor (a corrupt checkpoint): it uses its retries, then fails."""
    from actors.lanes import LanePool
    from cdm_dist.driver.execution import Checkpoint

    config = small_campaign(resources__placement="split", resources__max_retries=1)
    plan = LanePool._plan

    def corrupt_batch_2(self, flight):
        made = plan(self, flight)
        if made is not None and flight.job.batch.index == 2 and flight.step >= 4:
            good = flight.job.checkpoint
            made.checkpoint = Checkpoint(good.step, good.x, good.failed.repeat(3))  # 6 flags for 2 chains
        return made

    monkeypatch.setattr(LanePool, "_plan", corrupt_batch_2)
    report = _run(config)
    assert [r.failed for r in report.rows] == [False] * 4 + [True] * 2
    assert list(report.failed_batches) == [2]  # an error, not diverged chains: the run fails (cdm run exits 1)
    assert all(r.chain not in (4, 5) for r in report.topk)
    for got, want in zip(report.rows[:4], local_reference.rows[:4], strict=True):
        assert got.final_loss == pytest.approx(want.final_loss, abs=1e-5)


def test_repeated_actor_deaths_cost_no_retries_and_change_no_chain(ray_cluster, small_campaign, local_reference):
    """More kills than max_retries (1), fewer than max_restarts (4) per actor, at bad moments: mid-step, twice in a
    row while the actor is still restarting, and during the final evaluation (a sampler killed mid-campaign:
    test_killing_an_actor_mid_campaign_loses_no_chain). Every chain completes as unfaulted."""
    config = small_campaign(
        resources__placement="split", resources__in_flight=2, resources__max_retries=1, resources__max_restarts=4
    )
    executor = RayExecutor(config)
    prior, sampler = executor.replicas[0].prior, executor.replicas[0].sampler
    kills = []

    def kill(actor, name):
        ray.kill(actor, no_restart=False)
        kills.append(name)

    def at_chunk(batch, chunk):
        if batch.index == 0 and chunk.step == 4 and "prior-1" not in kills:
            kill(prior, "prior-1")
        elif batch.index == 1 and chunk.step == 8 and "prior-2" not in kills:
            kill(prior, "prior-2")
            time.sleep(0.3)
            kill(prior, "prior-3")  # again, while it restarts
        elif batch.index == 0 and chunk.step == 12 and "sampler-2" not in kills:
            kill(sampler, "sampler-2")  # its micro-batch is about to be evaluated on the sampler

    report = _run(config, executor, on_chunk=at_chunk)
    assert len(kills) == 4 and not any(r.failed for r in report.rows)
    _assert_same_chains(report, local_reference)


def test_micro_batches_start_on_the_least_loaded_replica(ray_cluster, small_campaign):
    config = small_campaign(resources__replicas=2, resources__in_flight=2, chains__count=4)  # 2 micro-batches
    executor = RayExecutor(config)
    _run(config, executor)
    assert sorted(replica for _, _, replica in executor.assignments) == [0, 1]


def test_transport_choices_and_their_errors(ray_cluster, small_campaign, monkeypatch, caplog):
    import actors.transport
    from cdm_dist.errors import InputError

    with pytest.raises(InputError, match=r"resources\.transport: Input should be 'auto', 'compiled' or 'tasks'"):
        small_campaign(resources__transport="nccl")
    with pytest.raises(InputError, match=r"^resources\.transport: compiled graphs connect the split placement"):
        RayExecutor(small_campaign(resources__transport="compiled"))  # colocated
    monkeypatch.setattr(actors.transport, "compiled_graphs_available", lambda: "ray.dag is not importable (test)")
    with pytest.raises(InputError, match=r"^resources\.transport: Ray cannot compile graphs here: ray\.dag is not"):
        RayExecutor(small_campaign(resources__placement="split", resources__transport="compiled"))
    gpus = {"resources__num_gpus": 1, "resources__num_cpus": 0.5}  # logical GPUs: auto's choice, not CUDA
    executor = RayExecutor(small_campaign(resources__placement="split", **gpus))
    try:
        assert executor.transport == "tasks"
    finally:
        executor.close()
    assert "transport auto: Ray tasks between the actors (ray.dag is not importable (test))" in caplog.text
    monkeypatch.undo()
    for placement_gpus in (gpus, {"resources__num_cpus": 0.5}):  # auto: compiled graphs wherever Ray compiles
        executor = RayExecutor(small_campaign(resources__placement="split", **placement_gpus))
        try:
            assert executor.transport == "compiled"
        finally:
            executor.close()


@pytest.fixture(scope="module")
def editing_source(tmp_path_factory):
    """A source x_src for the default problem (gmm2d: x of shape (1,)), as an .npy file."""
    import numpy as np

    path = tmp_path_factory.mktemp("source") / "source.npy"
    np.save(path, np.array([0.8]))
    return str(path)


_EDIT = ["chains.source={file: %s, strengths: [0.5, 0.75, 0.5]}", "method.guidance_start=0.0"]


@pytest.fixture(scope="module")
def editing_reference(tmp_path_factory, editing_source):
    from cdm_dist.driver.campaign import load_config

    root = tmp_path_factory.mktemp("editing")
    edit = [_EDIT[0] % editing_source, *_EDIT[1:]]
    return _run(load_config(None, [f"output={root}", "resources.executor=local", *_SMALL, *edit]))


def test_editing_chains_keep_the_executor_contract(ray_cluster, small_campaign, editing_source, editing_reference):
    """Source chains (mixed start steps in one micro-batch) give the same chains in-process, colocated and split, and
    a prior actor killed mid-campaign changes none of them; every chain reports its source_loss and improvement."""
    rows = editing_reference.rows
    assert all({"source_loss", "improvement"} <= set(r.metrics) for r in rows)
    assert len({r.metrics["source_loss"] for r in rows}) == 1  # one source, one held-out loss
    for r in rows:
        source_loss = r.metrics["source_loss"]
        assert r.metrics["improvement"] == pytest.approx((source_loss - r.final_loss) / source_loss, rel=1e-9)
    edit = {"chains__source": {"file": editing_source, "strengths": [0.5, 0.75, 0.5]}, "method__guidance_start": 0.0}
    colocated = small_campaign(resources__executor="ray", resources__placement="colocated", **edit)
    _assert_same_chains(_run(colocated), editing_reference)
    split = small_campaign(resources__executor="ray", resources__placement="split", resources__in_flight=2, **edit)
    executor = RayExecutor(split)
    actor, restarted = executor.replicas[0].prior, []

    def kill_once(batch, chunk):
        if not restarted and batch.index == 1 and chunk.step >= 8:
            restarted.append(_kill_and_wait(actor)["pid"])

    report = _run(split, executor, on_chunk=kill_once)
    assert restarted, "the prior actor was not killed"
    _assert_same_chains(report, editing_reference)
