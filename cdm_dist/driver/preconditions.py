"""Everything that can be checked before a campaign, a study or a selection starts, so that bad input is one line
and nothing is created: the tracking store answers and is an MLflow store, output paths can be written, the
chains fit in the driver's memory, a Ray address answers."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sqlite3
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cdm_dist.errors import InputError, first_line

TIMEOUT_S = 10.0
SQLITE_HEADER = b"SQLite format 3\x00"
DB_SCHEMES = ("postgresql", "mysql", "mssql")
DRIVER_BYTES_PER_CHAIN = 4096  # the chain's table row, result row, MLflow run id and bookkeeping in the driver


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable_folder(path: str | Path, field: str) -> Path:
    """A folder that exists or can be made (checked without making it)."""
    path = Path(path).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise InputError(f"{field}: {path} is a file, not a folder")
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise InputError(f"{field}: cannot make {path}: {base} is a file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"{field}: cannot write in {base}")
    try:  # permissions do not tell for root, read-only mounts or /proc: a file made and removed at once does
        descriptor, probe = tempfile.mkstemp(prefix=".cdm-write-check-", dir=base)
    except OSError as exc:
        raise InputError(f"{field}: cannot write in {base} ({exc.strerror or exc})") from None
    os.close(descriptor)
    os.unlink(probe)
    return path


def writable_file(path: str | Path, field: str) -> Path:
    """A file that can be written (its folder exists or can be made; it is not a folder)."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        raise InputError(f"{field}: {path} is a folder, not a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{field}: cannot write {path}")
    writable_folder(path.parent, field)
    return path


def tracking_store(uri: str, field: str = "tracking.uri", must_exist: bool = False) -> None:
    """The MLflow store at uri answers and is an MLflow store (or, unless must_exist, an empty place where one can
    be made)."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else "file"
    if scheme == "sqlite":
        _sqlite_store(uri, field, must_exist)
    elif scheme in ("http", "https"):
        _server_store(uri, field)
    elif scheme in DB_SCHEMES:
        _database_store(uri, field)
    elif scheme == "file":
        writable_folder(uri.removeprefix("file://"), field)
    else:
        raise InputError(
            f"{field}: unsupported MLflow store {redacted(uri)!r}; expected sqlite:///PATH, postgresql://..., "
            "mysql://..., http(s)://SERVER or a folder"
        )


def _sqlite_store(uri: str, field: str, must_exist: bool) -> None:
    path = Path(uri.removeprefix("sqlite:///")).expanduser()
    path = path if uri.startswith("sqlite:////") else path.resolve()
    if not path.exists():
        if must_exist:
            raise InputError(f"{field}: no MLflow database at {path}")
        writable_folder(path.parent, field)
        return
    if path.is_dir():
        raise InputError(f"{field}: {path} is a folder, not an MLflow database")
    with path.open("rb") as handle:
        header = handle.read(len(SQLITE_HEADER))
    if header and header != SQLITE_HEADER:
        raise InputError(f"{field}: {path} is not an MLflow database (not SQLite)")
    if not header:  # an empty file: MLflow makes its tables in it
        return
    tables = _sqlite_tables(path, field)
    if tables and not {"experiments", "runs", "alembic_version"} <= tables:
        raise InputError(f"{field}: {path} is a SQLite database but not an MLflow store (tables {sorted(tables)[:5]})")


def _sqlite_tables(path: Path, field: str) -> set[str]:
    """The tables of a SQLite file, read without writing; a journal that a crash left behind (hot) is first rolled
    back by opening the file read-write (SQLite's own recovery), then the file's integrity is checked."""
    query = "select name from sqlite_master where type = 'table'"
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=TIMEOUT_S)) as db:
            return {row[0] for row in db.execute(query)}
    except sqlite3.Error as exc:
        journal = path.with_name(f"{path.name}-journal")
        if not journal.is_file():
            raise InputError(f"{field}: {path} is not a readable SQLite database ({exc})") from None
    try:  # a hot journal: only a writer may roll it back
        with contextlib.closing(sqlite3.connect(path, timeout=TIMEOUT_S)) as db:
            tables = {row[0] for row in db.execute(query)}
            check = db.execute("pragma quick_check").fetchone()[0]
    except sqlite3.Error as exc:
        raise InputError(
            f"{field}: {path} has a journal left by a crash ({journal.name}) that cannot be rolled back ({exc})"
        ) from None
    if check != "ok":
        raise InputError(f"{field}: {path} is damaged (SQLite integrity check: {check})")
    return tables


def artifact_folder(uri: str, experiment: str, location: str) -> None:
    """Where the campaign's MLflow artifacts go can be written: the experiment's own artifact location when the
    store has it (a local folder), else `location` (tracking.artifact_location, where cdm creates the experiment). A
    server keeps its artifacts itself; a bucket is not checked."""
    if uri.startswith(("http://", "https://")):
        return
    existing = _experiment_location(uri, experiment)
    if existing is None:
        writable_folder(location, "tracking.artifact_location")
        return
    folder = _local_path(existing)
    if folder is not None:
        writable_folder(folder, f"tracking.experiment: the artifact location of {experiment!r}")


def _local_path(location: str) -> str | None:
    """The folder of a file:// URI or a plain path; None for any other scheme (a bucket, a server)."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    parsed = urlparse(location)
    if parsed.scheme == "file":
        return url2pathname(parsed.path)
    return location if parsed.scheme == "" else None


def _experiment_location(uri: str, experiment: str) -> str | None:
    """The artifact location of the named experiment in the store, read without writing; None when the store or the
    experiment does not exist yet (or the store is a folder of files)."""
    query = "select artifact_location from experiments where name = :name"
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else "file"
    if scheme == "sqlite":
        path = Path(uri.removeprefix("sqlite:///")).expanduser()
        path = path if uri.startswith("sqlite:////") else path.resolve()
        if not path.is_file() or path.stat().st_size == 0:
            return None
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=TIMEOUT_S)) as db:
                row = db.execute(query, {"name": experiment}).fetchone()
        except sqlite3.OperationalError:  # no tables yet: MLflow makes them
            return None
        return row[0] if row else None
    if scheme in DB_SCHEMES:
        import sqlalchemy

        engine = sqlalchemy.create_engine(uri, connect_args=connect_args(uri))
        try:
            with engine.connect() as connection:
                if "experiments" not in sqlalchemy.inspect(connection).get_table_names():
                    return None
                row = connection.execute(sqlalchemy.text(query), {"name": experiment}).fetchone()
        finally:
            engine.dispose()
        return row[0] if row else None
    return None


def _server_store(uri: str, field: str) -> None:
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            body = response.read(4096)
    except urllib.error.HTTPError as exc:
        raise InputError(f"{field}: {redacted(uri)} answers, but not as an MLflow server (HTTP {exc.code})") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{field}: no MLflow server answers at {redacted(uri)} ({masked(str(exc), uri)})") from None
    if not body.lstrip().startswith(b"{"):
        raise InputError(f"{field}: {redacted(uri)} answers, but not as an MLflow server")


def connect_args(uri: str) -> dict[str, Any]:
    """The connect timeout (TIMEOUT_S) for a network database's driver, as SQLAlchemy connect_args (none else)."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0]
    return {"connect_timeout": int(TIMEOUT_S)} if scheme in ("postgresql", "mysql") else {}


def with_connect_timeout(uri: str) -> str:
    """A network database URL with the connect timeout in its query (for libraries that take a URL only)."""
    if not connect_args(uri) or "connect_timeout=" in uri:
        return uri
    return f"{uri}{'&' if '?' in uri else '?'}connect_timeout={int(TIMEOUT_S)}"


def database_tables(uri: str) -> set[str]:
    """Connect once (TIMEOUT_S for PostgreSQL and MySQL) and list the tables; the driver's error if it cannot."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, connect_args=connect_args(uri))
    try:
        with engine.connect() as connection:
            return set(sqlalchemy.inspect(connection).get_table_names())
    finally:
        engine.dispose()


def _database_store(uri: str, field: str) -> None:
    try:
        tables = database_tables(uri)
    except Exception as exc:
        raise InputError(
            f"{field}: cannot reach the database {redacted(uri)} ({masked(first_line(exc), uri)})"
        ) from None
    if tables and not {"experiments", "runs", "alembic_version"} <= tables:
        raise InputError(f"{field}: the database {redacted(uri)} has tables, but is not an MLflow store")


def _password(uri: str) -> str | None:
    """The password in a URL's user part (scheme://user:password@host), else None."""
    _, sep, rest = uri.partition("://")
    credentials, at, _ = rest.partition("/")[0].rpartition("@")
    colon, password = credentials.partition(":")[1:]
    return password if sep and at and colon and password else None


def redacted(uri: str) -> str:
    """A URL without its password (user:***@host, and any password= in its query); unchanged when it has none."""
    password = _password(uri)
    if password is not None:
        scheme, _, rest = uri.partition("://")
        user = rest.partition(":")[0]
        uri = f"{scheme}://{user}:***@{rest[len(user) + 1 + len(password) + 1 :]}"
    return re.sub(r"([?&]password=)[^&]*", r"\1***", uri)


def masked(text: str, uri: str) -> str:
    """Text (e.g. a driver's error message) with the URL's password masked wherever it appears."""
    text = text.replace(uri, redacted(uri))
    password = _password(uri)
    return text.replace(password, "***") if password else text


def chains_fit(count: int, num_steps: int, field: str = "chains.count") -> None:
    """The driver holds every chain's loss history (and a saved copy) and its result; refuse what cannot fit."""
    import psutil

    need = count * (2 * 8 * num_steps + DRIVER_BYTES_PER_CHAIN)
    available = psutil.virtual_memory().available
    if need > available // 2:
        raise InputError(
            f"{field}: {count} chains need about {_size(need)} in the driver (loss histories and results), more than "
            f"half of the {_size(available)} available; run them as several campaigns"
        )


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PB"


def ray_address_answers(address: str, field: str = "--address") -> None:
    """A Ray address (host:port, ray://host:port) takes TCP connections within TIMEOUT_S."""
    target = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise InputError(f"{field}: {address!r} is not HOST:PORT (or 'auto', 'local', ray://HOST:PORT)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=TIMEOUT_S):
            pass
    except OSError as exc:
        raise InputError(f"{field}: no Ray cluster answers at {target} ({exc.strerror or exc})") from None


def actor_bundle(resources: Any) -> dict[str, float]:
    """What one actor reserves: resources.num_cpus CPUs, and num_gpus GPUs when it has any."""
    return {"CPU": resources.num_cpus} | ({"GPU": resources.num_gpus} if resources.num_gpus > 0 else {})


def capacity_error(resources: Any, available: dict[str, float], where: str) -> str | None:
    """Why the replicas' actors (2 per replica when split) do not fit in `available` CPUs and GPUs, with the fix;
    None when they fit."""
    per_replica = 2 if resources.placement == "split" else 1
    for resource, amount in actor_bundle(resources).items():
        need, have = amount * per_replica * resources.replicas, available.get(resource, 0.0)
        if need <= have + 1e-9:
            continue
        field = "num_gpus" if resource == "GPU" else "num_cpus"
        fits = int((have + 1e-9) // (amount * per_replica))
        if fits >= 1:
            fix = f"--set resources.replicas={fits}"
        elif have > 0:
            fix = f"--set resources.{field}={have / per_replica:g}"
        else:
            fix = f"a machine or cluster with {resource}s"
        return (
            f"resources.{field}: {resources.replicas} replica(s) x {per_replica} actor(s) x {amount:g} {resource} = "
            f"{need:g}, but {where} has {have:g} {resource}; use {fix}"
        )
    return None


def local_capacity() -> dict[str, float]:
    """The CPUs and GPUs a local Ray that cdm starts would have (this process's CPUs; CUDA devices torch sees)."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"CPU": float(cpus), "GPU": float(torch.cuda.device_count())}
