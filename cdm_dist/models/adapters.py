"""diffusers models behind the prior interface, loaded from local folders only (never a hub download).

- DiffusersPrior: any diffusers ModelMixin noise network (UNet1DModel, UNet2DModel, UNet2DConditionModel, the
  project's MLPNoiseModel, or a class the user names) + a scheduler with alphas_cumprod; ε-, v- and x0-prediction
  are each turned exactly into ε̂ and x̂0; fixed conditioning (text-encoder states, SDXL's added_cond_kwargs, class
  labels) with optional classifier-free guidance; weights in float32, bfloat16 or float16.
- LatentDecoder / DecodedSampler: a latent prior's AutoencoderKL; the fast sampler sees decoded images, with
  gradients through the decoder (activation checkpointing, switchable).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from cdm_dist.chains.priors import DiffusionPrior
from cdm_dist.chains.samplers import ConditionalSampler
from cdm_dist.errors import InputError
from cdm_dist.models.factories import load_object
from cdm_dist.models.manifest import verify_manifest
from cdm_dist.models.spec import DiffusersPriorSpec, VaeDecoderSpec, read_json

WEIGHT_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# -- loading --------------------------------------------------------------------------------------------------


def project_model_classes() -> dict[str, type]:
    """The project's own diffusers-style models, loadable by their config's _class_name."""
    from cdm_dist.models.networks import ConditionalVelocityModel, MLPNoiseModel
    from cdm_dist.models.tiny import GaussianNoiseModel

    return {cls.__name__: cls for cls in (MLPNoiseModel, ConditionalVelocityModel, GaussianNoiseModel)}


def model_class(name: str, field: str) -> type:
    """A ModelMixin class: a diffusers class name, one of the project's, or "package.module:Class"."""
    from diffusers.models.modeling_utils import ModelMixin

    if ":" in name:
        cls = load_object(name, field)
    else:
        cls = project_model_classes().get(name) or getattr(diffusers, name, None)
    if not isinstance(cls, type) or not issubclass(cls, ModelMixin):
        raise InputError(
            f"{field}: unknown model class {name!r}; expected a diffusers ModelMixin class (e.g. UNet2DModel, "
            "UNet2DConditionModel) or 'package.module:Class'"
        )
    return cls


def check_dtype_runs(dtype: str, device: torch.device, field: str) -> torch.dtype:
    """The torch dtype, after a tiny matmul and convolution in it on the device (so it fails here, not mid-run)."""
    torch_dtype = WEIGHT_DTYPES[dtype]
    try:
        a = torch.ones(4, 4, dtype=torch_dtype, device=device)
        (a @ a).sum().item()
        image = torch.ones(1, 2, 4, 4, dtype=torch_dtype, device=device)
        torch.nn.functional.conv2d(image, torch.ones(2, 2, 3, 3, dtype=torch_dtype, device=device)).sum().item()
    except Exception as exc:
        raise InputError(f"{field}: dtype {dtype} does not run on {device} ({type(exc).__name__}: {exc})") from None
    return torch_dtype


def _json_config(path: Path, field: str) -> dict[str, Any]:
    try:
        return read_json(path, "not a diffusers folder for the model")
    except InputError as exc:
        raise InputError(f"{field}: {exc}") from None


def load_model(folder: Path, name: str | None, dtype: torch.dtype, device: torch.device, field: str) -> Any:
    """A ModelMixin from a local folder (config.json + safetensors), in dtype on device, frozen and in eval mode."""
    config = _json_config(folder / "config.json", field)
    cls = model_class(name or config.get("_class_name", ""), field)
    weights = [p for p in folder.glob("*.safetensors") if p.name.startswith("diffusion_pytorch_model")]
    if not weights:
        raise InputError(f"{field}: {folder} has no diffusion_pytorch_model*.safetensors weights")
    if len(weights) == 1:
        verify_manifest(folder, weights[0], field)
    try:
        model = cls.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True, local_files_only=True)
    except Exception as exc:
        raise InputError(f"{field}: cannot load {cls.__name__} from {folder} ({type(exc).__name__}: {exc})") from None
    return model.to(device).eval().requires_grad_(False)


def load_scheduler(folder: Path, field: str) -> DDPMScheduler | DDIMScheduler:
    """The scheduler of the folder; DDPM and DDIM as they are, any other with alphas_cumprod as the DDIM scheduler
    of the same noise schedule (the chain takes its own DDIM/DDPM steps; only ᾱ_t matters)."""
    from diffusers import SchedulerMixin

    config = _json_config(folder / "scheduler_config.json", field)
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if not isinstance(cls, type) or not issubclass(cls, SchedulerMixin):
        raise InputError(f"{field}: {folder}: unknown scheduler class {config.get('_class_name')!r}")
    try:
        scheduler = cls.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise InputError(f"{field}: cannot load {cls.__name__} from {folder} ({exc})") from None
    if not isinstance(getattr(scheduler, "alphas_cumprod", None), torch.Tensor):
        raise InputError(f"{field}: {cls.__name__} has no alphas_cumprod (a DDPM-family scheduler is needed)")
    if isinstance(scheduler, DDPMScheduler | DDIMScheduler):
        return scheduler
    ddim = DDIMScheduler.from_config(scheduler.config)
    if not torch.allclose(ddim.alphas_cumprod, scheduler.alphas_cumprod):
        raise InputError(f"{field}: cannot rebuild {cls.__name__}'s noise schedule as a DDIM schedule")
    return ddim


def infer_event_shape(config: dict[str, Any], class_name: str, field: str) -> tuple[int, ...]:
    """x's shape from a model config: (dim,) for vector models, (C, L) for 1-D UNets, (C, H, W) for images."""
    if config.get("dim") is not None:
        return (int(config["dim"]),)
    if "in_channels" in config and "sample_size" in config:
        size = config["sample_size"]
        if "1D" in class_name:
            return (int(config["in_channels"]), int(size))
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (int(config["in_channels"]), *(int(s) for s in size))
    raise InputError(f"{field}: cannot tell x's shape from the {class_name} config; set event_shape")


@dataclass
class Conditioning:
    """Fixed keyword arguments of a conditional UNet for one sample (batch 1), expanded to the batch per call;
    `negative` holds the unconditional branch of classifier-free guidance."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    negative: dict[str, Any] | None = None
    guidance_scale: float = 1.0

    def expanded(self, kwargs: dict[str, Any], n: int) -> dict[str, Any]:
        """Each tensor repeated to batch n (nested dicts, e.g. added_cond_kwargs, too)."""
        out: dict[str, Any] = {}
        for key, value in kwargs.items():
            if isinstance(value, dict):
                out[key] = self.expanded(value, n)
            else:
                out[key] = value.expand(n, *value.shape[1:])
        return out

    def to(self, device: torch.device, dtype: torch.dtype) -> Conditioning:
        def move(kwargs: dict[str, Any]) -> dict[str, Any]:
            return {
                k: move(v) if isinstance(v, dict) else v.to(device, dtype if v.is_floating_point() else v.dtype)
                for k, v in kwargs.items()
            }

        return Conditioning(move(self.kwargs), None if self.negative is None else move(self.negative),
                            self.guidance_scale)  # fmt: skip


def _conditioning_tensors(path: str, model_config: dict[str, Any], field: str) -> dict[str, Any]:
    """encoder_hidden_states (and SDXL's text_embeds / time_ids) from a .safetensors file, checked against the
    UNet's config."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except Exception as exc:
        raise InputError(f"{field}: {path} is not a readable .safetensors file ({exc})") from None
    if "encoder_hidden_states" not in tensors:
        raise InputError(f"{field}: {path} has no 'encoder_hidden_states' tensor (found {sorted(tensors)})")
    states = tensors["encoder_hidden_states"]
    states = states[None] if states.dim() == 2 else states
    width = model_config.get("cross_attention_dim")
    width = width[0] if isinstance(width, list | tuple) else width
    if states.dim() != 3 or states.shape[0] != 1 or (width is not None and states.shape[-1] != width):
        raise InputError(
            f"{field}: {path}: encoder_hidden_states has shape {tuple(tensors['encoder_hidden_states'].shape)}; "
            f"expected (L, {width}) or (1, L, {width}) for this UNet"
        )
    kwargs: dict[str, Any] = {"encoder_hidden_states": states.float()}
    if model_config.get("addition_embed_type") == "text_time":
        missing = [k for k in ("text_embeds", "time_ids") if k not in tensors]
        if missing:
            raise InputError(f"{field}: {path}: this UNet (addition_embed_type text_time) also needs {missing}")
        kwargs["added_cond_kwargs"] = {
            k: (tensors[k][None] if tensors[k].dim() == 1 else tensors[k]).float() for k in ("text_embeds", "time_ids")
        }
    return kwargs


def _class_kwargs(label: int, model_config: dict[str, Any], field: str) -> dict[str, Any]:
    classes = model_config.get("num_class_embeds")
    if not classes:
        raise InputError(f"{field}: class_label given, but the model has no class embedding (num_class_embeds)")
    if not 0 <= label < classes:
        raise InputError(f"{field}: class_label {label} is outside 0..{classes - 1}")
    return {"class_labels": torch.tensor([label])}


def load_conditioning(spec: DiffusersPriorSpec, model: Any, field: str) -> Conditioning | None:
    """The fixed conditioning a spec names, checked against the model; None for unconditional models."""
    config = dict(model.config)
    needs_states = _requires(model, "encoder_hidden_states")
    cond = spec.conditioning
    if cond is None:
        if needs_states:
            raise InputError(f"{field}.conditioning: {type(model).__name__} needs encoder_hidden_states; give a file")
        return None
    where = f"{field}.conditioning"

    def branch(file: str | None, label: int | None, name: str) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if file is not None:
            kwargs |= _conditioning_tensors(file, config, f"{where}.{name}file")
        if label is not None:
            kwargs |= _class_kwargs(label, config, f"{where}.{name}class_label")
        if needs_states and "encoder_hidden_states" not in kwargs:
            raise InputError(f"{where}.{name}file: {type(model).__name__} needs encoder_hidden_states")
        return kwargs

    positive = branch(cond.file, cond.class_label, "")
    negative = None
    if cond.guidance_scale != 1.0:
        negative = branch(cond.negative_file or cond.file, cond.negative_class_label, "negative_")
        if cond.negative_file is None and cond.negative_class_label is None:
            raise InputError(f"{where}: guidance_scale != 1 needs a negative_file or negative_class_label")
    return Conditioning(positive, negative, cond.guidance_scale)


def _requires(model: Any, name: str) -> bool:
    parameter = inspect.signature(model.forward).parameters.get(name)
    return parameter is not None and parameter.default is inspect.Parameter.empty


def load_diffusers_prior(spec: DiffusersPriorSpec, device: torch.device | str, field: str) -> DiffusersPrior:
    """The prior a diffusers spec describes, on device with weights in spec.dtype."""
    device = torch.device(device)
    dtype = check_dtype_runs(spec.dtype, device, f"{field}.dtype")
    folder = spec.model_folder
    config = _json_config(folder / "config.json", field)
    model = load_model(folder, spec.model_class, dtype, device, f"{field}.diffusers")
    scheduler = load_scheduler(spec.scheduler_folder, f"{field}.scheduler")
    configured = scheduler.config.get("prediction_type", "epsilon")
    prediction = spec.prediction_type or configured
    if prediction not in PREDICTION_TYPES:
        raise InputError(f"{field}.prediction_type: unknown {prediction!r}; expected one of {list(PREDICTION_TYPES)}")
    shape = tuple(spec.event_shape) if spec.event_shape else infer_event_shape(config, type(model).__name__, field)
    conditioning = load_conditioning(spec, model, field)
    prior = DiffusersPrior(model, scheduler, prediction, shape, conditioning)
    config_file = spec.scheduler_folder / "scheduler_config.json"
    if spec.prediction_type is None:
        source = f"the scheduler's config ({config_file})"
    elif prediction == configured:
        source = f"{field}.prediction_type, as the scheduler's config says"
    else:
        source = f"{field}.prediction_type, overriding the scheduler's config ({configured!r}, {config_file})"
    prior.reading = {"scheduler": type(scheduler).__name__, "prediction_type": prediction, "from": source}
    return prior


# -- the prior ------------------------------------------------------------------------------------------------


def model_output(model: Any, x: torch.Tensor, timestep: int | torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The network's raw prediction (diffusers UNets wrap it in `.sample`)."""
    out = model(x, timestep, **kwargs)
    return getattr(out, "sample", out)


def to_eps_and_x0(
    out: torch.Tensor, x_t: torch.Tensor, alpha_bar: float, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε̂, x̂0) from an ε-, v- (Salimans & Ho 2022) or x0-prediction at x_t = sqrt(ᾱ) x0 + sqrt(1 - ᾱ) ε."""
    a, s = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    if prediction_type == "epsilon":
        return out, (x_t - s * out) / a
    if prediction_type == "v_prediction":  # v = a ε - s x0
        return a * out + s * x_t, a * x_t - s * out
    return (x_t - a * out) / s, out


class DiffusersPrior(DiffusionPrior):
    """A diffusers noise network + scheduler as a DiffusionPrior, whatever it predicts (ε, v or x0)."""

    def __init__(
        self,
        model: Any,
        scheduler: DDPMScheduler | DDIMScheduler,
        prediction_type: str = "epsilon",
        event_shape: tuple[int, ...] | None = None,
        conditioning: Conditioning | None = None,
    ) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise InputError(f"prediction_type: unknown {prediction_type!r}; expected one of {list(PREDICTION_TYPES)}")
        class_name = type(model).__name__
        shape = event_shape or infer_event_shape(dict(model.config), class_name, "prior")
        super().__init__(scheduler, shape)
        self.model = model.eval().requires_grad_(False)
        self.prediction_type = prediction_type
        self.reading = {"scheduler": type(scheduler).__name__, "prediction_type": prediction_type, "from": "the caller"}
        self.conditioning = conditioning
        self._moved: dict[tuple[torch.device, torch.dtype], Conditioning] = {}
        self._alpha_bar = scheduler.alphas_cumprod.double()

    @property
    def weights_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _conditioning(self, like: torch.Tensor) -> Conditioning | None:
        if self.conditioning is None:
            return None
        key = (like.device, self.weights_dtype)
        if key not in self._moved:
            self._moved[key] = self.conditioning.to(*key)
        return self._moved[key]

    def model_output(self, x_t: torch.Tensor, timestep: int) -> torch.Tensor:
        """The raw prediction in x_t's dtype, with classifier-free guidance where configured, (N, *event)."""
        model, dtype = self.model, self.weights_dtype
        if next(model.parameters()).device != x_t.device:
            model.to(x_t.device)
        x = x_t.to(dtype)
        cond = self._conditioning(x_t)
        if cond is None:
            return model_output(model, x, timestep).to(x_t.dtype)
        n = x.shape[0]
        if cond.negative is None:
            return model_output(model, x, timestep, **cond.expanded(cond.kwargs, n)).to(x_t.dtype)
        both = _concat(cond.expanded(cond.negative, n), cond.expanded(cond.kwargs, n))
        negative, positive = model_output(model, torch.cat([x, x]), timestep, **both).to(x_t.dtype).chunk(2)
        return negative + cond.guidance_scale * (positive - negative)

    def denoise(self, x_t: torch.Tensor, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model_output(x_t, timestep)
        return to_eps_and_x0(out, x_t, float(self._alpha_bar[timestep]), self.prediction_type)

    def predict_noise(self, x_t: torch.Tensor, timestep: int) -> torch.Tensor:
        return self.denoise(x_t, timestep)[0]

    def save(self, folder: str | Path) -> None:
        """Model and scheduler in diffusers' layout."""
        self.model.save_pretrained(folder)
        self.scheduler.save_pretrained(folder)


def _concat(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two batches of keyword tensors stacked along the batch (nested dicts too)."""
    return {
        k: _concat(first[k], second[k]) if isinstance(first[k], dict) else torch.cat([first[k], second[k]])
        for k in first
    }


# -- latent priors --------------------------------------------------------------------------------------------


class LatentDecoder:
    """A VAE's decoder for a latent prior: x = z · scaling_factor (+ shift), images = decode(z), differentiable."""

    def __init__(self, vae: Any, checkpointing: bool = True) -> None:
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
        self.shift_factor = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)
        self.latent_channels = int(vae.config.latent_channels)
        if checkpointing:
            vae.enable_gradient_checkpointing()
        elif getattr(vae, "is_gradient_checkpointing", False):
            vae.disable_gradient_checkpointing()
        vae.train(False)

    @property
    def weights_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Latents x (B, C, h, w) -> images (B, 3, H, W) in [-1, 1] (roughly), in x's dtype."""
        if next(self.vae.parameters()).device != x.device:
            self.vae.to(x.device)
        z = x.to(self.weights_dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.to(x.dtype)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> x = (posterior mean - shift) · scaling_factor, (B, C, h, w), the inverse
        of __call__ (diffusers' img2img takes a posterior sample; the mean makes the source deterministic)."""
        device = next(self.vae.parameters()).device
        mean = self.vae.encode(images.to(device, self.weights_dtype)).latent_dist.mean
        return ((mean - self.shift_factor) * self.scaling_factor).to(images.dtype)


def load_latent_decoder(spec: VaeDecoderSpec, device: torch.device | str, field: str) -> LatentDecoder:
    """A VAE decoder part, e.g. a latent prior's (the sampler role loads it: it turns x̂0 into what the sampler sees)."""
    device = torch.device(device)
    dtype = check_dtype_runs(spec.dtype, device, f"{field}.dtype")
    vae = load_model(Path(spec.vae), None, dtype, device, f"{field}.vae")
    if not hasattr(vae, "decode") or not hasattr(vae.config, "latent_channels"):
        raise InputError(f"{field}.vae: {type(vae).__name__} is not an autoencoder with decode()")
    return LatentDecoder(vae, spec.checkpointing)


class DecodedSampler(ConditionalSampler):
    """f(decode(x), eta): the user's sampler over images, fed a latent prior's decoded x (MLGD-F paper, Exp. 2:
    the SDXL latent x̂0 decoded for the ControlNet-conditioned sampler)."""

    def __init__(self, decoder: LatentDecoder, sampler: ConditionalSampler) -> None:
        self.decoder, self.inner = decoder, sampler
        self.y_dim, self.noise_shape = sampler.y_dim, sampler.noise_shape
        self.x_shape = None

    def sample(self, x: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        return self.inner.sample(self.decoder(x), eta)
