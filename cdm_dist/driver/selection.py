"""Selecting candidates x* from the tracking store: the best chains by held-out loss, or those a user tagged
`cdm.selected = true` in the MLflow UI; exported as .npy files plus a contact sheet. mlflow is imported lazily."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdm_dist.driver.preconditions import redacted
from cdm_dist.driver.tracking import client_for
from cdm_dist.errors import InputError

EVALUATION_COLUMNS = ("eval/mmd", "eval/improvement")  # logged on chain runs by `cdm evaluate`


@dataclass
class Candidate:
    run_id: str
    final_loss: float
    chain: int
    campaign: str
    x_path: str | None = None  # local file once exported
    evaluation: dict[str, float] = field(default_factory=dict)  # `cdm evaluate`'s eval/mmd, eval/improvement, if run


def find_candidates(uri: str, experiment: str | None, k: int, selected: bool = False) -> list[Candidate]:
    """The k chains with the lowest final_loss (status ok) across campaigns and trials, or the tagged ones."""
    client = client_for(uri)
    experiments = [client.get_experiment_by_name(experiment)] if experiment else client.search_experiments()
    if experiment and experiments[0] is None:
        raise InputError(f"--experiment: no experiment {experiment!r} in {redacted(uri)}")
    query = "tags.`cdm.kind` = 'chain' and tags.status = 'ok'"
    if selected:
        query += " and tags.`cdm.selected` = 'true'"
    runs = client.search_runs(
        [e.experiment_id for e in experiments],
        query,
        order_by=["metrics.final_loss ASC"],
        max_results=max(k, 1) if not selected else 10_000,
    )
    found = [
        Candidate(
            r.info.run_id,
            r.data.metrics["final_loss"],
            int(r.data.tags["cdm.chain"]),
            r.data.tags["cdm.campaign"],
            evaluation={k: r.data.metrics[k] for k in EVALUATION_COLUMNS if k in r.data.metrics},
        )
        for r in runs
        if math.isfinite(r.data.metrics.get("final_loss", math.inf))
    ]
    return found if selected else found[:k]


def export(candidates: list[Candidate], uri: str, folder: str | Path) -> Path:
    """Download each candidate's x* (.npy) and picture into folder; a contact sheet of the pictures beside them."""
    client = client_for(uri)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pictures = []
    for rank, cand in enumerate(candidates, start=1):
        for artifact in client.list_artifacts(cand.run_id):
            local = Path(client.download_artifacts(cand.run_id, artifact.path, str(folder / ".download")))
            target = folder / f"{rank:03d}_{cand.run_id[:8]}_{local.name}"
            shutil.move(local, target)
            if target.suffix == ".npy":
                cand.x_path = str(target)
            elif target.suffix == ".png":
                pictures.append((cand, target))
    shutil.rmtree(folder / ".download", ignore_errors=True)
    sheet = folder / "contact_sheet.png"
    _contact_sheet(pictures, sheet)
    return sheet


def _contact_sheet(pictures: list[tuple[Candidate, Path]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    n = max(len(pictures), 1)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (cand, picture) in zip(axes.flat, pictures, strict=False):
        ax.imshow(mpimg.imread(picture))
        ax.set_title(f"{cand.run_id[:8]}  loss {cand.final_loss:.4g}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def rows_json(candidates: list[Candidate]) -> dict[str, Any]:
    return {
        "rows": [
            {"run_id": c.run_id, "final_loss": c.final_loss, "x_path": c.x_path} | c.evaluation for c in candidates
        ]
    }


def format_candidates(candidates: list[Candidate]) -> str:
    """The `cdm topk` table; with `cdm evaluate`'s figures where a chain has them (eval/mmd, eval/improvement)."""
    evaluated = [k for k in EVALUATION_COLUMNS if any(k in c.evaluation for c in candidates)]
    lines = [["rank", "final_loss", "chain", *evaluated, "run_id", "x"]]
    for rank, cand in enumerate(candidates, start=1):
        figures = [_figure(k, cand.evaluation.get(k)) for k in evaluated]
        lines.append([str(rank), f"{cand.final_loss:.6g}", str(cand.chain), *figures, cand.run_id, str(cand.x_path)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _figure(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 100:+.1f}%" if key.endswith("improvement") else f"{value:.5g}"
