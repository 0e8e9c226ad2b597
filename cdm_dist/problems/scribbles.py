"""Scribbles: the MLGD-F paper's Exp. 2 (editing a scribble so that a ControlNet generator's outputs match a target
attribute mix) at a size two CPU cores train and run in minutes.

- X: a 1 x 32 x 32 line drawing in [-1, 1] (background -1, ink +1), drawn procedurally: one to three strokes (loops,
  zigzags, waves) inside a box whose aspect ratio and size vary.
- The generator's images: 3 x 16 x 16, the scribble's ink rendered in a colour (red or blue) on a background (light or
  dark). The two attributes are drawn at random, with probabilities that depend on the scribble's shape:
  P(red | x) = sigmoid(COLOUR_SLOPE · aspect(x)), aspect = log(ink spread across / ink spread down): wide drawings
  come out red, tall ones blue; P(dark | x) = sigmoid(DARK_SLOPE · (ink(x) - DARK_INK)): dense drawings get a dark
  background. So editing the scribble's shape moves the attribute mix, as a scribble's shape moves the perceived
  gender of a portrait in the paper.
- Y: a 16-D embedding of the generated image (a small CNN trained on the attributes), classified zero-shot against
  class embeddings, as CLIP's image embeddings are against text embeddings in the paper.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from cdm_dist.errors import InputError

SIZE = 32  # scribbles are 1 x SIZE x SIZE
IMAGE_SIZE = 16  # generated images are 3 x IMAGE_SIZE x IMAGE_SIZE
STROKE_WIDTH = 0.55  # pixels: the Gaussian pen's standard deviation
POINTS_PER_STROKE = 160  # about 3 points per pixel of the longest strokes
INK_GAIN = 1.0  # how fast the splatted ink saturates
LOG_ASPECT = 1.4  # the box's log aspect ratio is uniform on [-LOG_ASPECT, LOG_ASPECT]
COLOUR_SLOPE = 5.0  # P(red) = sigmoid(COLOUR_SLOPE * aspect)
DARK_SLOPE = 40.0  # P(dark) = sigmoid(DARK_SLOPE * (ink - DARK_INK))
DARK_INK = 0.15  # the ink fraction at which dark and light backgrounds are equally likely
ATTRIBUTES = {"colour": ("red", "blue"), "background": ("dark", "light")}
CLASSES = ("red", "blue", "dark", "light")
RED, BLUE = (0.9, 0.15, 0.1), (0.1, 0.25, 0.95)
LIGHT, DARK = (0.95, 0.93, 0.85), (0.12, 0.12, 0.18)
TARGETS = ("balanced", "skewed", "colour_interpolation", "background_interpolation")
TARGET_RED_SHARE = {"balanced": 0.5, "skewed": 0.25}  # the poster's 50% and 25% (of men; here of red)
EMBED_DIM = 16
LOGIT_SCALE = 30.0  # the zero-shot classifier's multiplier of the cosine (CLIP learns 100)
REFERENCE_POOL = 8000  # reference scribbles drawn per target, of which those with the wanted mix are used
LIGHT_ONLY = 0.2  # reference scribbles of the colour targets keep P(dark) below this (the source's background)
BLUE_ONLY = 0.05  # reference scribbles of the background target keep P(red) below this (the source's colour)


# -- procedural scribbles -------------------------------------------------------------------------------------


def _stroke_points(kind: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Points of one stroke per row in box coordinates [-1, 1]²: kind (n,) in {0 loop, 1 zigzag, 2 wave} ->
    (n, POINTS_PER_STROKE, 2)."""
    n, p = kind.shape[0], POINTS_PER_STROKE
    s = torch.linspace(0, 1, p)  # (p,)
    # loop: an ellipse arc of 1.3 to 2 turns' worth of 2 pi, random radii and start
    start = 2 * math.pi * torch.rand(n, 1, generator=gen)
    sweep = 2 * math.pi * (0.65 + 0.35 * torch.rand(n, 1, generator=gen))
    radii = 0.55 + 0.45 * torch.rand(n, 2, generator=gen)
    angle = start + sweep * s
    loop = torch.stack([radii[:, :1] * torch.cos(angle), radii[:, 1:] * torch.sin(angle)], -1)
    # zigzag: a polyline through 4 random corners
    corners = 2 * torch.rand(n, 4, 2, generator=gen) - 1  # (n, 4, 2)
    position = s * 3  # (p,) along 3 segments
    index = position.floor().clamp(max=2).long()
    frac = (position - index)[None, :, None]
    zigzag = corners[:, index] * (1 - frac) + corners[:, index + 1] * frac
    # wave: a sine across the box, horizontal or vertical
    phase = 2 * math.pi * torch.rand(n, 1, generator=gen)
    cycles = 1 + 1.5 * torch.rand(n, 1, generator=gen)
    offset = 0.6 * (2 * torch.rand(n, 1, generator=gen) - 1)
    along = 2 * s - 1
    across = offset + 0.4 * torch.sin(2 * math.pi * cycles * s + phase)
    flip = torch.rand(n, 1, generator=gen) < 0.5
    wave = torch.where(flip[..., None], torch.stack([across, along.expand_as(across)], -1),
                       torch.stack([along.expand_as(across), across], -1))  # fmt: skip
    choice = kind[:, None, None]
    return torch.where(choice == 0, loop, torch.where(choice == 1, zigzag, wave))


def render_points(points: torch.Tensor, mask: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """Ink of a Gaussian pen along densely spaced points: points (n, P, 2) in pixel units (x, y), mask (n, P) of the
    points drawn -> scribbles (n, 1, size, size) in [-1, 1]. Each point is splatted bilinearly, the splats are
    blurred by the pen's Gaussian and the ink saturates (1 - exp), so crossings do not darken much."""
    n = points.shape[0]
    position = points - 0.5  # pixel centres at integers
    base = position.floor()
    frac = position - base
    canvas = torch.zeros(n, (size + 2) * (size + 2), dtype=points.dtype)
    for dx in (0, 1):
        for dy in (0, 1):
            weight = (frac[..., 0] if dx else 1 - frac[..., 0]) * (frac[..., 1] if dy else 1 - frac[..., 1]) * mask
            col = (base[..., 0] + dx + 1).clamp(0, size + 1).long()
            row = (base[..., 1] + dy + 1).clamp(0, size + 1).long()
            canvas.scatter_add_(1, row * (size + 2) + col, weight)
    canvas = canvas.view(n, 1, size + 2, size + 2)[..., 1:-1, 1:-1]
    radius = torch.arange(-2, 3, dtype=points.dtype)
    kernel = torch.exp(-radius.square() / (2 * STROKE_WIDTH**2))
    blurred = F.conv2d(
        F.conv2d(canvas, kernel.view(1, 1, 1, 5), padding=(0, 2)), kernel.view(1, 1, 5, 1), padding=(2, 0)
    )
    return 2 * (1 - torch.exp(-INK_GAIN * blurred)) - 1


def draw_scribbles(n: int, gen: torch.Generator, size: int = SIZE) -> torch.Tensor:
    """n procedural scribbles (n, 1, size, size) in [-1, 1]: 1-3 strokes in a box of random aspect and size."""
    log_aspect = LOG_ASPECT * (2 * torch.rand(n, generator=gen) - 1)
    scale = 0.45 + 0.35 * torch.rand(n, generator=gen)
    half = torch.stack([scale * torch.exp(log_aspect / 2), scale * torch.exp(-log_aspect / 2)], -1).clamp(max=0.9) / 2
    centre = 0.5 + (0.5 - half) * (2 * torch.rand(n, 2, generator=gen) - 1) * 0.6  # (n, 2) in [0, 1]
    strokes = torch.randint(1, 4, (n,), generator=gen)
    kinds = torch.randint(0, 3, (n, 3), generator=gen)
    points = torch.cat([_stroke_points(kinds[:, k], gen) for k in range(3)], 1)  # (n, 3 P, 2)
    pixels = (centre[:, None] + points * half[:, None]) * size
    drawn = torch.arange(3).repeat_interleave(POINTS_PER_STROKE)[None] < strokes[:, None]  # (n, 3 P)
    return render_points(pixels, drawn.to(pixels.dtype), size)


def source_scribble(size: int = SIZE) -> torch.Tensor:
    """The editing source: a tall narrow loop (1, 1, size, size), whose outputs are ~100% blue on light."""
    angle = torch.linspace(0, 2 * math.pi, 2 * POINTS_PER_STROKE)
    half = torch.tensor([0.05, 0.20])
    points = (0.5 + torch.stack([torch.cos(angle), torch.sin(angle)], -1) * half) * size
    return render_points(points[None], torch.ones(1, len(angle)), size)


# -- shape features and the attribute probabilities -----------------------------------------------------------


def ink(x: torch.Tensor) -> torch.Tensor:
    """Scribbles (n, 1, H, W) in [-1, 1] -> ink weights (n, H, W) in [0, 1]."""
    return ((x[:, 0] + 1) / 2).clamp(0, 1)


def shape_features(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per scribble (n, 1, H, W): ink fraction (n,) and aspect (n,) = 0.5 log(Var across / Var down) of the ink."""
    w = ink(x)
    h, width = w.shape[1:]
    mass = w.sum((1, 2)) + 1e-6
    cols = torch.arange(width, dtype=w.dtype) + 0.5
    rows = torch.arange(h, dtype=w.dtype) + 0.5
    mx = (w.sum(1) * cols).sum(1) / mass
    my = (w.sum(2) * rows).sum(1) / mass
    vx = (w.sum(1) * (cols - mx[:, None]).square()).sum(1) / mass
    vy = (w.sum(2) * (rows - my[:, None]).square()).sum(1) / mass
    return {"ink": mass / (h * width), "aspect": 0.5 * torch.log((vx + 0.5) / (vy + 0.5))}


def attribute_probabilities(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The probabilities the training data draws each scribble's attributes with: P(red), P(dark), each (n,)."""
    f = shape_features(x)
    return {
        "red": torch.sigmoid(COLOUR_SLOPE * f["aspect"]),
        "dark": torch.sigmoid(DARK_SLOPE * (f["ink"] - DARK_INK)),
    }


# -- the rendered images --------------------------------------------------------------------------------------


def render(x: torch.Tensor, red: torch.Tensor, dark: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Scribbles (n, 1, H, W) and attributes red, dark (n,) bool -> images (n, 3, size, size) in [-1, 1]: the ink,
    averaged down to size, in red or blue over a dark or light background."""
    w = F.adaptive_avg_pool2d(ink(x)[:, None], size)  # (n, 1, size, size)
    colour = torch.where(red[:, None], torch.tensor(RED), torch.tensor(BLUE)).to(w)[..., None, None]
    back = torch.where(dark[:, None], torch.tensor(DARK), torch.tensor(LIGHT)).to(w)[..., None, None]
    return 2 * (back * (1 - w) + colour * w) - 1


def draw_attributes(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Attributes drawn with the shape-dependent probabilities: red, dark (n,) bool."""
    p = attribute_probabilities(x)
    u = torch.rand(x.shape[0], 2, generator=gen)
    return u[:, 0] < p["red"], u[:, 1] < p["dark"]


def image_attributes(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Attributes read off generated images (n, 3, h, w) by their pixels, not by the learned embedding: red when the
    ink (the pixels furthest from the background) leans red rather than blue; dark when the image's mean brightness
    is below the midpoint of the two backgrounds'. Returns red, dark (n,) bool."""
    rgb = (images + 1) / 2
    brightness = rgb.mean(1)  # (n, h, w)
    dark = brightness.mean((1, 2)) < (sum(DARK) + sum(LIGHT)) / 6
    background = rgb.median(-1).values.median(-1).values  # (n, 3): most pixels are background
    distance = (rgb - background[..., None, None]).abs().sum(1)  # (n, h, w)
    weight = distance / (distance.sum((1, 2), keepdim=True) + 1e-8)
    lean = ((rgb[:, 0] - rgb[:, 2]) * weight).sum((1, 2))  # red minus blue, over the ink
    return {"red": lean > 0, "dark": dark}


def check_target(name: str) -> str:
    """The target's name, or one InputError listing the four."""
    if name not in TARGETS:
        raise InputError(f"scribbles target: unknown {name!r}; expected one of {list(TARGETS)}")
    return name


# -- the embedding of generated images ------------------------------------------------------------------------


class ScribbleEmbedder(nn.Module):
    """y = a 16-D feature of a generated image (N, 3, 16, 16) in [-1, 1]; `heads` classify colour and background."""

    def __init__(self, dim: int = EMBED_DIM) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.GELU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.GELU(),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.GELU(), nn.Linear(64, dim),
        )  # fmt: skip
        self.heads = nn.Linear(dim, 4)  # logits: (red, blue), (dark, light)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)


def load_embedder(folder: str) -> ScribbleEmbedder:
    """The trained embedding from a folder (config.json + model.safetensors), in eval mode without gradients."""
    from safetensors.torch import load_file

    path = Path(folder)
    if not (path / "model.safetensors").is_file():
        raise InputError(f"{path}: no model.safetensors (the scribbles embedding; `cdm train sampler --problem "
                         "scribbles` writes it)")  # fmt: skip
    config = json.loads((path / "config.json").read_text())
    model = ScribbleEmbedder(int(config["dim"]))
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval().requires_grad_(False)


# -- the targets ----------------------------------------------------------------------------------------------


def reference_scribbles(name: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """n reference scribbles of a target, (n, 1, 32, 32): for balanced and skewed, scribbles of mixed colour
    (0.2 < P(red) < 0.8) on the source's light background; for an interpolation, scribbles whose P(red) (colour) or
    P(dark) (background) spreads evenly over [0, 1], the other attribute held at the source's value."""
    pool = draw_scribbles(REFERENCE_POOL, gen)
    p = attribute_probabilities(pool)
    if name in TARGET_RED_SHARE:
        keep = (p["dark"] < LIGHT_ONLY) & (p["red"] > 0.2) & (p["red"] < 0.8)
        chosen = pool[keep]
        return chosen[torch.randint(len(chosen), (n,), generator=gen)]
    moving, held, limit = ("red", "dark", LIGHT_ONLY) if name == "colour_interpolation" else ("dark", "red", BLUE_ONLY)
    keep = p[held] < limit
    values, chosen = p[moving][keep], pool[keep]
    bins = 10
    per_bin = [torch.nonzero((values >= b / bins) & (values < (b + 1) / bins)).flatten() for b in range(bins)]
    picks = [rows[torch.randint(len(rows), (n // bins + (b < n % bins),), generator=gen)] for b, rows in
             enumerate(per_bin)]  # fmt: skip
    return chosen[torch.cat(picks)]


@torch.no_grad()
def target_embeddings(sampler: Any, name: str, n: int, seed: int, colour: torch.Tensor | None = None) -> torch.Tensor:
    """n target samples (n, 16): the generator's embedded outputs on a target's reference scribbles. For balanced and
    skewed, the outputs are then stratified by colour so that exactly the wanted share is red: by the zero-shot
    classifier of the `colour` class embeddings (2, 16) (the evaluation's) when given, else by the pixels."""
    check_target(name)
    gen = torch.Generator().manual_seed(seed)
    draws = 3 * n if name in TARGET_RED_SHARE else n
    x = reference_scribbles(name, draws, gen).double()
    eta = torch.randn((draws, 1, *sampler.noise_shape), generator=gen, dtype=torch.float64)
    y, images = sampler.sample_with_images(x, eta)
    y, images = y[:, 0], images[:, 0]
    if name not in TARGET_RED_SHARE:
        return y
    if colour is None:
        red = image_attributes(images)["red"]
    else:
        from cdm_dist.models.generator import zero_shot_probs

        red = zero_shot_probs(y.float(), colour, LOGIT_SCALE)[:, 0] > 0.5
    reds = round(TARGET_RED_SHARE[name] * n)
    rows = torch.cat([torch.nonzero(red).flatten()[:reds], torch.nonzero(~red).flatten()[: n - reds]])
    if len(rows) < n:
        raise InputError(f"scribbles {name} target: only {int(red.sum())} red of {draws} reference outputs")
    return y[rows[torch.randperm(n, generator=gen)]]


# -- the problem's parts --------------------------------------------------------------------------------------


def sampler_part(folder: Path) -> dict[str, Any]:
    """The fast sampler: the one-step ControlNet generator of <folder>/sampler, y = its embedding of the image."""
    sampler = folder / "sampler"
    return {
        "generator": str(sampler),
        "prompt": str(sampler / "prompt.safetensors"),
        "steps": 1,
        "embed": {"factory": load_embedder, "args": {"folder": str(sampler / "embed")}},
    }


def load_generator(folder: str | Path, device: str = "cpu") -> Any:
    """The scribbles generator sampler of a checkpoints folder (prior/ and sampler/), as a campaign builds it."""
    from cdm_dist.models.generator import load_generator_sampler
    from cdm_dist.models.spec import GeneratorSamplerSpec

    spec = GeneratorSamplerSpec.model_validate(sampler_part(Path(folder)))
    return load_generator_sampler(spec, device)


def scribbles_target(folder: str, target: str = "balanced", target_size: int = 1000, target_seed: int = 0) -> Any:
    """A target of the scribbles problem: the generator's embedded outputs on the target's reference scribbles;
    held-out draws come from the same construction with other seeds."""
    from safetensors.torch import load_file

    from cdm_dist.chains.targets import Target

    sampler = load_generator(folder)
    colour = load_file(str(Path(folder) / "sampler" / "classes_colour.safetensors"))["embeddings"]
    draw = lambda n, seed: target_embeddings(sampler, check_target(target), n, seed, colour)  # noqa: E731
    return Target.from_sampler(draw, target_size, target_seed, source=f"scribbles {target} target")


def problem_parts(folder: Path, target: str, target_size: int, target_seed: int) -> dict[str, Any]:
    """The scribbles problem's parts: the pixel prior, the generator sampler and a target."""
    check_target(target)
    args = {"folder": str(folder), "target": target, "target_size": target_size, "target_seed": target_seed}
    return {
        "prior": {"diffusers": str(folder / "prior")},
        "sampler": sampler_part(folder),
        "target": {"factory": scribbles_target, "args": args},
    }
