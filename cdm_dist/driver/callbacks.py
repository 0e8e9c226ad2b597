"""Campaign callbacks (in the manner of Ray Tune's): the driver calls them at start, per chunk, per finished
micro-batch and at the end; tracking (MLflow), pruning (Optuna) and the progress bar implement them and never
reach into the driver.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from tqdm.auto import tqdm

from cdm_dist.driver.campaign import CampaignConfig, MicroBatch
from cdm_dist.driver.execution import Chunk, MicroBatchResult

if TYPE_CHECKING:
    from cdm_dist.driver.report import CampaignReport

ChainFiles = Sequence[Sequence[Path]]  # a finished micro-batch's files: one sequence per chain, x* first


class CampaignStopped(Exception):
    """Raised by a callback to stop the campaign on purpose (a pruned trial): it ends KILLED, not FAILED."""


class ChainInfo(NamedTuple):
    """One chain of the campaign table (a tuple: a campaign of 10^6 chains makes 10^6 of them at its start)."""

    chain: int
    seed: int
    zeta: str  # a short label of its zeta schedule


@dataclass(frozen=True)
class CampaignInfo:
    """What a campaign is, given to callbacks when it starts (or resumes)."""

    config: CampaignConfig
    output_dir: Path
    chains: tuple[ChainInfo, ...]


@dataclass(frozen=True)
class Progress:
    """Where the campaign stands."""

    chain_steps_done: int
    chain_steps_total: int
    chains_done: int
    chains_total: int
    best_loss: float  # the lowest held-out loss among finished chains (inf before any)


class CampaignCallback:
    """No-op hooks; implementations override those they need."""

    def on_start(self, info: CampaignInfo, progress: Progress) -> None:
        """The campaign starts, or resumes with `progress` already done."""

    def on_chunk(self, batch: MicroBatch, chunk: Chunk, progress: Progress) -> None:
        """A micro-batch ran some steps; raise CampaignStopped to stop the campaign."""

    def on_result(
        self, batch: MicroBatch, result: MicroBatchResult, history: torch.Tensor, files: ChainFiles, progress: Progress
    ) -> None:
        """A micro-batch finished: its result, loss history (B, T) and each chain's files (x* first)."""

    def on_restored(
        self, batch: MicroBatch, result: MicroBatchResult, history: torch.Tensor, files: ChainFiles
    ) -> None:
        """A resumed campaign found this micro-batch finished by an earlier driver (after on_start)."""

    def on_end(self, report: CampaignReport | None, error: BaseException | None) -> None:
        """The campaign ended: with its report, or with the error that stopped it."""


class ProgressBar(CampaignCallback):
    """A tqdm bar of chain-steps with chains done and the best loss."""

    def __init__(self, name: str, enabled: bool = True) -> None:
        self.name, self.enabled = name, enabled
        self.bar: tqdm | None = None

    def on_start(self, info: CampaignInfo, progress: Progress) -> None:
        self.bar = tqdm(
            total=progress.chain_steps_total,
            initial=progress.chain_steps_done,
            desc=self.name,
            unit="chain-step",
            disable=not self.enabled,
            dynamic_ncols=True,
        )

    def _show(self, progress: Progress) -> None:
        if self.bar is not None:
            self.bar.update(progress.chain_steps_done - self.bar.n)

    def on_chunk(self, batch: MicroBatch, chunk: Chunk, progress: Progress) -> None:
        self._show(progress)

    def on_result(
        self, batch: MicroBatch, result: MicroBatchResult, history: torch.Tensor, files: ChainFiles, progress: Progress
    ) -> None:
        self._show(progress)
        if self.bar is not None:
            self.bar.set_postfix(chains_done=progress.chains_done, best_loss=f"{progress.best_loss:.4g}")

    def on_end(self, report: CampaignReport | None, error: BaseException | None) -> None:
        if self.bar is not None:
            self.bar.close()
