"""Ray actors around actors.stages.LaneWorker: each loads its own role's models on its own device."""

from __future__ import annotations

from typing import Any

import ray

from actors.stages import LaneWorker
from cdm_dist.driver.campaign import CampaignConfig
from cdm_dist.driver.worker import pick_device
from cdm_dist.errors import InputError


class WorkerActor(LaneWorker):
    """A LaneWorker on the device Ray assigned: CUDA when it holds a GPU that torch can see, else CPU.

    Bad input found while building its parts (a factory that cannot be imported or raises, a wrong folder) does not
    kill the actor: `info()` reports it, and the coordinator raises it as one line before any chain runs."""

    def __init__(self, config: CampaignConfig, role: str) -> None:
        context = ray.get_runtime_context()
        self.gpu_ids = [str(g) for g in context.get_accelerator_ids().get("GPU", [])]
        self.node_id = context.get_node_id()
        self.init_error: str | None = None
        device = pick_device(config.resources.device, has_gpu=bool(self.gpu_ids))
        try:
            super().__init__(config, role, str(device))
        except InputError as exc:
            self.init_error = str(exc)

    def info(self) -> dict[str, Any]:
        """Role, process, device, Ray node, pinned GPU ids, and what it built (or the input error it met)."""
        pinned = {"gpu_ids": self.gpu_ids, "node_id": self.node_id}
        if self.init_error is not None:
            return {"role": getattr(self, "role", None), "init_error": self.init_error} | pinned
        return super().info() | pinned


RemoteWorker = ray.remote(WorkerActor)


@ray.remote(num_cpus=0)
class NodeMonitor:
    """MLflow's system-metrics monitor on one Ray node (pinned there), writing system/<node>/... to a run."""

    def __init__(self, run_id: str, uri: str, seconds: float, node_id: str) -> None:
        from cdm_dist.driver.worker import system_metrics_monitor

        self.monitor = system_metrics_monitor(run_id, uri, seconds, node_id)

    def stop(self) -> None:
        self.monitor.finish()
