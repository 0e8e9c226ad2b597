"""Tiny diffusers models built from configs (as diffusers' own tests build their dummy components): a latent prior
(UNet2DConditionModel + AutoencoderKL + DDIMScheduler with v-prediction, fixed text conditioning) and a small
differentiable image -> y sampler, for tests, benchmarks and the worked example; and GaussianNoiseModel, the exact
prediction of a Gaussian prior in any parameterisation, to check the adapters against closed forms.

Nothing here is trained: the weights are seeded random numbers. The models exercise the real classes, shapes,
dtypes and gradients of a latent-diffusion campaign at a size a CPU runs in seconds.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import save_file
from torch import nn

from cdm_dist.chains.priors import DiffusionPrior
from cdm_dist.chains.samplers import ConditionalSampler
from cdm_dist.chains.targets import Target

TEXT_WIDTH = 16  # the UNet's cross_attention_dim
TEXT_TOKENS = 5
SDXL_TEXT_EMBEDS = 12  # pooled text embedding width of the SDXL-style variant
SDXL_TIME_EMBED = 4  # addition_time_embed_dim (6 time ids)


def tiny_unet(
    sdxl: bool = False, seed: int = 0, latent_size: int = 8, channels: tuple[int, int] = (16, 32)
) -> UNet2DConditionModel:
    """A 2-block UNet2DConditionModel over 4 x latent_size x latent_size latents with cross-attention (SDXL's added
    conditions when sdxl)."""
    torch.manual_seed(seed)
    extra = {}
    if sdxl:
        extra = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": SDXL_TIME_EMBED,
            "projection_class_embeddings_input_dim": SDXL_TEXT_EMBEDS + 6 * SDXL_TIME_EMBED,
        }
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        norm_num_groups=8,
        **extra,
    )


def tiny_vae(
    latent_channels: int = 4, seed: int = 0, image_size: int = 16, channels: tuple[int, int] = (8, 16)
) -> AutoencoderKL:
    """A 2-block AutoencoderKL: 3 x image_size² images <-> latent_channels x (image_size / 2)² latents."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=4,
        sample_size=image_size,
    )


def tiny_scheduler(prediction_type: str = "v_prediction") -> DDIMScheduler:
    """DDIM over 1000 training steps with Stable Diffusion's scaled-linear betas."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=prediction_type,
        timestep_spacing="trailing",
    )


def save_tiny_latent_pipeline(
    folder: str | Path,
    prediction_type: str = "v_prediction",
    sdxl: bool = False,
    seed: int = 0,
    latent_size: int = 8,
    unet_channels: tuple[int, int] = (16, 32),
    vae_channels: tuple[int, int] = (8, 16),
) -> Path:
    """Write unet/, vae/, scheduler/ (save_pretrained) and conditioning.safetensors + negative.safetensors; images
    are 3 x (2 latent_size)²."""
    folder = Path(folder)
    tiny_unet(sdxl, seed, latent_size, unet_channels).save_pretrained(folder / "unet")
    tiny_vae(seed=seed + 1, image_size=2 * latent_size, channels=vae_channels).save_pretrained(folder / "vae")
    tiny_scheduler(prediction_type).save_pretrained(folder / "scheduler")
    save_text_conditioning(folder, ("conditioning", "negative"), sdxl, 2 * latent_size, seed + 2)
    return folder


def save_text_conditioning(folder: Path, names: tuple[str, ...], sdxl: bool, image_size: int, seed: int) -> None:
    """Seeded random text conditioning, one <name>.safetensors each: encoder_hidden_states (TEXT_TOKENS,
    TEXT_WIDTH), and for SDXL-style UNets text_embeds and the time_ids of an image_size² image."""
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        tensors = {"encoder_hidden_states": torch.randn(TEXT_TOKENS, TEXT_WIDTH, generator=gen)}
        if sdxl:
            size = float(image_size)
            tensors["text_embeds"] = torch.randn(SDXL_TEXT_EMBEDS, generator=gen)
            tensors["time_ids"] = torch.tensor([size, size, 0.0, 0.0, size, size])
        save_file(tensors, str(folder / f"{name}.safetensors"))


# -- a small image -> y sampler --------------------------------------------------------------------------------


class ImageFeatureSampler(ConditionalSampler):
    """y = g(image) + noise_scale · eta: a tiny CNN g of a (3, size, size) image in [-1, 1], a Gaussian P(Y | image);
    differentiable in the image. zero_output starts g's last layer at zero, as a fresh ControlNet's zero
    convolutions: then y does not depend on the image at all. The class is its own factory in problem specs:
    sampler: {factory: "cdm_dist.models.tiny:ImageFeatureSampler", args: {...}}."""

    def __init__(
        self,
        y_dim: int = 2,
        noise_scale: float = 0.1,
        seed: int = 0,
        zero_output: bool = False,
        device: str = "cpu",
        image_size: int = 16,
    ) -> None:
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, y_dim),
        ).to(device)
        if zero_output:
            nn.init.zeros_(self.net[-1].weight)
        self.net.eval().requires_grad_(False)
        self.y_dim, self.noise_shape, self.noise_scale = y_dim, (y_dim,), noise_scale
        self.x_shape = (3, image_size, image_size)

    def sample(self, x: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        net = self.net
        if next(net.parameters()).device != x.device:
            net.to(x.device)
        mean = net(x.to(next(net.parameters()).dtype)).to(x.dtype)  # (B, d_y)
        return mean[:, None] + self.noise_scale * eta  # (B, n_c, d_y)


def gaussian_target(y_dim: int = 2, center: float = 0.3, scale: float = 0.1, size: int = 500, seed: int = 0) -> Target:
    """Target samples N(center, scale²) in every coordinate (with fresh held-out draws)."""

    def draw(n: int, draw_seed: int) -> torch.Tensor:
        noise = torch.randn(n, y_dim, generator=torch.Generator().manual_seed(draw_seed), dtype=torch.float64)
        return center + scale * noise

    return Target.from_sampler(draw, size, seed, source="gaussian target")


# -- the closed-form reference ----------------------------------------------------------------------------------


class GaussianNoiseModel(ModelMixin, ConfigMixin):
    """The exact prediction for data x0 ~ N(mean, std² I) at x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε: the posterior
    mean x̂0 = mean + a std² / (a² std² + s²) (x_t - a mean), ε̂ = (x_t - a x̂0) / s and v = a ε̂ - s x̂0 (a, s =
    sqrt(ᾱ_t), sqrt(1 - ᾱ_t)); output as prediction_type asks. Vectors (dim,) or images (channels, size, size)."""

    @register_to_config
    def __init__(
        self,
        dim: int | None = 2,
        in_channels: int | None = None,
        sample_size: int | None = None,
        mean: float = 0.5,
        std: float = 0.7,
        prediction_type: str = "epsilon",
        schedule: dict[str, Any] | None = None,  # DDPMScheduler's arguments, as the scheduler saved with it
    ) -> None:
        super().__init__()
        scheduler = DDPMScheduler(**(schedule or {}))  # default: 1000 steps, linear betas 1e-4 .. 0.02
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.double(), persistent=False)
        self.scale = nn.Parameter(torch.ones(()))  # a weight to load, save and cast; 1 keeps the output exact

    def forward(self, x_t: torch.Tensor, timestep: int | torch.Tensor) -> torch.Tensor:
        alpha_bar = float(self.alphas_cumprod[int(timestep)])
        a, s = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
        mean, var = self.config.mean, self.config.std**2
        x0 = mean + a * var / (a * a * var + s * s) * (x_t - a * mean)
        eps = (x_t - a * x0) / s
        kind = self.config.prediction_type
        out = eps if kind == "epsilon" else x0 if kind == "sample" else a * eps - s * x0
        return self.scale * out


# -- a balanced synthetic pair (the pipeline benchmark) ----------------------------------------------------------


def burn(milliseconds: float) -> None:
    """Keep one CPU core busy for this long (small matrix products), changing nothing."""
    deadline = time.perf_counter() + milliseconds / 1000
    a = torch.full((64, 64), 1 / 64)
    while time.perf_counter() < deadline:
        a = a @ a


class BusyGaussianPrior(DiffusionPrior):
    """The exact prior of N(0, I) over R^dim (ε̂ = sqrt(1 - ᾱ_t) x_t), costing `milliseconds` of CPU per call: a
    prior of known cost for measuring pipelines."""

    def __init__(self, dim: int = 16, milliseconds: float = 10.0) -> None:
        from cdm_dist.chains.diffusion import make_scheduler

        super().__init__(make_scheduler(num_train_timesteps=1000, beta_schedule="linear"), (dim,))
        self.milliseconds = milliseconds

    def predict_noise(self, x_t: torch.Tensor, timestep: int) -> torch.Tensor:
        burn(self.milliseconds)
        return (1 - float(self.scheduler.alphas_cumprod[timestep])) ** 0.5 * x_t


class BusyLinearSampler(ConditionalSampler):
    """y = x[:, :y_dim] + noise_scale · eta, costing `milliseconds` of CPU per call."""

    def __init__(self, dim: int = 16, y_dim: int = 2, noise_scale: float = 0.3, milliseconds: float = 10.0) -> None:
        self.y_dim, self.noise_shape, self.x_shape = y_dim, (y_dim,), (dim,)
        self.noise_scale, self.milliseconds = noise_scale, milliseconds

    def sample(self, x: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        burn(self.milliseconds)
        return x[:, None, : self.y_dim] + self.noise_scale * eta
