"""Choosing an executor for a campaign: in-process, or Ray actors (colocated or split). The only place that knows
both; the driver (cdm_dist.runner) and the Ray coordinator (actors/) know only the executor contract."""

from __future__ import annotations

from cdm_dist.campaign import CampaignConfig
from cdm_dist.execution import Executor


def make_executor(config: CampaignConfig, address: str | None = None) -> Executor:
    """In-process, or Ray (colocated or split) per config.resources; raises InputError for bad input found while
    the workers build their models."""
    if config.resources.executor == "local":
        from cdm_dist.worker import LocalExecutor

        return LocalExecutor(config)
    from actors.coordinator import RayExecutor

    return RayExecutor(config, address)
