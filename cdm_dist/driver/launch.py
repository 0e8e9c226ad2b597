"""Executors by name: 'local' (in-process) is the driver's own; the others (e.g. 'ray', from actors/) register
through the `cdm_dist.executors` entry-point group, so the driver never imports the layers above it."""

from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points

from cdm_dist.driver.campaign import CampaignConfig
from cdm_dist.driver.execution import Executor
from cdm_dist.driver.preconditions import capacity_error, local_capacity
from cdm_dist.driver.worker import LocalExecutor
from cdm_dist.errors import InputError

ENTRY_POINTS = "cdm_dist.executors"


def make_executor(config: CampaignConfig, address: str | None = None) -> Executor:
    """The executor config.resources.executor names, started; raises InputError for bad input found while the
    workers build their models."""
    name = config.resources.executor
    if name == "local":
        return LocalExecutor(config)
    if name == "ray":
        local_ray_fits(config, address)
    registered = {point.name: point for point in entry_points(group=ENTRY_POINTS)}
    if name not in registered:
        raise InputError(
            f"resources.executor: {name!r} is not installed (entry-point group {ENTRY_POINTS} has "
            f"{sorted(registered) or 'nothing'}; pip install the project)"
        )
    return registered[name].load()(config, address)


def local_ray_fits(config: CampaignConfig, address: str | None) -> None:
    """Before a local Ray starts (no address, none running here): the replicas fit this machine's CPUs and GPUs."""
    if address or os.environ.get("RAY_ADDRESS"):
        return
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return
    too_much = capacity_error(config.resources, local_capacity(), "this machine")
    if too_much:
        raise InputError(too_much)
