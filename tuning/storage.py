"""Where a study lives and how processes share it.

- A journal file (the default, in the study folder) belongs to one `cdm tune` process at a time: the process holds
  an exclusive lock on it while it runs, so every trial it finds RUNNING when it starts was left by a dead process.
- A database (`--storage postgresql://...`, any SQLAlchemy URL) is shared by any number of processes on any number
  of machines. Each process heartbeats its own running trials; a trial whose last heartbeat is older than the grace
  period belongs to a dead process: it is failed (not counted) and its parameters are retried once (Optuna's
  heartbeat mechanism, driven here for ask/tell). A process never touches another live process's trials.
- A dead trial's parameters run once more (the config as written until it is evaluated); the dead trial's chains
  that had finished are marked superseded, so its retry's identical chains are the only ones listed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna

from cdm_dist.driver import preconditions
from cdm_dist.driver.campaign import TuneConfig
from cdm_dist.errors import InputError, first_line

HEARTBEAT_SECONDS = 30  # defaults for database storages
GRACE_HEARTBEATS = 3
TABLE_RACE_ATTEMPTS = 5
LOCK_GRACE_SECONDS = 10  # Optuna breaks a journal lock that has not changed for this long (a write takes ms)
STALE_LOCK_SECONDS = 2  # a lock older than this, with no process owning the journal, was left by a killed process
MAX_RETRY = 1  # a dead trial runs once more; if that retry dies too, its parameters are dropped (not the baseline's)
CONFIG_AS_WRITTEN = "cdm.config_as_written"  # user attribute of the study's first trial and its retries


def heartbeat_settings(tune: TuneConfig, database: bool) -> tuple[int | None, int | None]:
    """(interval, grace) in seconds for this storage; None for the journal file, which cannot hold heartbeats."""
    if not database:
        for name in ("heartbeat_seconds", "grace_seconds"):
            if getattr(tune, name) is not None:
                raise InputError(
                    f"tune.{name}: the journal file cannot hold heartbeats (one process per file); "
                    "use --storage with a database URL to share a study between processes"
                )
        return None, None
    interval = tune.heartbeat_seconds or HEARTBEAT_SECONDS
    grace = tune.grace_seconds or GRACE_HEARTBEATS * interval
    if grace <= interval:
        raise InputError(f"tune.grace_seconds: must exceed the heartbeat interval ({interval} s), got {grace}")
    return interval, grace


def check_storage(url: str | None, tune: TuneConfig) -> None:
    """The storage settings, checked before anything starts or is written: a URL that is one, heartbeats only on a
    database, and a database server that answers (a SQLite file is not opened here: opening would make it)."""
    if url is None:
        heartbeat_settings(tune, database=False)
        return
    if "://" not in url:
        raise InputError(f"--storage: {url!r} is not a database URL (e.g. postgresql+psycopg2://user@host/db)")
    heartbeat_settings(tune, database=True)
    if url.startswith("sqlite"):
        return
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url, connect_args=preconditions.connect_args(url))
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:
        reason = preconditions.masked(first_line(exc), url)
        raise InputError(f"--storage: cannot open {preconditions.redacted(url)} ({reason})") from None


def open_storage(
    url: str | None, folder: Path, tune: TuneConfig, on_stale: Callable[[optuna.Study, Any], None]
) -> tuple[optuna.storages.BaseStorage, str]:
    """The study's storage and its description: the journal file in `folder`, or the database at `url` with
    heartbeats (`on_stale` runs once per trial found dead; its password masked in the description). A database that
    cannot be reached within the connect timeout is one InputError and creates nothing."""
    if url is None:
        heartbeat_settings(tune, database=False)
        folder = folder.resolve()  # Optuna's lock is a symlink to this path: relative, it would not resolve
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "optuna.journal"
        break_stale_lock(path)
        lock = optuna.storages.journal.JournalFileSymlinkLock(str(path), grace_period=LOCK_GRACE_SECONDS)
        backend = optuna.storages.journal.JournalFileBackend(str(path), lock_obj=lock)
        return optuna.storages.JournalStorage(backend), str(path)
    if "://" not in url:
        raise InputError(f"--storage: {url!r} is not a database URL (e.g. postgresql+psycopg2://user@host/db)")
    interval, grace = heartbeat_settings(tune, database=True)
    for attempt in range(TABLE_RACE_ATTEMPTS):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna's terms since 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url,
                    engine_kwargs={"pool_pre_ping": True, "connect_args": preconditions.connect_args(url)},
                    heartbeat_interval=interval,
                    grace_period=grace,
                    heartbeat_stale_trial_callback=on_stale,
                )
            return storage, preconditions.redacted(url)
        except Exception as exc:
            # Processes that meet a new database at once race to create its tables: the losers try again.
            if "IntegrityError" in type(exc).__name__ + str(exc) and attempt + 1 < TABLE_RACE_ATTEMPTS:
                time.sleep(0.2 * (attempt + 1))
                continue
            reason = preconditions.masked(first_line(exc), url)
            raise InputError(f"--storage: cannot open {preconditions.redacted(url)} ({reason})") from None
    raise AssertionError("unreachable")


def break_stale_lock(journal: Path) -> bool:
    """Remove the lock Optuna takes on the journal for each write when a killed process left it: no process owns
    the journal (its owner lock is free) and the lock is older than any write, or points elsewhere (a relative link
    an earlier version made, which Optuna can never break). Returns whether a lock was removed."""
    lock = Path(f"{journal}.lock")
    if not lock.is_symlink():
        return False
    with open(f"{journal}.owner", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live cdm tune process holds the journal: the lock is its own
            return False
        try:
            stale = os.readlink(lock) != str(journal) or time.time() - os.lstat(lock).st_mtime > STALE_LOCK_SECONDS
            if stale:
                lock.unlink()
            return stale
        except FileNotFoundError:  # released meanwhile
            return False
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def uses_heartbeats(storage: optuna.storages.BaseStorage) -> bool:
    """Whether the storage records heartbeats (databases here), i.e. other processes may share the study."""
    return optuna.storages._heartbeat.is_heartbeat_enabled(storage)


@contextlib.contextmanager
def exclusive_journal(storage_label: str, storage: optuna.storages.BaseStorage) -> Iterator[None]:
    """Hold the journal file's owner lock while the study runs (one process per journal); no-op on databases."""
    if uses_heartbeats(storage):
        yield
        return
    lock_path = f"{storage_label}.owner"
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise InputError(
                f"{storage_label}: in use by {owner} (one cdm tune process per journal file; use --storage "
                "postgresql://... to tune one study from several processes)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fail_dead_trials(study: optuna.Study) -> None:
    """Fail the trials whose heartbeat is older than the grace period and run the stale-trial callback once each
    (Optuna's `fail_stale_trials`; several processes may call it at once: each dead trial is failed once)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def is_config_as_written(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether the trial evaluates the config as written (the study's first, enqueued trial, or a retry of it)."""
    return bool(trial.user_attrs.get(CONFIG_AS_WRITTEN)) or (trial.number == 0 and "fixed_params" in trial.system_attrs)


def retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    """Queue a dead trial's parameters again, once (`retry_history`, Optuna's system attribute for retried trials):
    a retry that dies too is dropped, except the config as written, queued again until it is evaluated. Called
    again for the same trial (its process died while recovering it), it queues nothing more. Returns whether the
    parameters are queued."""
    for other in study.get_trials(deepcopy=False):
        if other.system_attrs.get("retry_history", [None])[-1] == trial.number:
            return True
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    baseline = is_config_as_written(trial)
    if len(history) > MAX_RETRY and not baseline:
        return False
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs={CONFIG_AS_WRITTEN: True} if baseline else None,
            system_attrs={"failed_trial": history[0], "retry_history": history},
        )
    )
    return True


class Heartbeats:
    """Records a heartbeat for each of this process's running trials every `interval` seconds (one thread)."""

    def __init__(self, storage: optuna.storages.BaseStorage) -> None:
        self.storage = storage
        self.interval = storage.get_heartbeat_interval() if uses_heartbeats(storage) else None
        self.trials: set[int] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def add(self, trial_id: int) -> None:
        """Start beating for a trial (its first heartbeat now, before any work)."""
        if self.interval is None:
            return
        self.storage.record_heartbeat(trial_id)
        with self.lock:
            self.trials.add(trial_id)

    def remove(self, trial_id: int) -> None:
        with self.lock:
            self.trials.discard(trial_id)

    def beat(self) -> None:
        """A heartbeat for each of this process's running trials, now."""
        with self.lock:
            trials = sorted(self.trials)
        for trial_id in trials:
            with contextlib.suppress(Exception):  # a lost beat is retried next interval
                self.storage.record_heartbeat(trial_id)

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            self.beat()

    def __enter__(self) -> Heartbeats:
        if self.interval is not None:
            self.thread = threading.Thread(target=self._beat, name="cdm-heartbeats", daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
