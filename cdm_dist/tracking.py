"""MLflow tracking of a campaign: one parent run, one child run per chain; the driver is the only writer and
writes in batches (one log_batch per chain when its micro-batch finishes). mlflow is imported lazily."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from cdm_dist.campaign import CampaignConfig, MicroBatch
from cdm_dist.errors import InputError
from cdm_dist.worker import MicroBatchResult

MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100  # per log_batch request (MLflow REST limits)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {'a.b': 'value'} for MLflow params."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def resolve_uri(uri: str) -> str:
    """Make a relative sqlite:/// path absolute and create its folder, so runs land where the user expects."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri.removeprefix("sqlite:///")).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return uri


def client_for(uri: str) -> Any:
    """An MlflowClient on the store at uri (relative SQLite paths resolved)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=resolve_uri(uri))


class CampaignTracker:
    """Parent run + child runs of a campaign in one experiment."""

    def __init__(self, config: CampaignConfig) -> None:
        from mlflow.entities import Metric, Param, RunTag

        self._metric, self._param, self._tag = Metric, Param, RunTag
        self.config = config
        self.client = client_for(config.tracking.uri)
        self.experiment_id = self._experiment()
        self.parent_id: str | None = None
        self.child_ids: dict[int, str] = {}

    def _experiment(self) -> str:
        name = self.config.tracking.experiment
        try:
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                return found.experiment_id
            if self.config.tracking.uri.startswith(("http://", "https://")):  # the server stores artifacts
                return self.client.create_experiment(name)
            location = Path(self.config.tracking.artifact_location).resolve().as_uri()
            return self.client.create_experiment(name, artifact_location=location)
        except Exception as exc:  # a bad URI or an unreachable server
            raise InputError(f"tracking.uri: cannot use MLflow store {self.config.tracking.uri!r} ({exc})") from None

    # -- runs -------------------------------------------------------------------------------------------
    def start(
        self,
        state: dict[str, Any],
        output_dir: Path,
        chains: list[tuple[int, int, str]],
        parent_tags: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Create (or, with a saved state, reopen) the parent and one child per chain (id, seed, zeta label)."""
        if state.get("parent_run_id"):
            self.parent_id = state["parent_run_id"]
            self.client.update_run(self.parent_id, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=output_dir.name,
                tags={"cdm.kind": "campaign", "cdm.output_dir": str(output_dir.resolve())} | (parent_tags or {}),
            )
            self.parent_id = run.info.run_id
            params = flatten(self.config.model_dump(mode="json"))
            self._batch(self.parent_id, params=params)
            self.client.log_artifact(self.parent_id, str(output_dir / "config.yaml"))  # written by CampaignStore
        self.child_ids = {int(k): v for k, v in state.get("child_run_ids", {}).items()}
        for chain, seed, zeta in chains:
            if chain not in self.child_ids:
                run = self.client.create_run(
                    self.experiment_id,
                    run_name=f"chain-{chain:05d}",
                    tags={
                        "mlflow.parentRunId": self.parent_id,
                        "cdm.kind": "chain",
                        "cdm.campaign": self.parent_id,
                        "cdm.chain": str(chain),
                        "cdm.seed": str(seed),
                        "cdm.zeta": zeta,
                        "status": "running",
                    },
                )
                self.child_ids[chain] = run.info.run_id
        return {"parent_run_id": self.parent_id, "child_run_ids": {str(k): v for k, v in self.child_ids.items()}}

    def _batch(
        self,
        run_id: str,
        metrics: list[tuple[str, float, int]] = (),
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """log_batch in pieces under MLflow's per-request limits."""
        now = int(time.time() * 1000)
        metric_list = [self._metric(k, float(v), now, s) for k, v, s in metrics if math.isfinite(v)]
        param_list = [self._param(k, v[:6000]) for k, v in (params or {}).items()]
        tag_list = [self._tag(k, v) for k, v in (tags or {}).items()]
        while metric_list or param_list or tag_list:
            self.client.log_batch(
                run_id,
                metrics=metric_list[:MAX_METRICS],
                params=param_list[:MAX_PARAMS],
                tags=tag_list[:MAX_TAGS],
            )
            metric_list, param_list, tag_list = (
                metric_list[MAX_METRICS:],
                param_list[MAX_PARAMS:],
                tag_list[MAX_TAGS:],
            )

    def log_micro_batch(
        self,
        batch: MicroBatch,
        result: MicroBatchResult,
        history: torch.Tensor,
        artifacts: list[list[Path]],
    ) -> None:
        """Each chain of a finished micro-batch: params, loss per step, final metrics, artifacts, status."""
        method = self.config.method.model_dump(mode="json")
        every = self.config.tracking.log_every
        for row, chain in enumerate(batch.chain_ids):
            run_id = self.child_ids[chain]
            failed = bool(result.failed[row])
            params = {"chain": str(chain), "seed": str(batch.chains.seeds[row])}
            params |= flatten(batch.chains.zetas[row].model_dump(mode="json"), "zeta.")
            params |= flatten(method, "method.")
            losses = history[row].tolist()
            metrics = [("loss", v, s) for s, v in enumerate(losses) if s % every == 0 or s == len(losses) - 1]
            if not failed:
                metrics.append(("final_loss", result.final_loss[row].item(), len(losses)))
                metrics += [(k, v[row].item(), len(losses)) for k, v in result.metrics.items()]
            self._batch(run_id, metrics, params, {"status": "failed" if failed else "ok"})
            for path in artifacts[row]:
                self.client.log_artifact(run_id, str(path))
            self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED")

    def log_progress(self, chains_done: int, best_loss: float, step: int) -> None:
        self._batch(self.parent_id, [("chains_done", chains_done, step), ("best_final_loss", best_loss, step)])

    def finish(self, summary: dict[str, float]) -> None:
        """Summary metrics on the parent run, which is then closed."""
        self._batch(self.parent_id, [(k, v, 0) for k, v in summary.items()])
        self.client.set_terminated(self.parent_id, "FINISHED")

    def abort(self, status: str = "FAILED") -> None:
        """Close the parent early: FAILED (the driver is stopping; --resume can finish it) or KILLED (pruned)."""
        if self.parent_id is not None:
            self.client.set_terminated(self.parent_id, status)


def find_campaign(run_id: str, uri: str) -> Path:
    """The output folder of the campaign whose parent run is run_id."""
    client = client_for(uri)
    try:
        run = client.get_run(run_id)
    except Exception:
        raise InputError(f"--resume: no run {run_id!r} in MLflow store {uri!r}") from None
    folder = run.data.tags.get("cdm.output_dir")
    if run.data.tags.get("cdm.kind") != "campaign" or not folder:
        raise InputError(f"--resume: run {run_id} is not a campaign's parent run")
    return Path(folder)
