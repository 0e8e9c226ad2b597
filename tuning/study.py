"""`cdm tune`: an Optuna study whose trials are small campaigns with the same chain seeds.

- The search space (config paths -> ranges) becomes one define-by-run function that only calls trial.suggest_*.
- K trials run at once (ask/tell, one thread each); each trial is a campaign whose MLflow run is nested under the
  study's run, with the trial's chains nested under it.
- Chains report the median guidance loss at milestone steps; the pruner stops bad trials early, and the compute
  they did not spend is counted.
- Realism: trials whose chains' median prior_fit (the prior's noise-prediction error at x*) exceeds a limit are
  infeasible (Optuna constraints), so a study cannot win by adversarial x* that fool the sampler.
- Storage (tuning/storage.py): a journal file in the output folder by default (one process at a time), or a
  database URL shared by many processes on many machines, which heartbeat their running trials. Together they
  finish exactly N counted trials: a trial asked beyond N is surplus and never runs; a trial whose process died is
  failed (not counted) and its parameters are retried once (the config as written, until it is evaluated); the
  dead trial's finished chains are marked superseded, so each x* is listed once.
"""

from __future__ import annotations

import math
import os
import re
import socket
import statistics
import threading
import traceback
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch

from cdm_dist.driver.callbacks import CampaignCallback, CampaignStopped, Progress
from cdm_dist.driver.campaign import (
    NAME,
    CampaignConfig,
    MicroBatch,
    ParamSpec,
    check_config,
    dump_config,
    micro_batches,
    with_values,
)
from cdm_dist.driver.execution import Chunk, Executor
from cdm_dist.driver.launch import make_executor
from cdm_dist.driver.preflight import probe_step
from cdm_dist.driver.report import CampaignReport
from cdm_dist.driver.runner import run_campaign
from cdm_dist.driver.store import CampaignStore
from cdm_dist.errors import InputError
from tuning.storage import (
    CONFIG_AS_WRITTEN,
    Heartbeats,
    exclusive_journal,
    fail_dead_trials,
    open_storage,
    retry,
    uses_heartbeats,
)

OUTCOME = "cdm.outcome"  # user attribute set as a trial is told: complete, pruned, failed, duplicate or surplus
PROCESS = "cdm.process"  # user attribute: host:pid of the process that ran the trial
DUPLICATE = "cdm.duplicate_of"  # user attribute of trials not run: their parameters were already evaluated
CAMPAIGN_DIR = "cdm.campaign_dir"  # user attribute: the trial's campaign folder (its MLflow run ids are there)
SUPERSEDED = "superseded"  # status tag of a dead trial's finished chains: its retry stores the same chains again
SUPERSEDED_TAG = "cdm.superseded"  # tag of a dead trial's campaign run whose retry is queued
MAX_DUPLICATES = 20  # re-asks for one trial before a repeated configuration is run anyway (the space is exhausted)
PLANNED = "cdm.planned_chain_steps"
RUN = "cdm.chain_steps"
CONSTRAINT = "prior_fit"  # Optuna constraint: the trial's median prior_fit minus the limit, feasible when <= 0
PRIOR_FIT_LIMIT = "cdm.prior_fit_limit"  # study user attribute: the limit, fixed when the study starts
UNGUIDED_SEED = 1_000_000  # seeds of the unguided chains that set the "auto" limit (never a trial's)
UNGUIDED_CHAINS = 32


def suggest(trial: optuna.trial.BaseTrial, space: dict[str, ParamSpec]) -> dict[str, Any]:
    """The define-by-run search space: one suggest call per knob, no other work."""
    values: dict[str, Any] = {}
    for path, spec in space.items():
        if spec.type == "float":
            values[path] = trial.suggest_float(path, spec.low, spec.high, log=spec.log)
        elif spec.type == "int":
            values[path] = trial.suggest_int(path, int(spec.low), int(spec.high), log=spec.log)
        else:
            values[path] = trial.suggest_categorical(path, spec.choices)
    return values


def aggregate(losses: list[float], how: str, k: int) -> float:
    """The trial objective from its chains' held-out losses (failed chains count as +inf)."""
    finite = sorted(v for v in losses if math.isfinite(v))
    if not finite:
        return math.inf
    if how == "best":
        return finite[0]
    if how == "topk_mean":
        return sum(finite[:k]) / len(finite[:k])
    ordered = sorted(losses)  # +inf sorts last, so failed chains push the median up
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def median_finite(values: list[float]) -> float:
    """The median of the finite values (nan when none)."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def make_pruner(config: CampaignConfig) -> optuna.pruners.BasePruner:
    tune = config.tune
    if tune.multi_objective or tune.pruner == "none":
        return optuna.pruners.NopPruner()
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0)
    return optuna.pruners.SuccessiveHalvingPruner()


class MilestoneReporter(CampaignCallback):
    """Reports the median guidance loss to the trial once every micro-batch has passed a milestone step, and stops
    the campaign (CampaignStopped) when the pruner says so; counts the chain-steps run."""

    def __init__(self, trial: optuna.Trial, config: CampaignConfig, batches: int, prune: bool = True) -> None:
        steps = config.method.num_steps
        self.trial, self.batches, self.prune = trial, batches, prune
        self.milestones = sorted({max(1, round(f * steps)) for f in config.tune.milestones})
        self.step: dict[int, int] = {}
        self.losses: dict[int, torch.Tensor] = {}  # micro-batch -> (B,) last guidance loss seen
        self.reported: set[int] = set()
        self.steps_run = 0

    def on_chunk(self, batch: MicroBatch, chunk: Chunk, progress: Progress) -> None:
        self.steps_run += len(batch.chains) * chunk.losses.shape[1]
        if not self.prune:
            return
        self.step[batch.index] = chunk.step
        finite = chunk.losses[:, ~torch.isnan(chunk.losses).all(0)]
        if finite.shape[1]:
            self.losses[batch.index] = finite[:, -1]
        if len(self.step) < self.batches:
            return
        reached = min(self.step.values())
        for milestone in self.milestones:
            if milestone <= reached and milestone not in self.reported and self.losses:
                self.reported.add(milestone)
                value = float(torch.cat(list(self.losses.values())).nanmedian())
                self.trial.report(value, milestone)
                if self.trial.should_prune():
                    raise CampaignStopped(f"pruned at step {milestone}: median guidance loss {value:.4g}")


@dataclass
class TuneResult:
    """What `cdm tune` prints and writes."""

    study: str
    storage: str
    complete: int
    pruned: int
    failed: int
    best_value: float | list[float] | None
    best_params: dict[str, Any]
    pareto: list[dict[str, Any]] = field(default_factory=list)
    chain_steps_run: int = 0
    chain_steps_saved: int = 0
    prior_fit_limit: float | None = None
    infeasible: int = 0  # complete trials over the prior_fit limit
    objective: str = ""  # what best_value is, in words
    best_trial: int | None = None
    best_config: str | None = None  # the best trial's campaign config (YAML), ready for `cdm run`

    def to_json(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "storage": self.storage,
            "trials_complete": self.complete,
            "trials_pruned": self.pruned,
            "trials_failed": self.failed,
            "best_value": self.best_value,
            "best_params": self.best_params,
            "pareto_front": self.pareto,
            "chain_steps_run": self.chain_steps_run,
            "chain_steps_saved_by_pruning": self.chain_steps_saved,
            "prior_fit_limit": self.prior_fit_limit,
            "trials_infeasible": self.infeasible,
            "objective": self.objective,
            "best_trial": self.best_trial,
            "best_config": self.best_config,
        }


class Tuner:
    """Runs the study: asks trials, runs their campaigns K at a time, tells the results."""

    def __init__(
        self,
        config: CampaignConfig,
        storage_url: str | None = None,
        address: str | None = None,
        executor: Executor | None = None,
    ) -> None:
        config = study_config(config)
        self.config, self.address = config, address
        self.prior_fit_limit: float | None = None  # set when the study runs
        self.given = executor  # workers made (and probed) by the caller, who closes them
        self.executor: Executor | None = None  # the workers every trial shares (made in run): models load once
        self.name = config.tune.study_name or config.name
        self.folder = Path(config.output).resolve() / f"study-{self.name}"
        self.storage, self.storage_label = open_storage(storage_url, self.folder, config.tune, self._on_dead_trial)
        self.shared = uses_heartbeats(self.storage)  # a database: other processes may run trials of this study
        directions = ["minimize", "minimize"] if config.tune.multi_objective else ["minimize"]
        self.study = optuna.create_study(
            storage=self.storage,
            study_name=self.name,
            sampler=optuna.samplers.TPESampler(seed=config.tune.sampler_seed),
            pruner=make_pruner(config),
            directions=directions,
            load_if_exists=True,
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        # A restarted process must not draw the same suggestions again: its sampler's stream starts where the
        # study stands (the first process, with no trials yet, keeps sampler_seed itself). On a shared database,
        # processes that start together also differ by their pid.
        seed = config.tune.sampler_seed + len(self.study.get_trials(deepcopy=False))
        salt = os.getpid() * 7919 if self.shared else 0
        self.study.sampler = optuna.samplers.TPESampler(seed=(seed + salt) % 2**32)
        self.process = f"{socket.gethostname()}:{os.getpid()}"
        self.lock = threading.Lock()
        self._duplicates = 0
        self.study_run_id: str | None = None
        self.tracker_client: Any = None

    # -- bookkeeping ------------------------------------------------------------------------------------
    def _finished(self) -> list[optuna.trial.FrozenTrial]:
        """Trials that count towards N: complete, pruned, or failed by their own campaign (not by a dead process,
        and not skipped as duplicates or surplus)."""
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
        return [t for t in self.study.get_trials(deepcopy=False, states=states) if counted(t)]

    def _running(self) -> list[optuna.trial.FrozenTrial]:
        """Trials running in any process (on a database, dead ones until their grace period has passed)."""
        return self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))

    def recover_stale(self) -> int:
        """Journal file: trials a dead process left RUNNING (this process holds the journal, so no live process
        runs them) are failed, not counted, their MLflow runs closed KILLED and their parameters retried once.
        Database: the trials whose heartbeat is older than the grace period, the same way."""
        if self.shared:
            before = len(self._running())
            fail_dead_trials(self.study)
            return before - len(self._running())
        stale = self._running()
        for trial in stale:  # failed last: a process killed while recovering it leaves it to the next (idempotent)
            self._on_dead_trial(self.study, trial)
            self.storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        return len(stale)

    def _on_dead_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """A trial found dead (its process is gone): queue its parameters again, then close its campaign's MLflow
        runs (its finished chains marked superseded when the retry will store them again)."""
        queued = retry(study, trial)
        if trial.user_attrs.get(CAMPAIGN_DIR) and self.config.tracking.enabled:
            close_campaign_runs(Path(trial.user_attrs[CAMPAIGN_DIR]), self.config.tracking.uri, superseded=queued)

    def _twin(self, trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
        """A finished trial, or an earlier running one, with exactly these parameters (same seeds, same result)."""
        earlier = [t for t in self._running() if t.number < trial.number]
        for other in [*self._finished(), *earlier]:
            if other.number != trial.number and other.params == trial.params:
                return other
        return None

    def _surplus(self, trial: optuna.Trial, trials: int) -> bool:
        """Whether N trials numbered below this one are already counted or running (in any process): then this
        one, asked in the same instant by a second process, is beyond N and must not run."""
        ahead = [t for t in [*self._finished(), *self._running()] if t.number < trial.number]
        return len(ahead) >= trials

    def _study_run(self) -> None:
        """The study's one MLflow run, shared by every process: found by tag, else created; when two processes
        create it at once, both keep the earliest and the other is deleted."""
        if not self.config.tracking.enabled:
            return
        from cdm_dist.driver.tracking import client_for, experiment_id

        client = self.tracker_client = client_for(self.config.tracking.uri)
        experiment = experiment_id(client, self.config.tracking)
        query = f"tags.`cdm.study` = '{self.name}' and tags.`cdm.kind` = 'study'"
        found = client.search_runs([experiment], query, order_by=["attributes.start_time ASC"])
        if not found:
            made = client.create_run(
                experiment,
                run_name=f"study-{self.name}",
                tags={"cdm.kind": "study", "cdm.study": self.name, "cdm.storage": self.storage_label},
            )
            found = client.search_runs([experiment], query, order_by=["attributes.start_time ASC"])
            found.sort(key=lambda r: (r.info.start_time, r.info.run_id))
            if found[0].info.run_id != made.info.run_id:
                client.delete_run(made.info.run_id)
        self.study_run_id = found[0].info.run_id
        if found[0].info.status != "RUNNING":
            client.update_run(self.study_run_id, status="RUNNING")

    # -- one trial --------------------------------------------------------------------------------------
    def _run_trial(self, trial: optuna.Trial) -> tuple[Any, optuna.trial.TrialState | str]:
        values = suggest(trial, self.config.tune.space)
        twin = self._twin(trial)
        if twin is not None and self._duplicates < MAX_DUPLICATES:
            trial.set_user_attr(DUPLICATE, twin.number)
            self._duplicates += 1
            return None, "duplicate"
        trial.set_user_attr(PROCESS, self.process)
        config = with_values(self.config, values)
        config = config.model_copy(update={"name": f"{self.name}-trial{trial.number:04d}"})
        planned = config.chains.count * config.method.num_steps
        trial.set_user_attr(PLANNED, planned)
        reporter = MilestoneReporter(trial, config, len(micro_batches(config)), not self.config.tune.multi_objective)
        tags = {"cdm.trial": str(trial.number), "cdm.study": self.name}
        if self.study_run_id:
            tags["mlflow.parentRunId"] = self.study_run_id
        store = CampaignStore.create(config)
        trial.set_user_attr(CAMPAIGN_DIR, str(store.root))
        try:
            report: CampaignReport = run_campaign(
                config, self.executor, store, [reporter], progress=False, parent_tags=tags
            )
        except CampaignStopped:
            trial.set_user_attr(RUN, reporter.steps_run)
            return None, optuna.trial.TrialState.PRUNED
        trial.set_user_attr(RUN, reporter.steps_run)
        trial.set_user_attr("cdm.campaign_run_id", report.campaign_run_id)
        loss = aggregate(
            [r.final_loss for r in report.rows], self.config.tune.objective, self.config.tune.objective_topk
        )
        fit = median_finite([r.metrics.get("prior_fit", math.nan) for r in report.rows])
        if self.prior_fit_limit is not None and math.isfinite(fit):
            trial.set_user_attr("cdm.prior_fit_median", fit)
            trial.set_constraint(CONSTRAINT, fit - self.prior_fit_limit)
        if self.tracker_client is not None and report.campaign_run_id:
            self._log_trial(report.campaign_run_id, trial.number, values, loss, fit)
        if not math.isfinite(loss):
            return None, optuna.trial.TrialState.FAIL
        if self.config.tune.multi_objective:
            return [loss, float(config.method.num_steps * config.method.n_c)], optuna.trial.TrialState.COMPLETE
        return loss, optuna.trial.TrialState.COMPLETE

    def _log_trial(self, run_id: str, number: int, values: dict[str, Any], loss: float, fit: float) -> None:
        from mlflow.entities import Metric, Param

        with self.lock:
            params = [Param(f"trial.{k}", str(v)) for k, v in values.items()] + [Param("trial.number", str(number))]
            metrics = [Metric("objective", loss, 0, 0)]
            if math.isfinite(fit):
                metrics.append(Metric("prior_fit_median", fit, 0, 0))
            self.tracker_client.log_batch(run_id, metrics=metrics, params=params)

    # -- realism ----------------------------------------------------------------------------------------
    def _prior_fit_limit(self) -> float | None:
        """The study's prior_fit limit: configured, or the 95% quantile over unguided chains (stored in the study,
        so a resumed study keeps it)."""
        setting = self.config.tune.prior_fit_limit
        if setting == "off":
            return None
        if setting != "auto":
            return float(setting)
        if PRIOR_FIT_LIMIT not in self.study.user_attrs:
            unguided = with_values(
                self.config,
                {
                    "name": f"{self.name}-unguided",
                    "chains.count": UNGUIDED_CHAINS,
                    "chains.base_seed": UNGUIDED_SEED,
                    "chains.zeta": [{"scale": 0.0}],
                    "chains.zeta_grid": None,
                    "tracking.enabled": False,
                    "pictures": False,  # read for its prior_fit only: its chains' pictures would go unseen
                    "output": str(self.folder),
                },
                "tune",
            )
            report = run_campaign(unguided, self.executor, CampaignStore.create(unguided), progress=False)
            fits = torch.tensor([r.metrics.get("prior_fit", math.nan) for r in report.rows], dtype=torch.float64)
            limit = float(torch.nanquantile(fits, 0.95))
            self.study.set_user_attr(PRIOR_FIT_LIMIT, limit)
        return float(self.study.user_attrs[PRIOR_FIT_LIMIT])

    # -- the study --------------------------------------------------------------------------------------
    def enqueue_baseline(self) -> None:
        """A new study's first trial is the config as written, so tuning can only improve on it."""
        if self.study.get_trials(deepcopy=False):
            return
        current = self.config.model_dump(mode="json")
        values = {}
        for path, spec in self.config.tune.space.items():
            node: Any = current
            for part in path.split("."):
                node = node[int(part)] if isinstance(node, list) else node[part]
            inside = node in spec.choices if spec.type == "categorical" else spec.low <= node <= spec.high
            if inside:
                values[path] = node
        self.study.enqueue_trial(values, user_attrs={CONFIG_AS_WRITTEN: True})

    def run(self, trials: int, parallel: int = 1) -> TuneResult:
        """Finish `trials` counted trials in all (those already in the storage and those other processes run
        count too), `parallel` at a time in this process."""
        with exclusive_journal(self.storage_label, self.storage):
            self.enqueue_baseline()
            self.recover_stale()
            todo = max(0, trials - len(self._finished()))
            needs_limit = self.config.tune.prior_fit_limit == "auto" and PRIOR_FIT_LIMIT not in self.study.user_attrs
            if todo > 0 or needs_limit:  # one pool of workers for every trial: the models load once
                self.executor = self.given or make_executor(self.config, self.address)
                if self.given is None:
                    probe_step(self.config, self.executor)  # one checked guided step before any trial
            try:
                self.prior_fit_limit = self._prior_fit_limit()
                self._study_run()
                optuna.logging.set_verbosity(optuna.logging.WARNING)
                from tqdm.auto import tqdm

                with tqdm(total=trials, initial=trials - todo, desc=f"study {self.name}", unit="trial") as bar:
                    self._loop(trials, parallel, bar)
            finally:
                if self.executor is not None and self.given is None:
                    self.executor.close()
                self.executor = None
            result = self.result()
            self._finish_tracking(result, done=result.complete + result.pruned + result.failed >= trials)
        return result

    def _ask(self) -> optuna.Trial:
        with warnings.catch_warnings():  # Optuna expects heartbeats from optimize(); here they come from ask/tell
            warnings.simplefilter("ignore", UserWarning)
            return self.study.ask()

    def _tell(self, trial: optuna.Trial, outcome: str, value: Any = None) -> None:
        """Mark how the trial ended, then tell Optuna (a told trial can no longer take attributes)."""
        trial.set_user_attr(OUTCOME, outcome)
        if outcome == "complete":
            self.study.tell(trial, value)
        else:
            state = optuna.trial.TrialState.PRUNED if outcome == "pruned" else optuna.trial.TrialState.FAIL
            self.study.tell(trial, state=state)

    def _loop(self, trials: int, parallel: int, bar: Any) -> None:
        """Until N trials are counted: ask while this process runs fewer than `parallel` and fewer than N are
        counted or running anywhere; tell each as it ends; meanwhile fail other processes' dead trials."""
        running: dict[Future, optuna.Trial] = {}
        poll = float(min(self.storage.get_heartbeat_interval(), 5)) if self.shared else None
        with ThreadPoolExecutor(max_workers=parallel) as pool, Heartbeats(self.storage) as heartbeats:
            while True:
                if self.shared:
                    heartbeats.beat()  # this process's trials are live: fresh beats, whatever the beat thread's delay
                    self.recover_stale()
                counted = len(self._finished())
                bar.n = min(counted, trials)
                bar.refresh()
                if counted >= trials and not running:
                    return
                while len(running) < parallel and counted + len(self._running()) < trials:
                    trial = self._ask()
                    heartbeats.add(trial._trial_id)
                    if self._surplus(trial, trials):
                        heartbeats.remove(trial._trial_id)
                        self._tell(trial, "surplus")
                        break
                    running[pool.submit(self._run_trial, trial)] = trial
                if not running:  # other processes run the last trials: wait for them to end (or die)
                    threading.Event().wait(poll or 1.0)
                    continue
                done, _ = wait(list(running), timeout=poll, return_when=FIRST_COMPLETED)
                for future in done:
                    trial = running.pop(future)
                    heartbeats.remove(trial._trial_id)
                    self._told(trial, future)

    def _told(self, trial: optuna.Trial, future: Future) -> None:
        """Tell a finished trial's outcome; an input error stops the study, any other error fails the trial alone."""
        try:
            value, state = future.result()
        except InputError:
            self._tell(trial, "failed")
            raise
        except Exception as exc:  # a crashing trial fails alone
            trial.set_user_attr("cdm.error", "".join(traceback.format_exception(exc))[-2000:])
            value, state = None, optuna.trial.TrialState.FAIL
        if state == "duplicate":  # not run and not counted: the loop asks again
            self._tell(trial, "duplicate")
        elif state == optuna.trial.TrialState.COMPLETE:
            self._tell(trial, "complete", value)
        else:
            self._tell(trial, "pruned" if state == optuna.trial.TrialState.PRUNED else "failed")

    def result(self) -> TuneResult:
        finished = self._finished()
        by_state = {s: [t for t in finished if t.state == s] for s in optuna.trial.TrialState}
        complete = by_state[optuna.trial.TrialState.COMPLETE]
        pareto: list[dict[str, Any]] = []
        best_value: Any = None
        best_params: dict[str, Any] = {}
        best: optuna.trial.FrozenTrial | None = None
        front = self.study.best_trials if complete and self.config.tune.multi_objective else []  # feasible only
        if front:
            pareto = [{"number": t.number, "values": t.values, "params": t.params} for t in front]
            best = min(front, key=lambda t: t.values[0])
            best_value, best_params = best.values, best.params
        elif complete and not self.config.tune.multi_objective:
            try:
                best = self.study.best_trial  # the best feasible trial
                best_value, best_params = best.value, best.params
            except ValueError:  # every complete trial broke the prior_fit limit
                pass
        pruned = by_state[optuna.trial.TrialState.PRUNED]
        return TuneResult(
            study=self.name,
            storage=self.storage_label,
            complete=len(complete),
            pruned=len(pruned),
            failed=len(by_state[optuna.trial.TrialState.FAIL]),
            best_value=best_value,
            best_params=best_params,
            pareto=pareto,
            chain_steps_run=sum(t.user_attrs.get(RUN, 0) for t in finished),
            chain_steps_saved=sum(t.user_attrs.get(PLANNED, 0) - t.user_attrs.get(RUN, 0) for t in pruned),
            prior_fit_limit=self.prior_fit_limit,
            infeasible=sum(t.constraints.get(CONSTRAINT, 0.0) > 0 for t in complete),
            objective=objective_words(self.config),
            best_trial=None if best is None else best.number,
            best_config=None if best is None else str(self.write_best(best.params)),
        )

    def write_best(self, params: dict[str, Any]) -> Path:
        """The campaign config with the best trial's parameters, as `best.yaml` in the study's folder: `cdm run`
        runs it as a plain campaign (the tune section left out)."""
        best = with_values(self.config, params).model_copy(update={"name": f"{self.name}-best"})
        best = best.model_copy(update={"tune": type(best.tune)()})
        path = self.folder / "best.yaml"
        header = f"# cdm tune: study {self.name}'s best trial; run it with: cdm run {path}\n"
        path.write_text(header + dump_config(best))
        return path

    def _finish_tracking(self, result: TuneResult, done: bool) -> None:
        """The study's summary and plots on its MLflow run; FINISHED once N trials are counted and none runs."""
        if self.tracker_client is None or self.study_run_id is None:
            return
        from mlflow.entities import Metric

        metrics = [
            Metric("trials_complete", result.complete, 0, 0),
            Metric("trials_pruned", result.pruned, 0, 0),
            Metric("chain_steps_saved_by_pruning", result.chain_steps_saved, 0, 0),
        ]
        if isinstance(result.best_value, float):
            metrics.append(Metric("best_value", result.best_value, 0, 0))
        self.tracker_client.log_batch(self.study_run_id, metrics=metrics)
        for path in self._plots():
            self.tracker_client.log_artifact(self.study_run_id, str(path))
        if done and not self._running():
            self.tracker_client.set_terminated(self.study_run_id, "FINISHED")

    def _plots(self) -> list[Path]:
        """Optimisation history, parameter importances and parallel coordinates as PNGs (where computable)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as plots

        paths = []
        target = (lambda t: t.values[0]) if self.config.tune.multi_objective else None
        for name, plot in [
            ("optimization_history", plots.plot_optimization_history),
            ("param_importances", plots.plot_param_importances),
            ("parallel_coordinate", plots.plot_parallel_coordinate),
        ]:
            try:
                with warnings.catch_warnings():  # optuna marks its matplotlib plots experimental
                    warnings.simplefilter("ignore")
                    axes = plot(self.study, target=target) if target else plot(self.study)
            except Exception:  # e.g. importances need two or more complete trials with varying parameters
                continue
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            path = self.folder / f"{name}.png"
            figure.savefig(path, bbox_inches="tight")
            plt.close(figure)
            paths.append(path)
        return paths


def study_config(config: CampaignConfig) -> CampaignConfig:
    """A study's config checked before anything starts (the space, what trials may change, the study's name), with
    one held-out sample size for every trial, whatever its n_c."""
    if not config.tune.space:
        raise InputError("tune.space: empty; declare at least one knob to tune")
    for path, spec in config.tune.space.items():  # every path exists and every range value validates
        with_values(config, {path: spec.choices[0] if spec.type == "categorical" else spec.low})
    shared = [p for p in config.tune.space if p.split(".")[0] in ("problem", "resources", "tracking", "output")]
    if shared:
        raise InputError(f"tune.space: {shared}: trials share one problem and one actor pool; tune method/chains")
    if config.method.eval_samples is None:
        method = config.method.model_copy(update={"eval_samples": config.method.heldout_samples})
        config = config.model_copy(update={"method": method})
    check_config(config)
    name = config.tune.study_name or config.name
    if not re.fullmatch(NAME, name):  # its folder, and its trials' campaign folders, stay in output
        raise InputError(f"tune.study_name: {name!r} would leave output; use letters, digits, '_', '.', '-'")
    return config


def objective_words(config: CampaignConfig) -> str:
    """What a trial's value is: which statistic of its chains' held-out losses (and its compute, multi-objective)."""
    tune = config.tune
    statistic = {"median": "the median", "best": "the lowest", "topk_mean": f"the mean of the {tune.objective_topk} "
                 "lowest"}[tune.objective]  # fmt: skip
    words = f"{statistic} held-out final_loss over a trial's {config.chains.count} chains (lower is better)"
    if tune.multi_objective:
        words += ", and its compute num_steps x n_c"
    return words


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a finished trial counts towards N: complete, pruned, or failed by its own campaign."""
    if trial.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
        return trial.user_attrs.get(OUTCOME, "complete") in ("complete", "pruned")
    return trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs.get(OUTCOME) == "failed"


def died(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial was failed because its process died (it was never told)."""
    return trial.state == optuna.trial.TrialState.FAIL and OUTCOME not in trial.user_attrs


def close_campaign_runs(folder: Path, uri: str, superseded: bool) -> None:
    """Close a dead trial's campaign runs (parent and unfinished chains) as KILLED, from the ids in its folder and
    the parent's children in MLflow (ids the process died before saving). `superseded` (its retry is queued and
    stores the same chains again): its finished chains get status superseded, so `cdm topk` lists each x* once."""
    from cdm_dist.driver.tracking import client_for

    state = CampaignStore(folder).load_tracking()
    parent = state.get("parent_run_id")
    if not parent:
        return
    client = client_for(uri)
    run = client.get_run(parent)
    query = f"tags.`mlflow.parentRunId` = '{parent}'"
    children = {r.info.run_id: r for r in _all_runs(client, run.info.experiment_id, query)}
    for run_id in state.get("child_run_ids", {}).values():
        if run_id not in children:
            children[run_id] = client.get_run(run_id)
    if superseded:
        client.set_tag(parent, SUPERSEDED_TAG, "true")
    for child in children.values():
        if superseded and child.data.tags.get("status") == "ok":
            client.set_tag(child.info.run_id, "status", SUPERSEDED)
        if child.info.status == "RUNNING":
            client.set_terminated(child.info.run_id, "KILLED")
    if run.info.status == "RUNNING":
        client.set_terminated(parent, "KILLED")


def _all_runs(client: Any, experiment: str, query: str) -> list[Any]:
    """Every run matching the query (all pages)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment], query, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs
