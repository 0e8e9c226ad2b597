"""`cdm bench scribbles`: the MLGD-F paper's Exp. 2 protocol on the built-in scribbles problem, through the product.

Per target (balanced 50% red, skewed 25% red, an interpolation along colour, one along the background): `cdm run`
of examples/scribbles.yaml on Ray with split placement (an editing campaign from the source scribble), the SDEdit
search for the campaign's measured wall time (`cdm baseline sdedit`), then `cdm evaluate`: fresh generated images at
the source, the top-5 x* and the SDEdit search's best, their MMD to fresh target samples, the improvement over the
source, and the attribute share with its Wilson 95% interval beside the target's. The poster reports +32.5 / +27.1 /
+22.1 / +28.5% for MLGD-F, 47.4% and 26.4% male for the 50% and 25% targets, and +6% to +15% for the authors' SDEdit
search.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import environment, markdown_table, write_report
from cdm_dist.driver.campaign import check_config, load_config
from cdm_dist.driver.evaluation import evaluate_campaign
from cdm_dist.driver.launch import make_executor
from cdm_dist.driver.runner import run_campaign
from cdm_dist.driver.sdedit import sdedit_search
from cdm_dist.driver.store import CampaignStore
from cdm_dist.problems.scribbles import TARGET_RED_SHARE, TARGETS

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "scribbles.yaml"
POSTER_IMPROVEMENT = {"balanced": 0.325, "skewed": 0.271, "colour_interpolation": 0.221,
                      "background_interpolation": 0.285}  # fmt: skip
QUICK = ["method.num_steps=4", "method.n_c=4", "method.target_batch=16", "chains.count=4", "resources.micro_batch=2",
         "evaluation.samples=64", "evaluation.chunk=32", "topk=2", "problem.args.target_size=64"]  # fmt: skip

QUICK_SDEDIT_SECONDS = 1e-3  # --quick: one SDEdit round (its first round always runs), not the campaign's wall time


def classifier_settings(target: str, checkpoints: Path) -> list[str]:
    """The evaluation's zero-shot classifier of the attribute a target moves: colour, or the background."""
    attribute, classes, headline = ("background", "[dark, light]", "dark") if target == "background_interpolation" \
        else ("colour", "[red, blue]", "red")  # fmt: skip
    file = checkpoints / "sampler" / f"classes_{attribute}.safetensors"
    return [f"evaluation.classifier={{zero_shot: {file}, classes: {classes}, attribute: {headline}}}"]


def target_settings(root: Path, target: str, checkpoints: Path | None, quick: bool, chains: int | None) -> list[str]:
    """The --set overrides of examples/scribbles.yaml for one target of the bench."""
    from cdm_dist.problems.builtins import SHIPPED_CHECKPOINTS

    folder = checkpoints or SHIPPED_CHECKPOINTS / "scribbles"
    source = EXAMPLE.parent / "scribbles_source.png"
    settings = [f"problem.args.scribbles_target={target}", f"output={root / 'campaigns'}", f"name=scribbles-{target}",
                f"tracking.uri=sqlite:///{root / 'mlflow.db'}", f"tracking.artifact_location={root / 'artifacts'}",
                f"chains.source.file={source}", *classifier_settings(target, folder)]  # fmt: skip
    if checkpoints is not None:
        settings.append(f"problem.args.checkpoints={checkpoints}")
    if quick:
        settings += QUICK
    if chains is not None:
        settings.append(f"chains.count={chains}")
    return settings


def bench_target(root: Path, target: str, settings: list[str], sdedit_seconds: float | None = None) -> dict[str, Any]:
    """One target: the campaign, its time-matched SDEdit search (or one of sdedit_seconds), and the evaluation of
    both against the source."""
    config = load_config(EXAMPLE, settings)
    check_config(config)
    tic = time.perf_counter()
    executor = make_executor(config)
    try:
        campaign = run_campaign(config, executor, CampaignStore.create(config), progress=False)
    finally:
        executor.close()
    sdedit = sdedit_search(campaign.output_dir, sdedit_seconds, progress=False)
    report = evaluate_campaign(campaign.output_dir, progress=lambda line: None)
    attribute = report["attribute"]
    best, top = report["rows"][0], report["rows"]
    sde = report["baselines"][0] if report["baselines"] else None
    target_share = (report["target"]["shares"] or {}).get(attribute)
    return {
        "target": target,
        "attribute": attribute,
        "wanted_share": TARGET_RED_SHARE.get(target),
        "target_share": None if target_share is None else target_share["share"],
        "chains": len(campaign.rows),
        "chains_failed": sum(r.failed for r in campaign.rows),
        "mlgd_f_seconds": campaign.wall_seconds,
        "sdedit_variations": sdedit["variations"],
        "sdedit_seconds": sdedit["used_seconds"],
        "source_mmd": report["source"]["mmd"],
        "source_share": report["source"]["shares"][attribute]["share"],
        "mlgd_f_mmd": best["mmd"],
        "mlgd_f_improvement": best["improvement"],
        "mlgd_f_top5_mean_improvement": sum(r["improvement"] for r in top) / len(top),
        "mlgd_f_share": best["shares"][attribute]["share"],
        "mlgd_f_share_low": best["shares"][attribute]["low"],
        "mlgd_f_share_high": best["shares"][attribute]["high"],
        "sdedit_improvement": None if sde is None else sde["improvement"],
        "sdedit_share": None if sde is None else sde["shares"][attribute]["share"],
        "poster_improvement": POSTER_IMPROVEMENT[target],
        "evaluation_samples": report["samples"],
        "folder": campaign.output_dir,
        "picture": str(Path(campaign.output_dir) / "evaluation.png"),
        "seconds": time.perf_counter() - tic,
    }


def _percent(value: float | None, signed: bool = True) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%" if signed else f"{100 * value:.1f}%"


def poster_table(rows: list[dict[str, Any]]) -> str:
    """The poster's table: improvement over the source per target, with shares, SDEdit and the ratio."""
    lines = ["| target | MLGD-F improvement (poster) | top-5 mean | share of the attribute [95% CI] | target share | "
             "source share | SDEdit search improvement | MLGD-F / SDEdit |", "|" + "---|" * 8]  # fmt: skip
    for r in rows:
        ratio = None if not r["sdedit_improvement"] or r["sdedit_improvement"] <= 0 else \
            r["mlgd_f_improvement"] / r["sdedit_improvement"]  # fmt: skip
        share = (f"{r['attribute']} {_percent(r['mlgd_f_share'], False)} [{_percent(r['mlgd_f_share_low'], False)}, "
                 f"{_percent(r['mlgd_f_share_high'], False)}]")  # fmt: skip
        lines.append(
            f"| {r['target']} | {_percent(r['mlgd_f_improvement'])} ({_percent(r['poster_improvement'])}) | "
            f"{_percent(r['mlgd_f_top5_mean_improvement'])} | {share} | {_percent(r['target_share'], False)} | "
            f"{_percent(r['source_share'], False)} | {_percent(r['sdedit_improvement'])} | "
            f"{'-' if ratio is None else f'{ratio:.1f}x'} |"
        )
    return "\n".join(lines) + "\n"


def bench_scribbles(
    json_path: str | None,
    targets: tuple[str, ...] = TARGETS,
    quick: bool = False,
    chains: int | None = None,
    checkpoints: str | None = None,
    keep: str | None = None,
) -> dict[str, Any]:
    """Every target through cdm run / cdm baseline sdedit / cdm evaluate; JSON + markdown (+ the pictures)."""
    tic = time.perf_counter()
    root = Path(keep or "out/bench_scribbles")  # campaigns, MLflow store and SDEdit rounds (not the repository)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    folder = Path(checkpoints) if checkpoints else None
    rows = []
    for target in targets:
        print(f"scribbles: {target} ...", flush=True)
        settings = target_settings(root, target, folder, quick, chains)
        rows.append(bench_target(root, target, settings, QUICK_SDEDIT_SECONDS if quick else None))
        print(f"scribbles: {target}: MLGD-F {_percent(rows[-1]['mlgd_f_improvement'])}, SDEdit search "
              f"{_percent(rows[-1]['sdedit_improvement'])} ({rows[-1]['seconds']:.0f} s)", flush=True)  # fmt: skip
    pictures = []
    if json_path is not None:
        for row in rows:
            picture = Path(row["picture"])
            if picture.is_file():
                copy = Path(json_path).parent / f"scribbles_{row['target']}.png"
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(picture, copy)
                pictures.append(str(copy))
    config = load_config(EXAMPLE, target_settings(root, targets[0], folder, quick, chains))
    payload = {
        "problem": "scribbles",
        "settings": {
            "num_steps": config.method.num_steps,
            "n_c": config.method.n_c,
            "chains": config.chains.count,
            "strength": config.chains.source.strength,
            "zeta": [z.model_dump() for z in config.chains.zeta],
            "placement": config.resources.placement,
            "evaluation_samples": config.evaluation.samples,
        },
        "environment": environment(torch.device("cpu")),
        "rows": rows,
        "pictures": pictures,
        "wall_seconds": time.perf_counter() - tic,
    }
    columns = ["target", "chains", "chains_failed", "mlgd_f_seconds", "sdedit_variations", "sdedit_seconds",
               "source_mmd", "mlgd_f_mmd", "mlgd_f_improvement", "sdedit_improvement"]  # fmt: skip
    markdown = (
        f"Scribbles (MLGD-F paper, Exp. 2 at small scale): {config.chains.count} chains, {config.method.num_steps} "
        f"steps from strength {config.chains.source.strength}, n_c = {config.method.n_c}, split placement on Ray; "
        f"each design evaluated on {config.evaluation.samples} fresh generated images; the SDEdit search ran for "
        f"the campaign's wall time. Whole bench: {payload['wall_seconds'] / 60:.1f} min.\n\n"
        + poster_table(rows)
        + "\n"
        + markdown_table(rows, columns)
    )
    write_report(payload, json_path, markdown)
    return payload
