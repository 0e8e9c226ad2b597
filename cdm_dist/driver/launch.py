"""Executors by name: 'local' (in-process) is the driver's own; the others (e.g. 'ray', from actors/) register
through the `cdm_dist.executors` entry-point group, so the driver never imports the layers above it."""

from __future__ import annotations

from importlib.metadata import entry_points

from cdm_dist.driver.campaign import CampaignConfig
from cdm_dist.driver.execution import Executor
from cdm_dist.driver.worker import LocalExecutor
from cdm_dist.errors import InputError

ENTRY_POINTS = "cdm_dist.executors"


def make_executor(config: CampaignConfig, address: str | None = None) -> Executor:
    """The executor config.resources.executor names, started; raises InputError for bad input found while the
    workers build their models."""
    name = config.resources.executor
    if name == "local":
        return LocalExecutor(config)
    registered = {point.name: point for point in entry_points(group=ENTRY_POINTS)}
    if name not in registered:
        raise InputError(
            f"resources.executor: {name!r} is not installed (entry-point group {ENTRY_POINTS} has "
            f"{sorted(registered) or 'nothing'}; pip install the project)"
        )
    return registered[name].load()(config, address)
