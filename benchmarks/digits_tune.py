"""Issue 25's `cdm tune` study on the uniform digits target, judged: which settings matter, and are the x* 0s?

`cdm tune examples/tune_digits_zeros.yaml --trials 20`, then
`python -m benchmarks.digits_tune out/campaigns/study-tune-digits-zeros` (writes benchmarks/results/digits_zeros_tune.*)

Per complete trial (its campaign folder holds every chain's x*, held-out loss and prior_fit): the study's objective and
constraint, then the top 5 by held-out loss among its chains within the study's prior_fit limit (as the bench), the
judge's digits among them and among all chains within the limit, and their f(x*) spread. Optuna's parameter importances
(fANOVA) for the objective and for the 0s within the limit; pictures of the best trial's top 5 and of the trial with
the most 0s.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import optuna
import torch

from benchmarks.digits import circular_spread, draw_circle, draw_grid, nearest_digits, top_within_limit
from benchmarks.report import markdown_table, write_report
from cdm_dist.driver.campaign import load_config
from cdm_dist.driver.store import CampaignStore
from cdm_dist.problems.digits import from_model_space
from cdm_dist.problems.judge import judge_digits, load_judge
from cdm_dist.problems.shipped import digits_problem
from tuning.study import CAMPAIGN_DIR, CONSTRAINT, OUTCOME, PRIOR_FIT_LIMIT, objective_words

SPREAD_DRAWS = 500  # f(x*) draws per x* for its spread (as the bench)


def open_study(folder: Path) -> optuna.Study:
    """The study in a `cdm tune` folder (its journal file), read-only use."""
    backend = optuna.storages.journal.JournalFileBackend(str(folder.resolve() / "optuna.journal"))
    storage = optuna.storages.JournalStorage(backend)
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def trial_chains(campaign: Path) -> dict[str, torch.Tensor]:
    """A trial's chains from its campaign folder: x (B, 1, 16, 16), final_loss (B,), prior_fit (B,), in chain order."""
    store = CampaignStore.open(campaign)
    parts = []
    index = 0
    while (loaded := store.load_result(index)) is not None:
        parts.append(loaded[0])
        index += 1
    return {
        "x": torch.cat([p.x for p in parts]),
        "final_loss": torch.cat([p.final_loss for p in parts]),
        "prior_fit": torch.cat([p.metrics["prior_fit"] for p in parts]),
    }


def judge_trial(chains: dict[str, torch.Tensor], limit: float, judge: Any, sampler: Any) -> dict[str, Any]:
    """The top 5 within the limit, judged, with their f(x*) spread; and the 0s among all chains within the limit."""
    loss, fit = chains["final_loss"].double(), chains["prior_fit"].double()
    top = top_within_limit(loss, fit, limit)
    within = ~((fit > limit) & fit.isfinite())
    labels, _ = judge_digits(judge, from_model_space(chains["x"].float()))
    x_top = chains["x"][top].float()
    with torch.no_grad():
        eta = torch.randn((len(x_top), SPREAD_DRAWS, *sampler.noise_shape), generator=torch.Generator().manual_seed(0))
        spread = circular_spread(sampler.sample(x_top.to(eta.dtype), eta)).tolist() if len(top) else []
    judged = [labels[i] for i in top.tolist()]
    return {
        "chains": len(loss),
        "within_limit": int(within.sum()),
        "zeros_within_limit": sum(labels[i] == 0 and bool(within[i]) for i in range(len(labels))),
        "zeros_all": labels.count(0),
        "judged_by_chain": labels,
        "top5_chains": top.tolist(),
        "top5_judged_digits": judged,
        "top5_zeros": judged.count(0),
        "top5_loss_mean": float(loss[top].mean()) if len(top) else None,
        "top5_spread_mean": sum(spread) / len(spread) if spread else None,
        "top5_prior_fit_mean": float(fit[top].mean()) if len(top) else None,
        "median_prior_fit": float(fit.nanmedian()),
    }


def importances(study: optuna.Study, target: dict[int, float]) -> dict:
    """fANOVA importances of the knobs for the objective and for a per-trial measure (trial number -> value)."""
    out: dict[str, Any] = {}
    for name, pick in (("objective", None), ("zeros_within_limit", lambda t: target[t.number])):
        try:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            values = optuna.importance.get_param_importances(study, evaluator=evaluator, target=pick)
        except Exception as exc:  # too few complete trials, or a measure that never varies
            out[name] = f"not computable ({type(exc).__name__}: {exc})"
            continue
        out[name] = {k: round(v, 3) for k, v in values.items()}
    return out


def analyse(
    folder: Path,
    json_path: str | None,
    pictures: bool = True,
    baselines: tuple[Path, ...] = (),
    summary: dict[str, Any] | None = None,
    other: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The study in `folder`, judged: a row per complete trial, importances, pictures beside json_path. Baselines:
    the study's own unguided chains (that set its limit) and any other campaign folders (e.g. the trials' seeds
    unguided), judged the same way: the 0s the prior makes by itself."""
    study = open_study(folder)
    limit = float(study.user_attrs[PRIOR_FIT_LIMIT])
    judge = load_judge()
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    config = load_config(Path(complete[0].user_attrs[CAMPAIGN_DIR]) / "config.yaml") if complete else None
    args = config.problem.args if config else {}
    problem = digits_problem(args.get("digits_target", "uniform"), fast_steps=args.get("fast_steps"))
    rows, xs = [], {}
    for trial in complete:
        chains = trial_chains(Path(trial.user_attrs[CAMPAIGN_DIR]))
        row = {"trial": trial.number, "objective": trial.value, **{k: _plain(v) for k, v in trial.params.items()}}
        row["feasible"] = trial.constraints.get(CONSTRAINT, 0.0) <= 0 if trial.constraints else True
        row |= judge_trial(chains, limit, judge, problem.fast_sampler)
        xs[trial.number] = chains["x"][row["top5_chains"]].float()
        rows.append(row)
    rows.sort(key=lambda r: (not r["feasible"], r["objective"]))
    plain = {}
    for campaign in [*sorted(folder.glob("*-unguided-*")), *baselines]:
        plain[campaign.name] = judge_trial(trial_chains(campaign), limit, judge, problem.fast_sampler)
    zeros = {r["trial"]: float(r["zeros_within_limit"]) for r in rows}
    payload: dict[str, Any] = {
        "study": study.study_name,
        "folder": str(folder),
        "prior_fit_limit": limit,
        "trials": len(study.trials),
        "trials_complete": len(complete),
        "trials_not_complete": {
            t.number: t.user_attrs.get(OUTCOME, t.state.name)
            for t in study.trials
            if t.state != optuna.trial.TrialState.COMPLETE
        },
        "objective": objective_words(config) if config else None,
        "loss": config.method.loss.name if config else None,
        "dtype": config.method.dtype if config else None,
        "feasible": "the trial's median prior_fit within the study's limit (Optuna constraint)",
        "selection": "top 5 by held-out loss among the trial's chains within the prior_fit limit (as the bench)",
        "importances": importances(study, zeros),
        "objective_vs_zeros_within_limit": _spearman([r["objective"] for r in rows], list(zeros.values())),
        "baselines": plain,
        "cdm_tune_summary": summary,
        "paired": paired(rows, other) if other else None,
        "rows": rows,
    }
    out = Path(json_path).parent if json_path else folder
    stem = Path(json_path).stem if json_path else "digits_zeros_tune"  # the pictures' names start with the JSON's
    feasible = [r for r in rows if r["feasible"]]
    picks = {"best": feasible[0] if feasible else None,
             "most_zeros": max(rows, key=lambda r: (r["top5_zeros"], -r["objective"])) if rows else None}  # fmt: skip
    for name, row in picks.items():
        if not pictures or row is None or not len(xs[row["trial"]]):
            continue
        x = xs[row["trial"]]
        labels, _ = nearest_digits(x)
        judged, confidence = judge_digits(judge, from_model_space(x))
        title = f"study {study.study_name}, trial {row['trial']} ({name}): top-5 x* within the prior_fit limit"
        payload[f"{name}_trial"] = row["trial"]
        payload[f"{name}_grid_png"] = str(draw_grid(x, labels, out / f"{stem}_{name}_top5.png", title,
                                                    judged, confidence))  # fmt: skip
        circle = draw_circle(problem, x, "uniform", out / f"{stem}_{name}_circle.png")
        payload[f"{name}_circle_png"] = str(circle)
    columns = ["trial", "objective", "feasible", *sorted({k for t in complete for k in t.params}), "within_limit",
               "zeros_within_limit", "judged_by_chain", "top5_judged_digits", "top5_zeros", "top5_loss_mean",
               "top5_spread_mean", "top5_prior_fit_mean", "median_prior_fit"]  # fmt: skip
    baseline_rows = [{"campaign": name, **row} for name, row in plain.items()]
    markdown = "\n\n".join([
        f"Study {study.study_name}: {payload['objective']}; prior_fit limit {limit:.4g} ({payload['feasible']})",
        markdown_table(rows, columns),
        "Baselines (unguided chains, judged the same way):",
        markdown_table(baseline_rows, ["campaign", *columns[columns.index("within_limit"):]]),
        f"fANOVA importances: {json.dumps(payload['importances'])}",
        f"objective vs 0s within the limit: {json.dumps(payload['objective_vs_zeros_within_limit'])}",
        f"paired trials: {json.dumps(payload['paired'])}",
    ])  # fmt: skip
    write_report(payload, json_path, markdown)
    return payload


def paired(rows: list[dict[str, Any]], other: dict[str, Any]) -> dict[str, Any]:
    """Trials with the same parameters in this study and another's analysis JSON (two studies with one TPE seed
    share their first, random, trials): their 0s within the limit and in the top 5, summed over the pairs."""
    knobs = lambda r: {k: v for k, v in r.items() if k.startswith(("chains.", "method."))}  # noqa: E731
    theirs = {json.dumps(knobs(r), sort_keys=True): r for r in other["rows"]}
    pairs = [(r, theirs[json.dumps(knobs(r), sort_keys=True)]) for r in rows if json.dumps(knobs(r), sort_keys=True)
             in theirs]  # fmt: skip
    return {
        "other": other.get("study"),
        "other_loss": other.get("loss"),
        "trials": sorted(r["trial"] for r, _ in pairs),
        "zeros_within_limit": [sum(r["zeros_within_limit"] for r, _ in pairs),
                               sum(o["zeros_within_limit"] for _, o in pairs)],
        "top5_zeros": [sum(r["top5_zeros"] for r, _ in pairs), sum(o["top5_zeros"] for _, o in pairs)],
        "order": "[this study, the other]",
    }  # fmt: skip


def _spearman(a: list[float], b: list[float]) -> dict[str, float] | None:
    """Spearman's rank correlation and its p-value (None below 3 pairs or when a side is constant)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    result = spearmanr(a, b)
    return {"spearman_rho": float(result.statistic), "p_value": float(result.pvalue), "trials": len(a)}


def _plain(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="the study's folder (output/study-NAME)")
    parser.add_argument("--json", default="benchmarks/results/digits_zeros_tune.json")
    parser.add_argument("--baseline", action="append", default=[], help="another campaign folder to judge")
    parser.add_argument("--summary", help="the study's `cdm tune --json` summary, kept in the output")
    parser.add_argument("--compare", help="another study's analysis JSON: its trials with the same parameters")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    summary = json.loads(Path(args.summary).read_text()) if args.summary else None
    other = json.loads(Path(args.compare).read_text()) if args.compare else None
    baselines = tuple(Path(b) for b in args.baseline)
    payload = analyse(Path(args.folder), args.json, baselines=baselines, summary=summary, other=other)
    print(json.dumps(payload["baselines"], indent=1))
    print(json.dumps(payload["importances"], indent=1))
    for row in payload["rows"]:
        print({k: v for k, v in row.items() if k not in ("top5_chains", "judged_by_chain")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
