"""Ray actors around cdm_dist.worker.ChainWorker: each loads its own models on its own device."""

from __future__ import annotations

from typing import Any

import ray

from cdm_dist.campaign import CampaignConfig
from cdm_dist.worker import ChainWorker, pick_device


class WorkerActor(ChainWorker):
    """A ChainWorker on the device Ray assigned: CUDA when it holds a GPU that torch can see, else CPU."""

    def __init__(self, config: CampaignConfig, role: str) -> None:
        context = ray.get_runtime_context()
        self.gpu_ids = [str(g) for g in context.get_accelerator_ids().get("GPU", [])]
        device = pick_device(config.resources.device, has_gpu=bool(self.gpu_ids))
        super().__init__(config, role, str(device))
        self.node_id = context.get_node_id()

    def info(self) -> dict[str, Any]:
        """Role, process, device, Ray node and the GPU ids Ray pinned this actor to."""
        return super().info() | {"gpu_ids": self.gpu_ids, "node_id": self.node_id}


RemoteWorker = ray.remote(WorkerActor)
