"""Issue 25, third round: is it the search, the selection or the sampler that keeps 0s out of the uniform top 5?

`python -m benchmarks.digits_selection --json benchmarks/results/digits_selection.json [--seeds 128]
[--sampler shipped|blurred|kernel] [--loss mmd|multiscale]`

One batch of `--protocol study` uniform chains (seeds 0..seeds-1, all x* kept), then:
- **selection**: the top 5 of each block of 64 seeds (within the prior_fit limit) under other ranking criteria than
  the held-out loss: fresh η and target draws, the one-step sampler, the loss after SDEdit re-noising of x* (the
  prior's own variations of x*), the sampler on noisy copies of x* (randomised smoothing), small-bandwidth MMD²;
- **the data's own P(θ | x)**: a kernel estimate over the training digits at 72 angles,
  P(θ_a | x) ∝ Σ_i exp(-||x - R_θa d_i||² / 2s²), s picked by held-out likelihood; its circular moments |E e^{ikθ}|
  (0 for every k when x is angle-free) for real held-out digits per class and for the x* per judged class, beside
  the sampler's spread;
- `--sampler blurred`: the chains with a flow sampler trained on blurred and noisy digits as well (trained into
  `out/digits_selection/blurred_sampler` when missing, 3-7 min), to see whether a sampler that reads Tweedie-like
  inputs better makes the guidance find 0s; `--sampler kernel`: the chains with the data's kernel P(θ | x) as f
  (a faithful, if coarse, sampler); `--loss multiscale`: MMD² over five bandwidths, which sees 4-fold symmetry.

This round ran with the sampler trained on the rotations alone; `benchmarks/results/digits_selection.json` holds
its figures. The shipped sampler now learns the readable quarter turns as well (issue 25's fourth round), so
`--sampler shipped` runs that one; the blurred sampler still learns the rotations alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from benchmarks.digits import (
    BLOCK,
    PAPER_FAST_STEPS,
    block_tops,
    circular_spread,
    heldout_prior_fit,
    prior_fit_limit,
    rotated_copies,
    study_settings,
)
from cdm_dist.chains.diffusion import ddim_step_from_x0
from cdm_dist.chains.losses import LossConfig, MMDLoss
from cdm_dist.chains.mlgd import Chains
from cdm_dist.chains.priors import DiffusionPrior
from cdm_dist.chains.samplers import ConditionalSampler
from cdm_dist.driver.methods import run_method
from cdm_dist.models.spec import CDMProblem
from cdm_dist.problems.digits import base_digits, from_model_space, rotate, target_samples, to_model_space
from cdm_dist.problems.judge import judge_digits, load_judge
from cdm_dist.problems.shipped import digits_problem

ANGLES = 72  # the kernel posterior's angle grid (5°)
BANDWIDTHS = (0.75, 1.0, 1.25, 1.5, 2.0)  # pixel-space kernel widths s tried for the data's P(θ | x)
SDEDIT_T = (50, 100, 200)  # SDEdit re-noising timesteps (of 1000)
SMOOTHING = (0.1, 0.2)  # input-noise std of the smoothed sampler, in the [-1, 1] pixel scale
MULTISCALE = (0.05, 0.1, 0.25, 0.5, 1.0)  # `--loss multiscale`: MMD² kernels at these fractions of the median
EVAL_SAMPLES = 512  # y draws per x* (and target draws) of every re-ranking criterion


# -- the data's own P(θ | x) ---------------------------------------------------------------------------------


def rotated_templates(images: torch.Tensor, angles: int = ANGLES) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image (N, 1, H, W) in [0, 1] at `angles` evenly spaced angles, in model space: (N, A, H*W), θ (A,)."""
    bank, theta = rotated_copies(images, angles)
    return to_model_space(bank), theta


def angle_posterior(x: torch.Tensor, templates: torch.Tensor, s: float, chunk: int = 64) -> torch.Tensor:
    """Kernel estimate of P(θ_a | x) ∝ Σ_i exp(-||x - t_ia||² / 2s²): x (B, ...) flattened against templates
    (N, A, D) -> (B, A), rows summing to 1."""
    n, a, dim = templates.shape
    flat = templates.reshape(n * a, dim)
    norms = flat.square().sum(1)  # (N*A,)
    out = []
    for part in x.flatten(1).split(chunk):  # (b, D)
        d2 = part.square().sum(1, keepdim=True) + norms[None] - 2 * part @ flat.T  # (b, N*A)
        out.append(torch.logsumexp((-d2 / (2 * s * s)).reshape(len(part), n, a), dim=1).softmax(-1))
    return torch.cat(out)


def posterior_moments(p: torch.Tensor, theta: torch.Tensor, orders: tuple[int, ...] = (1, 2, 4)) -> torch.Tensor:
    """|E e^{ikθ}| of a distribution p (B, A) on the angles theta (A,), per order k: (B, K); all 0 when uniform."""
    k = torch.tensor(orders, dtype=p.dtype)[:, None]  # (K, 1)
    phase = k * theta.to(p.dtype)[None]  # (K, A)
    return torch.hypot(p @ phase.cos().T, p @ phase.sin().T)


def pick_bandwidth(templates: torch.Tensor, theta: torch.Tensor, seed: int = 0) -> tuple[float, dict[str, float]]:
    """The kernel width s with the least held-out negative log-likelihood of a digit's true angle bin (each held-out
    digit at a seeded random grid angle), and the NLL per s (uniform: log A)."""
    images, _ = base_digits("heldout")
    bins = torch.randint(len(theta), (len(images),), generator=torch.Generator().manual_seed(seed))
    x = to_model_space(rotate(images, theta[bins]))
    nll = {}
    for s in BANDWIDTHS:
        p = angle_posterior(x, templates, s)
        nll[str(s)] = float(-p[torch.arange(len(x)), bins].clamp_min(1e-30).log().mean())
    return float(min(nll, key=nll.get)), nll


class KernelAngleSampler(ConditionalSampler):
    """f(x, η) from the data's kernel P(θ | x) (`angle_posterior`): θ by the inverse CDF of its piecewise-constant
    density at u = Φ(η), y = (cos θ, sin θ); differentiable in x through the bin probabilities."""

    def __init__(self, templates: torch.Tensor, s: float) -> None:
        self.templates, self.s = templates, s
        self.y_dim, self.noise_shape, self.x_shape = 2, (1,), (1, 16, 16)

    def sample(self, x: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        p = angle_posterior(x.float(), self.templates, self.s)  # (B, A)
        width = 2 * math.pi / p.shape[1]
        cdf = p.cumsum(-1)  # (B, A)
        u = torch.special.ndtr(eta[..., 0].float()).clamp(1e-6, 1 - 1e-6)  # (B, n)
        bins = torch.searchsorted(cdf.detach().contiguous(), u.contiguous()).clamp(max=p.shape[1] - 1)  # (B, n)
        mass = p.gather(1, bins)  # (B, n)
        before = cdf.gather(1, bins) - mass
        theta = (bins + ((u - before) / mass).clamp(0, 1)) * width  # (B, n)
        return torch.stack([theta.cos(), theta.sin()], -1).to(x.dtype)


# -- re-ranking criteria ---------------------------------------------------------------------------------------


@torch.no_grad()
def sdedit_variations(prior: DiffusionPrior, x: torch.Tensor, t: int, draws: int, seed: int, steps: int = 100):
    """The prior's SDEdit variations of x (B, ...): noised to timestep t, then deterministic DDIM back to 0, `draws`
    times with fresh noise -> (draws, B, ...)."""
    schedule = prior.schedule(steps)
    start = next(i for i, step in enumerate(schedule.timesteps) if step <= t)
    gen = torch.Generator().manual_seed(seed)
    a = float(schedule.alpha_bar[start])
    out = []
    for _ in range(draws):
        z = a**0.5 * x + (1 - a) ** 0.5 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        for i in range(start, len(schedule)):
            eps, x0 = prior.denoise(z, schedule.timesteps[i])
            z = ddim_step_from_x0(x0, eps, float(schedule.alpha_bar_prev[i]))
        out.append(z)
    return torch.stack(out)


@torch.no_grad()
def sample_f(sampler: ConditionalSampler, x: torch.Tensor, seed: int, sigma: float = 0.0, groups: int = 16):
    """EVAL_SAMPLES draws of f per x (B, ...) -> (B, n, d_y) float64; sigma > 0: each group of draws sees its own
    noisy copy x + sigma ξ (randomised smoothing of the sampler)."""
    gen = torch.Generator().manual_seed(seed)
    b = len(x)
    if sigma == 0:
        eta = torch.randn((b, EVAL_SAMPLES, *sampler.noise_shape), generator=gen)
        return sampler.sample(x, eta).double()
    noisy = x[:, None] + sigma * torch.randn((b, groups, *x.shape[1:]), generator=gen)  # (B, G, ...)
    eta = torch.randn((b * groups, EVAL_SAMPLES // groups, *sampler.noise_shape), generator=gen)
    return sampler.sample(noisy.flatten(0, 1), eta).reshape(b, EVAL_SAMPLES, -1).double()


def criteria(problem: CDMProblem, one_step: CDMProblem, x: torch.Tensor, final_loss: torch.Tensor, spec: LossConfig):
    """Ranking scores (B,) of the x* (lower is better), by name."""
    loss = spec.build()  # the chains' own loss
    small = MMDLoss(multipliers=[0.05, 0.1]).build()  # a tenth of the median bandwidth: higher circular harmonics
    target = target_samples("uniform", EVAL_SAMPLES, 12345)
    y = sample_f(problem.fast_sampler, x, seed=1)
    scores = {"held-out loss (the bench)": final_loss.double(), "fresh η and target": loss(y, target),
              "small-bandwidth MMD²": small(y, target),
              "one-step sampler": loss(sample_f(one_step.fast_sampler, x, seed=1), target)}  # fmt: skip
    for t in SDEDIT_T:
        variations = sdedit_variations(problem.prior, x, t, draws=4, seed=7)
        losses = torch.stack(
            [loss(sample_f(problem.fast_sampler, v, seed=2 + j), target) for j, v in enumerate(variations)]
        )
        scores[f"after SDEdit to t = {t} (mean of 4)"] = losses.mean(0)
    for sigma in SMOOTHING:
        scores[f"smoothed sampler σ = {sigma}"] = loss(sample_f(problem.fast_sampler, x, seed=1, sigma=sigma), target)
    return scores


# -- the run ---------------------------------------------------------------------------------------------------


def blurred_digits_data() -> Any:
    """The digits' training pairs, half of them blurred (Gaussian, s ~ U[0, 1.5] px) and half with pixel noise
    (std ~ U[0, 0.3]): inputs like the guidance's Tweedie estimates x̂0, with the same angle y."""
    from cdm_dist.problems.training import TrainingData, training_data

    plain = training_data("digits")

    def draw(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = plain.draw(n, gen)
        width = 1.5 * torch.rand(n, generator=gen)
        blur = torch.rand(n, generator=gen) < 0.5
        x = torch.where(blur[:, None, None, None], gaussian_blur(x, width), x)
        std = 0.3 * torch.rand(n, generator=gen) * (torch.rand(n, generator=gen) < 0.5)
        return x + std[:, None, None, None] * torch.randn(x.shape, generator=gen), y

    text = plain.description + "; half blurred (Gaussian s ~ U[0, 1.5] px), half with pixel noise std ~ U[0, 0.3]"
    return TrainingData(plain.problem, plain.x_shape, plain.y_dim, draw, plain.heldout, text)


def gaussian_blur(x: torch.Tensor, width: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Each image (N, 1, H, W) blurred by its own Gaussian of std width (N,) pixels (≈ identity below 0.2 px)."""
    r = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(r[None] ** 2) / (2 * width[:, None].clamp_min(1e-3) ** 2))  # (N, 2r+1)
    k = k / k.sum(1, keepdim=True)
    kernel = (k[:, :, None] * k[:, None, :])[:, None]  # (N, 1, 2r+1, 2r+1)
    n = len(x)
    out = torch.nn.functional.conv2d(x.reshape(1, n, *x.shape[2:]), kernel, padding=radius, groups=n)
    return out.reshape(x.shape)


def blurred_checkpoints(folder: Path) -> Path:
    """A checkpoints folder with the shipped digits prior and a sampler trained on blurred_digits_data (made once)."""
    from cdm_dist.problems.builtins import checkpoints_folder
    from cdm_dist.problems.training import train

    if not (folder / "sampler" / "manifest.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(checkpoints_folder(None, "digits") / "prior", folder / "prior")
        command = "python -m benchmarks.digits_selection --sampler blurred"
        train("sampler", "digits", folder / "sampler", seed=0, command=command, data=blurred_digits_data())
    return folder


def top5_rows(scores: torch.Tensor, fit: torch.Tensor, limit: float, labels: list[int], spread: torch.Tensor):
    """Per block of BLOCK seeds: the top 5 by a score within the limit, judged."""
    rows = []
    for first, top in zip(range(0, len(scores), BLOCK), block_tops(scores, fit, limit), strict=True):
        top, part = top.tolist(), slice(first, min(first + BLOCK, len(scores)))
        judged = [labels[i] for i in top]
        rows.append({"seeds": f"{first}-{part.stop - 1}", "top5_judged": judged, "top5_zeros": judged.count(0),
                     "top5_seeds": top, "top5_spread_mean": float(spread[top].mean())})  # fmt: skip
    return rows


def run(seeds: int, sampler: str, out: Path, loss: str = "mmd") -> dict[str, Any]:
    """The chains, the re-rankings and the data's P(θ | x) (see the module's docstring)."""
    checkpoints = blurred_checkpoints(out / "blurred_sampler") if sampler == "blurred" else None
    config, zeta = study_settings("uniform")
    if loss == "multiscale":
        config = config.model_copy(update={"loss": MMDLoss(multipliers=list(MULTISCALE))})
    problem = digits_problem("uniform", checkpoints, fast_steps=PAPER_FAST_STEPS)
    shipped = problem if checkpoints is None else digits_problem("uniform", fast_steps=PAPER_FAST_STEPS)
    templates, theta = rotated_templates(base_digits("train")[0])
    s, nll = pick_bandwidth(templates, theta)
    if sampler == "kernel":  # every 3rd training digit at 36 angles: the chains' f, cheap enough for the CPU
        few, few_theta = rotated_templates(base_digits("train")[0][::3], angles=36)
        problem = dataclasses.replace(problem, fast_sampler=KernelAngleSampler(few, pick_bandwidth(few, few_theta)[0]))
    start = time.perf_counter()
    result = run_method(problem, "mlgd_f", Chains.make(range(seeds), zeta), config)
    chain_seconds = time.perf_counter() - start
    x, fit = result.x.detach().float().cpu(), result.metrics["prior_fit"].cpu()
    limit = prior_fit_limit(heldout_prior_fit(shipped, config.eval_seed))
    labels, _ = judge_digits(load_judge(), from_model_space(x))
    within = [i for i in range(len(x)) if not fit[i] > limit]
    spread = circular_spread(sample_f(shipped.fast_sampler, x, seed=0))  # (B,): the shipped f, as the bench
    one_step = digits_problem("uniform", sampler_kind="one_step")
    scores = criteria(problem, one_step, x, result.final_loss.cpu(), config.loss)
    selection = {name: top5_rows(score, fit, limit, labels, spread) for name, score in scores.items()}
    moments = posterior_moments(angle_posterior(x, templates, s), theta)  # (B, 3)
    images, classes = base_digits("heldout")
    gen = torch.Generator().manual_seed(1)
    real = to_model_space(rotate(images, 2 * math.pi * torch.rand(len(images), generator=gen)))
    real_moments = posterior_moments(angle_posterior(real, templates, s), theta)
    real_spread = circular_spread(sample_f(shipped.fast_sampler, real, seed=0))

    def by_class(values: torch.Tensor, f_spread: torch.Tensor, groups: list[int]) -> dict[str, dict[str, float]]:
        table = {}
        for d in sorted(set(groups)):
            rows = [i for i, g in enumerate(groups) if g == d]
            m = values[rows].median(0).values
            table[str(d)] = {"count": len(rows), "data_m1": float(m[0]), "data_m2": float(m[1]),
                             "data_m4": float(m[2]), "f_spread": float(f_spread[rows].median())}  # fmt: skip
        return table

    return {
        "sampler": sampler,
        "loss": config.loss.model_dump(mode="json"),
        "seeds": seeds,
        "chain_seconds": chain_seconds,
        "prior_fit_limit": limit,
        "within_limit": len(within),
        "judged_within_limit": {str(k): v for k, v in sorted(Counter(labels[i] for i in within).items())},
        "selection": selection,
        "data_posterior": {
            "bandwidth": s,
            "heldout_nll_by_bandwidth": nll,
            "uniform_nll": math.log(ANGLES),
            "heldout_digits_by_class": by_class(real_moments, real_spread, classes.tolist()),
            "x_star_within_limit_by_judged_class": by_class(
                moments[within], spread[within], [labels[i] for i in within]
            ),
        },
    }


def report(payload: dict[str, Any]) -> str:
    """The markdown tables of one or more runs."""
    lines = ["# Issue 25, third round: the uniform target's top 5 under other selections, and the data's P(θ | x)", ""]
    for sampler, run_ in payload["runs"].items():
        blocks = [row["seeds"] for row in next(iter(run_["selection"].values()))]
        lines += [f"## sampler: {sampler} ({run_['seeds']} chains, `--protocol study` uniform settings, "
                  f"{run_['within_limit']} within the prior_fit limit {run_['prior_fit_limit']:.3f})", "",
                  f"Judged classes within the limit: {run_['judged_within_limit']} (-1: no digit at confidence 0.7). "
                  "Spread: the shipped f's mean resultant length over the top 5 (500 draws each).",
                  "", "| ranking | " + " | ".join(f"top-5 judged, seeds {b}" for b in blocks) + " |",
                  "|---|" + "---|" * len(blocks)]  # fmt: skip
        for name, rows in run_["selection"].items():
            cells = [f"{', '.join('-' if d < 0 else str(d) for d in r['top5_judged'])} ({r['top5_zeros']} zeros, "
                     f"spread {r['top5_spread_mean']:.2f})" for r in rows]  # fmt: skip
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        post = run_["data_posterior"]
        lines += ["", f"The data's P(θ | x) (kernel width s = {post['bandwidth']} by held-out likelihood): median "
                  "|E e^{ikθ}| (0 = angle-free) and the shipped f's median spread", "",
                  "| digits | class | count | data k=1 | data k=2 | data k=4 | f spread |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for group, key in (("held-out, random angles", "heldout_digits_by_class"),
                           ("x* within the limit, by judge", "x_star_within_limit_by_judged_class")):  # fmt: skip
            for d, v in post[key].items():
                name = "no digit" if d == "-1" else d
                lines.append(f"| {group} | {name} | {v['count']} | {v['data_m1']:.2f} | {v['data_m2']:.2f} | "
                             f"{v['data_m4']:.2f} | {v['f_spread']:.2f} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="benchmarks/results/digits_selection.json")
    parser.add_argument("--seeds", type=int, default=128)
    parser.add_argument("--sampler", choices=("shipped", "blurred", "kernel"), default="shipped")
    parser.add_argument(
        "--loss", choices=("mmd", "multiscale"), default="mmd", help="the study's MMD², or 5 bandwidths"
    )
    parser.add_argument("--out", default="out/digits_selection", help="where the blurred sampler is trained")
    args = parser.parse_args(argv)
    path = Path(args.json)
    payload = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    name = args.sampler if args.loss == "mmd" else f"{args.sampler}, multiscale MMD²"
    payload["runs"][name] = run(args.seeds, args.sampler, Path(args.out), args.loss)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    path.with_suffix(".md").write_text(report(payload))
    print(report(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
