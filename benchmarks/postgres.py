"""A throwaway PostgreSQL server on 127.0.0.1 (initdb + pg_ctl from PostgreSQL's server package), for the tests and
benchmarks of shared studies and `cdm serve`. Stopped and deleted on exit; nothing else is touched."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from cdm_dist.driver.processes import free_port


def missing() -> str | None:
    """Why a throwaway server cannot run here (None when it can)."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (the postgres extra)"
    if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
        return "PostgreSQL's initdb and pg_ctl are not on PATH (Debian: apt-get install postgresql; PATH gets "
        "/usr/lib/postgresql/*/bin)"
    if os.geteuid() == 0 and (
        shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode
    ):
        return "running as root without a postgres user to run the server"
    return None


@contextlib.contextmanager
def throwaway_server() -> Iterator[Callable[[str], str]]:
    """Start a server; yield a function (name) -> SQLAlchemy URL of a new, empty database on it."""
    reason = missing()
    if reason is not None:
        raise RuntimeError(reason)
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # PostgreSQL refuses root
    root = Path(tempfile.mkdtemp(prefix="cdm-postgres-"))
    os.chmod(root, 0o777)
    data, port = root / "data", free_port()
    try:
        subprocess.run([*as_user, "initdb", "-D", str(data), "-A", "trust", "-U", "postgres"], check=True,
                       capture_output=True)  # fmt: skip
        options = f"-p {port} -k {root} -h 127.0.0.1"
        subprocess.run([*as_user, "pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
                       check=True, capture_output=True)  # fmt: skip

        def database(name: str) -> str:
            subprocess.run([*as_user, "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", name],
                           check=True, capture_output=True)  # fmt: skip
            return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{name}"

        yield database
    finally:
        subprocess.run([*as_user, "pg_ctl", "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
