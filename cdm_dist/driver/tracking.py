"""MLflow tracking of a campaign, as a campaign callback: one parent run with every chain's outcome in its chains
table (chain_table.CHAINS_TABLE), and a child run per chain up to tracking.child_runs_max chains, else for the top-k
chains only; the driver is the only writer and writes in batches (one log_batch per chain when its micro-batch
finishes). mlflow is imported lazily."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cdm_dist.driver.callbacks import CampaignCallback, CampaignInfo, CampaignStopped, ChainFiles, ChainInfo, Progress
from cdm_dist.driver.campaign import CampaignConfig, MicroBatch, TrackingConfig, campaign_chains, micro_batches
from cdm_dist.driver.chain_table import (
    CHAIN_RUNS_TAG,
    CHAINS_TABLE,
    chain_runs_mode,
    flatten,
    write_chain_table,
    zeta_params_json,
)
from cdm_dist.driver.execution import Chunk, MicroBatchResult, SystemMetricsSource
from cdm_dist.driver.preconditions import masked, redacted, tracking_store, with_connect_timeout
from cdm_dist.driver.report import CampaignReport, top_k
from cdm_dist.driver.store import CampaignStore
from cdm_dist.driver.ui_links import CANDIDATE_KEY, CANDIDATE_STEP, save_views
from cdm_dist.errors import InputError

MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100  # per log_batch request (MLflow REST limits)
CANDIDATES_TABLE = "candidates.json"  # the campaign run's table of its chains, by final_loss
FIRST_METRICS = ("prior_fit", "improvement")  # the candidates table's first metric columns, where present


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def resolve_uri(uri: str) -> str:
    """Make a relative sqlite:/// path absolute and create its folder, so runs land where the user expects."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri.removeprefix("sqlite:///")).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return uri


_READY: set[str] = set()  # SQLite stores this process has opened (their tables exist)


def quiet_store_logs() -> None:
    """No INFO lines from MLflow creating or migrating a store's tables (alembic): a run prints its own summary."""
    for name in ("mlflow.store.db.utils", "alembic.runtime.migration", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def client_for(uri: str) -> Any:
    """An MlflowClient on the store at uri (relative SQLite paths resolved, a database's connect timeout set). A
    SQLite store is first opened under a file lock: processes that meet a new file at once would otherwise race to
    create (or migrate) its tables. A new one is made aside and renamed into place (make_sqlite_store)."""
    import fcntl

    from mlflow.tracking import MlflowClient

    quiet_store_logs()
    uri = with_connect_timeout(resolve_uri(uri))
    if not uri.startswith("sqlite:///") or uri in _READY:
        return MlflowClient(tracking_uri=uri)
    path = Path(uri.removeprefix("sqlite:///"))
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not path.is_file() or path.stat().st_size == 0:
            make_sqlite_store(path)
        client = MlflowClient(tracking_uri=uri)  # opens the store: migrates an older MLflow's tables
    _READY.add(uri)
    return client


def make_sqlite_store(path: Path) -> None:
    """A new SQLite store's tables made in a file beside `path`, then renamed to it: a process killed while MLflow
    makes them (a dozen migrations) leaves no half-made store, whose next opening would fail ("table _alembic_tmp_…
    already exists"). Called under client_for's lock, so any file a killed maker left is stale and removed."""
    from mlflow.tracking import MlflowClient

    for stale in path.parent.glob(f".{path.name}.*.new*"):  # with any journal SQLite left beside it
        stale.unlink(missing_ok=True)
    made = path.with_name(f".{path.name}.{uuid.uuid4().hex}.new")  # a new name: MLflow caches a store per URI
    MlflowClient(tracking_uri=f"sqlite:///{made}").search_experiments()  # makes every table and the Default experiment
    os.replace(made, path)


def reader(uri: str) -> Any:
    """An MlflowClient that only reads: on an existing SQLite store, without client_for's lock file beside it (the
    lock guards making a store's tables, which an existing store does not need)."""
    path = Path(resolve_uri(uri).removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if path is None or not path.is_file() or path.stat().st_size == 0:
        return client_for(uri)
    from mlflow.tracking import MlflowClient

    quiet_store_logs()
    return MlflowClient(tracking_uri=with_connect_timeout(f"sqlite:///{path}"))


class MLflowTracker(CampaignCallback):
    """The campaign callback that tracks it in MLflow: a parent run with the chains table, and a child run per chain
    (up to tracking.child_runs_max chains; above, child runs for the top-k chains only, made at the end).

    Writing is idempotent, so the store and MLflow agree after a crash at any point: run ids are saved as they are
    made, a resumed campaign adopts the runs it already has, a finished chain's run is never written again, and a
    run that was half-written gets only the (metric, step) points it lacks."""

    def __init__(self, config: CampaignConfig, store: CampaignStore, parent_tags: dict[str, str] | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        self._metric, self._param, self._tag = Metric, Param, RunTag
        self.config, self.store, self.parent_tags = config, store, parent_tags or {}
        self.client = client_for(config.tracking.uri)
        self.experiment_id = experiment_id(self.client, config.tracking)
        self.parent_id: str | None = None
        self.child_ids: dict[int, str] = {}
        self.chain_runs = chain_runs_mode(config.chains.count, config.tracking.child_runs_max)  # 'all' or 'top'
        self.chains: tuple[ChainInfo, ...] = ()
        self.resumed = False  # runs made by an earlier driver may hold part of what we write
        self._done: set[str] | None = None  # child runs already terminal (read once on resume)
        self._have: dict[tuple[str, str], set[int]] = {}  # (run, key) -> steps written (by any driver)
        self._buffer: dict[int, dict[int, float]] = {}  # chain -> step -> loss, not written yet
        self._flushed = time.monotonic()

    def _save_ids(self) -> None:
        self.store.save_tracking(
            {"parent_run_id": self.parent_id, "child_run_ids": {str(k): v for k, v in self.child_ids.items()}}
        )

    # -- the callback -------------------------------------------------------------------------------------
    def on_start(self, info: CampaignInfo, progress: Progress) -> None:
        """Create (or, for a resumed campaign, reopen) the parent and, up to tracking.child_runs_max chains, one child
        per chain; their ids go in the campaign folder as they are made."""
        self.chains = info.chains
        state = self.store.load_tracking()
        if state.get("parent_run_id"):
            self.parent_id, self.resumed = state["parent_run_id"], True
            self.client.update_run(self.parent_id, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=info.output_dir.name,
                tags={"cdm.kind": "campaign", "cdm.output_dir": str(info.output_dir.resolve())}
                | {CHAIN_RUNS_TAG: self.chain_runs}
                | self.parent_tags,
            )
            self.parent_id = run.info.run_id
            self._save_ids()
            self._batch(self.parent_id, params=flatten(self.config.model_dump(mode="json")))
            self.client.log_artifact(self.parent_id, str(self.store.config_path))
        save_views(self.client, self.experiment_id, self.parent_id)  # what chains_view_url opens
        self.child_ids = {int(k): v for k, v in state.get("child_run_ids", {}).items()}
        if self.resumed and (self.chain_runs == "top" or len(self.child_ids) < len(info.chains)):
            self.child_ids |= {int(r.data.tags["cdm.chain"]): r.info.run_id for r in self._children()}  # adopt
        if self.chain_runs == "all":
            self._make_children(info.chains)

    def _make_children(self, chains: Sequence[ChainInfo]) -> None:
        """A child run for each of these chains that has none yet; the ids go in the campaign folder."""
        for chain in chains:
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
        self._save_ids()

    def _children(self) -> list[Any]:
        """The parent's child runs in MLflow (every page)."""
        runs, token = [], None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], f"tags.`mlflow.parentRunId` = '{self.parent_id}'", max_results=1000,
                page_token=token,
            )  # fmt: skip
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def on_chunk(self, batch: MicroBatch, chunk: Chunk, progress: Progress) -> None:
        """Buffer the chunk's guidance losses per chain; write the buffer every tracking.flush_seconds (live
        curves in the UI while the campaign runs)."""
        every = self.config.tracking.log_every
        for row, chain in enumerate(batch.chain_ids):
            if chain not in self.child_ids:  # no run of its own (yet): its curve is written if it makes the top-k
                continue
            points = self._buffer.setdefault(chain, {})
            for k, value in enumerate(chunk.losses[row].tolist()):
                step = chunk.first_step + k
                if step % every == 0 and math.isfinite(value):
                    points[step] = value  # a step redone after a roll-back has the same value: kept once
        if time.monotonic() - self._flushed >= self.config.tracking.flush_seconds:
            self._flush(progress)

    def _flush(self, progress: Progress | None) -> None:
        for chain, points in self._buffer.items():
            if points:
                run_id = self.child_ids[chain]
                self._batch(run_id, self._missing(run_id, [("loss", v, s) for s, v in sorted(points.items())]))
                points.clear()
        if progress is not None:
            steps = progress.chain_steps_done
            self._batch(self.parent_id, self._missing(self.parent_id, [("chain_steps_done", steps, steps)]))
        self._flushed = time.monotonic()

    def on_restored(
        self, batch: MicroBatch, result: MicroBatchResult, history: torch.Tensor, files: ChainFiles
    ) -> None:
        """A micro-batch an earlier driver finished: repair its chains' runs if that driver died while writing."""
        self._log_chains(batch, result, history, files)

    def on_result(
        self, batch: MicroBatch, result: MicroBatchResult, history: torch.Tensor, files: ChainFiles, progress: Progress
    ) -> None:
        """The finished micro-batch's chains (_log_chains); then the campaign's progress on the parent."""
        self._log_chains(batch, result, history, files)
        done = progress.chains_done
        metrics = [("chains_done", done, done), ("best_final_loss", progress.best_loss, done)]
        self._batch(self.parent_id, self._missing(self.parent_id, metrics))

    def _log_chains(
        self, batch: MicroBatch, result: MicroBatchResult, history: torch.Tensor, files: ChainFiles
    ) -> None:
        """Each chain of a finished micro-batch that has a run: params, loss per step, final metrics, files, status
        (skipped where already written)."""
        method = self.config.method.model_dump(mode="json")
        every = self.config.tracking.log_every
        for row, chain in enumerate(batch.chain_ids):
            run_id = self.child_ids.get(chain)
            if run_id is None or self._is_done(run_id):
                continue
            failed = bool(result.failed[row])
            params = {"chain": str(chain), "seed": str(batch.chains.seeds[row])}
            params |= flatten(batch.chains.zetas[row].model_dump(mode="json"), "zeta.")
            params |= flatten(method, "method.")
            losses = history[row].tolist()
            metrics = [("loss", v, s) for s, v in enumerate(losses) if s % every == 0 or s == len(losses) - 1]
            self._buffer.pop(chain, None)
            if not failed:
                metrics.append(("final_loss", result.final_loss[row].item(), len(losses)))
                metrics += [(k, v[row].item(), len(losses)) for k, v in result.metrics.items()]
            self._batch(run_id, self._missing(run_id, metrics), params, {"status": "failed" if failed else "ok"})
            for path in files[row]:
                self.client.log_artifact(run_id, str(path))
            self._log_candidate(run_id, files[row])
            self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED")
            if self._done is not None:
                self._done.add(run_id)  # written whole: not again at the end (a top-k chain's run on resume)

    def _log_candidate(self, run_id: str, paths: Sequence[Path]) -> None:
        """The chain's candidate picture as an MLflow image with key CANDIDATE_KEY and step CANDIDATE_STEP (the
        gallery view's image grid): x* itself where it is an image (chainNNNNN_image.png), else its samples against
        the target (chainNNNNN.png). These are the files and tag MlflowClient.log_image writes (images/KEY+step+S+
        timestamp+MS+UUID.png, its +compressed.webp copy, tag mlflow.loggedImages), named by the run's id and start
        time where log_image takes the clock and a random uuid: a resumed campaign that writes them again overwrites
        them, so a chain has one image after a crash at any point."""
        from mlflow.tracking.multimedia import compress_image_size
        from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_IMAGES
        from PIL import Image

        pngs = [p for p in paths if p.suffix == ".png"]
        picture = next((p for p in pngs if p.stem.endswith("_image")), None) or next(iter(pngs), None)
        if picture is None:  # a failed chain, or pictures: false
            return
        started = self.client.get_run(run_id).info.start_time
        name = f"{CANDIDATE_KEY}+step+{CANDIDATE_STEP}+timestamp+{started}+{uuid.uuid5(uuid.NAMESPACE_OID, run_id)}"
        with tempfile.TemporaryDirectory() as folder, Image.open(picture) as image:
            full, small = Path(folder) / f"{name}.png", Path(folder) / f"{name}+compressed.webp"
            image.save(full)
            compress_image_size(image).save(small)
            for path in (full, small):
                self.client.log_artifact(run_id, str(path), "images")
        self._batch(run_id, tags={MLFLOW_LOGGED_IMAGES: "True"})  # what log_image sets: the UI looks for images

    def _is_done(self, run_id: str) -> bool:
        """Whether an earlier driver finished writing this run (only asked on resume; read once)."""
        if not self.resumed:
            return False
        if self._done is None:
            self._done = {r.info.run_id for r in self._children() if r.info.status in ("FINISHED", "FAILED")}
        return run_id in self._done

    def _missing(self, run_id: str, metrics: Sequence[tuple[str, float, int]]) -> list[tuple[str, float, int]]:
        """The points no driver has written yet (read from MLflow once per run and key on resume), now counted as
        written: a step redone after a roll-back, a live point written again at the end, or a point an earlier
        driver wrote is never written twice."""
        missing = []
        for key, value, step in metrics:
            have = self._have.get((run_id, key))
            if have is None:
                have = {m.step for m in self.client.get_metric_history(run_id, key)} if self.resumed else set()
                self._have[(run_id, key)] = have
            if step not in have and math.isfinite(value):
                have.add(step)
                missing.append((key, value, step))
        return missing

    def on_end(self, report: CampaignReport | None, error: BaseException | None) -> None:
        """Summary metrics and FINISHED (FAILED when micro-batches kept failing: errors, unlike diverged chains); or
        FAILED (`--resume` can finish it), KILLED when a callback stopped it."""
        if self.parent_id is None:
            return
        if report is None:
            self.client.set_terminated(self.parent_id, "KILLED" if isinstance(error, CampaignStopped) else "FAILED")
            return
        self._flush(None)
        summary = [(k, v, 0) for k, v in report.summary().items()]
        failed = ",".join(map(str, sorted(report.failed_batches)))
        tags = {"cdm.failed_micro_batches": failed} if failed else None
        self._batch(self.parent_id, self._missing(self.parent_id, summary), tags=tags)
        report.campaign_run_id, report.experiment_id = self.parent_id, self.experiment_id
        if self.chain_runs == "top":
            self._log_top_chains(report)
        for row in report.rows:
            row.run_id = self.child_ids.get(row.chain)
        self._log_chain_table(report)
        self._log_candidates(report)
        save_views(self.client, self.experiment_id, self.parent_id, [r.final_loss for r in report.rows if not r.failed])
        self.client.set_terminated(self.parent_id, "FAILED" if report.failed_batches else "FINISHED")

    def _log_top_chains(self, report: CampaignReport) -> None:
        """A campaign above tracking.child_runs_max: child runs, written whole from the campaign folder, for its
        top-k (report.topk, and the k best by final_loss whatever their prior_fit)."""
        chosen = {r.chain for r in report.topk} | {r.chain for r in top_k(report.rows, self.config.topk)}
        self._make_children([self.chains[c] for c in sorted(chosen)])
        batches = micro_batches(self.config)
        size = self.config.resources.micro_batch
        for index in sorted({c // size for c in chosen}):
            finished = self.store.load_result(index)
            if finished is None:  # a micro-batch the driver has (and has saved) before on_end: cannot happen
                raise RuntimeError(f"micro-batch {index} has no saved result")
            batch = batches[index]
            files = [self.store.chain_files(c) if c in chosen else [] for c in batch.chain_ids]
            self._log_chains(batch, *finished, files)

    def _log_chain_table(self, report: CampaignReport) -> None:
        """Every chain's outcome in the campaign run's chains table (CHAINS_TABLE, written whole each time)."""
        zetas = zeta_params_json(campaign_chains(self.config).zetas)
        run_ids = {r.chain: r.run_id for r in report.rows if r.run_id}
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / CHAINS_TABLE
            write_chain_table(report.rows, zetas, run_ids, path)
            self.client.log_artifact(self.parent_id, str(path))

    def _log_candidates(self, report: CampaignReport) -> None:
        """The campaign run's candidates table (an MLflow table artifact, CANDIDATES_TABLE, written whole each time):
        one row per chain run, lowest final_loss first (failed chains last), with what a user selects on: chain, run
        id, final_loss, prior_fit, improvement (editing campaigns), the problem's other metrics, seed, zeta."""
        import pandas as pd

        names = sorted({k for r in report.rows for k in r.metrics}, key=lambda k: (k not in FIRST_METRICS, k))
        ranked = [r for r in report.rows if r.run_id]
        rows = sorted(ranked, key=lambda r: (r.failed, r.final_loss if math.isfinite(r.final_loss) else math.inf))
        table: dict[str, list[Any]] = {"rank": [], "chain": [], "run_id": [], "final_loss": []}
        table |= {name: [] for name in names} | {"seed": [], "zeta": [], "status": []}
        for rank, row in enumerate(rows, start=1):
            values = [rank, row.chain, row.run_id, None if row.failed else _finite(row.final_loss)]
            values += [_finite(row.metrics.get(name)) for name in names]
            values += [row.seed, row.zeta, "failed" if row.failed else "ok"]
            for column, value in zip(table, values, strict=True):
                table[column].append(value)
        with tempfile.TemporaryDirectory() as folder:  # written whole: log_table would append to an earlier copy
            path = Path(folder) / CANDIDATES_TABLE
            pd.DataFrame(table).to_json(path, orient="split", index=False)
            self.client.log_artifact(self.parent_id, str(path))
        tag = {"path": CANDIDATES_TABLE, "type": "table"}  # what log_table adds: the UI lists the run's tables
        logged = json.loads(self.client.get_run(self.parent_id).data.tags.get("mlflow.loggedArtifacts", "[]"))
        if tag not in logged:
            self._batch(self.parent_id, tags={"mlflow.loggedArtifacts": json.dumps([*logged, tag])})

    def tag_parent(self, tags: dict[str, str]) -> None:
        """Set tags on the campaign's (parent) run."""
        self._batch(self.parent_id, tags=tags)

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


class SystemMetrics(CampaignCallback):
    """Per-node system metrics on the campaign's run while it runs: the executor starts MLflow's monitor on every
    node (tagged by node id; the run's cdm.node.<id> tags give each node's address) and stops them at the end."""

    def __init__(self, tracker: MLflowTracker, executor: SystemMetricsSource) -> None:
        self.tracker, self.executor = tracker, executor

    def on_start(self, info: CampaignInfo, progress: Progress) -> None:
        tracking = self.tracker.config.tracking
        seconds = tracking.system_metrics_seconds
        nodes = self.executor.start_system_metrics(self.tracker.parent_id, tracking.uri, seconds)
        self.tracker.tag_parent({f"cdm.node.{k}": v for k, v in nodes.items()})

    def on_end(self, report: CampaignReport | None, error: BaseException | None) -> None:
        self.executor.stop_system_metrics()


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
        uri = tracking.uri
        raise InputError(f"tracking.uri: cannot use MLflow store {redacted(uri)!r} ({masked(str(exc), uri)})") from None


def find_campaign(run_id: str, uri: str) -> Path:
    """The output folder of the campaign whose parent run is run_id."""
    tracking_store(uri, "--tracking-uri", must_exist=True)  # a store that is not there is not made
    client = reader(uri)  # nor a lock file beside one that is
    try:
        run = client.get_run(run_id)
    except Exception:
        raise InputError(f"--resume: no run {run_id!r} in MLflow store {redacted(uri)!r}") from None
    folder = run.data.tags.get("cdm.output_dir")
    if run.data.tags.get("cdm.kind") != "campaign" or not folder:
        raise InputError(f"--resume: run {run_id} is not a campaign's parent run")
    return Path(folder)
