"""A few-step image-conditioned generator as the fast conditional sampler (MLGD-F paper, Exp. 2): a diffusers
ControlNet conditioned on the image x (a pixel prior's x, or a latent prior's x̂0 decoded by DecodedSampler), a
UNet2DConditionModel taking 1-4 deterministic x0-prediction steps on trailing timesteps from the latent noise η (as
SDXL-Turbo), the generator's VAE decoding the final latent (without one, the UNet works in pixels), and y = an
embedding of the generated image (a local CLIP vision model, or a factory's function).

Everything is differentiable in x. The n_c samples of each x run in chunks of `sample_chunk`; under gradients each
chunk is one activation checkpoint (see GeneratorSampler).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from cdm_dist.chains.samplers import ConditionalSampler
from cdm_dist.errors import InputError
from cdm_dist.models.adapters import (
    PREDICTION_TYPES,
    Conditioning,
    _concat,
    _conditioning_tensors,
    check_dtype_runs,
    load_model,
    load_scheduler,
    to_eps_and_x0,
)
from cdm_dist.models.factories import call_factory
from cdm_dist.models.spec import GENERATOR_MODULES, ClipEmbedSpec, GeneratorSamplerSpec, read_json

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
Embed = Callable[[torch.Tensor], torch.Tensor]  # images (N, C, H, W) in [-1, 1] -> (N, d_y)


# -- the step maths (pure) ------------------------------------------------------------------------------------


def trailing_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """diffusers' "trailing" spacing, the one few-step models are distilled on: T = 1000 gives [999] for 1 step,
    [999, 499] for 2, [999, 749, 499, 249] for 4."""
    return [round(num_train_timesteps - i * num_train_timesteps / steps) - 1 for i in range(steps)]


def ddim_update(x0: torch.Tensor, eps: torch.Tensor, alpha_bar_next: float) -> torch.Tensor:
    """The deterministic DDIM step (η = 0) to the next timestep: x_t' = sqrt(ᾱ_t') x̂0 + sqrt(1 - ᾱ_t') ε̂.
    x0, eps (N, c, h, w) -> (N, c, h, w)."""
    return math.sqrt(alpha_bar_next) * x0 + math.sqrt(1 - alpha_bar_next) * eps


def few_step_latents(
    predict: Callable[[torch.Tensor, int], torch.Tensor],
    eta: torch.Tensor,
    timesteps: list[int],
    alpha_bar: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """x̂0 after len(timesteps) steps from x_T = η (a DDIM-type scheduler's init noise sigma is 1): at each t the
    model's output becomes (ε̂, x̂0); the state moves to the next t by DDIM, and the last step returns x̂0 (as
    SDXL-Turbo's last step). predict(x_t (N, c, h, w), t) -> raw output (N, c, h, w); eta (N, c, h, w)."""
    x_t = eta
    for i, t in enumerate(timesteps):
        eps, x0 = to_eps_and_x0(predict(x_t, t), x_t, float(alpha_bar[t]), prediction_type)
        if i + 1 == len(timesteps):
            return x0
        x_t = ddim_update(x0, eps, float(alpha_bar[timesteps[i + 1]]))
    raise ValueError("no timesteps")


# -- embeddings of the generated image ------------------------------------------------------------------------


def zero_shot_probs(y: torch.Tensor, class_embeddings: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """CLIP zero-shot: softmax over classes of logit_scale x cosine(y, class embedding); y (N, d), (K, d) -> (N, K)."""
    y = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (N, d)
    e = class_embeddings.to(y) / class_embeddings.to(y).norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (K, d)
    return torch.softmax(logit_scale * (y @ e.T), dim=-1)  # (N, K)


def _hw(value: Any, field: str) -> tuple[int, int] | int:
    """A preprocessor size: {"height", "width"} -> (h, w), {"shortest_edge"} or an int -> that int."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    if isinstance(value, dict) and "shortest_edge" in value:
        return int(value["shortest_edge"])
    raise InputError(f"{field}: preprocessor_config.json: cannot read the size {value!r}")


def _checkpointing_on(model: nn.Module, on: bool) -> None:
    """transformers' activation checkpointing, non-reentrant. transformers checkpoints only in training mode, so with
    it on every dropout is set to 0 and the model runs in training mode: CLIP (layer norms, no batch norm) then
    computes exactly what it computes in eval mode."""
    if not on:
        model.eval()
        return
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.0
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()


class ClipEmbedder:
    """y = the image embedding of a CLIPVisionModelWithProjection, with CLIPImageProcessor's preprocessing done in
    torch (differentiable): [-1, 1] -> [0, 1] (clamped, as diffusers' postprocessing) -> with `resize`, the config's
    bicubic resize and center crop -> normalize with image_mean / image_std. Without `resize` the generated image
    must already be the model's input size (neither resized nor cropped)."""

    def __init__(
        self, model: nn.Module, preprocess: dict[str, Any], resize: bool, field: str, checkpointing: bool = True
    ) -> None:
        self.model = model.requires_grad_(False)
        _checkpointing_on(model, checkpointing)
        config = model.config
        self.image_size = int(config.image_size)
        self.channels = int(getattr(config, "num_channels", 3))
        self.y_dim = int(config.projection_dim)
        self.resize, self.field = resize, field
        self.size = _hw(preprocess.get("size", self.image_size), f"{field}.clip")
        self.do_resize = resize and bool(preprocess.get("do_resize", True))
        self.crop = _hw(preprocess.get("crop_size", self.image_size), f"{field}.clip")
        self.crop = (self.crop, self.crop) if isinstance(self.crop, int) else self.crop
        self.do_crop = resize and bool(preprocess.get("do_center_crop", False))
        normalize = bool(preprocess.get("do_normalize", True))
        mean = preprocess.get("image_mean", OPENAI_CLIP_MEAN) if normalize else [0.0] * self.channels
        std = preprocess.get("image_std", OPENAI_CLIP_STD) if normalize else [1.0] * self.channels
        self.mean = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)

    @property
    def weights_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _resized(self, height: int, width: int) -> tuple[int, int]:
        if not self.do_resize:
            return height, width
        if isinstance(self.size, tuple):
            return self.size
        short, long = (height, width) if height <= width else (width, height)
        other = int(self.size * long / short)  # CLIPImageProcessor's get_resize_output_image_size (int())
        return (self.size, other) if height <= width else (other, self.size)

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The size an image of height x width has after resizing and cropping."""
        height, width = self._resized(height, width)
        if self.do_crop and height >= self.crop[0] and width >= self.crop[1]:
            return self.crop
        return height, width

    def check_input(self, image_shape: tuple[int, ...]) -> None:
        """Images of shape (C, H, W) fit the model, or one InputError naming `embed.clip`."""
        channels, height, width = image_shape
        if channels not in (1, self.channels):
            raise InputError(
                f"{self.field}.clip: the generated images have {channels} channels; CLIP takes {self.channels}"
            )
        size = self.input_size(height, width)
        if size != (self.image_size, self.image_size):
            hint = "" if self.resize else "; set resize: true to resize them"
            raise InputError(
                f"{self.field}.clip: the generated images are {height}x{width} ({size[0]}x{size[1]} after the "
                f"preprocessing), the CLIP model takes {self.image_size}x{self.image_size}{hint}"
            )

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] -> the model's pixel_values (N, 3, S, S), in the images' dtype."""
        pixels = ((images + 1) / 2).clamp(0, 1)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, self.channels, -1, -1)  # do_convert_rgb
        height, width = pixels.shape[-2:]
        size = self._resized(height, width)
        if size != (height, width):
            pixels = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False, antialias=True)
        if self.do_crop:
            (height, width), (crop_h, crop_w) = pixels.shape[-2:], self.crop
            if height >= crop_h and width >= crop_w:
                top, left = (height - crop_h) // 2, (width - crop_w) // 2
                pixels = pixels[..., top : top + crop_h, left : left + crop_w]
        return (pixels - self.mean.to(pixels)) / self.std.to(pixels)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] -> image_embeds (N, projection_dim) in the images' dtype."""
        pixels = self.pixel_values(images).to(self.weights_dtype)
        return self.model(pixel_values=pixels).image_embeds.to(images.dtype)


def load_clip_embedder(
    spec: ClipEmbedSpec, dtype: torch.dtype, device: torch.device, checkpointing: bool, field: str
) -> ClipEmbedder:
    """A local CLIPVisionModelWithProjection (safetensors, never a download) + its preprocessor_config.json."""
    try:
        from transformers import CLIPVisionModelWithProjection
    except ImportError as exc:
        raise InputError(
            f"{field}.clip: a CLIP embedding needs transformers ({exc}); pip install transformers"
        ) from None
    folder = Path(spec.clip)
    try:
        preprocess = read_json(folder / "preprocessor_config.json", "a CLIP folder needs its preprocessor config")
    except InputError as exc:
        raise InputError(f"{field}.clip: {exc}") from None
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    except Exception as exc:
        raise InputError(
            f"{field}.clip: cannot load CLIPVisionModelWithProjection from {folder} ({type(exc).__name__}: {exc})"
        ) from None
    return ClipEmbedder(model.to(device, dtype), preprocess, spec.resize, field, checkpointing)


class FunctionEmbedder:
    """A factory's embedding, image (N, C, H, W) in [-1, 1] -> (N, d_y); an nn.Module runs in the embed dtype."""

    def __init__(self, function: Embed, y_dim: int) -> None:
        self.function, self.y_dim = function, y_dim

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        function = self.function
        if isinstance(function, nn.Module):
            weights = next(function.parameters(), None)
            if weights is not None:
                return function(images.to(weights.dtype)).to(images.dtype)
        return function(images).to(images.dtype)


def load_factory_embedder(
    function: Any, image_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, field: str
) -> FunctionEmbedder:
    """The factory's function, checked on two blank images of the generated shape: it must give (2, d_y)."""
    if not callable(function):
        raise InputError(f"{field}: the factory returned {type(function).__name__}, not a function of images")
    if isinstance(function, nn.Module):
        function = function.to(device, dtype).eval().requires_grad_(False)
    probe = torch.zeros(2, *image_shape, device=device)
    try:
        with torch.no_grad():
            out = FunctionEmbedder(function, 0)(probe)
    except Exception as exc:
        raise InputError(
            f"{field}: the embedding raised {type(exc).__name__} on images of shape {tuple(probe.shape)}: {exc}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(
            f"{field}: the embedding returned {shape} for images of shape {tuple(probe.shape)}; expected (N, d_y) = "
            "(2, d_y)"
        )
    return FunctionEmbedder(function, int(out.shape[1]))


# -- the sampler ----------------------------------------------------------------------------------------------


def _latent_size(unet: Any) -> tuple[int, int]:
    size = unet.config.sample_size
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def generated_shape(unet: Any, vae: Any | None) -> tuple[int, int, int]:
    """(C, H, W) of the generated images: the VAE's out_channels, the UNet's latent size times the VAE's factor;
    without a VAE (a pixel-space generator) the UNet's own output."""
    if vae is None:
        return (int(unet.config.out_channels), *_latent_size(unet))
    factor, (h, w) = 2 ** (len(vae.config.block_out_channels) - 1), _latent_size(unet)
    return int(vae.config.out_channels), h * factor, w * factor


def _checkpointing(module: Any, on: bool) -> None:
    if on:
        module.enable_gradient_checkpointing()
    elif getattr(module, "is_gradient_checkpointing", False):
        module.disable_gradient_checkpointing()


class GeneratorSampler(ConditionalSampler):
    """y = embed(VAE.decode(few-step UNet + ControlNet(image x) from η)), η the generator's initial latent noise.

    - x: images (B, C, H, W) roughly in [-1, 1]; the ControlNet gets (x + 1) / 2 (diffusers' [0, 1] convention),
      resized to the size its conditioning embedding maps onto the UNet's latents when x's size differs (as the
      diffusers pipelines resize the control image to the generation size).
    - eta: (B, n_c, c, h, w), noise_shape = the UNet's (in_channels, sample_size); y: (B, n_c, y_dim) in x's dtype.
    - Each module computes in its own weight dtype; the latent state and the step maths stay in x's dtype.

    Chunks: the B·n_c samples run `sample_chunk` at a time. A chunk only bounds memory if its backward is chunked
    too, so under gradients (with more than one chunk) each chunk is one non-reentrant activation checkpoint: the
    forward keeps only the chunk's inputs (x, its row indices, its η) and its y, and the backward recomputes one
    chunk's graph at a time. The result and the gradient are the unchunked ones (the recomputation is the same
    deterministic computation); the cost is one more forward per chunk. This needs nothing from the matching loss
    (any loss of y backpropagates through it). Within a chunk, the modules' own activation checkpointing
    (`checkpointing`) bounds the recomputed graph further.
    """

    def __init__(
        self,
        unet: Any,
        controlnet: Any,
        vae: Any | None,
        alphas_cumprod: torch.Tensor,
        conditioning: Conditioning,
        embed: Embed,
        y_dim: int,
        steps: int = 1,
        controlnet_scale: float = 1.0,
        prediction_type: str = "epsilon",
        sample_chunk: int | None = None,
        checkpointing: dict[str, bool] | None = None,
        field: str = "problem.sampler",
    ) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise InputError(f"{field}: unknown prediction_type {prediction_type!r}")
        self.unet, self.controlnet = (m.eval().requires_grad_(False) for m in (unet, controlnet))
        self.vae = None if vae is None else vae.eval().requires_grad_(False)  # None: the UNet works in pixels
        flags = checkpointing or {}
        for name in ("unet", "controlnet", "vae"):
            if getattr(self, name) is not None:
                _checkpointing(getattr(self, name), flags.get(name, True))
        self.alpha_bar = alphas_cumprod.double().cpu()
        self.timesteps = trailing_timesteps(len(self.alpha_bar), steps)
        self.conditioning, self.embed, self.y_dim = conditioning, embed, y_dim
        self.controlnet_scale, self.prediction_type = float(controlnet_scale), prediction_type
        self.sample_chunk, self.field = sample_chunk, field
        self.x_shape = None
        self.noise_shape = (int(unet.config.in_channels), *_latent_size(unet))
        embedding = controlnet.config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
        factor, (h, w) = 2 ** (len(embedding) - 1), _latent_size(unet)
        self.control_shape = (int(controlnet.config.conditioning_channels), h * factor, w * factor)
        self.image_shape = generated_shape(unet, vae)
        config = vae.config if vae is not None else None
        self.scaling_factor = float(getattr(config, "scaling_factor", 1.0) or 1.0)
        self.shift_factor = float(getattr(config, "shift_factor", 0.0) or 0.0)
        self._moved: dict[tuple[torch.device, torch.dtype], Conditioning] = {}

    # -- checks and placement ---------------------------------------------------------------------------------
    def check_image_channels(self, channels: int, where: str = "x (or the prior's decoded x̂0)") -> None:
        """The ControlNet takes images of this many channels, or one InputError naming `controlnet`."""
        expected = self.control_shape[0]
        if channels != expected:
            raise InputError(
                f"{self.field}.controlnet: the ControlNet takes {expected}-channel conditioning images "
                f"(conditioning_channels), but {where} has {channels} channels"
            )

    def _modules(self) -> list[nn.Module]:
        modules = [m for m in (self.unet, self.controlnet, self.vae) if m is not None]
        owners = [getattr(self.embed, name, None) for name in ("model", "function")]
        return modules + [owner for owner in owners if isinstance(owner, nn.Module)]

    def _follow(self, device: torch.device) -> None:
        if next(self.unet.parameters()).device != device:
            for module in self._modules():
                module.to(device)

    def _dtype(self, module: nn.Module) -> torch.dtype:
        return next(module.parameters()).dtype

    def _conditioning(self, device: torch.device, dtype: torch.dtype) -> Conditioning:
        key = (device, dtype)
        if key not in self._moved:
            self._moved[key] = self.conditioning.to(device, dtype)
        return self._moved[key]

    # -- the computation --------------------------------------------------------------------------------------
    def _model_output(self, x_t: torch.Tensor, t: int, control: torch.Tensor) -> torch.Tensor:
        """The UNet's guided output with the ControlNet's residuals, in x_t's dtype. x_t (n, c, h, w), control
        (n, C, H', W') in [0, 1]."""
        n, guided = x_t.shape[0], self.conditioning.negative is not None
        if guided:  # [negative; positive] in one batch, the ControlNet on both (as the diffusers pipelines)
            x_t, control = torch.cat([x_t, x_t]), torch.cat([control, control])
        results = []
        for module in (self.controlnet, self.unet):
            cond = self._conditioning(x_t.device, self._dtype(module))
            kwargs = cond.expanded(cond.kwargs, n)
            if guided:
                kwargs = _concat(cond.expanded(cond.negative, n), kwargs)
            results.append(kwargs)
        cn_kwargs, unet_kwargs = results
        cn_dtype, unet_dtype = self._dtype(self.controlnet), self._dtype(self.unet)
        down, mid = self.controlnet(
            x_t.to(cn_dtype), t, controlnet_cond=control.to(cn_dtype), conditioning_scale=self.controlnet_scale,
            return_dict=False, **cn_kwargs,
        )  # fmt: skip
        out = self.unet(
            x_t.to(unet_dtype), t, down_block_additional_residuals=[r.to(unet_dtype) for r in down],
            mid_block_additional_residual=mid.to(unet_dtype), **unet_kwargs,
        ).sample.to(x_t.dtype)  # fmt: skip
        if not guided:
            return out
        negative, positive = out.chunk(2)
        return negative + self.conditioning.guidance_scale * (positive - negative)

    def generate(self, images: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        """Conditioning images (n, C, H, W) in [-1, 1], latent noise eta (n, c, h, w) -> generated images
        (n, C', H', W') roughly in [-1, 1], in the images' dtype."""
        self.check_image_channels(images.shape[1])
        control = (images + 1) / 2  # (n, C, H, W) in [0, 1]
        if tuple(control.shape[-2:]) != self.control_shape[1:]:
            control = F.interpolate(control, size=self.control_shape[1:], mode="bilinear", antialias=True)
        latents = few_step_latents(
            lambda x_t, t: self._model_output(x_t, t, control),
            eta.to(images.dtype), self.timesteps, self.alpha_bar, self.prediction_type,
        )  # fmt: skip  # (n, c, h, w)
        if self.vae is None:
            return latents.to(images.dtype)
        z = latents.to(self._dtype(self.vae)) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.to(images.dtype)

    def _chunk_y(self, x: torch.Tensor, rows: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        """y of one chunk: x (B, C, H, W), rows (n,) indices into x, eta (n, c, h, w) -> (n, d_y) in x's dtype."""
        return self.embed(self.generate(x.index_select(0, rows), eta)).to(x.dtype)

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        size = self.sample_chunk or n
        return [(start, min(start + size, n)) for start in range(0, n, size)]

    def sample(self, x: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), eta (B, n_c, c, h, w) -> y (B, n_c, y_dim) in x's dtype, differentiable in x."""
        batch, n_c = eta.shape[:2]
        self.check_image_channels(x.shape[1])
        self._follow(x.device)
        noise = eta.to(x.device, x.dtype).reshape(batch * n_c, *self.noise_shape)
        chunks = self._chunks(batch * n_c)
        recompute = len(chunks) > 1 and torch.is_grad_enabled() and (x.requires_grad or noise.requires_grad)
        pieces = []
        for start, end in chunks:
            rows = torch.arange(start, end, device=x.device) // n_c  # sample i is x[i // n_c]'s
            if recompute:
                pieces.append(checkpoint(self._chunk_y, x, rows, noise[start:end], use_reentrant=False))
            else:
                pieces.append(self._chunk_y(x, rows, noise[start:end]))
        y = torch.cat(pieces)
        if y.shape[-1] != self.y_dim:
            raise InputError(f"{self.field}.embed: the embedding gave width {y.shape[-1]}, expected {self.y_dim}")
        return y.reshape(batch, n_c, self.y_dim)

    @torch.no_grad()
    def sample_with_images(self, x: torch.Tensor, eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y and the generated images behind it, in one pass without gradients (evaluation): x (B, C, H, W), eta
        (B, n_c, c, h, w) -> y (B, n_c, y_dim) in x's dtype, images (B, n_c, C', H', W')."""
        batch, n_c = eta.shape[:2]
        self.check_image_channels(x.shape[1])
        self._follow(x.device)
        noise = eta.to(x.device, x.dtype).reshape(batch * n_c, *self.noise_shape)
        ys, pictures = [], []
        for start, end in self._chunks(batch * n_c):
            rows = torch.arange(start, end, device=x.device) // n_c
            pictures.append(self.generate(x.index_select(0, rows), noise[start:end]))
            ys.append(self.embed(pictures[-1]).to(x.dtype))
        images = torch.cat(pictures)
        return torch.cat(ys).reshape(batch, n_c, -1), images.reshape(batch, n_c, *images.shape[1:])

    def images(self, x: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        """The generated images behind `sample`: x (B, C, H, W), eta (B, n_c, c, h, w) -> (B, n_c, C', H', W')."""
        return self.sample_with_images(x, eta)[1]


# -- loading --------------------------------------------------------------------------------------------------


def _takes(module: Any, name: str) -> bool:
    return name in inspect.signature(module.forward).parameters


def load_generator_sampler(
    spec: GeneratorSamplerSpec, device: torch.device | str, field: str = "problem.sampler"
) -> GeneratorSampler:
    """The generator sampler a spec describes, on device, each module in its dtype; one InputError naming the
    field or file for every way the folders do not fit together."""
    device = torch.device(device)
    dtypes = {
        module: check_dtype_runs(
            spec.module_dtype(module), device, f"{field}.dtypes.{module}" if module in spec.dtypes else f"{field}.dtype"
        )
        for module in GENERATOR_MODULES
    }
    root = Path(spec.generator)
    for part, name in (("unet", "config.json"), ("scheduler", "scheduler_config.json")):
        if not (root / part / name).is_file():
            raise InputError(f"{field}.generator: {root / part / name} is missing; the generator folder needs {part}/")
    cn_folder = spec.controlnet_folder
    cn_field = f"{field}.controlnet" if spec.controlnet is not None else f"{field}.generator"
    if not (cn_folder / "config.json").is_file():
        raise InputError(f"{cn_field}: {cn_folder / 'config.json'} is missing; the generator needs a ControlNet")

    unet = load_model(root / "unet", None, dtypes["unet"], device, f"{field}.generator")
    if not _takes(unet, "down_block_additional_residuals") or not hasattr(unet.config, "sample_size"):
        raise InputError(f"{field}.generator: {type(unet).__name__} in unet/ takes no ControlNet residuals")
    controlnet = load_model(cn_folder, None, dtypes["controlnet"], device, cn_field)
    if not _takes(controlnet, "controlnet_cond"):
        raise InputError(f"{cn_field}: {type(controlnet).__name__} in {cn_folder} is not a ControlNet")
    for key in ("in_channels", "block_out_channels", "cross_attention_dim", "addition_embed_type"):
        mine, theirs = controlnet.config.get(key), unet.config.get(key)
        if _seq(mine) != _seq(theirs):
            raise InputError(f"{cn_field}: the ControlNet's {key} ({mine}) differs from the UNet's ({theirs})")
    scheduler = load_scheduler(root / "scheduler", f"{field}.generator")
    prediction = scheduler.config.get("prediction_type", "epsilon")
    vae = None  # no vae/: a pixel-space generator, whose UNet output is the image
    if (root / "vae").exists():
        vae = load_model(root / "vae", None, dtypes["vae"], device, f"{field}.generator")
    if vae is not None and (not hasattr(vae, "decode") or vae.config.get("latent_channels") != unet.config.in_channels):
        raise InputError(
            f"{field}.generator: vae/ must be an autoencoder with latent_channels = the UNet's in_channels "
            f"({unet.config.in_channels}); got {type(vae).__name__} with {vae.config.get('latent_channels')}"
        )

    config = dict(unet.config)
    negative = None
    if spec.guidance_scale != 1.0:
        if spec.negative_prompt is None:
            raise InputError(f"{field}: guidance_scale != 1 needs a negative_prompt")
        negative = _conditioning_tensors(spec.negative_prompt, config, f"{field}.negative_prompt")
    conditioning = Conditioning(_conditioning_tensors(spec.prompt, config, f"{field}.prompt"), negative,
                                spec.guidance_scale)  # fmt: skip

    image_shape = generated_shape(unet, vae)
    if isinstance(spec.embed, ClipEmbedSpec):
        embed: Any = load_clip_embedder(spec.embed, dtypes["embed"], device, spec.module_checkpointing("embed"),
                                        f"{field}.embed")  # fmt: skip
        embed.check_input(image_shape)
    else:
        made = call_factory(spec.embed, f"{field}.embed", device)
        embed = load_factory_embedder(made, image_shape, dtypes["embed"], device, f"{field}.embed")
    return GeneratorSampler(
        unet, controlnet, vae, scheduler.alphas_cumprod, conditioning, embed, embed.y_dim,
        steps=spec.steps, controlnet_scale=spec.controlnet_scale, prediction_type=prediction,
        sample_chunk=spec.sample_chunk, checkpointing={m: spec.module_checkpointing(m) for m in GENERATOR_MODULES},
        field=field,
    )  # fmt: skip


def _seq(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, list | tuple) else (value,)
