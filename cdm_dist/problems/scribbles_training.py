"""Training the scribbles problem's generator and embedding (cdm_dist.problems.scribbles); the prior trains through
`cdm train prior --problem scribbles` like every other prior.

- The generator: one step of a diffusers UNet2DConditionModel with a ControlNet that sees the scribble, from the
  noise η at the last trailing timestep straight to the image (prediction_type "sample"), as SDXL-Turbo generates in
  one step. It is trained on (scribble, rendered image) pairs by the energy score (Gneiting & Raftery 2007; the
  "engression" of Shen & Meinshausen 2023): E||G(x, η) - I|| - ½ E||G(x, η) - G(x, η')||, whose minimiser is the
  true conditional distribution, so the generator learns to draw the attributes at the data's frequencies rather
  than their average colour (which an x0-prediction step from pure noise would give).
- The embedding: a small CNN of the generated image, trained to tell both attributes apart; y is its 16-D feature,
  and the class embeddings for zero-shot classification are the mean unit feature of each attribute value.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from cdm_dist.errors import InputError
from cdm_dist.problems import scribbles as S
from cdm_dist.problems.scribbles import ScribbleEmbedder

PROMPT_WIDTH = 8  # the generator UNet's cross_attention_dim; its prompt is a fixed zero token (no text here)


@dataclass(frozen=True)
class GeneratorSettings:
    """Optimisation knobs of the generator's training."""

    steps: int = 2000
    scribbles: int = 8  # scribbles per batch
    draws: int = 8  # images per scribble (the energy score's samples)
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.995
    grad_clip: float = 1.0


@dataclass(frozen=True)
class EmbedderSettings:
    """Optimisation knobs of the embedding's training."""

    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    noise: float = 0.15  # pixel noise added to the renders, so generated images (never exact) embed like them


# -- the generator ------------------------------------------------------------------------------------------


def new_generator(seed: int, channels: tuple[int, ...] = (16, 32)) -> tuple[nn.Module, nn.Module]:
    """An untrained pixel-space UNet2DConditionModel (3 x 16 x 16, no attention) and its ControlNet, which maps the
    1 x 32 x 32 scribble onto the UNet's 16 x 16 grid."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed)
    levels = len(channels)
    unet = UNet2DConditionModel(
        sample_size=S.IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=channels,
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        mid_block_type="UNetMidBlock2D",
        cross_attention_dim=PROMPT_WIDTH,
        norm_num_groups=8,
    )
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16), conditioning_channels=1)
    return unet, controlnet


def generator_scheduler() -> Any:
    """The generator's scheduler: DDIM with trailing spacing, x0 ("sample") prediction; one step starts at t = 999."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, prediction_type="sample",
                         timestep_spacing="trailing")  # fmt: skip


def generate(unet: nn.Module, controlnet: nn.Module, scribbles: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """One generator step: scribbles (n, 1, 32, 32) in [-1, 1], eta (n, 3, 16, 16) -> images (n, 3, 16, 16), as
    GeneratorSampler runs it (control in [0, 1], t = 999, the zero prompt)."""
    prompt = torch.zeros(eta.shape[0], 1, PROMPT_WIDTH, dtype=eta.dtype, device=eta.device)
    down, mid = controlnet(eta, 999, encoder_hidden_states=prompt, controlnet_cond=(scribbles + 1) / 2,
                           return_dict=False)  # fmt: skip
    return unet(eta, 999, encoder_hidden_states=prompt, down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample  # fmt: skip


DISTANCE_EPS = 1e-8  # under the square root, so a distance is differentiable at zero


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances, differentiable at zero: a (S, K, D), b (S, L, D) -> (S, K, L)."""
    d2 = (a[:, :, None] - b[:, None]).square().sum(-1)
    return (d2 + DISTANCE_EPS).sqrt()


def energy_score(generated: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Mean over scribbles of E||G - I|| - ½ E||G - G'|| (a strictly proper scoring rule): generated (S, K, D),
    data (S, L, D) -> scalar."""
    k = generated.shape[1]
    cross = _distances(generated, data).mean((1, 2))
    diagonal = k * DISTANCE_EPS**0.5  # the k zero distances of each sample to itself, as _distances gives them
    within = (_distances(generated, generated).sum((1, 2)) - diagonal) / (k * (k - 1))
    return (cross - 0.5 * within).mean()


def generator_batch(settings: GeneratorSettings, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Scribbles repeated `draws` times (S·K, 1, 32, 32) and their rendered images (S·K, 3, 16, 16), each with its
    own attributes drawn at the shape's probabilities."""
    x = S.draw_scribbles(settings.scribbles, gen).repeat_interleave(settings.draws, 0)
    red, dark = S.draw_attributes(x, gen)
    return x, S.render(x, red, dark)


def train_generator(out: Path, settings: GeneratorSettings, seed: int, progress: bool = True) -> dict[str, Any]:
    """Train the generator by the energy score; returns the training record (the folder is written by the caller)."""
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    unet, controlnet = new_generator(seed)
    params = [*unet.parameters(), *controlnet.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, settings.warmup, settings.steps)
    ema = EMAModel(params, decay=settings.ema_decay, use_ema_warmup=True)
    gen = torch.Generator().manual_seed(seed + 1)
    shape = (settings.scribbles, settings.draws, -1)
    recent: list[float] = []
    start = time.perf_counter()
    for _ in tqdm(range(settings.steps), desc="train generator scribbles", disable=not progress, mininterval=2.0):
        x, images = generator_batch(settings, gen)
        eta = torch.randn(images.shape, generator=gen)
        loss = energy_score(generate(unet, controlnet, x, eta).view(shape), images.view(shape))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        optimizer.step(), schedule.step(), optimizer.zero_grad()
        ema.step(params)
        recent = [*recent[-199:], float(loss.detach())]
    ema.copy_to(params)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    controlnet.save_pretrained(out / "controlnet", safe_serialization=True)
    generator_scheduler().save_pretrained(out / "scheduler")
    save_file({"encoder_hidden_states": torch.zeros(1, PROMPT_WIDTH)}, str(out / "prompt.safetensors"))
    return {"final_energy_score": sum(recent) / len(recent), "train_seconds": time.perf_counter() - start,
            "parameters": sum(p.numel() for p in params)}  # fmt: skip


# -- the embedding --------------------------------------------------------------------------------------------


def embedder_batch(n: int, gen: torch.Generator, noise: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rendered images (n, 3, 16, 16) with pixel noise, and their attributes red, dark (n,) bool."""
    x = S.draw_scribbles(n, gen)
    red = torch.rand(n, generator=gen) < 0.5
    dark = torch.rand(n, generator=gen) < 0.5
    images = S.render(x, red, dark)
    return images + noise * torch.randn(images.shape, generator=gen), red, dark


def attribute_logits(model: ScribbleEmbedder, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(colour logits (n, 2) over (red, blue), background logits (n, 2) over (dark, light))."""
    logits = model.heads(model(images))
    return logits[:, :2], logits[:, 2:]


def train_embedder(settings: EmbedderSettings, seed: int, progress: bool = True) -> tuple[ScribbleEmbedder, dict]:
    """Train the embedding on both attributes (cross-entropy of each head)."""
    torch.manual_seed(seed)
    model = ScribbleEmbedder()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    gen = torch.Generator().manual_seed(seed + 1)
    recent: list[float] = []
    start = time.perf_counter()
    for _ in tqdm(range(settings.steps), desc="train embedder scribbles", disable=not progress, mininterval=2.0):
        images, red, dark = embedder_batch(settings.batch_size, gen, settings.noise)
        colour, background = attribute_logits(model, images)
        loss = F.cross_entropy(colour, (~red).long()) + F.cross_entropy(background, (~dark).long())
        loss.backward()
        optimizer.step(), optimizer.zero_grad()
        recent = [*recent[-99:], float(loss.detach())]
    return model.eval(), {"final_training_loss": sum(recent) / len(recent),
                          "train_seconds": time.perf_counter() - start}  # fmt: skip


@torch.no_grad()
def class_embeddings(model: ScribbleEmbedder, seed: int, n: int = 4000) -> dict[str, torch.Tensor]:
    """Per attribute, the zero-shot class embeddings: the mean unit embedding of each value's renders, (2, 16)."""
    gen = torch.Generator().manual_seed(seed)
    images, red, dark = embedder_batch(n, gen, 0.0)
    y = F.normalize(model(images), dim=-1)
    return {
        "colour": torch.stack([y[red].mean(0), y[~red].mean(0)]),
        "background": torch.stack([y[dark].mean(0), y[~dark].mean(0)]),
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """A JSON file, indented."""
    path.write_text(json.dumps(payload, indent=1) + "\n")


def check_out(out: Path) -> Path:
    """A new or empty output folder, or one InputError naming it."""
    if out.exists() and any(out.iterdir()):
        raise InputError(f"--out: {out} exists and is not empty; choose a new folder")
    return out


# -- quality, measured against the probabilities the data was drawn with --------------------------------------


@torch.no_grad()
def generator_quality(unet: nn.Module, controlnet: nn.Module, seed: int, scribbles: int = 64, draws: int = 64) -> dict:
    """Per held-out scribble, the generator's share of red and of dark images (read off the pixels) against P(red)
    and P(dark) of the training data: mean absolute error, and the share of images that are a clean render."""
    gen = torch.Generator().manual_seed(20_000 + seed)
    x = S.draw_scribbles(scribbles, gen)
    p = S.attribute_probabilities(x)
    xs = x.repeat_interleave(draws, 0)
    images = torch.cat([generate(unet, controlnet, xs[i : i + 512], torch.randn(len(xs[i : i + 512]), 3, 16, 16,
                        generator=gen)) for i in range(0, len(xs), 512)])  # fmt: skip
    seen = S.image_attributes(images)
    red = seen["red"].double().view(scribbles, draws).mean(1)
    dark = seen["dark"].double().view(scribbles, draws).mean(1)
    clean = S.render(xs, seen["red"], seen["dark"])
    rmse = (images - clean).square().flatten(1).mean(1).sqrt()
    return {
        "scribbles": scribbles,
        "draws_per_scribble": draws,
        "red_share_mae": float((red - p["red"].double()).abs().mean()),
        "dark_share_mae": float((dark - p["dark"].double()).abs().mean()),
        "pixel_rmse_to_nearest_render_median": float(rmse.median()),
    }


@torch.no_grad()
def embedder_quality(model: ScribbleEmbedder, classes: dict[str, torch.Tensor], seed: int, n: int = 2000) -> dict:
    """Zero-shot accuracy of each attribute's class embeddings on held-out renders (with the training noise)."""
    from cdm_dist.models.generator import zero_shot_probs

    gen = torch.Generator().manual_seed(30_000 + seed)
    images, red, dark = embedder_batch(n, gen, EmbedderSettings().noise)
    y = model(images)
    truth = {"colour": red, "background": dark}
    return {f"{name}_zero_shot_accuracy": float(((zero_shot_probs(y, classes[name], S.LOGIT_SCALE)[:, 0] > 0.5) ==
            truth[name]).double().mean()) for name in classes}  # fmt: skip


def train_sampler(out: Path, steps: int | None, seed: int, tiny: bool, command: str, progress: bool = True) -> dict:
    """`cdm train sampler --problem scribbles`: the generator and the embedding, into one folder with a manifest."""
    from cdm_dist.models.manifest import library_versions, sha256

    check_out(out)
    settings = GeneratorSettings(steps=steps or (40 if tiny else GeneratorSettings.steps))
    if settings.steps < 1:
        raise InputError(f"--steps: must be >= 1; got {settings.steps}")
    embed_settings = EmbedderSettings(steps=30 if tiny else EmbedderSettings.steps)
    out.mkdir(parents=True, exist_ok=True)
    record = train_generator(out, settings, seed, progress)
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(out / "unet").eval()
    controlnet = ControlNetModel.from_pretrained(out / "controlnet").eval()
    model, embed_record = train_embedder(embed_settings, seed, progress)
    from safetensors.torch import save_file as save

    (out / "embed").mkdir()
    save(model.state_dict(), str(out / "embed" / "model.safetensors"))
    write_json(out / "embed" / "config.json", {"class": "ScribbleEmbedder", "dim": S.EMBED_DIM})
    classes = class_embeddings(model, seed)
    for name, embeddings in classes.items():
        tensors = {"embeddings": embeddings, "logit_scale": torch.tensor(S.LOGIT_SCALE)}
        save(tensors, str(out / f"classes_{name}.safetensors"))
    small = {"scribbles": 8, "draws": 8} if tiny else {}
    manifest = {
        "role": "sampler",
        "problem": "scribbles",
        "model_class": "UNet2DConditionModel + ControlNetModel (one step, prediction_type sample) + ScribbleEmbedder",
        "data": "procedural scribbles, each rendered with attributes drawn at P(red | shape), P(dark | shape)",
        "objective": "energy score of the generator's images against the renders (engression); cross-entropy of the "
        "embedding's two attribute heads",
        "seed": seed,
        "tiny": tiny,
        "generator_settings": asdict(settings),
        "embedder_settings": asdict(embed_settings),
        "generator": record,
        "embedder": embed_record,
        "classes": {name: list(S.ATTRIBUTES[name]) for name in classes},
        "logit_scale": S.LOGIT_SCALE,
        "quality": generator_quality(unet, controlnet, seed, **small) | embedder_quality(model, classes, seed),
        "weights_sha256": {str(p.relative_to(out)): sha256(p) for p in sorted(out.rglob("*.safetensors"))},
        "command": command,
        "versions": library_versions(),
    }
    write_json(out / "manifest.json", manifest)
    manifest["final_training_loss"] = record["final_energy_score"]
    return manifest
