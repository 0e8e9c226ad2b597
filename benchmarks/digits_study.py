"""What makes 0s appear on the uniform digits target: a hand-run grid around the paper protocol (issue 25).

`python -m benchmarks.digits_study --json benchmarks/results/digits_zeros_study.json [--cells a,b] [--seeds 15]
[--first-seed 0] [--scales 0.1,0.3,1.0]`

Each cell changes settings of `paper_settings("uniform")`; every cell runs the same seeds at each step length
(per-chain ζ schedules in one batch). Per cell and step length: the judge's 0s among the top 5 by held-out loss within
the prior_fit limit (the held-out digits' 95% quantile, as `cdm bench digits`; cells run before issue 25's study used
the unguided chains' 95% quantile, each row records its limit) and among all chains within it, the f(x*) spread and
prior_fit.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.digits import (
    PAPER_FAST_STEPS,
    circular_spread,
    heldout_prior_fit,
    paper_settings,
    prior_fit_limit,
    top_within_limit,
)
from cdm_dist.chains.config import MLGDConfig, ZetaConfig
from cdm_dist.chains.losses import MMDLoss
from cdm_dist.chains.mlgd import Chains
from cdm_dist.driver.methods import run_method
from cdm_dist.problems.digits import from_model_space
from cdm_dist.problems.judge import judge_digits, load_judge
from cdm_dist.problems.shipped import digits_problem

SCALES = (0.1, 0.3, 1.0)  # ζ step lengths in pixels (linear schedule, final ratio 0.1), per chain
STUDY = {"grad": "identity", "guidance_min_t": 100, "cleanup_eta": 1.0}  # the first round's changes


def cells() -> dict[str, dict[str, Any]]:
    """Cell name -> the MLGDConfig fields it changes from the paper protocol's uniform settings."""
    return {
        "paper": {},
        "no_window": {"guidance_min_t": 0},
        "identity_grad": {"grad": "identity"},
        "mmd": {"loss": MMDLoss()},
        "steps_100": {"num_steps": 100, "guidance_min_t": 0, "guidance_stop": 0.8},
        "sw2": {"loss": paper_settings("uniform")[0].loss.model_copy(update={"p": 2})},
        "window_100": {"guidance_min_t": 100},
        "unguided": {"guidance": False},  # the prior alone on the same seeds: the 0s it makes by itself
        # following the study's finding that grad matters for 0s (all with the identity gradient):
        "identity_window_100": {"grad": "identity", "guidance_min_t": 100},
        "identity_cleanup": {"grad": "identity", "cleanup_eta": 1.0},  # fresh noise after the t >= 250 window
        "identity_cleanup_03": {"grad": "identity", "cleanup_eta": 0.3},
        "identity_eta_1": {"grad": "identity", "eta": 1.0},  # DDPM noise at every step
        "study": STUDY,  # the first round's `--protocol study`
        # around `study` (issue 25, second round): the guidance's noise, its loss and its window; study_mmd is
        # `--protocol study`'s uniform target since that round
        "study_nc256": STUDY | {"n_c": 256},
        "study_nguess3": STUDY | {"n_guess": 3},
        "study_mmd": STUDY | {"loss": MMDLoss()},
        "study_window_50": STUDY | {"guidance_min_t": 50},
        "study_start_01": STUDY | {"guidance_start": 0.1},
    }


def run_cell(
    config: MLGDConfig,
    zeta: ZetaConfig,
    seeds: int,
    judge: Any,
    limit: float,
    scales: tuple[float, ...] = SCALES,
    first_seed: int = 0,
) -> list[dict]:
    """One cell: every seed at every step length; a row per step length."""
    problem = digits_problem("uniform", fast_steps=PAPER_FAST_STEPS)
    scales = scales if config.guidance else (0.0,)
    schedules = [zeta.model_copy(update={"scale": s}) for s in scales for _ in range(seeds)]
    start = time.perf_counter()
    chains = Chains.make(list(range(first_seed, first_seed + seeds)) * len(scales), schedules)
    result = run_method(problem, "mlgd_f", chains, config)
    seconds = time.perf_counter() - start
    labels, _ = judge_digits(judge, from_model_space(result.x.float()))
    with torch.no_grad():
        eta = torch.randn((len(result.x), 500, 2), generator=torch.Generator().manual_seed(0))
        spread = circular_spread(problem.fast_sampler.sample(result.x.float(), eta))  # (B,)
    rows = []
    for k, scale in enumerate(scales):
        part = slice(k * seeds, (k + 1) * seeds)
        loss, fit = result.final_loss[part].cpu(), result.metrics["prior_fit"][part].cpu()
        top = top_within_limit(loss, fit, limit)
        within = torch.nonzero(~((fit > limit) & fit.isfinite()))[:, 0].tolist()
        judged = labels[part]
        rows.append(
            {
                "scale": scale,
                "seeds": seeds,
                "first_seed": first_seed,
                "top5_judged": [judged[i] for i in top.tolist()],
                "top5_zeros": [judged[i] for i in top.tolist()].count(0),
                "zeros_within_limit": sum(judged[i] == 0 for i in within),
                "within_limit": len(within),
                "top5_spread_mean": float(spread[part][top].mean()),
                "top5_prior_fit_mean": float(fit[top].mean()),
                "top5_loss_mean": float(loss[top].mean()),
                "median_loss": float(loss.median()),
                "prior_fit_limit": limit,
                "seconds": seconds / len(scales),
            }
        )
    return rows


@torch.no_grad()
def class_losses(samples: int = 512, seed: int = 0, kind: str = "flow") -> dict[str, dict[str, float]]:
    """Real held-out digits at random angles under the uniform target: per class, the mean and least sliced W1 to
    the uniform circle and the mean f(x) spread. A class the sampler reads as angle-free has a low loss and spread."""
    import math

    from cdm_dist.problems.digits import base_digits, rotate, target_samples, to_model_space

    problem = digits_problem("uniform", fast_steps=PAPER_FAST_STEPS, sampler_kind=kind)
    noise = problem.fast_sampler.noise_shape
    images, labels = base_digits("heldout")
    gen = torch.Generator().manual_seed(seed)
    x = to_model_space(rotate(images, 2 * math.pi * torch.rand(len(images), generator=gen)))
    y = problem.fast_sampler.sample(x, torch.randn(len(x), samples, *noise, generator=gen)).double()  # (N, samples, 2)
    loss = paper_settings("uniform")[0].loss.build()(y, target_samples("uniform", samples, seed + 1))  # (N,)
    spread = circular_spread(y)  # (N,)
    return {
        str(d): {"count": int((labels == d).sum()), "sw1_mean": float(loss[labels == d].mean()),
                 "sw1_min": float(loss[labels == d].min()), "spread_mean": float(spread[labels == d].mean())}
        for d in range(10)
    }  # fmt: skip


@torch.no_grad()
def ring_probe(samples: int = 512, seed: int = 0, kind: str = "flow") -> list[dict[str, Any]]:
    """Synthetic round rings (radius, width in px): the most rotation-invariant 0s. Their true P(θ | x) is uniform;
    what the shipped sampler, the judge and the prior make of them."""
    from cdm_dist.chains.priors import prior_fit
    from cdm_dist.problems.digits import SIZE, target_samples, to_model_space

    problem = digits_problem("uniform", fast_steps=PAPER_FAST_STEPS, sampler_kind=kind)
    centre = torch.arange(SIZE, dtype=torch.float64) - (SIZE - 1) / 2
    r = (centre[:, None] ** 2 + centre[None, :] ** 2).sqrt()  # (16, 16)
    shapes = [(3.0, 0.9), (3.5, 1.0), (4.0, 1.2), (4.5, 1.3)]
    images = torch.stack([torch.exp(-(((r - a) / w) ** 2)) for a, w in shapes])[:, None].float()  # (4, 1, 16, 16)
    x = to_model_space(images)
    gen = torch.Generator().manual_seed(seed)
    y = problem.fast_sampler.sample(x, torch.randn(len(x), samples, *problem.fast_sampler.noise_shape, generator=gen))
    y = y.double()  # (4, samples, 2)
    loss = paper_settings("uniform")[0].loss.build()(y, target_samples("uniform", samples, seed + 1))
    judged, confidence = judge_digits(load_judge(), images)
    fit = prior_fit(problem.prior, x.double(), paper_settings("uniform")[0].eval_seed)
    return [
        {
            "radius": a,
            "width": w,
            "judged": d,
            "confidence": c,
            "spread": float(sp),
            "sw1": float(lo),
            "prior_fit": float(f),
        }
        for (a, w), d, c, sp, lo, f in zip(shapes, judged, confidence, circular_spread(y), loss, fit, strict=True)
    ]


@torch.no_grad()
def half_turn_probe(samples: int = 256, angles: int = 2, seed: int = 0, kind: str = "flow") -> dict[str, Any]:
    """Does the sampler tell a held-out digit at θ from the same digit at θ + π? Per class, over every held-out digit
    at `angles` random angles: the share of f(x) draws on the true half of the circle (|angle - θ| < π/2; 0.5 for a
    digit whose angle is ambiguous up to a half turn, as a calibrated sampler would give a half-turn-symmetric
    shape), the share of digits whose mean f(x) direction is within 45° of θ + π (read upside down), the spread,
    and the digit's own half-turn asymmetry |x - rot180(x)| / |x| in pixels (0 for a half-turn-symmetric image);
    and, over all digits, a reliability table of the half-turn call (confidence against accuracy)."""
    import math

    from cdm_dist.problems.digits import angle_of, base_digits, rotate, to_model_space

    problem = digits_problem("uniform", fast_steps=PAPER_FAST_STEPS, sampler_kind=kind)
    noise = problem.fast_sampler.noise_shape
    images, labels = base_digits("heldout")
    turned = rotate(images, torch.full((len(images),), math.pi))
    asymmetry = (images - turned).flatten(1).norm(dim=1) / images.flatten(1).norm(dim=1)  # (N,)
    gen = torch.Generator().manual_seed(seed)
    images, labels, asymmetry = images.repeat(angles, 1, 1, 1), labels.repeat(angles), asymmetry.repeat(angles)
    theta = 2 * math.pi * torch.rand(len(images), generator=gen)
    x = to_model_space(rotate(images, theta))
    y = problem.fast_sampler.sample(x, torch.randn(len(x), samples, *noise, generator=gen)).double()  # (N, samples, 2)
    wrap = lambda a: torch.remainder(a + math.pi, 2 * math.pi) - math.pi  # noqa: E731
    error = wrap(angle_of(y) - theta[:, None].double())  # (N, samples)
    mean_error = wrap(torch.atan2(y[..., 1].mean(1), y[..., 0].mean(1)) - theta.double())  # (N,)
    true_half = (error.abs() < math.pi / 2).double().mean(1)  # (N,)
    flipped = (mean_error.abs() > 3 * math.pi / 4).double()  # (N,)
    spread = circular_spread(y)
    # calibration of the half-turn call: confidence = the share of draws within π/2 of the draws' mean direction,
    # correct = that mean direction within π/2 of θ; a calibrated sampler's accuracy equals its confidence per bin
    confidence = (wrap(angle_of(y) - (mean_error + theta.double())[:, None]).abs() < math.pi / 2).double().mean(1)
    correct = (mean_error.abs() < math.pi / 2).double()
    reliability = []
    for low, high in ((0.5, 0.8), (0.8, 0.95), (0.95, 0.99), (0.99, 1.01)):
        inside = (confidence >= low) & (confidence < high)
        reliability.append({"confidence": f"[{low}, {min(high, 1.0)}{']' if high > 1 else ')'}",
                            "digits": int(inside.sum()), "zeros": int((inside & (labels == 0)).sum()),
                            "mean_confidence": float(confidence[inside].mean()) if inside.any() else None,
                            "accuracy": float(correct[inside].mean()) if inside.any() else None})  # fmt: skip
    by_class = {
        str(d): {"count": int((labels == d).sum()), "true_half_share": float(true_half[labels == d].mean()),
                 "read_upside_down": float(flipped[labels == d].mean()),
                 "spread_mean": float(spread[labels == d].mean()),
                 "median_abs_error_deg": float(error[labels == d].abs().median().rad2deg()),
                 "half_turn_asymmetry": float(asymmetry[labels == d].mean())}
        for d in range(10)
    }  # fmt: skip
    return by_class | {"reliability": reliability}


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A cell's rows after a run: the new ones replace those of the same step length and seeds, the others stay."""
    key = lambda row: (row["scale"], row["seeds"], row.get("first_seed", 0))  # noqa: E731
    fresh = {key(row) for row in new}
    return [row for row in old if key(row) not in fresh] + new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="benchmarks/results/digits_zeros_study.json")
    parser.add_argument("--cells", default=",".join(cells()))
    parser.add_argument("--seeds", type=int, default=15)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first..first+seeds-1")
    parser.add_argument("--scales", default=",".join(map(str, SCALES)), help="ζ step lengths in pixels, per cell")
    args = parser.parse_args(argv)
    scales = tuple(float(s) for s in args.scales.split(","))
    torch.set_num_threads(1)
    judge = load_judge()
    base, zeta = paper_settings("uniform")
    path = Path(args.json)
    done = json.loads(path.read_text()) if path.is_file() else {}
    done["heldout_classes"] = class_losses()  # the 6-step Euler flow of the paper protocol
    done["rings"] = ring_probe()
    done["heldout_classes_consistency"] = class_losses(kind="consistency")  # the re-noised 6-step sampler
    done["rings_consistency"] = ring_probe(kind="consistency")
    done["half_turn"] = half_turn_probe()  # does the sampler tell a digit at θ from θ + π?
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(done, indent=1) + "\n")
    limit = prior_fit_limit(heldout_prior_fit(digits_problem("uniform", fast_steps=PAPER_FAST_STEPS), base.eval_seed))
    for name in [c for c in args.cells.split(",") if c]:
        config = base.model_copy(update=cells()[name])
        config = MLGDConfig.model_validate(config.model_dump())  # validated again after the update
        rows = run_cell(config, zeta, args.seeds, judge, limit, scales, args.first_seed)
        rows = merge_rows(done.get(name, {}).get("rows", []), rows)
        done[name] = {"changes": {k: str(v) for k, v in cells()[name].items()}, "rows": rows}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(done, indent=1) + "\n")
        for row in rows:
            print(name, {k: v for k, v in row.items() if k not in ("prior_fit_limit",)}, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
