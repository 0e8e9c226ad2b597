"""A campaign's outcome: one row per chain, the report `cdm run` prints and writes, and the top-k selection."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

SMALL_X = 8  # x* with at most this many numbers is printed in the top-k table; larger ones by their file


@dataclass
class ChainRow:
    """One chain's outcome."""

    chain: int
    seed: int
    zeta: str
    final_loss: float
    failed: bool
    metrics: dict[str, float]
    x_path: str
    run_id: str | None
    x: list[float] | None = None  # x*'s values when it is small (at most SMALL_X numbers), else None: see x_path


@dataclass
class CampaignReport:
    """What `cdm run` prints and writes."""

    campaign_run_id: str | None
    experiment: str
    output_dir: str
    executor: str
    rows: list[ChainRow]
    topk: list[ChainRow]
    wall_seconds: float
    chain_steps: int
    # micro-batches that kept failing (errors, not diverged chains) -> why; the run then fails (exit 1, MLflow FAILED)
    failed_batches: dict[int, str] = field(default_factory=dict)
    experiment_id: str | None = None  # the MLflow experiment of campaign_run_id

    def summary(self) -> dict[str, float]:
        """Counts and losses over the chains (the campaign run's summary metrics)."""
        ok = [r.final_loss for r in self.rows if not r.failed]
        return {
            "chains_total": len(self.rows),
            "chains_ok": len(ok),
            "chains_failed": len(self.rows) - len(ok),
            "best_final_loss": min(ok) if ok else math.inf,
            "median_final_loss": float(torch.tensor(ok).median()) if ok else math.inf,
            "wall_seconds": self.wall_seconds,
            "chain_steps_per_s": self.chain_steps / self.wall_seconds if self.wall_seconds > 0 else 0.0,
        }

    def to_json(self) -> dict[str, Any]:
        summary = self.summary()
        return {
            "campaign_run_id": self.campaign_run_id,
            "experiment": self.experiment,
            "chains_total": summary["chains_total"],
            "chains_ok": summary["chains_ok"],
            "chains_failed": summary["chains_failed"],
            "topk": [
                {"chain": r.chain, "seed": r.seed, "final_loss": r.final_loss, "x_path": r.x_path, "run_id": r.run_id}
                | ({"x": r.x} if r.x is not None else {})
                | ({"metrics": r.metrics} if r.metrics else {})
                for r in self.topk
            ],
            "output_dir": self.output_dir,
            "executor": self.executor,
            "wall_seconds": self.wall_seconds,
            "chain_steps": self.chain_steps,
            "chain_steps_per_s": self.chain_steps / self.wall_seconds if self.wall_seconds > 0 else None,
            "failed_micro_batches": {str(k): v for k, v in self.failed_batches.items()},
        }


def top_k(rows: list[ChainRow], k: int, prior_fit_limit: float | None = None) -> list[ChainRow]:
    """The k chains with the lowest held-out loss; failed chains never qualify, nor chains whose prior_fit exceeds
    the limit (x* the prior finds unlikely: selection.prior_fit_limit)."""
    ok = [r for r in rows if not r.failed and math.isfinite(r.final_loss) and not over_limit(r, prior_fit_limit)]
    return sorted(ok, key=lambda r: r.final_loss)[:k]


def over_limit(row: ChainRow, prior_fit_limit: float | None) -> bool:
    """A chain whose prior_fit exceeds the limit (as `cdm topk` and `cdm tune` judge it)."""
    fit = row.metrics.get("prior_fit", math.nan)
    return prior_fit_limit is not None and math.isfinite(fit) and fit > prior_fit_limit


def format_topk(rows: list[ChainRow]) -> str:
    """The top-k table printed by `cdm run`: x*'s values when small, else its file."""
    metric_names = sorted({k for r in rows for k in r.metrics})
    header = ["rank", "chain", "seed", "final_loss", *metric_names, "zeta", "x*"]
    lines = [header]
    for rank, r in enumerate(rows, start=1):
        metrics = [f"{r.metrics[m]:.4g}" for m in metric_names]
        x = "[" + ", ".join(f"{v:.4g}" for v in r.x) + "]" if r.x is not None else r.x_path
        lines.append([str(rank), str(r.chain), str(r.seed), f"{r.final_loss:.5g}", *metrics, r.zeta, x])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def loss_meaning(loss: Any, samples: int) -> str:
    """What a chain's final_loss is, in words (the method's matching loss on fresh draws)."""
    text = f"final_loss: the {loss.name} loss between {samples} fresh samples of f(x*, η) and held-out target "
    text += "samples; lower is better"
    if getattr(loss, "u_statistic", False):
        text += " (an unbiased estimate of MMD², so values just below 0 mean a match within noise)"
    return text


def format_next_steps(
    store: str, default_store: bool, experiment: str, folder: str, urls: tuple[str, str] | None
) -> str:
    """Where a finished campaign is and what to do next: the store, the folder, the UI's chain table and gallery
    (urls), and the top-k command."""
    uri = "" if default_store else f" --tracking-uri {store}"
    lines = [f"  store    {store} (experiment {experiment}); folder {folder}", f"  browse   cdm ui{uri}, then open"]
    if urls:
        lines += [f"    chains   {urls[0]}", f"    gallery  {urls[1]}"]
    lines.append(
        f"  select   cdm topk --experiment {experiment}{uri}   (or tag chain runs cdm.selected=true in the UI, then "
        f"cdm topk --selected --export DIR{uri})"
    )
    return "next:\n" + "\n".join(lines)
