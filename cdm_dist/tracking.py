"""MLflow tracking of a campaign, as a campaign callback: one parent run, one child run per chain; the driver is the
only writer and writes in batches (one log_batch per chain when its micro-batch finishes). mlflow is imported
lazily."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cdm_dist.callbacks import CampaignCallback, CampaignInfo, CampaignStopped, Progress
from cdm_dist.campaign import CampaignConfig, MicroBatch, TrackingConfig
from cdm_dist.errors import InputError
from cdm_dist.execution import MicroBatchResult
from cdm_dist.store import CampaignStore

if TYPE_CHECKING:
    from cdm_dist.report import CampaignReport

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


class MLflowTracker(CampaignCallback):
    """The campaign callback that tracks it in MLflow: a parent run, one child run per chain."""

    def __init__(self, config: CampaignConfig, store: CampaignStore, parent_tags: dict[str, str] | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        self._metric, self._param, self._tag = Metric, Param, RunTag
        self.config, self.store, self.parent_tags = config, store, parent_tags or {}
        self.client = client_for(config.tracking.uri)
        self.experiment_id = experiment_id(self.client, config.tracking)
        self.parent_id: str | None = None
        self.child_ids: dict[int, str] = {}

    # -- the callback -------------------------------------------------------------------------------------
    def on_start(self, info: CampaignInfo, progress: Progress) -> None:
        """Create (or, for a resumed campaign, reopen) the parent and one child per chain; their ids go in the
        campaign folder."""
        state = self.store.load_tracking()
        if state.get("parent_run_id"):
            self.parent_id = state["parent_run_id"]
            self.client.update_run(self.parent_id, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=info.output_dir.name,
                tags={"cdm.kind": "campaign", "cdm.output_dir": str(info.output_dir.resolve())} | self.parent_tags,
            )
            self.parent_id = run.info.run_id
            self._batch(self.parent_id, params=flatten(self.config.model_dump(mode="json")))
            self.client.log_artifact(self.parent_id, str(self.store.config_path))
        self.child_ids = {int(k): v for k, v in state.get("child_run_ids", {}).items()}
        for chain in info.chains:
            if chain.chain not in self.child_ids:
                run = self.client.create_run(
                    self.experiment_id,
                    run_name=f"chain-{chain.chain:05d}",
                    tags={
                        "mlflow.parentRunId": self.parent_id,
                        "cdm.kind": "chain",
                        "cdm.campaign": self.parent_id,
                        "cdm.chain": str(chain.chain),
                        "cdm.seed": str(chain.seed),
                        "cdm.zeta": chain.zeta,
                        "status": "running",
                    },
                )
                self.child_ids[chain.chain] = run.info.run_id
        self.store.save_tracking(
            {"parent_run_id": self.parent_id, "child_run_ids": {str(k): v for k, v in self.child_ids.items()}}
        )

    def on_result(
        self,
        batch: MicroBatch,
        result: MicroBatchResult,
        history: torch.Tensor,
        files: Sequence[Sequence[Path]],
        progress: Progress,
    ) -> None:
        """Each chain of a finished micro-batch: params, loss per step, final metrics, files, status; then the
        campaign's progress on the parent."""
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
            for path in files[row]:
                self.client.log_artifact(run_id, str(path))
            self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED")
        done = progress.chains_done
        self._batch(self.parent_id, [("chains_done", done, done), ("best_final_loss", progress.best_loss, done)])

    def on_end(self, report: CampaignReport | None, error: BaseException | None) -> None:
        """Summary metrics and FINISHED; or FAILED (`--resume` can finish it), KILLED when a callback stopped it."""
        if self.parent_id is None:
            return
        if report is None:
            self.client.set_terminated(self.parent_id, "KILLED" if isinstance(error, CampaignStopped) else "FAILED")
            return
        self._batch(self.parent_id, [(k, v, 0) for k, v in report.summary().items()])
        self.client.set_terminated(self.parent_id, "FINISHED")
        report.campaign_run_id = self.parent_id
        for row in report.rows:
            row.run_id = self.child_ids.get(row.chain)

    def _batch(
        self,
        run_id: str,
        metrics: Sequence[tuple[str, float, int]] = (),
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


def experiment_id(client: Any, tracking: TrackingConfig) -> str:
    """The experiment's id, created (with the configured artifact location for local stores) when missing."""
    name = tracking.experiment
    try:
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        if tracking.uri.startswith(("http://", "https://")):  # the server stores artifacts
            return client.create_experiment(name)
        location = Path(tracking.artifact_location).resolve().as_uri()
        return client.create_experiment(name, artifact_location=location)
    except Exception as exc:  # a bad URI or an unreachable server
        raise InputError(f"tracking.uri: cannot use MLflow store {tracking.uri!r} ({exc})") from None


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
