"""`cdm bench digits`: MLGD-F on rotated digits (MLGD-F paper, Exp. 1): top-5 x* per target on the circle."""

from __future__ import annotations

import math
import time
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.report import environment, markdown_table, write_report
from cdm_dist.chains.config import MLGDConfig, ZetaConfig
from cdm_dist.chains.losses import MMDLoss, SlicedWassersteinLoss
from cdm_dist.chains.mlgd import Chains
from cdm_dist.chains.priors import prior_fit
from cdm_dist.driver.methods import run_method
from cdm_dist.errors import InputError
from cdm_dist.models.spec import CDMProblem
from cdm_dist.problems.digits import (
    angle_of,
    base_digits,
    from_model_space,
    rotate,
    target_angles,
    to_model_space,
)
from cdm_dist.problems.shipped import digits_problem


def settings(quick: bool, n_c: int | None = None) -> tuple[MLGDConfig, ZetaConfig]:
    """MLGD-F on digits: 100 DDIM steps, identity gradient, normalised steps (zeta is a step length in pixels),
    the last 20% unguided so the prior brings x back onto digits. Much stronger guidance finds noise images that
    fool the sampler (lower loss, no digits); `cdm tune` rules those out with its prior_fit limit."""
    n_c = n_c or (16 if quick else 64)
    steps = 10 if quick else 100
    config = MLGDConfig(num_steps=steps, n_c=n_c, target_batch=250, n_guess=1, grad="identity", guidance_stop=0.8)
    return config, ZetaConfig(kind="linear", scale=0.3, final=0.1, normalize=True)


PROTOCOLS = ("default", "paper", "study")
PAPER_SEEDS = 15  # chains per target in the MLGD-F code's MNIST runs; the top 5 by final loss are reported
PAPER_STEPS = {"uniform": 290, "bimodal": 125, "unimodal": 130}  # its DDIM steps per target
PAPER_MIN_T = {"uniform": 250}  # guidance off for t < 250 on the uniform target: the last steps only clean up
PAPER_FAST_STEPS = 6  # its consistency sampler takes 6 steps (ts 150 -> 1); here 6 Euler steps of the shipped flow
PAPER_ZETA = ZetaConfig(kind="linear", scale=0.1, final=0.1, normalize=True)  # step length in pixels (study)
PAPER_ZETA_FACTOR = {"unimodal": 2.0}  # its step_size_mode: 'double' on the unimodal target, 'original' elsewhere
PAPER_N_C = 128  # conditional samples per guess (the MLGD-F code: 1500, 600 uniform; scaled to the 2-core CPU)


def paper_settings(kind: str, quick: bool = False, n_c: int | None = None) -> tuple[MLGDConfig, ZetaConfig]:
    """The MLGD-F code's MNIST protocol for one target through this project's knobs: its steps per target, the
    guidance window t >= 250 on the uniform target, the sliced W1 loss over 50 directions and a full gradient
    through Tweedie; step lengths normalised (this prior's pixels and sampler are not theirs)."""
    config = MLGDConfig(
        num_steps=10 if quick else PAPER_STEPS[kind],
        n_c=n_c or (16 if quick else PAPER_N_C),
        target_batch=250,
        n_guess=1,
        grad="full",
        guidance_min_t=PAPER_MIN_T.get(kind, 0),
        loss=SlicedWassersteinLoss(n_projections=50, p=1),
    )
    zeta = PAPER_ZETA.model_copy(update={"scale": PAPER_ZETA.scale * PAPER_ZETA_FACTOR.get(kind, 1.0)})
    return config, zeta


STUDY_ZETA_SCALE = {"uniform": 0.2}  # issue 25's study: the uniform target's step length in pixels ...
STUDY_MIN_T = {"uniform": 100}  # ... and guidance down to t = 100, then a stochastic clean-up (cleanup_eta 1), ...
STUDY_LOSS = {"uniform": MMDLoss()}  # ... and MMD² (median bandwidth) in place of the sliced W1


def study_settings(kind: str, quick: bool = False, n_c: int | None = None) -> tuple[MLGDConfig, ZetaConfig]:
    """The paper protocol with what issue 25's study found makes the uniform target's 0s: the identity gradient (the
    full one leads to cross-shaped non-digits), and on the uniform target guidance down to t = 100, ζ 0.2, then the
    unguided steps with fresh noise (cleanup_eta 1) so the prior washes out what guidance left off its manifold, and
    MMD² as the loss: the chains make as many 0s as under the sliced W1, but MMD² ranks them first."""
    config, zeta = paper_settings(kind, quick, n_c)
    window = {"guidance_min_t": STUDY_MIN_T[kind]} if kind in STUDY_MIN_T else {}
    loss = {"loss": STUDY_LOSS[kind]} if kind in STUDY_LOSS else {}
    config = config.model_copy(update={"grad": "identity", "cleanup_eta": 1.0, **window, **loss})
    return config, zeta.model_copy(update={"scale": STUDY_ZETA_SCALE.get(kind, zeta.scale)})


def top_within_limit(
    final_loss: torch.Tensor, prior_fit: torch.Tensor, limit: float | None, k: int = 5
) -> torch.Tensor:
    """Indices of the k lowest final losses among chains whose prior_fit is within the limit (as `cdm tune`'s and the
    campaign report's selection: a NaN prior_fit is not over it); final_loss, prior_fit (B,) -> (<= k,)."""
    over = (prior_fit > limit) & prior_fit.isfinite() if limit is not None else torch.zeros_like(final_loss).bool()
    ok = torch.nonzero(~over & final_loss.isfinite())[:, 0]  # (M,)
    return ok[torch.argsort(final_loss[ok], stable=True)[:k]]


BLOCK = 64  # seeds per block when a run's top 5 is also reported per block: the bench's --chains 64


def block_tops(final_loss: torch.Tensor, prior_fit: torch.Tensor, limit: float | None, block: int = BLOCK):
    """top_within_limit of each block of `block` consecutive seeds, as indices into the whole batch."""
    return [top_within_limit(final_loss[first : first + block], prior_fit[first : first + block], limit) + first
            for first in range(0, len(final_loss), block)]  # fmt: skip


def prior_fit_limit(prior_fit: torch.Tensor) -> float:
    """A prior_fit limit: the 95% quantile of reference scores (B,) (`cdm tune`'s "auto" limit: unguided chains')."""
    return float(torch.nanquantile(prior_fit.double(), 0.95))


HELDOUT_ROTATION_SEED = 0  # the held-out digits' random rotations when scoring them for the limit


def heldout_prior_fit(problem: CDMProblem, seed: int) -> torch.Tensor:
    """prior_fit of every held-out digit at a random rotation, (N,): what real digits score under the prior. The
    selection's limit is their 95% quantile: the prior's own samples score lower (cleaner than real digits), so
    their quantile rejects 36% of real 0s, the digit with the most ink (benchmarks/results/digits_paper.json)."""
    images, _ = base_digits("heldout")
    turns = torch.rand(len(images), generator=torch.Generator().manual_seed(HELDOUT_ROTATION_SEED))  # (N,)
    x = to_model_space(rotate(images, 2 * math.pi * turns))  # (N, 1, 16, 16)
    return prior_fit(problem.prior, x, seed)


ZETA_SCALES = (0.15, 0.3, 0.6)  # per-chain schedules cycled over the chains: step lengths in pixels ...
ZETA_FINALS = (0.1, 0.3)  # ... and end-to-start ratios


def chain_schedules(zeta: ZetaConfig, chains: int) -> list[ZetaConfig]:
    """Chain k's zeta schedule: the settings' schedule at grid point k modulo the grid of scales x final ratios."""
    grid = [zeta.model_copy(update={"scale": a, "final": b}) for a in ZETA_SCALES for b in ZETA_FINALS]
    return [grid[k % len(grid)] for k in range(chains)]


def mean(values: list[float]) -> float:
    """The mean of a list, NaN when empty (a target with no chain within the limit)."""
    return sum(values) / len(values) if values else math.nan


def circular_spread(y: torch.Tensor) -> torch.Tensor:
    """Mean resultant length of the angles of y (..., n, 2) = (cos, sin): 1 for one angle, 0 for a uniform circle."""
    theta = angle_of(y)
    return torch.stack([theta.cos().mean(-1), theta.sin().mean(-1)]).norm(dim=0)


def rotated_copies(images: torch.Tensor, angles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image (N, 1, H, W) in [0, 1] at `angles` evenly spaced rotations: pixels (N, A, H*W), θ (A,)."""
    theta = torch.tensor([2 * math.pi * k / angles for k in range(angles)])
    turned = [rotate(images, theta[k].expand(len(images))) for k in range(angles)]
    return torch.stack(turned, 1).flatten(2), theta


@cache
def _rotated_training_digits(angles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every training digit at `angles` evenly spaced rotations: pixels (angles * N, 256), labels (angles * N,)."""
    images, labels = base_digits("train")
    bank, _ = rotated_copies(images, angles)  # (N, A, 256)
    return bank.transpose(0, 1).reshape(-1, bank.shape[-1]), labels.repeat(angles)


def nearest_digits(x: torch.Tensor, angles: int = 36) -> tuple[list[int], list[float]]:
    """Label and pixel distance of the closest training digit over rotations: x (N, 1, 16, 16) in [-1, 1]."""
    bank, labels = _rotated_training_digits(angles)
    distance, index = torch.cdist(from_model_space(x.float()).flatten(1), bank).min(dim=1)
    return labels[index].tolist(), distance.tolist()


def draw_grid(
    x: torch.Tensor,
    labels: list[int],
    path: Path,
    title: str,
    judged: list[int] | None = None,
    confidence: list[float] | None = None,
) -> Path:
    """The top-k x* side by side, as PNG, titled with the judge's digit (and confidence) and the nearest digit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(x), figsize=(1.6 * len(x), 2.0), dpi=90, squeeze=False)
    judged = judged or [None] * len(x)
    confidence = confidence or [None] * len(x)
    for ax, image, label, digit, conf in zip(axes[0], from_model_space(x.float()), labels, judged, confidence,
                                             strict=True):  # fmt: skip
        ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
        said = "" if digit is None else f"judge: {'-' if digit < 0 else digit} ({conf:.2f})\n"
        ax.set_title(f"{said}nearest: {label}", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def draw_circle(problem: CDMProblem, x: torch.Tensor, kind: str, path: Path, n: int = 500) -> Path:
    """f_phi(x*) angles against the target's, one polar histogram per x* (the paper's right-hand panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = torch.Generator().manual_seed(0)
    eta = torch.randn((len(x), n, *problem.fast_sampler.noise_shape), generator=gen)
    with torch.no_grad():
        predicted = angle_of(problem.fast_sampler.sample(x.float(), eta)).numpy()  # (k, n)
    target = target_angles(kind, 5 * n, 1).numpy()
    bins = np.linspace(0, 2 * np.pi, 37)
    fig, axes = plt.subplots(1, len(x), figsize=(2.2 * len(x), 2.4), dpi=90, subplot_kw={"projection": "polar"})
    for rank, ax in enumerate(np.atleast_1d(axes)):
        for values, color, label in ((target, "tab:blue", "target G"), (predicted[rank], "tab:orange", "f(x*)")):
            density, _ = np.histogram(values, bins=bins, density=True)
            ax.bar(bins[:-1], density, width=bins[1] - bins[0], align="edge", alpha=0.5, color=color, label=label)
        ax.set_yticklabels([])
        ax.set_title(f"top {rank + 1}", fontsize=8)
    np.atleast_1d(axes)[0].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def bench_digits(
    json_path: str | None,
    targets: tuple[str, ...] = ("uniform", "bimodal", "unimodal"),
    chains: int | None = None,
    quick: bool = False,
    device: str = "cpu",
    n_c: int | None = None,
    checkpoints: str | None = None,
    protocol: str = "default",
) -> dict[str, Any]:
    """Per target: guided chains and, on the same seeds, unguided ones; the top-5 by held-out loss among the x*
    within the prior_fit limit (held-out digits' 95% quantile), judged by the project's digit judge, pictured.
    Protocol 'default': 100 steps, ζ cycled over a grid, identity gradient, MMD; 'paper': the MLGD-F code's
    MNIST protocol (`paper_settings`); 'study': it with issue 25's study's changes (`study_settings`)."""
    if protocol not in PROTOCOLS:
        raise InputError(f"--protocol: unknown {protocol!r}; expected one of {list(PROTOCOLS)}")
    from cdm_dist.problems.judge import judge_digits, load_judge

    bench_start = time.perf_counter()
    dev = torch.device(device)
    paper = protocol in ("paper", "study")  # the study's protocol is the paper's with a few settings changed
    chains = chains or (PAPER_SEEDS if paper else 16)
    judge = load_judge()
    out = Path(json_path).parent if json_path else Path("out/bench_digits")
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"digits_{protocol}" if paper else "digits"
    rows, used, payload, heldout = [], {}, {}, None
    for kind in tqdm(targets, desc="bench digits", unit="target"):
        if paper:
            config, zeta = (study_settings if protocol == "study" else paper_settings)(kind, quick, n_c)
            schedules = [zeta] * chains
        else:
            config, zeta = settings(quick, n_c)
            schedules = chain_schedules(zeta, chains)
        fast_steps = PAPER_FAST_STEPS if paper else None
        used[kind] = {"mlgd": config.model_dump(mode="json"), "zeta": [z.model_dump() for z in schedules[:6]],
                      "fast_steps": fast_steps or 8}  # fmt: skip
        problem = digits_problem(kind, checkpoints, fast_steps=fast_steps)
        start = time.perf_counter()
        guided = run_method(problem, "mlgd_f", Chains.make(range(chains), schedules), config, dev)
        seconds = time.perf_counter() - start
        plain = config.model_copy(update={"guidance": False})  # the same x* as ζ = 0, without gradient requests
        unguided = run_method(problem, "mlgd_f", Chains.make(range(chains), ZetaConfig(scale=0.0)), plain, dev)
        if heldout is None:  # the same prior for every target
            heldout, heldout_zeros = heldout_prior_fit(problem, config.eval_seed), base_digits("heldout")[1] == 0
        limit, unguided_limit = prior_fit_limit(heldout), prior_fit_limit(unguided.metrics["prior_fit"].cpu())
        zeros_over = float((heldout[heldout_zeros] > unguided_limit).double().mean())  # real 0s it would reject
        fit = guided.metrics["prior_fit"].cpu()
        order = top_within_limit(guided.final_loss.cpu(), fit, limit)
        order_unguided = top_within_limit(unguided.final_loss.cpu(), unguided.metrics["prior_fit"].cpu(), None)
        x_top = guided.x[order].detach().cpu()
        judged_all, confidence_all = judge_digits(judge, from_model_space(guided.x.detach().float().cpu()))
        over = ((fit > limit) & fit.isfinite()).tolist()
        within = [d for d, off in zip(judged_all, over, strict=True) if not off]
        by_block = [[judged_all[i] for i in top.tolist()] for top in block_tops(guided.final_loss.cpu(), fit, limit)]
        labels, distances, judged, confidence, spread = [], [], [], [], []
        grid = circle = None  # no pictures when no chain is within the limit
        if len(x_top):
            labels, distances = nearest_digits(x_top)
            judged, confidence = [judged_all[i] for i in order.tolist()], [confidence_all[i] for i in order.tolist()]
            with torch.no_grad():  # f(x*) of each top-5 x*: 500 draws of the fast sampler, fixed noise
                eta = torch.randn(
                    (len(x_top), 500, *problem.fast_sampler.noise_shape), generator=torch.Generator().manual_seed(0)
                )
                spread = circular_spread(problem.fast_sampler.sample(x_top.to(eta.dtype), eta)).tolist()
            title = f"{kind} target ({protocol}): top-5 x* by held-out loss within the prior_fit limit"
            grid = str(draw_grid(x_top, labels, out / f"{prefix}_{kind}_top5.png", title, judged, confidence))
            circle = str(draw_circle(problem, x_top, kind, out / f"{prefix}_{kind}_circle.png"))
        _, unguided_distances = nearest_digits(unguided.x[order_unguided].detach().cpu())
        x_path = out / f"{prefix}_{kind}_top5.npy"
        np.save(x_path, x_top[:, 0].float().numpy())
        rows.append(
            {
                "target": kind,
                "protocol": protocol,
                "grad": config.grad,
                "chains": chains,
                "num_steps": config.num_steps,
                "top5_loss_mean": float(guided.final_loss[order].mean()),
                "seconds_per_chain": seconds / chains,
                "grid_png": grid,
                "circle_png": circle,
                "x_npy": str(x_path),
                "top5_judged_digits": judged,
                "top5_judge_confidence": [round(c, 3) for c in confidence],
                "top5_zeros": judged.count(0),
                "zeros_within_limit": within.count(0),
                "judged_within_limit": {str(d): within.count(d) for d in sorted(set(within))},
                "top5_judged_by_block": by_block if chains > BLOCK else None,  # blocks of 64 seeds
                "top5_nearest_digits": labels,
                "top5_nearest_zeros": labels.count(0),
                "top5_nearest_distance_mean": mean(distances),
                "top5_spread": spread,
                "top5_spread_mean": mean(spread),
                "top5_zeta": [f"{schedules[i].scale}/{schedules[i].final}" for i in order.tolist()],
                "top5_seeds": order.tolist(),
                "prior_fit_limit": limit,
                "chains_over_limit": int(((fit > limit) & fit.isfinite()).sum()),
                "unguided_prior_fit_q95": unguided_limit,
                "top5_within_unguided_q95": int((fit[order] <= unguided_limit).sum()),
                "heldout_zeros_over_unguided_q95": zeros_over,
                "top5_prior_fit_mean": float(fit[order].mean()),
                "unguided_top5_prior_fit_mean": float(unguided.metrics["prior_fit"][order_unguided].mean()),
                "unguided_top5_nearest_distance_mean": mean(unguided_distances),
                "unguided_top5_loss_mean": float(unguided.final_loss[order_unguided].mean()),
                "median_loss": float(guided.final_loss.median()),
                "unguided_median_loss": float(unguided.final_loss.median()),
                "failed": int(guided.failed.sum()),
            }
        )
        payload = _report(rows, protocol, used, bench_start, dev, quick, json_path)
    return payload


COLUMNS = [
    "target",
    "grad",
    "chains",
    "num_steps",
    "top5_loss_mean",
    "unguided_top5_loss_mean",
    "median_loss",
    "seconds_per_chain",
    "top5_judged_digits",
    "top5_zeros",
    "top5_nearest_digits",
    "top5_spread_mean",
    "top5_prior_fit_mean",
    "unguided_top5_prior_fit_mean",
    "prior_fit_limit",
    "chains_over_limit",
    "unguided_prior_fit_q95",
    "top5_within_unguided_q95",
    "grid_png",
]


def _report(
    rows: list[dict[str, Any]],
    protocol: str,
    used: dict[str, Any],
    bench_start: float,
    dev: torch.device,
    quick: bool,
    json_path: str | None,
) -> dict[str, Any]:
    """The bench's JSON (and markdown table) so far: written after every target, so a long run keeps what it did."""
    from cdm_dist.problems.judge import THRESHOLD

    payload = {
        "rows": rows,
        "protocol": protocol,
        "settings": used,
        "wall_seconds": time.perf_counter() - bench_start,
        "selection": "top 5 by held-out loss among the chains whose prior_fit is within the limit, the 95% quantile "
        "of the held-out digits' prior_fit (each at a random rotation); unguided_prior_fit_q95: the unguided chains' "
        "95% quantile on the same seeds, the limit before issue 25's study",
        "judge": f"cdm_dist/checkpoints/digits/judge (cdm train judge), a digit at confidence >= {THRESHOLD}, else -1",
        "spread": "mean resultant length of the angles of 500 f(x*) draws: 0 uniform on the circle, 1 one angle",
        "x_npy_space": "model space: pixels in [-1, 1], shape [5, 16, 16]",
        "nearest_distance": "L2 pixel distance ([0, 1] pixels) to the closest training digit over 36 rotations",
        "environment": environment(dev),
        "quick": quick,
    }
    write_report(payload, json_path, markdown_table(rows, COLUMNS))
    return payload
