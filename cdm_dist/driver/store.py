"""A campaign's folder: resolved config, chain checkpoints, finished results and x* files, written atomically.

It is what `cdm run --resume` reads after the driver died: finished micro-batches are never redone, the others
restart from their last checkpoint (chain noise is a function of (seed, step), so the numbers do not change).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdm_dist.driver.campaign import CampaignConfig, dump_config
from cdm_dist.driver.execution import Checkpoint, MicroBatchResult
from cdm_dist.errors import InputError


def atomic_write(path: Path, write: Any) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


class CampaignStore:
    """The files of one campaign under `root`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def create(cls, config: CampaignConfig) -> CampaignStore:
        """A fresh folder output/<name>-<time>-<random> holding the resolved config."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        root = Path(config.output) / f"{config.name}-{stamp}-{secrets.token_hex(2)}"
        if root.resolve().parent != Path(config.output).resolve():  # a name that is a path (set in code, not YAML)
            raise InputError(f"name: {config.name!r} would put the campaign outside output ({config.output})")
        try:
            for sub in ("checkpoints", "results", "chains"):
                (root / sub).mkdir(parents=True, exist_ok=False)
        except OSError as exc:
            raise InputError(f"output: cannot create {root} ({exc})") from None
        store = cls(root)
        atomic_write(store.config_path, lambda p: p.write_text(dump_config(config)))
        return store

    @classmethod
    def open(cls, root: str | Path) -> CampaignStore:
        store = cls(root)
        if not store.config_path.is_file():
            raise InputError(f"{root}: not a campaign folder (no config.yaml)")
        return store

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    # -- checkpoints ------------------------------------------------------------------------------------
    def _checkpoint_path(self, index: int) -> Path:
        return self.root / "checkpoints" / f"mb{index:05d}.pt"

    def save_checkpoint(self, index: int, checkpoint: Checkpoint, history: torch.Tensor) -> None:
        """A micro-batch's state and its loss history (B, T) so far."""
        payload = checkpoint.tensors() | {"history": history}
        atomic_write(self._checkpoint_path(index), lambda p: torch.save(payload, p))

    def load_checkpoint(self, index: int) -> tuple[Checkpoint, torch.Tensor] | None:
        path = self._checkpoint_path(index)
        if not path.is_file():
            return None
        payload = _load(path, "checkpoint")
        return Checkpoint.from_tensors(payload), payload["history"]

    # -- results ----------------------------------------------------------------------------------------
    def _result_path(self, index: int) -> Path:
        return self.root / "results" / f"mb{index:05d}.pt"

    def chain_x_path(self, chain: int) -> Path:
        return self.root / "chains" / f"chain{chain:05d}.npy"

    def save_chain_files(self, chain: int, x: torch.Tensor, pictures: dict[str, bytes]) -> list[Path]:
        """x* as .npy, then its pictures (chainNNNNN.png for the samples, chainNNNNN_NAME.png for the others)."""
        x_path = self.chain_x_path(chain)
        atomic_write(x_path, lambda p: _save_npy(p, x.numpy()))
        paths = [x_path]
        for name, png in pictures.items():
            path = x_path.with_suffix(".png") if name == "samples" else x_path.with_name(f"{x_path.stem}_{name}.png")
            atomic_write(path, lambda p, data=png: p.write_bytes(data))
            paths.append(path)
        return paths

    def chain_files(self, chain: int) -> list[Path]:
        """The files of a chain on disk: x* first, then its pictures."""
        x_path = self.chain_x_path(chain)
        return [x_path, *sorted(x_path.parent.glob(f"{x_path.stem}*.png"))]

    def save_result(self, result: MicroBatchResult, history: torch.Tensor) -> None:
        """The micro-batch's results: the 'done' mark, written after its chains' files and tracking."""
        payload = {
            "x": result.x,
            "final_loss": result.final_loss,
            "failed": result.failed,
            "history": history,
            **{f"metric.{k}": v for k, v in result.metrics.items()},
        }
        atomic_write(self._result_path(result.index), lambda p: torch.save(payload, p))
        self._checkpoint_path(result.index).unlink(missing_ok=True)

    def load_result(self, index: int) -> tuple[MicroBatchResult, torch.Tensor] | None:
        path = self._result_path(index)
        if not path.is_file():
            return None
        payload = _load(path, "result")
        metrics = {k.removeprefix("metric."): v for k, v in payload.items() if k.startswith("metric.")}
        result = MicroBatchResult(index, payload["x"], payload["final_loss"], payload["failed"], metrics)
        return result, payload["history"]

    # -- tracking ids -----------------------------------------------------------------------------------
    @property
    def tracking_path(self) -> Path:
        return self.root / "tracking.json"

    def save_tracking(self, state: dict[str, Any]) -> None:
        atomic_write(self.tracking_path, lambda p: p.write_text(json.dumps(state, indent=1)))

    def load_tracking(self) -> dict[str, Any]:
        if not self.tracking_path.is_file():
            return {}
        try:
            return json.loads(self.tracking_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{self.tracking_path}: not valid JSON ({exc})") from None


def _save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as handle:
        np.save(handle, array)


def _load(path: Path, what: str) -> dict[str, Any]:
    """A saved micro-batch file (written atomically, so unreadable means damaged from outside the campaign)."""
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as exc:
        raise InputError(
            f"{path}: the {what} cannot be read ({type(exc).__name__}); move it away to redo that micro-batch"
        ) from None
    if not isinstance(payload, dict) or "history" not in payload:
        raise InputError(f"{path}: not a campaign {what} file")
    return payload
