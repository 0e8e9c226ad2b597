"""A digit judge of the project's own: a small rotation-robust CNN over the 16x16 rotated digits.

The MLGD-F code judges its x* with a noise-robust MNIST classifier and a 0.7 confidence threshold (below it: no
digit). This one is trained by `cdm train judge --problem digits` on the training digits at uniformly random
angles, with pixel noise and one-pixel shifts, so it names a digit whatever its rotation. Under rotation 6 and 9 are
one shape: the judge splits its confidence between them, and the threshold then says "no digit".

The same network trained on *upright* digits (turned by at most 10 degrees, as the MLGD-F code's MNIST classifier) is
the digits' **reader** (`cdm train reader --problem digits`): it says at which quarter turns a digit still reads as a
digit, which is what the angle Y means in that code's training data (`cdm_dist.problems.digits.readable_turns`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cdm_dist.errors import InputError
from cdm_dist.models.manifest import read_manifest, sha256, verify_manifest

WEIGHTS = "model.safetensors"
THRESHOLD = 0.7  # the MLGD-F code's confidence threshold: below it the judge names no digit
NO_DIGIT = -1  # the label of an image the judge is not confident about
HELDOUT_ANGLES = 8  # held-out accuracy: every held-out digit at k * 45 degrees


@dataclass(frozen=True)
class JudgeConfig:
    """The judge's architecture: three 3x3 conv blocks, global average pooling, a linear head."""

    channels: tuple[int, int, int] = (32, 64, 96)
    classes: int = 10
    size: int = 16


@dataclass(frozen=True)
class JudgeSettings:
    """Training knobs of the judge."""

    steps: int = 6000
    batch_size: int = 128
    lr: float = 3e-3
    noise: float = 0.1  # std of the Gaussian pixel noise added to training images ([0, 1] pixels)
    shift: int = 1  # random shifts of up to this many pixels
    rotation: float = 180.0  # training views turned by up to this many degrees either way (180: any angle)


# the judge's knobs, and the reader's: upright digits (the MLGD-F classifier's RandomRotation(10)), no pixel noise
ROLE_SETTINGS = {"judge": JudgeSettings(), "reader": JudgeSettings(steps=1500, noise=0.0, rotation=10.0)}


class DigitJudge(nn.Module):
    """A small CNN: images (N, 1, 16, 16) in [0, 1] -> logits (N, 10)."""

    def __init__(self, config: JudgeConfig = JudgeConfig()) -> None:
        super().__init__()
        self.config = config
        a, b, c = config.channels
        self.features = nn.Sequential(
            nn.Conv2d(1, a, 3, padding=1), nn.GroupNorm(4, a), nn.SiLU(),
            nn.Conv2d(a, b, 3, padding=1), nn.GroupNorm(4, b), nn.SiLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(b, c, 3, padding=1), nn.GroupNorm(4, c), nn.SiLU(), nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(4, c), nn.SiLU(),
        )  # fmt: skip
        self.head = nn.Linear(c, config.classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, 10) of images (N, 1, 16, 16) in [0, 1], min-max scaled first (as the MLGD-F judge)."""
        return self.head(self.features(min_max(images)).mean((-1, -2)))


def min_max(images: torch.Tensor) -> torch.Tensor:
    """Each image scaled to [0, 1] by its own min and max, (N, 1, H, W) -> (N, 1, H, W)."""
    flat = images.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values  # (N,)
    return ((flat - lo[:, None]) / (hi - lo + 1e-8)[:, None]).view_as(images)


@torch.no_grad()
def judge_digits(
    judge: DigitJudge, images: torch.Tensor, threshold: float = THRESHOLD
) -> tuple[list[int], list[float]]:
    """The judge's digit per image (NO_DIGIT below the confidence threshold) and its confidence, images (N, 1, 16, 16)
    in [0, 1]."""
    probs = torch.softmax(judge(images.float()), dim=-1)  # (N, 10)
    confidence, label = probs.max(-1)
    label = torch.where(confidence >= threshold, label, torch.full_like(label, NO_DIGIT))
    return label.tolist(), confidence.tolist()


def augment(images: torch.Tensor, settings: JudgeSettings, gen: torch.Generator) -> torch.Tensor:
    """Training views of upright digits (N, 1, 16, 16): a random rotation (uniform within settings.rotation degrees
    either way), a small shift, pixel noise."""
    from cdm_dist.problems.digits import rotate

    n = len(images)
    if settings.rotation >= 180:  # any angle (drawn as the shipped judge was, so its command reproduces it)
        theta = 2 * math.pi * torch.rand(n, generator=gen)
    else:
        theta = math.radians(settings.rotation) * (2 * torch.rand(n, generator=gen) - 1)
    turned = rotate(images, theta)
    dx, dy = (torch.randint(-settings.shift, settings.shift + 1, (2,), generator=gen)).tolist()
    shifted = torch.roll(turned, shifts=(dy, dx), dims=(-2, -1))
    return shifted + settings.noise * torch.randn(shifted.shape, generator=gen)


@torch.no_grad()
def heldout_accuracy(judge: DigitJudge, angles: int = HELDOUT_ANGLES) -> dict[str, float]:
    """Accuracy on the held-out digits (every 10th) at `angles` evenly spaced rotations: plain argmax, with 6 and 9
    counted as one class (one shape under rotation), and the share the 0.7 threshold leaves unjudged."""
    from cdm_dist.problems.digits import base_digits, rotate

    images, labels = base_digits("heldout")
    turned = torch.cat([rotate(images, torch.full((len(images),), 2 * math.pi * k / angles)) for k in range(angles)])
    truth = labels.repeat(angles)
    probs = torch.softmax(judge(turned), dim=-1)
    pred = probs.argmax(-1)
    merged = torch.where(pred == 9, 6, pred) == torch.where(truth == 9, 6, truth)
    zeros = truth == 0
    return {
        "accuracy": float((pred == truth).float().mean()),
        "accuracy_6_9_merged": float(merged.float().mean()),
        "unjudged_below_threshold": float((probs.max(-1).values < THRESHOLD).float().mean()),
        "zero_recall": float((pred[zeros] == 0).float().mean()),
        "zero_precision": float((truth[pred == 0] == 0).float().mean()),
        "images": len(truth),
    }


def train_judge(
    problem: str,
    out: str | Path,
    steps: int | None = None,
    seed: int = 0,
    command: str | None = None,
    progress: bool = True,
    role: str = "judge",
) -> dict[str, Any]:
    """Train the digit judge, or the upright reader (`role`), by cross-entropy on augmented training digits (Adam,
    cosine decay) and write its folder: config.json, model.safetensors and manifest.json (held-out quality, sha256
    of the weights, the command)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from cdm_dist.problems.digits import DATA, base_digits

    if problem != "digits":
        raise InputError(f"--problem: a {role} is trained for digits only; got {problem!r}")
    if role not in ROLE_SETTINGS:
        raise InputError(f"role: unknown {role!r}; expected one of {list(ROLE_SETTINGS)}")
    settings = ROLE_SETTINGS[role] if steps is None else replace(ROLE_SETTINGS[role], steps=steps)
    if settings.steps < 1:
        raise InputError(f"--steps: must be >= 1; got {settings.steps}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"--out: {out} exists and is not empty; choose a new folder")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = base_digits("train")
    judge = DigitJudge()
    optimizer = torch.optim.Adam(judge.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.steps)
    start, recent = time.perf_counter(), []
    for _ in tqdm(range(settings.steps), desc=f"train {role} digits", disable=not progress, mininterval=1.0):
        pick = torch.randint(len(images), (settings.batch_size,), generator=gen)
        loss = nn.functional.cross_entropy(judge(augment(images[pick], settings, gen)), labels[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        recent = [*recent[-199:], float(loss.detach())]
    judge.eval()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, out / WEIGHTS)
    (out / "config.json").write_text(json.dumps(asdict(judge.config), indent=1) + "\n")
    turns = "uniformly random rotations" if settings.rotation >= 180 else f"rotations within ±{settings.rotation:g}°"
    manifest = {
        "role": role,
        "problem": problem,
        "model_class": type(judge).__name__,
        "parameters": sum(p.numel() for p in judge.parameters()),
        "data": f"{DATA}; {turns}, shifts of up to {settings.shift} px, pixel noise of std {settings.noise}",
        "objective": "cross-entropy over the 10 digits",
        "threshold": THRESHOLD if role == "judge" else None,
        "steps": settings.steps,
        "seed": seed,
        "settings": asdict(settings),
        "final_training_loss": sum(recent) / len(recent),
        "train_seconds": time.perf_counter() - start,
        "quality": heldout_accuracy(judge) if role == "judge" else reader_quality(judge),
        "weights_sha256": sha256(out / WEIGHTS),
        "command": command or " ".join(sys.argv),
        "versions": {"torch": torch.__version__},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


@torch.no_grad()
def reader_quality(reader: DigitJudge) -> dict[str, Any]:
    """The reader on the held-out digits: upright accuracy, and per quarter turn the share of each class that still
    reads as a digit (any digit, at the readable confidence), the share of the angle labels it adds."""
    from cdm_dist.problems.digits import base_digits, readable_turns

    images, labels = base_digits("heldout")
    readable = readable_turns(reader, images)  # (N, 4)
    shares = {
        f"readable_at_{90 * k}_deg_by_class": [round(float(readable[labels == d, k].float().mean()), 3) for d in
                                               range(10)] for k in range(1, 4)}  # fmt: skip
    return {
        "upright_accuracy": float((reader(images).argmax(-1) == labels).float().mean()),
        **shares,
        "mean_readable_turns": float(readable.float().sum(1).mean()),
        "images": len(images),
    }


@cache
def readable_quarters(split: str = "train") -> torch.Tensor:
    """readable_turns of every digit of a split under the shipped reader, (N, 4) bool (cached: read-only)."""
    from cdm_dist.problems.digits import base_digits, readable_turns

    return readable_turns(load_judge(role="reader"), base_digits(split)[0])


def shipped_judge(role: str = "judge") -> Path:
    """The shipped digits judge's folder, or the reader's."""
    return Path(__file__).resolve().parent.parent / "checkpoints" / "digits" / role


def load_judge(folder: str | Path | None = None, role: str = "judge") -> DigitJudge:
    """A judge (or reader) folder, default the shipped one, its weights checked against the manifest's sha256."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else shipped_judge(role)
    manifest = read_manifest(folder)
    if manifest.get("role") != role:
        raise InputError(f"{role}: {folder} is not a {role} checkpoint (role {manifest.get('role')!r})")
    verify_manifest(folder, folder / WEIGHTS, role)
    config = json.loads((folder / "config.json").read_text())
    judge = DigitJudge(JudgeConfig(**{**config, "channels": tuple(config["channels"])}))
    judge.load_state_dict(load_file(folder / WEIGHTS))
    return judge.eval().requires_grad_(False)
