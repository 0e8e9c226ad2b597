"""The baseline an editing campaign is judged against: an SDEdit search (Meng et al. 2022) on the same wall clock.

Variations of the source at the campaign's strengths, without guidance (method 'sdedit'), run through the same
executor in rounds until the MLGD-F campaign's measured time is spent; the best by the same held-out loss is kept
(MLGD-F paper, Exp. 2: a time-matched SDEdit search reaches +6% to +15% MMD improvement, MLGD-F +22% to +33%).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cdm_dist.driver.campaign import load_config
from cdm_dist.driver.report import ChainRow
from cdm_dist.driver.store import CampaignStore, atomic_write
from cdm_dist.errors import InputError

SEED_OFFSET = 1_000_000  # variations' seeds start here above the campaign's base seed (no chain is repeated)
RESULT = "sdedit.json"


def campaign_report(store: CampaignStore) -> dict[str, Any]:
    """The finished campaign's report.json (its measured wall clock and top-k)."""
    path = store.root / "report.json"
    if not path.is_file():
        raise InputError(f"{path} is missing: the campaign has not finished (run `cdm run --resume {store.root}`)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc})") from None


def row_json(row: ChainRow) -> dict[str, Any]:
    """A chain's outcome as JSON."""
    return {"chain": row.chain, "seed": row.seed, "final_loss": row.final_loss, "metrics": row.metrics,
            "x_path": row.x_path, "run_id": row.run_id}  # fmt: skip


def sdedit_search(
    folder: str | Path,
    seconds: float | None = None,
    executor_name: str | None = None,
    address: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """SDEdit variations of an editing campaign's source, as many as fit in `seconds` (default: the campaign's
    measured wall clock), in rounds through one executor; the best by held-out loss, written to <folder>/sdedit.json."""
    from cdm_dist.driver.campaign import check_config
    from cdm_dist.driver.launch import make_executor
    from cdm_dist.driver.runner import run_campaign

    store = CampaignStore.open(folder)
    config = load_config(store.config_path)
    if config.chains.source is None:
        raise InputError(f"{store.config_path}: chains.source is not set: an SDEdit search edits a source")
    campaign = campaign_report(store)
    budget = float(seconds if seconds is not None else campaign["wall_seconds"])
    if not budget > 0:
        raise InputError(f"--seconds: must be > 0, got {budget}")

    def round_config(count: int, base_seed: int) -> Any:
        settings = ["method.name=sdedit", f"name={config.name}-sdedit", f"output={store.root / 'sdedit'}",
                    f"chains.count={count}", f"chains.base_seed={base_seed}", "pictures=false"]  # fmt: skip
        return load_config(store.config_path, settings, executor_name)

    count, seed = config.chains.count, config.chains.base_seed + SEED_OFFSET
    first = round_config(count, seed)
    check_config(first)
    executor = make_executor(first, address)
    rounds: list[dict[str, Any]] = []
    best: ChainRow | None = None
    used = 0.0
    try:
        while count >= 1:
            cfg = round_config(count, seed)
            report = run_campaign(cfg, executor, CampaignStore.create(cfg), progress=progress)
            used += report.wall_seconds
            rounds.append({"variations": count, "seconds": report.wall_seconds, "folder": report.output_dir,
                           "run_id": report.campaign_run_id})  # fmt: skip
            if report.topk and (best is None or report.topk[0].final_loss < best.final_loss):
                best = report.topk[0]
            seed += count
            per_variation = report.wall_seconds / count
            count = math.floor((budget - used) / per_variation) if per_variation > 0 else 0
            if progress:
                print(f"sdedit: round {len(rounds)}: {rounds[-1]['variations']} variations in "
                      f"{report.wall_seconds:.1f} s ({used:.1f} of {budget:.1f} s)")  # fmt: skip
    finally:
        executor.close()
    mlgd_best = campaign["topk"][0] if campaign.get("topk") else None
    result = {
        "method": "sdedit",
        "budget_seconds": budget,
        "used_seconds": used,
        "variations": sum(r["variations"] for r in rounds),
        "rounds": rounds,
        "best": None if best is None else row_json(best),
        "campaign": {
            "chains": campaign.get("chains_total"),
            "wall_seconds": campaign["wall_seconds"],
            "best": mlgd_best,
        },
    }
    atomic_write(store.root / RESULT, lambda p: p.write_text(json.dumps(result, indent=1)))
    return result


def load_sdedit(folder: str | Path) -> dict[str, Any] | None:
    """A campaign's SDEdit search result (sdedit.json), None when none was run."""
    path = Path(folder) / RESULT
    return json.loads(path.read_text()) if path.is_file() else None


def format_sdedit(result: dict[str, Any]) -> str:
    """MLGD-F's best against the time-matched SDEdit search's best: held-out loss and improvement over the source."""

    def line(name: str, designs: Any, seconds: float, row: dict[str, Any] | None) -> str:
        if row is None:
            return f"{name:<8} {designs!s:>8} {seconds:>9.1f}  {'(none finished)':>14}"
        metrics = row.get("metrics") or {}
        improvement = metrics.get("improvement", math.nan)
        return f"{name:<8} {designs!s:>8} {seconds:>9.1f}  {row['final_loss']:>14.6g}  {100 * improvement:>+10.1f}%"

    campaign = result["campaign"]
    header = f"{'method':<8} {'designs':>8} {'seconds':>9}  {'held-out loss':>14}  {'vs source':>11}"
    return "\n".join([
        header,
        line("mlgd_f", campaign["chains"], campaign["wall_seconds"], campaign["best"]),
        line("sdedit", result["variations"], result["used_seconds"], result["best"]),
    ])  # fmt: skip
