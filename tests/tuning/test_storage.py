"""Where a study lives: the journal file recovers from a lock a killed process left (whatever the output folder);
a database that never answers is one line within the connect timeout, its password masked."""

import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from cdm_dist.driver import preconditions
from cdm_dist.driver.campaign import TuneConfig, dump_config, load_config
from cdm_dist.errors import InputError
from tuning.storage import open_storage

SPACE = "tune.space={chains.zeta.0.scale: {type: float, low: 0.3, high: 10, log: true}}"
CDM = [sys.executable, "-m", "cdm_cli.main"]

# A process that takes Optuna's lock on the study's journal, as a write does, and is killed holding it.
LOCK_HOLDER = """
import sys, time
from pathlib import Path
import optuna
from cdm_dist.driver.campaign import TuneConfig
from tuning.storage import open_storage
if sys.argv[1] == "cdm":  # the lock as cdm takes it (absolute path)
    storage, journal = open_storage(None, Path("out/campaigns/study-stale"), TuneConfig(), lambda study, trial: None)
else:  # the lock as earlier versions took it: a symlink to a relative path, which Optuna can never resolve
    journal = "out/campaigns/study-stale/optuna.journal"
    Path(journal).parent.mkdir(parents=True)
optuna.storages.journal.JournalFileSymlinkLock(journal).acquire()
print("locked", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("made_by", ["cdm", "relative"])
def test_a_restart_breaks_a_journal_lock_a_killed_process_left(small_campaign, tmp_path, made_by):
    """The output folder is relative (the study runs from its folder); the restart finishes within a minute."""
    base = small_campaign(resources__executor="local", chains__count=2, method__num_steps=4, output="out/campaigns")
    config = load_config(None, [SPACE, "tune.study_name=stale", "tune.prior_fit_limit=off", "tune.pruner=none"])
    config = config.model_copy(update={k: getattr(base, k) for k in type(base).model_fields if k != "tune"})
    (tmp_path / "study.yaml").write_text(dump_config(config))
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, made_by], cwd=tmp_path, stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = tmp_path / "out/campaigns/study-stale/optuna.journal.lock"
    assert lock.is_symlink()

    tic = time.monotonic()
    done = subprocess.run([*CDM, "tune", "study.yaml", "--trials", "1"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "study stale: 1 complete" in done.stdout and time.monotonic() - tic < 60
    assert not lock.is_symlink()  # released after the restart's last write


@pytest.fixture
def silent_server():
    """A port that takes TCP connections and never answers: a database server that hangs."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


def test_a_database_that_never_answers_is_one_line_within_the_connect_timeout(silent_server, tmp_path, monkeypatch):
    monkeypatch.setattr(preconditions, "TIMEOUT_S", 2.0)  # libpq's shortest
    url = f"postgresql+psycopg2://nobody:secret@127.0.0.1:{silent_server}/none"
    errors = []

    def open_it():
        try:
            open_storage(url, tmp_path / "study", TuneConfig(), lambda study, trial: None)
        except InputError as exc:
            errors.append(str(exc))

    tic = time.monotonic()
    opening = threading.Thread(target=open_it, daemon=True)  # without a timeout it would hang: fail, not hang
    opening.start()
    opening.join(60)
    assert not opening.is_alive(), "open_storage hangs on a server that never answers"
    (message,) = errors
    assert message.startswith(f"--storage: cannot open postgresql+psycopg2://nobody:***@127.0.0.1:{silent_server}/")
    assert "timeout" in message and "secret" not in message and time.monotonic() - tic < 30
    assert not (tmp_path / "study").exists()
