"""A campaign's chains table: every chain's outcome in one columnar artifact of the campaign run (Parquet,
CHAINS_TABLE), so a campaign of 10^5 or 10^6 chains needs child runs only for the chains a user looks at. A row per
chain: chain, seed, zeta (label), zeta_params (the chain run's zeta.* params, as JSON), status (ok or failed),
final_loss (null when failed), run_id (the chain's own run, null without one) and one metric.NAME column per
problem metric (null where not finite). pyarrow (an mlflow dependency) is imported lazily."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cdm_dist.driver.report import ChainRow

CHAINS_TABLE = "chains.parquet"  # the campaign run's artifact
CHAIN_RUNS_TAG = "cdm.chain_runs"  # on the campaign run: 'all' (a run per chain) or 'top' (the rest only in the table)
METRIC = "metric."  # prefix of the metric columns
SUPERSEDED_TAG = "cdm.superseded"  # on a dead trial's campaign run whose retry stores its chains (tuning.study)


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


def chain_runs_mode(count: int, child_runs_max: int) -> str:
    """'all' when a campaign of count chains gets a run per chain (tracking.child_runs_max), else 'top'."""
    return "all" if count <= child_runs_max else "top"


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def write_chain_table(
    rows: Sequence[ChainRow], zeta_params: Sequence[str], run_ids: Mapping[int, str], path: str | Path
) -> None:
    """The chains table of rows (zeta_params[chain]: the chain's zeta.* params as JSON) to a Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = sorted({k for r in rows for k in r.metrics})
    columns: dict[str, Any] = {
        "chain": pa.array([r.chain for r in rows], pa.int64()),
        "seed": pa.array([r.seed for r in rows], pa.int64()),
        "zeta": pa.array([r.zeta for r in rows], pa.string()),
        "zeta_params": pa.array([zeta_params[r.chain] for r in rows], pa.string()),
        "status": pa.array(["failed" if r.failed else "ok" for r in rows], pa.string()),
        "final_loss": pa.array([None if r.failed else _finite(r.final_loss) for r in rows], pa.float64()),
        "run_id": pa.array([run_ids.get(r.chain) for r in rows], pa.string()),
    }
    for name in names:
        columns[METRIC + name] = pa.array([_finite(r.metrics.get(name)) for r in rows], pa.float64())
    pq.write_table(pa.table(columns), path, compression="zstd")


def zeta_params_json(zetas: Sequence[Any]) -> list[str]:
    """Each chain's zeta schedule as the chain run's zeta.* params (flattened, str values) in JSON; a schedule
    shared by many chains is dumped once."""

    dumped: dict[int, str] = {}
    texts = []
    for zeta in zetas:
        if id(zeta) not in dumped:
            dumped[id(zeta)] = json.dumps(flatten(zeta.model_dump(mode="json"), "zeta."), sort_keys=True)
        texts.append(dumped[id(zeta)])
    return texts


def read_chain_table(path: str | Path) -> dict[str, list[Any]]:
    """A chains table as columns (name -> values, None where null)."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pydict()
