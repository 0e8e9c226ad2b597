"""`cdm evaluate CAMPAIGN`: the MLGD-F paper's Exp. 2 table for a finished campaign.

For the source x_src (editing campaigns) and each top-k x*, draw `evaluation.samples` fresh conditional samples y
with the same eta for every design (common random numbers), then report

- the campaign's own matching loss (`method.loss`, as the held-out loss: y (1, n, d) against a fresh target draw
  (m, d)) and the improvement over the source, (L_source - L_x*) / L_source;
- attribute shares: a classifier's class per sample (argmax: hard assignment, as counting "% male"), the share of
  each class with its Wilson score interval, and the mean class probability; also for the target's own samples
  when the classifier takes y.

It writes evaluation.json and evaluation.md into the campaign folder and logs eval/* metrics to the campaign's
MLflow runs (each chain's run, else the campaign run) with the two files as artifacts.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

from cdm_dist.chains.losses import Loss
from cdm_dist.chains.mlgd import DTYPES
from cdm_dist.chains.rng import Stream, chain_normal
from cdm_dist.driver.campaign import CampaignConfig, ClassifierConfig, load_config, micro_batches
from cdm_dist.driver.preconditions import masked, redacted
from cdm_dist.driver.store import CampaignStore, atomic_write
from cdm_dist.errors import InputError
from cdm_dist.models.generator import zero_shot_probs

ETA_BLOCK = 64  # samples per seeded block of eta: sample i's eta depends on (seed, i) only, never on `chunk`
DEFAULT_LOGIT_SCALE = 100.0  # CLIP's exp(logit_scale) after training
EVALUATE_MAY_CHANGE = ("evaluation.", "resources.", "tracking.", "topk")  # how to evaluate, never what was run


# -- the maths ---------------------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (Wilson 1927): the p with |p̂ - p| <= z sqrt(p(1-p)/n)."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the ends (no rounding residue)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def attribute_shares(probs: torch.Tensor, classes: Sequence[str], confidence: float) -> dict[str, dict[str, float]]:
    """Per class: the share of samples whose argmax class it is, its Wilson interval, the count and the mean
    probability; probs (N, K)."""
    n = probs.shape[0]
    counts = torch.bincount(probs.argmax(dim=1), minlength=len(classes)).tolist()  # (K,)
    means = probs.double().mean(dim=0).tolist()  # (K,)
    shares = {}
    for name, count, mean in zip(classes, counts, means, strict=True):
        low, high = wilson_interval(count, n, confidence)
        shares[name] = {"share": count / n, "low": low, "high": high, "count": count, "mean_prob": mean}
    return shares


def matching_loss(loss_fn: Loss, y: torch.Tensor, target: torch.Tensor) -> float:
    """The campaign's matching loss of one design's samples y (n, d) to the target (m, d), as the held-out loss
    (batch of one chain: (1, n, d) against (m, d))."""
    return float(loss_fn(y.unsqueeze(0), target.to(y))[0])


def evaluation_eta(
    seed: int, start: int, stop: int, noise_shape: Sequence[int], dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """The eta of samples [start, stop), (stop - start, *noise_shape): blocks of ETA_BLOCK samples from the seed's
    counter-based stream (cdm_dist.chains.rng, block = step), so a sample's eta is the same whatever the chunk size
    and for every design (common random numbers)."""
    if stop <= start:
        return torch.empty(0, *noise_shape, dtype=dtype)
    first, last = start // ETA_BLOCK, (stop - 1) // ETA_BLOCK
    seeds = torch.tensor([seed], dtype=torch.int64)
    shape = (ETA_BLOCK, *noise_shape)
    blocks = [chain_normal(seeds, Stream.EVALUATE, block, shape)[0] for block in range(first, last + 1)]
    offset = first * ETA_BLOCK
    return torch.cat(blocks)[start - offset : stop - offset].to(dtype)


# -- classifiers -------------------------------------------------------------------------------------------


@dataclass
class Classifier:
    """Class probabilities of y (N, d_y) or of generated images (N, C, H, W) -> (N, K), checked."""

    classes: list[str]
    input: str  # "y" | "image"
    function: Callable[[torch.Tensor], torch.Tensor]
    label: str  # what the config names, for messages and the report
    field: str = "evaluation.classifier"

    def probs(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (N, K) probabilities in float64 on the CPU."""
        try:
            with torch.no_grad():
                out = self.function(batch)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{self.field}: {self.label} raised {type(exc).__name__}: {exc}") from exc
        out = torch.as_tensor(out).detach().double().cpu()
        expected = (batch.shape[0], len(self.classes))
        if tuple(out.shape) != expected:
            raise InputError(
                f"{self.field}: {self.label} gave shape {list(out.shape)} for {batch.shape[0]} samples; expected "
                f"(N, K) = {list(expected)}, one probability per class in {self.classes}"
            )
        if not torch.isfinite(out).all() or (out < -1e-6).any() or ((out.sum(1) - 1).abs() > 1e-3).any():
            raise InputError(
                f"{self.field}: {self.label} gave values that are not class probabilities (finite, >= 0, each row "
                "summing to 1); apply a softmax to logits"
            )
        return out


def load_class_embeddings(path: str | Path, y_dim: int, classes: Sequence[str]) -> tuple[torch.Tensor, float | None]:
    """A zero-shot classifier's file: "embeddings" (K, d_y) and an optional scalar "logit_scale" (the multiplier,
    CLIP's logit_scale.exp())."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputError(f"evaluation.classifier.zero_shot: {path}: file not found")
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise InputError(f"evaluation.classifier.zero_shot: {path}: not a readable .safetensors file ({exc})") from None
    if "embeddings" not in tensors:
        raise InputError(f"{path}: no 'embeddings' tensor (K, d_y) in the zero-shot file; found {sorted(tensors)}")
    embeddings = tensors["embeddings"].double()
    if embeddings.dim() != 2 or embeddings.shape[0] != len(classes):
        raise InputError(
            f"{path}: class embeddings have shape {list(embeddings.shape)}; expected (K, d_y) with K = "
            f"{len(classes)} rows, one per class in evaluation.classifier.classes {list(classes)}"
        )
    if embeddings.shape[1] != y_dim:
        raise InputError(
            f"{path}: class embeddings have width {embeddings.shape[1]} but the sampler's y has y_dim = {y_dim} "
            "(evaluation.classifier.zero_shot)"
        )
    if not torch.isfinite(embeddings).all() or (embeddings.norm(dim=1) == 0).any():
        raise InputError(f"{path}: class embeddings must be finite and non-zero")
    scale = tensors.get("logit_scale")
    if scale is not None and (scale.numel() != 1 or not math.isfinite(float(scale)) or float(scale) <= 0):
        raise InputError(f"{path}: logit_scale must be one positive number, got shape {list(scale.shape)}")
    return embeddings, None if scale is None else float(scale)


def build_classifier(config: ClassifierConfig, y_dim: int, device: torch.device | str = "cpu") -> Classifier:
    """The configured classifier: zero-shot against class embeddings, or the factory's function."""
    classes = list(config.classes)
    if config.zero_shot is not None:
        embeddings, file_scale = load_class_embeddings(config.zero_shot, y_dim, classes)
        scale = config.logit_scale or file_scale or DEFAULT_LOGIT_SCALE
        label = f"zero-shot {Path(config.zero_shot).name} (logit scale {scale:g})"
        return Classifier(classes, "y", lambda y: zero_shot_probs(y.double(), embeddings, scale), label)
    from cdm_dist.models.factories import call_factory
    from cdm_dist.models.spec import import_path

    field = "evaluation.classifier.factory"
    function = call_factory(config.factory, field, device)
    if not callable(function):
        raise InputError(f"{field}: the factory returned {type(function).__name__}, not a function of {config.input}")
    label = f"{import_path(config.factory.factory)} ({config.input})"
    return Classifier(classes, config.input, function, label, field)


def _own_images(sampler: Any) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Any]] | None:
    """A sampler's (y, images) in one pass: its `sample_with_images(x, eta)`, or its `images(x, eta)` (B, n, C, H, W)
    embedded by its `embed` (N, C, H, W) -> (N, d_y) (cdm_dist.models.generator.GeneratorSampler); else None."""
    if callable(getattr(sampler, "sample_with_images", None)):
        return sampler.sample_with_images
    generate, embed = getattr(sampler, "images", None), getattr(sampler, "embed", None)
    if not (callable(generate) and callable(embed)):
        return None

    def both(x: torch.Tensor, eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pictures = generate(x, eta)  # (B, n, C, H, W)
        b, n = pictures.shape[:2]
        y = embed(pictures.reshape(b * n, *pictures.shape[2:])).to(x.dtype)  # (B n, d_y)
        return y.reshape(b, n, -1), pictures

    return both


def images_hook(sampler: Any, problem: str) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Any]]:
    """(x, eta) -> (y (B, n, d_y), generated images (B, n, C, H, W)) for classifiers that look at the images: the
    sampler's own (`sample_with_images`, or `images` + `embed`), through a latent decoder where the problem has one
    (cdm_dist.models.adapters.DecodedSampler); else one InputError."""
    own = _own_images(sampler)
    if own is not None:
        return own
    inner, decoder = getattr(sampler, "inner", None), getattr(sampler, "decoder", None)
    inner_own = _own_images(inner) if decoder is not None and inner is not None else None
    if inner_own is not None:
        return lambda x, eta: inner_own(decoder(x), eta)
    raise InputError(
        f"evaluation.classifier.input: image needs the generated images, but the sampler of problem {problem} "
        f"({type(inner or sampler).__name__}) has neither sample_with_images(x, eta) -> (y, images) nor images(x, "
        "eta) with embed(images); use a classifier of y (input: y, or zero_shot)"
    )


# -- one design --------------------------------------------------------------------------------------------


@torch.no_grad()
def draw_design(
    sampler: Any,
    x: torch.Tensor,
    samples: int,
    chunk: int,
    seed: int,
    classifier: Classifier | None = None,
    images: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Any]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`samples` conditional samples at one design x (1, *event), `chunk` per sampler call, with the evaluation's
    eta: y (samples, d_y) on x's device and, with a classifier, its class probabilities (samples, K) (of the
    generated images when `images` gives them)."""
    ys, probs = [], []
    noise_shape = tuple(sampler.noise_shape)
    for start in range(0, samples, chunk):
        stop = min(start + chunk, samples)
        eta = evaluation_eta(seed, start, stop, noise_shape, x.dtype).to(x.device).unsqueeze(0)  # (1, c, *noise)
        if images is not None:
            y, pictures = images(x, eta)  # (1, c, d_y), (1, c, C, H, W)
            probs.append(classifier.probs(torch.as_tensor(pictures)[0]))
        else:
            y = sampler.sample(x, eta)  # (1, c, d_y)
            if classifier is not None:
                probs.append(classifier.probs(y[0]))
        if tuple(y.shape) != (1, stop - start, sampler.y_dim):
            raise InputError(
                f"problem.sampler: gave y of shape {list(y.shape)}; expected (1, {stop - start}, {sampler.y_dim})"
            )
        ys.append(y[0])
    return torch.cat(ys), torch.cat(probs) if probs else None


# -- a campaign --------------------------------------------------------------------------------------------


@dataclass
class Design:
    name: str  # "source" | "chain N"
    x: torch.Tensor  # (1, *event)
    chain: int | None = None
    final_loss: float | None = None


def baseline_designs(store: CampaignStore) -> list[Design]:
    """The best design of each baseline run on the campaign (`cdm baseline sdedit`), evaluated beside its top-k."""
    from cdm_dist.driver.sdedit import load_sdedit

    sdedit = load_sdedit(store.root)
    if not sdedit or not sdedit.get("best"):
        return []
    best = sdedit["best"]
    x = torch.from_numpy(np.load(best["x_path"], allow_pickle=False))[None]
    return [Design(f"sdedit best of {sdedit['variations']}", x, None, best["final_loss"])]


def finished_chains(store: CampaignStore, config: CampaignConfig) -> list[Design]:
    """Every chain of a finished micro-batch that did not fail, with its x* and held-out loss."""
    designs, finished = [], 0
    for batch in micro_batches(config):
        loaded = store.load_result(batch.index)
        if loaded is None:
            continue
        finished += 1
        result, _ = loaded
        for row, chain in enumerate(batch.chain_ids):
            loss = float(result.final_loss[row])
            if not bool(result.failed[row]) and math.isfinite(loss):
                designs.append(Design(f"chain {chain}", result.x[row : row + 1], chain, loss))
    if not finished:
        raise InputError(
            f"{store.root}: the campaign has no finished results yet (results/ is empty); finish it with "
            f"`cdm run --resume {store.root}`"
        )
    if not designs:
        raise InputError(f"{store.root}: every finished chain failed; there is no x* to evaluate")
    return designs


def campaign_config(store: CampaignStore, overrides: Sequence[str] = ()) -> CampaignConfig:
    """The campaign's stored config with `--set` overrides of how to evaluate (evaluation.*, resources.*,
    tracking.*, topk); the chains and the problem stay as they ran."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if not key.startswith(EVALUATE_MAY_CHANGE):
            raise InputError(
                f"--set {key}: evaluate reads the campaign as it ran; only evaluation.*, resources.*, tracking.* "
                "and topk may change"
            )
    return load_config(store.config_path, list(overrides))


def evaluate_campaign(
    folder: str | Path,
    overrides: Sequence[str] = (),
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate a campaign's source and top-k x* (see the module docstring); writes evaluation.json and
    evaluation.md into its folder, logs to its MLflow runs, and returns the JSON report. `progress` gets one line
    per design (default: stderr)."""
    from cdm_dist.driver.worker import ChainWorker, pick_device

    tell = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    tic = time.perf_counter()
    store = CampaignStore.open(folder)
    config = campaign_config(store, overrides)
    settings = config.evaluation
    chains = finished_chains(store, config)
    k = settings.topk or config.topk
    top = sorted(chains, key=lambda d: (d.final_loss, d.chain))[:k]

    device = device or str(pick_device(config.resources.device, has_gpu=True))
    worker = ChainWorker(config, "sampler", device)
    sampler = worker.problem.sampler(config.method.name)
    dtype = DTYPES[config.method.dtype]
    classifier = images = None
    if settings.classifier is not None:
        classifier = build_classifier(settings.classifier, sampler.y_dim, worker.device)
        if classifier.input == "image":
            images = images_hook(sampler, config.problem.label())
    loss_fn = config.method.loss.build()
    target = worker.problem.target.heldout(settings.samples, settings.seed).to(worker.device, dtype)  # (m, d_y)

    source = worker.source()
    baselines = baseline_designs(store)
    designs = ([Design("source", source.detach().cpu())] if source is not None else []) + top + baselines
    rows: list[dict[str, Any]] = []
    for number, design in enumerate(designs, start=1):
        started = time.perf_counter()
        x = design.x.to(worker.device, dtype)
        y, probs = draw_design(sampler, x, settings.samples, settings.chunk, settings.seed, classifier, images)
        if not torch.isfinite(y).all():
            raise InputError(f"problem.sampler: the conditional samples at {design.name} are not finite")
        row = {
            "design": design.name,
            "chain": design.chain,
            "final_loss": design.final_loss,
            "mmd": matching_loss(loss_fn, y, target),
            "improvement": None,
            "shares": None if probs is None else attribute_shares(probs, classifier.classes, settings.confidence),
        }
        if source is not None and design.name != "source":
            reference = rows[0]["mmd"]
            row["improvement"] = (reference - row["mmd"]) / reference if reference > 0 else None
        rows.append(row)
        tell(_progress_line(number, len(designs), row, classifier, time.perf_counter() - started))

    sheet = designs_picture(sampler, designs, worker.device, dtype, settings.seed)
    if sheet is not None:
        atomic_write(store.root / "evaluation.png", lambda path: path.write_bytes(sheet))
    target_shares = None
    if classifier is not None and classifier.input == "y":
        target_shares = attribute_shares(classifier.probs(target), classifier.classes, settings.confidence)
    report = {
        "campaign": config.name,
        "folder": str(store.root.resolve()),
        "loss": config.method.loss.name,
        "samples": settings.samples,
        "chunk": settings.chunk,
        "seed": settings.seed,
        "confidence": settings.confidence,
        "device": str(worker.device),
        "chains_ok": len(chains),
        "topk": len(top),
        "classifier": None if classifier is None else classifier.label,
        "classes": None if classifier is None else classifier.classes,
        "attribute": None if classifier is None else settings.classifier.attribute or classifier.classes[0],
        "source": rows[0] if source is not None else None,
        "rows": rows[int(source is not None) : len(rows) - len(baselines)],
        "baselines": rows[len(rows) - len(baselines) :],  # e.g. the time-matched SDEdit search's best
        "target": {"samples": int(target.shape[0]), "shares": target_shares},
        "seconds": time.perf_counter() - tic,
    }
    write_reports(store, report)
    report["mlflow"] = log_to_mlflow(store, config, report)
    return report


SHEET_IMAGES = 8  # generated images per design in evaluation.png


@torch.no_grad()
def designs_picture(sampler: Any, designs: list[Design], device: Any, dtype: torch.dtype, seed: int) -> bytes | None:
    """evaluation.png: per design (source, top-k x*, baselines), x and its first SHEET_IMAGES generated images at the
    evaluation's eta; None when the sampler gives no images."""
    from cdm_dist.driver.pictures import designs_sheet, image_png

    try:
        images = images_hook(sampler, "")
    except InputError:
        return None
    eta = evaluation_eta(seed, 0, SHEET_IMAGES, tuple(sampler.noise_shape), dtype).to(device)[None]
    rows = []
    for design in designs:
        x = design.x.to(device, dtype)
        rows.append((x[0] if x.dim() == 4 else x, torch.as_tensor(images(x.reshape(1, *x.shape[-3:]), eta)[1])[0]))
    return image_png(designs_sheet(rows))


def _progress_line(number: int, total: int, row: dict[str, Any], classifier: Classifier | None, seconds: float) -> str:
    line = f"evaluate [{number}/{total}] {row['design']}: loss {row['mmd']:.5g}"
    if row["improvement"] is not None:
        line += f", {_percent(row['improvement'], signed=True)} vs source"
    if row["shares"] is not None:
        line += ", " + ", ".join(f"{c} {s['share'] * 100:.1f}%" for c, s in row["shares"].items())
    return f"{line} ({seconds:.1f} s)"


# -- the table, the files and MLflow -----------------------------------------------------------------------


def _percent(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value * 100:+.1f}%" if signed else f"{value * 100:.1f}%"


def _share_cell(share: dict[str, float] | None) -> str:
    if share is None:
        return "n/a"
    return f"{share['share'] * 100:.1f} [{share['low'] * 100:.1f}, {share['high'] * 100:.1f}]"


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """The table: a header, the source, the top-k x*, then the target's own shares."""
    classes = report["classes"] or []
    level = f"{report['confidence'] * 100:g}%"
    header = ["design", "final_loss", report["loss"], "vs source", *(f"{c} % [{level} CI]" for c in classes)]
    lines = [header]
    for row in ([report["source"]] if report["source"] else []) + report["rows"] + report.get("baselines", []):
        shares = row["shares"] or {}
        lines.append([
            row["design"],
            "-" if row["final_loss"] is None else f"{row['final_loss']:.5g}",
            f"{row['mmd']:.5g}",
            _percent(row["improvement"], signed=True),
            *(_share_cell(shares.get(c)) for c in classes),
        ])  # fmt: skip
    if classes:
        target = report["target"]["shares"] or {}
        lines.append(["target", "-", "-", "-", *(_share_cell(target.get(c)) for c in classes)])
    return lines


def describe(report: dict[str, Any]) -> str:
    """The line above the table."""
    text = (
        f"campaign {report['campaign']}: {report['loss']} on {report['samples']} fresh samples per design (seed "
        f"{report['seed']}), top {report['topk']} of {report['chains_ok']} chains"
    )
    if report["classifier"]:
        text += f"; classifier {report['classifier']}, headline class {report['attribute']!r}"
    return text


def format_evaluation(report: dict[str, Any]) -> str:
    """The table `cdm evaluate` prints."""
    lines = table_rows(report)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)
    return f"{describe(report)}\n{table}"


def markdown(report: dict[str, Any]) -> str:
    """evaluation.md: the same table in Markdown."""
    lines = table_rows(report)
    body = [f"| {' | '.join(lines[0])} |", f"|{'---|' * len(lines[0])}"]
    body += [f"| {' | '.join(line)} |" for line in lines[1:]]
    return f"# Evaluation of {report['campaign']}\n\n{describe(report)}\n\n" + "\n".join(body) + "\n"


def write_reports(store: CampaignStore, report: dict[str, Any]) -> tuple[Path, Path]:
    """evaluation.json and evaluation.md in the campaign folder, each written atomically."""
    import json

    json_path, md_path = store.root / "evaluation.json", store.root / "evaluation.md"
    atomic_write(json_path, lambda p: p.write_text(json.dumps(report, indent=1) + "\n"))
    atomic_write(md_path, lambda p: p.write_text(markdown(report)))
    return json_path, md_path


def metric_key(*parts: str) -> str:
    """An MLflow metric key (letters, digits, _ - . / and spaces)."""
    return "/".join(re.sub(r"[^A-Za-z0-9_\-. ]", "_", part) for part in parts)


def design_metrics(row: dict[str, Any], prefix: tuple[str, ...] = ("eval",)) -> dict[str, float]:
    """eval/mmd, eval/improvement, eval/share/<class> (+ share_low, share_high, prob) of one design."""
    metrics = {metric_key(*prefix, "mmd"): row["mmd"]}
    if row.get("improvement") is not None:
        metrics[metric_key(*prefix, "improvement")] = row["improvement"]
    for name, share in (row.get("shares") or {}).items():
        metrics[metric_key(*prefix, "share", name)] = share["share"]
        metrics[metric_key(*prefix, "share_low", name)] = share["low"]
        metrics[metric_key(*prefix, "share_high", name)] = share["high"]
        metrics[metric_key(*prefix, "prob", name)] = share["mean_prob"]
    return metrics


def log_to_mlflow(store: CampaignStore, config: CampaignConfig, report: dict[str, Any]) -> dict[str, Any] | None:
    """The figures on the campaign's MLflow runs (each chain's own run where it has one, else the campaign run),
    the source's and target's on the campaign run, and the two files as the campaign run's artifacts; None when
    the campaign is not tracked."""
    state = store.load_tracking()
    parent = state.get("parent_run_id")
    if not config.tracking.enabled or not parent:
        return None
    from mlflow.entities import Metric

    from cdm_dist.driver.tracking import MAX_METRICS, client_for

    children = {int(k): v for k, v in state.get("child_run_ids", {}).items()}
    per_run: dict[str, dict[str, float]] = {parent: {}}
    for row in report["rows"]:
        run = children.get(row["chain"])
        if run is not None:
            per_run.setdefault(run, {}).update(design_metrics(row))
        else:
            per_run[parent].update(design_metrics(row, ("eval", f"chain{row['chain']:05d}")))
    if report["source"] is not None:
        per_run[parent].update(design_metrics(report["source"], ("eval", "source")))
    for row in report.get("baselines", []):
        per_run[parent].update(design_metrics(row, ("eval", row["design"].split()[0])))
    if report["rows"]:
        best = report["rows"][0]
        per_run[parent].update(
            {k.replace("eval/", "eval/best/", 1): v for k, v in design_metrics(best).items() if "/share_" not in k}
        )
    for name, share in (report["target"]["shares"] or {}).items():
        per_run[parent][metric_key("eval", "target", "share", name)] = share["share"]
    try:
        client = client_for(config.tracking.uri)
        now = int(time.time() * 1000)
        for run, metrics in per_run.items():
            entries = [Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(v)]
            for start in range(0, len(entries), MAX_METRICS):
                client.log_batch(run, metrics=entries[start : start + MAX_METRICS])
        for name in ("evaluation.json", "evaluation.md", "evaluation.png"):
            if (store.root / name).is_file():
                client.log_artifact(parent, str(store.root / name), artifact_path="evaluation")
    except Exception as exc:
        raise InputError(
            f"tracking.uri: the evaluation is in {store.root / 'evaluation.json'} but logging it to MLflow "
            f"{redacted(config.tracking.uri)!r} failed ({type(exc).__name__}: {masked(str(exc), config.tracking.uri)})"
        ) from None
    return {"campaign_run_id": parent, "runs": sorted(per_run)}
