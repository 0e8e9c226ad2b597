"""`cdm train prior|sampler`: fit the learned models of a problem with accelerate, keep EMA weights, write a manifest.

- Prior: epsilon-prediction DDPM loss (Ho et al. 2020) under the problem's DDPMScheduler.
- Sampler: conditional rectified flow / flow matching (Liu et al. 2023; Lipman et al. 2023): z_s = (1 - s) eta + s y,
  regress v(z_s, s | x) on y - eta. A few Euler steps give the fast sampler, many the full chain.
- One-step sampler (`--kind one_step`): the flow's own map distilled into one Euler step (Liu et al. 2023, Sec. 2.3:
  a straight teacher's coupling, regressed directly): the student, a copy of the teacher, learns
  z0 + v(z0, 0 | x) = Phi_teacher(z0 | x), the teacher's 32-step integral from the same noise.
Quality is measured on held-out data and written to the manifest, not assumed.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cdm_dist.errors import InputError
from cdm_dist.models.manifest import library_versions, sha256

Draw = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]  # (n, gen) -> x (n, *x), y (n, d_y)
ROLES = ("prior", "sampler")
KINDS = ("flow", "one_step")  # sampler kinds: a rectified flow (Euler steps), or its one-step distillation
TEACHER_STEPS = 32  # Euler steps of the teacher flow whose map the one-step sampler learns


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation knobs of one training run."""

    steps: int
    batch_size: int
    lr: float
    ema_decay: float = 0.999
    warmup: int = 200
    grad_clip: float = 1.0
    gradient_accumulation: int = 1
    mixed_precision: str = "no"  # accelerate: no | fp16 | bf16


DEFAULTS: dict[tuple[str, str], TrainSettings] = {
    ("gmm", "prior"): TrainSettings(steps=10_000, batch_size=1024, lr=2e-3),
    ("gmm", "sampler"): TrainSettings(steps=10_000, batch_size=1024, lr=2e-3),
    ("digits", "prior"): TrainSettings(steps=3_000, batch_size=64, lr=1e-3, ema_decay=0.995),
    ("digits", "sampler"): TrainSettings(steps=4_000, batch_size=128, lr=1e-3, ema_decay=0.995),
    ("gmm", "one_step"): TrainSettings(steps=4_000, batch_size=1024, lr=5e-4, warmup=100),
    ("digits", "one_step"): TrainSettings(steps=1_500, batch_size=128, lr=3e-4, ema_decay=0.995, warmup=100),
    ("scribbles", "prior"): TrainSettings(steps=3_000, batch_size=32, lr=1e-3, ema_decay=0.995),
}


@dataclass(frozen=True)
class TrainingData:
    """Joint samples (x, y) of a problem: `draw` for training, `heldout` for measuring quality."""

    problem: str
    x_shape: tuple[int, ...]
    y_dim: int
    draw: Draw
    heldout: Draw
    description: str


def training_data(problem: str) -> TrainingData:
    """Where a problem's (x, y) pairs come from: the mixture joint itself, or rotated digits."""
    from cdm_dist.problems.builtins import GMM_PROBLEMS

    if problem in GMM_PROBLEMS:
        from cdm_dist.problems.builtins import mixture_problem

        joint = mixture_problem(problem).joint  # joint seed 1 for 5D/10D

        def draw(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            xy = joint.sample(n, gen).float()
            return xy[:, :-1], xy[:, -1:]

        dim = GMM_PROBLEMS[problem]
        text = f"fresh samples of the {problem} joint (cdm_dist.problems.builtins; joint seed 1 for 5D/10D) every step"
        return TrainingData(problem, (dim - 1,), 1, draw, draw, text)
    if problem == "digits":
        from cdm_dist.problems.digits import DATA, SIZE, rotated_batch

        def digits(split: str) -> Draw:
            return lambda n, gen: rotated_batch(n, gen, split)

        text = f"{DATA}, theta ~ U[0, 2pi) per draw"
        return TrainingData(problem, (1, SIZE, SIZE), 2, digits("train"), digits("heldout"), text)
    if problem == "scribbles":
        from cdm_dist.problems import scribbles

        def draw_scribbles(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            x = scribbles.draw_scribbles(n, gen)
            p = scribbles.attribute_probabilities(x)
            return x, torch.stack([p["red"], p["dark"]], 1)

        text = (
            "procedural scribbles (cdm_dist.problems.scribbles.draw_scribbles), fresh every step; y = (P(red), P(dark))"
        )
        size = scribbles.SIZE
        return TrainingData(problem, (1, size, size), 2, draw_scribbles, draw_scribbles, text)
    raise InputError(f"--problem: unknown {problem!r}; expected one of {trainable_problems()}")


def sampler_data(problem: str) -> TrainingData:
    """The (x, y) pairs a problem's fast sampler learns: the problem's own, except on digits, where y is the digit's
    angle or that angle plus a quarter turn at which it still reads as a digit (the MLGD-F code's labels)."""
    data = training_data(problem)
    if problem != "digits":
        return data
    from cdm_dist.problems.digits import READABLE_CONFIDENCE, readable_rotated_batch
    from cdm_dist.problems.judge import readable_quarters

    def readable(split: str) -> Draw:
        return lambda n, gen: readable_rotated_batch(n, gen, readable_quarters(split), split)

    text = (f"{data.description}; y also theta + each quarter turn at which the shipped reader "
            f"(checkpoints/digits/reader) names a digit at > {READABLE_CONFIDENCE} in the turned digit")  # fmt: skip
    return replace(data, draw=readable("train"), heldout=readable("heldout"), description=text)


def trainable_problems() -> list[str]:
    """The built-in problems whose training data the project can draw."""
    from cdm_dist.problems.builtins import GMM_PROBLEMS

    return [*GMM_PROBLEMS, "digits", "scribbles"]


def settings_for(problem: str, role: str, kind: str = "flow") -> TrainSettings:
    """The default training settings of a problem family, role and sampler kind."""
    family = problem if problem in ("digits", "scribbles") else "gmm"
    return DEFAULTS[(family, "one_step" if kind == "one_step" else role)]


# -- models ---------------------------------------------------------------------------------------------------


def new_model(data: TrainingData, role: str, gen: torch.Generator, tiny: bool = False) -> torch.nn.Module:
    """An untrained model for a problem and role; data statistics go into its config."""
    from diffusers import UNet2DModel

    from cdm_dist.models.networks import ConditionalVelocityModel, MLPNoiseModel

    width, blocks = (32, 1) if tiny else (128, 3)
    x, y = data.draw(20_000 if not tiny else 2_000, gen)
    image = len(data.x_shape) == 3
    if role == "prior":
        if image:
            return UNet2DModel(
                sample_size=data.x_shape[-1],
                in_channels=data.x_shape[0],
                out_channels=data.x_shape[0],
                layers_per_block=1,
                **_image_prior_levels(data.x_shape[-1], tiny),
                norm_num_groups=8,
            )
        return MLPNoiseModel(
            dim=data.x_shape[0],
            width=width,
            blocks=blocks,
            beta_schedule=new_scheduler().config.beta_schedule,
            data_mean=x.mean(0).tolist(),
            data_std=x.std(0).tolist(),
            preconditioning="edm",
        )
    x_stats = {} if image else {"x_mean": x.mean(0).tolist(), "x_std": x.std(0).tolist()}
    return ConditionalVelocityModel(
        x_shape=list(data.x_shape),
        y_dim=data.y_dim,
        width=width,
        blocks=blocks,
        encoder_width=32 if tiny else 128,
        y_mean=y.mean(0).tolist(),
        y_std=y.std(0).tolist(),
        **x_stats,
    )


def _image_prior_levels(size: int, tiny: bool) -> dict[str, Any]:
    """A UNet2DModel's levels: three to 4x4 for 16x16 images, four (narrower at the top) for 32x32."""
    channels = (16, 32, 32) if tiny else (32, 64, 64) if size <= 16 else (16, 32, 64, 64)
    plain = len(channels) - 1
    return {
        "block_out_channels": channels,
        "down_block_types": ("DownBlock2D",) * plain + ("AttnDownBlock2D",),
        "up_block_types": ("AttnUpBlock2D",) + ("UpBlock2D",) * plain,
    }


def new_scheduler(prediction_type: str = "epsilon") -> Any:
    """The noise schedule of every learned prior: DDPM's linear betas 1e-4..0.02 over 1000 steps (Ho et al. 2020).

    Not the capped cosine schedule: its last ᾱ is ~1e-9, so DDIM's first Tweedie step divides the network's
    ε error by sqrt(ᾱ_T) ~ 3e-5 and the next step cannot undo it; exact priors do not mind, learned ones do."""
    from cdm_dist.chains.diffusion import make_scheduler

    return make_scheduler("ddpm", num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction_type)


# -- objectives -----------------------------------------------------------------------------------------------


def prior_loss(
    model: torch.nn.Module,
    alphas_cumprod: torch.Tensor,
    x0: torch.Tensor,
    gen: torch.Generator,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """E λ(t) ||ε - ε̂(sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε, t)||², t uniform on the training grid (Ho et al. 2020);
    λ = 1, or EDM's weight for a preconditioned MLPNoiseModel (Karras et al. 2022). With v-prediction the target
    is v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x0 (Salimans & Ho 2022), so x̂0 at high noise is the network's own output
    rather than the ε error divided by sqrt(ᾱ_t)."""
    from cdm_dist.models.learned import noise_prediction
    from cdm_dist.models.networks import MLPNoiseModel

    n = x0.shape[0]
    t = torch.randint(len(alphas_cumprod), (n,), generator=gen).to(x0.device)
    noise = torch.randn(x0.shape, generator=gen).to(x0)
    ab = alphas_cumprod.to(x0)[t].view(n, *[1] * (x0.dim() - 1))
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    eps = noise_prediction(model, x_t, t)
    if prediction_type == "v_prediction":
        velocity = ab.sqrt() * noise - (1 - ab).sqrt() * x0
        return (eps.float() - velocity.float()).square().mean()
    unwrapped = getattr(model, "module", model)  # accelerate may wrap it
    weight = unwrapped.loss_weight(t) if isinstance(unwrapped, MLPNoiseModel) else 1.0
    return (weight * (eps.float() - noise.float()).square()).mean()


def flow_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """E ||(z1 - z0) - v((1 - s) z0 + s z1, s | x)||², z1 = standardised y, z0 ~ N(0, I), s ~ U[0, 1]."""
    unwrapped = getattr(model, "module", model)
    z1 = unwrapped.to_standard(y)
    z0 = torch.randn(z1.shape, generator=gen).to(z1)
    s = torch.rand(z1.shape[0], generator=gen).to(z1)
    z_s = (1 - s[:, None]) * z0 + s[:, None] * z1
    v = model(z_s, s, x)
    return torch.nn.functional.mse_loss(v.float(), (z1 - z0).float())


@torch.no_grad()
def teacher_pairs(
    data: TrainingData, teacher: torch.nn.Module, count: int, gen: torch.Generator, steps: int, chunk: int = 8192
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`count` triples (x, z0, Phi_teacher(z0 | x)): fresh x from the training data, z0 ~ N(0, I), and the teacher
    flow's `steps`-step Euler map in its standardised units; drawn once, reused by every distillation step."""
    from cdm_dist.models.learned import flow_map

    xs, zs, targets = [], [], []
    for start in tqdm(range(0, count, chunk), desc="teacher pairs", mininterval=1.0, leave=False):
        x, _ = data.draw(min(chunk, count - start), gen)
        z0 = torch.randn((x.shape[0], data.y_dim), generator=gen)
        xs.append(x), zs.append(z0), targets.append(flow_map(teacher, z0, teacher.condition(x), steps))
    return torch.cat(xs), torch.cat(zs), torch.cat(targets)


def distill_loss(student: torch.nn.Module, x: torch.Tensor, z0: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||Phi_teacher(z0 | x) - (z0 + v_student(z0, 0 | x))||²: the teacher's map learned in one Euler step
    (rectified-flow distillation, Liu et al. 2023)."""
    one_step = z0 + student(z0, torch.zeros(x.shape[0], device=x.device, dtype=x.dtype), x)
    return torch.nn.functional.mse_loss(one_step.float(), target.float())


def shipped_sampler(problem: str) -> Path:
    """The shipped flow sampler of a built-in problem (the default teacher)."""
    from cdm_dist.problems.builtins import SHIPPED_CHECKPOINTS

    return SHIPPED_CHECKPOINTS / problem / "sampler"


# -- the training loop ----------------------------------------------------------------------------------------


def train(
    role: str,
    problem: str,
    out: str | Path,
    steps: int | None = None,
    seed: int = 0,
    settings: TrainSettings | None = None,
    tiny: bool = False,
    cpu: bool = False,
    command: str | None = None,
    progress: bool = True,
    kind: str = "flow",
    teacher: str | Path | None = None,
    data: TrainingData | None = None,
) -> dict[str, Any]:
    """Train one model with accelerate and EMA; save it (safetensors + config) with its manifest, and return that.
    A sampler is a rectified flow (`kind` flow) or the one-step distillation of a teacher flow (`one_step`); `data`
    replaces the problem's own (x, y) draws (an augmented set, say)."""
    from accelerate import Accelerator
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    if role not in ROLES:
        raise InputError(f"role: unknown {role!r}; expected one of {list(ROLES)}")
    if problem == "scribbles" and role == "sampler":
        if data is not None:
            raise InputError("data: the scribbles generator trains on its own draws; other data is not taken")
        from cdm_dist.problems.scribbles_training import train_sampler

        return train_sampler(Path(out), steps, seed, tiny, command or " ".join(sys.argv), progress)
    if kind not in KINDS or (kind != "flow" and role != "sampler"):
        raise InputError(f"--kind: {kind!r} is not a {role} kind; expected flow, or one_step for a sampler")
    if teacher is not None and kind != "one_step":
        raise InputError("--teacher: only for --kind one_step")
    data = data or (sampler_data(problem) if role == "sampler" else training_data(problem))
    settings = settings or settings_for(problem, role, kind)
    if steps is not None:
        if steps < 1:
            raise InputError(f"--steps: must be >= 1; got {steps}")
        settings = replace(settings, steps=steps, warmup=min(settings.warmup, steps // 10))
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"--out: {out} exists and is not empty; choose a new folder")

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=settings.mixed_precision, gradient_accumulation_steps=settings.gradient_accumulation
    )
    teacher_model, teacher_folder = None, None
    if kind == "one_step":
        from cdm_dist.models.learned import load_flow_model

        teacher_folder = Path(teacher) if teacher is not None else shipped_sampler(problem)
        teacher_model = load_flow_model(teacher_folder, field="--teacher").float().eval().requires_grad_(False)
        shape = (tuple(teacher_model.config.x_shape or [1]), teacher_model.config.y_dim)
        if shape != (data.x_shape, data.y_dim):
            found = f"x {list(shape[0])} to y_dim {shape[1]}"
            raise InputError(f"--teacher: {teacher_folder} maps {found}, not {problem}'s x and y")
        model = type(teacher_model).from_config(teacher_model.config)  # the student starts as the teacher
        model.load_state_dict(teacher_model.state_dict())
        model.requires_grad_(True).train()
    else:
        model = new_model(data, role, gen, tiny)
    image_prior = role == "prior" and len(data.x_shape) == 3
    scheduler = new_scheduler("v_prediction" if image_prior else "epsilon") if role == "prior" else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, settings.warmup, settings.steps)
    model, optimizer, lr_schedule = accelerator.prepare(model, optimizer, lr_schedule)
    ema = EMAModel(accelerator.unwrap_model(model).parameters(), decay=settings.ema_decay, use_ema_warmup=True)
    pairs = None
    if teacher_model is not None:
        count = (32_768 if data.problem == "digits" else 262_144) if not tiny else 4_096
        pairs = teacher_pairs(data, teacher_model, count, gen, TEACHER_STEPS)

    recent: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(settings.steps), desc=f"train {role} {problem}", disable=not progress, mininterval=1.0)
    for _ in bar:
        if pairs is not None:
            pick = torch.randint(len(pairs[0]), (settings.batch_size,), generator=gen)
            x, z0, target = (t[pick].to(accelerator.device) for t in pairs)
        else:
            x, y = data.draw(settings.batch_size, gen)
            x, y = x.to(accelerator.device), y.to(accelerator.device)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                if role == "prior":
                    loss = prior_loss(model, scheduler.alphas_cumprod, x, gen, scheduler.config.prediction_type)
                elif pairs is not None:
                    loss = distill_loss(model, x, z0, target)
                else:
                    loss = flow_loss(model, x, y, gen)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            ema.step(accelerator.unwrap_model(model).parameters())
        recent = [*recent[-199:], float(loss.detach())]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)
    seconds = time.perf_counter() - start

    trained = accelerator.unwrap_model(model)
    ema.copy_to(trained.parameters())
    trained = trained.to("cpu").float().eval()
    steps_measured = (1, 2) if kind == "one_step" else FLOW_STEPS
    quality = measure_quality(role, data, trained, scheduler, seed, small=tiny, flow_steps=steps_measured)
    out.mkdir(parents=True, exist_ok=True)
    trained.save_pretrained(out, safe_serialization=True)
    if scheduler is not None:
        scheduler.save_pretrained(out)
    manifest = {
        "role": role,
        "problem": problem,
        "model_class": type(trained).__name__,
        "parameters": sum(p.numel() for p in trained.parameters()),
        "data": data.description,
        "objective": _objective(role, trained, scheduler.config.prediction_type if scheduler else kind),
        "kind": kind if role == "sampler" else None,
        "teacher": None
        if teacher_folder is None
        else {
            "folder": str(teacher_folder),
            "euler_steps": TEACHER_STEPS,
            "weights_sha256": sha256(teacher_folder / "diffusion_pytorch_model.safetensors"),
        },
        "steps": settings.steps,
        "seed": seed,
        "settings": asdict(settings),
        "tiny": tiny,
        "final_training_loss": sum(recent) / len(recent),
        "final_training_loss_window": len(recent),
        "train_seconds": seconds,
        "device": str(accelerator.device),
        "quality": quality,
        "weights_sha256": sha256(out / "diffusion_pytorch_model.safetensors"),
        "command": command or " ".join(sys.argv),
        "versions": library_versions(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _objective(role: str, model: torch.nn.Module, kind: str = "flow") -> str:
    if kind == "one_step":
        return f"one-step distillation of a conditional rectified flow ({TEACHER_STEPS} teacher Euler steps)"
    if role == "sampler":
        return "conditional rectified flow"
    if getattr(model.config, "preconditioning", "none") == "edm":
        return "EDM-preconditioned, EDM-weighted epsilon-prediction DDPM loss"
    if kind == "v_prediction":
        return "v-prediction DDPM loss (Salimans & Ho 2022)"
    return "epsilon-prediction DDPM loss"


# -- quality --------------------------------------------------------------------------------------------------

FLOW_STEPS = (1, 2, 4, 8, 32)
X0_TIMESTEPS = (250, 500, 750, 999)


@torch.no_grad()
def measure_quality(
    role: str,
    data: TrainingData,
    model: torch.nn.Module,
    scheduler: Any,
    seed: int,
    small: bool = False,
    flow_steps: tuple[int, ...] = FLOW_STEPS,
) -> dict[str, Any]:
    """Held-out quality: prior MMD² to data (with the data-vs-data floor); sampler error against the truth."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    n = 200 if small else 1000
    if role == "prior":
        from cdm_dist.models.adapters import DiffusersPrior

        prior = DiffusersPrior(model, scheduler, prediction_type=scheduler.config.prediction_type)
        return prior_quality(prior, data, gen, n, 10 if small else 50)
    if data.problem == "digits":
        return digits_sampler_quality(model, gen, n, flow_steps)
    return gmm_sampler_quality(model, data.problem, gen, 4 if small else 64, n, flow_steps)


def prior_quality(
    prior: Any, data: TrainingData, gen: torch.Generator, n: int = 1000, steps: int = 50
) -> dict[str, Any]:
    """MMD² (unbiased, median bandwidth) of n DDIM prior samples vs n held-out x, next to held-out vs held-out."""
    from cdm_dist.chains.diffusion import ddim_sample
    from cdm_dist.chains.losses import mmd2

    z = torch.randn((n, *prior.event_shape), generator=gen)
    samples = ddim_sample(prior.predict_noise, z, prior.schedule(steps)).flatten(1)
    held_a = data.heldout(n, gen)[0].flatten(1)
    held_b = data.heldout(n, gen)[0].flatten(1)
    return {
        "prior_mmd2": float(mmd2(samples[None].double(), held_a.double())[0]),
        "heldout_mmd2_floor": float(mmd2(held_b[None].double(), held_a.double())[0]),
        "samples": n,
        "ddim_steps": steps,
        "x0_rmse_by_t": x0_errors(prior, data.heldout(min(n, 512), gen)[0], gen),
    }


@torch.no_grad()
def x0_errors(prior: Any, x0: torch.Tensor, gen: torch.Generator, timesteps: tuple[int, ...] = X0_TIMESTEPS) -> dict:
    """RMS error of Tweedie's x̂0 on held-out data noised to each timestep (what guidance differentiates)."""
    errors = {}
    for t in timesteps:
        ab = float(prior.scheduler.alphas_cumprod[t])
        x_t = ab**0.5 * x0 + (1 - ab) ** 0.5 * torch.randn(x0.shape, generator=gen)
        _, x0_hat = prior.denoise(x_t, t)
        errors[str(t)] = float((x0_hat - x0).square().mean().sqrt())
    return errors


def gmm_sampler_quality(
    model: torch.nn.Module,
    problem: str,
    gen: torch.Generator,
    points: int = 64,
    n: int = 1000,
    flow_steps: tuple[int, ...] = FLOW_STEPS,
) -> dict[str, Any]:
    """Wasserstein-1 between the flow's P(Y | x) and the exact mixture conditional at random x and at x*.

    W1 in 1-D = mean |sorted samples - exact quantiles at (i + 1/2) / n|; the floor is the same for exact samples.
    """
    from cdm_dist.chains.mixtures import mixture_icdf_1d
    from cdm_dist.problems.builtins import gmm_problem

    exact = gmm_problem(problem)
    conditional = exact.fast_sampler.conditional  # the exact ConditionalMixture of Y given X
    x = exact.prior.mixture.sample(points, gen)  # (P, d_x) from the X marginal
    x = torch.cat([x, exact.x_star[None]])  # the last point is x*
    log_w, means = conditional.at(x)
    stds = torch.sqrt(conditional.covs_y[:, 0, 0])
    levels = ((torch.arange(n, dtype=torch.float64) + 0.5) / n).expand(len(x), n)
    quantiles = mixture_icdf_1d(levels, log_w, means[..., 0], stds)  # (P+1, n)

    def w1(y: torch.Tensor) -> torch.Tensor:
        return (y.sort(dim=1).values - quantiles).abs().mean(1)  # (P+1,)

    eta = torch.randn((len(x), n, 1), generator=gen, dtype=torch.float64)
    floor = w1(exact.fast_sampler.sample(x, eta)[..., 0])

    def errors(y: torch.Tensor) -> dict[str, float]:
        err = w1(y[..., 0])
        return {"w1_mean": float(err[:-1].mean()), "w1_at_x_star": float(err[-1])}

    result = {"points": points, "samples": n, "exact_w1_floor_mean": float(floor[:-1].mean())}
    return result | _by_flow_steps(model, x, eta, flow_steps, errors)


def digits_sampler_quality(
    model: torch.nn.Module, gen: torch.Generator, n: int = 1000, flow_steps: tuple[int, ...] = FLOW_STEPS
) -> dict[str, Any]:
    """One draw per held-out digit at a random angle theta, for several Euler step counts: the angular error to the
    nearest of its labels (theta plus each readable quarter turn, `readable_quarters`), and, over the digits with
    more than one label, the share of draws within 30° of a label other than theta, beside the labels' own share."""
    from cdm_dist.problems.digits import QUARTER_TURNS, angle_of, base_digits, rotate, to_model_space
    from cdm_dist.problems.judge import readable_quarters

    images, _ = base_digits("heldout")
    pick = torch.randint(len(images), (n,), generator=gen)
    theta = 2 * math.pi * torch.rand(n, generator=gen)
    x = to_model_space(rotate(images[pick], theta))
    labels = theta[:, None] + torch.tensor(QUARTER_TURNS)  # (n, 4)
    readable = readable_quarters("heldout")[pick]  # (n, 4)
    several = readable.sum(1) > 1  # (n,): digits with a label besides their rotation
    eta = torch.randn((n, 1, 2), generator=gen)

    def errors(samples: torch.Tensor) -> dict[str, float]:
        off = torch.remainder(angle_of(samples[:, 0])[:, None] - labels + math.pi, 2 * math.pi) - math.pi  # (n, 4)
        error = off.abs().masked_fill(~readable, math.inf).min(1).values  # (n,)
        near_turn = ((off.abs() < math.radians(30)) & readable)[:, 1:].any(1)  # (n,): at an extra readable turn
        return {
            "median_abs_angle_error_deg": float(error.median().rad2deg()),
            "within_30_deg": float((error < math.radians(30)).float().mean()),
            "extra_turn_share": float(near_turn[several].float().mean()),
        }

    labels_share = float((1 - 1 / readable[several].sum(1).float()).mean())  # each (digit, turn) pair alike
    return {"samples": n, "extra_turn_share_of_labels": labels_share} | _by_flow_steps(
        model, x, eta, flow_steps, errors
    )


def _by_flow_steps(
    model: torch.nn.Module,
    x: torch.Tensor,
    eta: torch.Tensor,
    flow_steps: tuple[int, ...],
    errors: Callable[[torch.Tensor], dict[str, float]],
) -> dict[str, float]:
    """`errors` of the flow's samples y = f(x, eta) for each Euler step count, as {f"{name}_{steps}_steps": value}."""
    from cdm_dist.models.learned import FlowSampler

    result: dict[str, float] = {}
    for steps in flow_steps:
        measured = errors(FlowSampler(model, steps).sample(x, eta))
        result |= {f"{name}_{steps}_steps": value for name, value in measured.items()}
    return result
