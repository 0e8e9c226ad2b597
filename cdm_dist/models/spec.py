"""The problem spec: the one door through which models enter a campaign (never model objects, only descriptions).

`problem` in a campaign config is one of
- a registered name (the built-in benchmarks, or a name an installed package registers in the entry-point group
  `cdm_dist.problems.builtins`) with `args`;
- a factory `"package.module:function"` with `args`, returning a CDMProblem;
- parts: `prior`, `sampler` (and `full_sampler`), `target` and optional `metrics` and `decoder`, each a factory or
  a declarative loader (a local diffusers folder, one of the project's flow-sampler folders, a file of samples, a
  VAE folder); a latent diffusers prior fills `decoder` with its VAE.
The driver validates the shape here (format, mappings, files exist); each worker builds the parts its role needs
(cdm_dist.problems.registry).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import (
    AfterValidator,
    Discriminator,
    Field,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    Tag,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from cdm_dist.chains.config import UNION_TAG, NonNegative, StrictModel
from cdm_dist.chains.mlgd import MetricsFn
from cdm_dist.chains.priors import DiffusionPrior
from cdm_dist.chains.samplers import ConditionalSampler
from cdm_dist.chains.targets import Target
from cdm_dist.errors import InputError

PositiveInt = Annotated[int, Field(ge=1)]
WeightDtype = Literal["float32", "bfloat16", "float16", "float64"]  # float64: reference models
FACTORY_FORMAT = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
# Fields of the built-in problems that older configs wrote next to `name`; they are the built-ins' args now.
LEGACY_PROBLEM_FIELDS = (
    "target_size",
    "target_seed",
    "joint_seed",
    "full_chain_steps",
    "models",
    "checkpoints",
    "fast_steps",
    "digits_target",
)


def absolute(path: str) -> str:
    """A path made absolute against the current folder (actors and `--resume` may run elsewhere)."""
    return str(Path(path).expanduser().resolve())


def existing_folder(path: str) -> str:
    """The path made absolute, when it is a folder."""
    folder = absolute(path)
    if not Path(folder).is_dir():
        raise ValueError(f"{folder} is not a folder")
    return folder


def read_json(path: Path, missing: str) -> dict[str, Any]:
    """The JSON object in a file; one error naming the file if it is missing (`missing` says why), bad or no object."""
    if not path.is_file():
        raise InputError(f"{path} is missing: {missing}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a JSON object")
    return data


def existing_file(path: str) -> str:
    """The path made absolute, when it is a file."""
    file = absolute(path)
    if not Path(file).is_file():
        raise ValueError(f"{file} is not a file")
    return file


Folder = Annotated[str, AfterValidator(existing_folder)]  # checked to exist, made absolute
File = Annotated[str, AfterValidator(existing_file)]


def factory_format(value: str) -> str:
    """A "package.module:function" reference (checked for form only: importing it is the worker's job)."""
    if not FACTORY_FORMAT.match(value):
        raise ValueError(f"{value!r} is not of the form 'package.module:function'")
    return value


def import_path(factory: str | Callable[..., Any]) -> str:
    """A factory's "package.module:function", also of a function given as itself."""
    return factory if isinstance(factory, str) else f"{factory.__module__}:{factory.__qualname__}"


class FactorySpec(StrictModel):
    """A function, or its "package.module:function", called with `args` where the part is built."""

    factory: Annotated[str | Callable[..., Any], PlainSerializer(import_path)]  # "package.module:function"
    args: dict[str, Any] = Field(default_factory=dict)  # keyword arguments it is called with

    @field_validator("factory")
    @classmethod
    def _format(cls, value: str | Callable[..., Any]) -> str | Callable[..., Any]:
        return factory_format(value) if isinstance(value, str) else value


class ConditioningSpec(StrictModel):
    """Fixed conditioning of a conditional UNet: text-encoder states from a file and/or a class label, with
    optional classifier-free guidance against a fixed negative (Ho & Salimans 2022)."""

    file: File | None = None  # .safetensors: encoder_hidden_states (L, D) [+ text_embeds, time_ids for SDXL]
    class_label: int | None = None  # the class of a class-conditional UNet
    guidance_scale: NonNegative = 1.0  # ε̂ = ε̂_neg + s (ε̂_cond - ε̂_neg); 1 = no guidance
    negative_file: File | None = None  # the same tensors for the negative branch
    negative_class_label: int | None = None  # the class of the negative branch

    @model_validator(mode="after")
    def _complete(self) -> ConditioningSpec:
        if self.file is None and self.class_label is None:
            raise ValueError("needs a file (encoder_hidden_states) or a class_label")
        if self.guidance_scale != 1.0 and self.negative_file is None and self.negative_class_label is None:
            raise ValueError("guidance_scale != 1 needs a negative_file or negative_class_label")
        if self.file is not None and self.guidance_scale != 1.0 and self.negative_file is None:
            raise ValueError("guidance_scale != 1 with text conditioning needs a negative_file")
        return self


class DiffusersPriorSpec(StrictModel):
    """A prior from a local diffusers folder (never a hub download): a UNet (or any ModelMixin) + its scheduler,
    optionally an AutoencoderKL for a latent prior (x = the latent times the VAE's scaling_factor)."""

    diffusers: Folder  # the folder: a pipeline (unet/, scheduler/, vae/) or a single model folder
    subfolder: str | None = None  # the model's folder inside, e.g. "unet"
    model_class: str | None = None  # a diffusers class name or "package.module:Class"; default: config _class_name
    scheduler_subfolder: str | None = None  # default: "scheduler" if present, else the model's folder
    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = None  # default: the scheduler's
    prediction_type_overrides_scheduler: bool = False  # confirm a prediction_type that differs from the scheduler's
    dtype: WeightDtype = "float32"  # model weights; the chain's maths stays in method.dtype
    conditioning: ConditioningSpec | None = None
    vae_subfolder: str | None = None  # latent prior: the AutoencoderKL's folder inside, e.g. "vae"
    vae_dtype: WeightDtype | None = None  # default: dtype
    decoder_checkpointing: bool = True  # activation checkpointing in the VAE decoder when gradients flow
    event_shape: list[PositiveInt] | None = None  # x's shape; default: from the model config (dim, or C x size)

    @model_validator(mode="after")
    def _folders(self) -> DiffusersPriorSpec:
        """Every folder is there with its config (no weights are read here)."""
        root = Path(self.diffusers)
        for name in ("subfolder", "scheduler_subfolder", "vae_subfolder"):
            sub = getattr(self, name)
            if sub is not None and not (root / sub).is_dir():
                raise ValueError(f"{name}: {root / sub} is not a folder")
        model_config = read_json(self.model_folder / "config.json", "not a diffusers folder for the model")
        scheduler = read_json(self.scheduler_folder / "scheduler_config.json", "not a diffusers scheduler folder")
        declared, configured = self.prediction_type, scheduler.get("prediction_type", "epsilon")
        if declared is not None and declared != configured and not self.prediction_type_overrides_scheduler:
            raise ValueError(
                f"prediction_type: {declared!r}, but the scheduler's config says {configured!r} "
                f"({self.scheduler_folder / 'scheduler_config.json'}); to read the model as {declared!r} anyway (a "
                "checkpoint shipped with a wrong scheduler config), also set prediction_type_overrides_scheduler: true"
            )
        if self.vae_subfolder is not None:
            vae = read_json(root / self.vae_subfolder / "config.json", "not a diffusers folder for the VAE")
            latent, channels = vae.get("latent_channels"), model_config.get("in_channels")
            if latent is not None and channels is not None and latent != channels:
                raise ValueError(
                    f"vae_subfolder: the VAE's latent_channels ({latent}) differ from the model's in_channels "
                    f"({channels})"
                )
        return self

    @property
    def model_folder(self) -> Path:
        root = Path(self.diffusers)
        return root / self.subfolder if self.subfolder else root

    @property
    def decoder(self) -> VaeDecoderSpec | None:
        """The VAE of a latent prior as a decoder part (x = the latent times its scaling_factor); None otherwise."""
        if self.vae_subfolder is None:
            return None
        return VaeDecoderSpec(vae=str(Path(self.diffusers) / self.vae_subfolder),
                              dtype=self.vae_dtype or self.dtype, checkpointing=self.decoder_checkpointing)  # fmt: skip

    @property
    def scheduler_folder(self) -> Path:
        """scheduler_subfolder, else <diffusers>/scheduler, else the model's folder, else <diffusers>."""
        root = Path(self.diffusers)
        if self.scheduler_subfolder is not None:
            candidates = [root / self.scheduler_subfolder]
        else:
            candidates = [root / "scheduler", self.model_folder, root]
        for folder in candidates:
            if (folder / "scheduler_config.json").is_file():
                return folder
        raise ValueError(f"no scheduler_config.json in {[str(c) for c in dict.fromkeys(candidates)]}")


class VaeDecoderSpec(StrictModel):
    """A diffusers AutoencoderKL from a local folder, whose decoder turns x (a latent) into what the samplers see."""

    vae: Folder  # the VAE's folder (config.json + diffusion_pytorch_model.safetensors)
    dtype: WeightDtype = "float32"  # of the weights
    checkpointing: bool = True  # activation checkpointing in the decoder when gradients flow


class FlowSamplerSpec(StrictModel):
    """One of the project's conditional rectified-flow sampler folders (`cdm train sampler`), `steps` Euler steps."""

    flow: Folder  # a folder `cdm train sampler` wrote
    steps: PositiveInt = 8  # Euler steps of the flow
    dtype: WeightDtype = "float32"  # of the weights
    # consistency-style steps (the MLGD-F code's 6-step sampler): jump to the endpoint, re-noise with fresh noise
    renoise: bool = False


def _by_key(*keys: str) -> Callable[[Any], str | None]:
    """Pick a union member by the key the mapping has (a callable discriminator: errors name the right member)."""

    def pick(data: Any) -> str | None:
        fields = data if isinstance(data, dict) else vars(data) if hasattr(data, "__dict__") else {}
        return next((f"{UNION_TAG}{key}" for key in keys if key in fields), None)

    return pick


ModuleDtypes = dict[Literal["unet", "controlnet", "vae", "embed"], WeightDtype]
ModuleFlags = dict[Literal["unet", "controlnet", "vae", "embed"], bool]
GENERATOR_MODULES = ("unet", "controlnet", "vae", "embed")


class ClipEmbedSpec(StrictModel):
    """A local CLIP vision model (transformers' CLIPVisionModelWithProjection + preprocessor_config.json): y is the
    image embedding of the generated image, preprocessed in torch so it stays differentiable."""

    clip: Folder  # the CLIP vision model's folder
    resize: bool = False  # resize the generated image to the model's input size (else a size mismatch is an error)


EmbedSpec = Annotated[
    Annotated[ClipEmbedSpec, Tag(f"{UNION_TAG}clip")] | Annotated[FactorySpec, Tag(f"{UNION_TAG}factory")],
    Discriminator(
        _by_key("clip", "factory"),
        custom_error_type="spec_kind",
        custom_error_message="expected {clip: FOLDER} or {factory: 'package.module:function', args: {...}}",
    ),
]


class GeneratorSamplerSpec(StrictModel):
    """A few-step image-conditioned generator as the fast sampler (MLGD-F paper, Exp. 2: SDXL-Turbo + a scribble
    ControlNet conditioned on the decoded x̂0, y = the CLIP embedding of the generated image), from local diffusers
    folders: `generator` holds unet/, scheduler/, vae/ (none for a pixel-space UNet) and controlnet/ (unless
    `controlnet` names a folder)."""

    generator: Folder  # a diffusers folder: unet/, scheduler/, controlnet/, and vae/ unless the UNet works in pixels
    controlnet: Folder | None = None  # default: <generator>/controlnet
    prompt: File  # .safetensors: encoder_hidden_states (L, D) [+ text_embeds, time_ids for SDXL]
    negative_prompt: File | None = None  # the same tensors for the unconditional branch of classifier-free guidance
    guidance_scale: NonNegative = 1.0  # 1 = no guidance (SDXL-Turbo is distilled to run without it)
    steps: Annotated[int, Field(ge=1, le=4)] = 1  # the generator's denoising steps
    controlnet_scale: NonNegative = 1.0  # conditioning_scale of the ControlNet residuals
    embed: EmbedSpec  # y from the generated image: a CLIP model's image embedding, or a factory's function
    dtype: WeightDtype = "float32"  # every module's weights unless `dtypes` says otherwise
    dtypes: ModuleDtypes = Field(default_factory=dict)  # weight dtype per module (unet, controlnet, vae, embed)
    # activation checkpointing per module when gradients flow (embed: a CLIP model; a factory's function is as it is)
    checkpointing: bool | ModuleFlags = True
    # conditional samples per chunk, each chunk one activation checkpoint when gradients flow (its backward recomputes
    # it alone, so memory holds one chunk's graph); None: all samples at once
    sample_chunk: PositiveInt | None = None

    @model_validator(mode="after")
    def _folders(self) -> GeneratorSamplerSpec:
        """The generator's parts are there with their configs (no weights are read here)."""
        root = Path(self.generator)
        for part, name in (("unet", "config.json"), ("scheduler", "scheduler_config.json")):
            read_json(root / part / name, f"the generator folder needs {part}/ ({part}/{name})")
        if (root / "vae").exists():
            read_json(root / "vae" / "config.json", "a generator's vae/ needs its config (vae/config.json)")
        read_json(self.controlnet_folder / "config.json", "the generator needs a ControlNet (controlnet/ or "
                  "`controlnet: FOLDER`)")  # fmt: skip
        if self.guidance_scale != 1.0 and self.negative_prompt is None:
            raise ValueError("guidance_scale != 1 needs a negative_prompt")
        return self

    @property
    def controlnet_folder(self) -> Path:
        return Path(self.controlnet) if self.controlnet is not None else Path(self.generator) / "controlnet"

    def module_dtype(self, module: str) -> str:
        """The weight dtype of one module (unet, controlnet, vae, embed)."""
        return self.dtypes.get(module, self.dtype)

    def module_checkpointing(self, module: str) -> bool:
        """Whether one module checkpoints its activations."""
        return self.checkpointing if isinstance(self.checkpointing, bool) else self.checkpointing.get(module, True)


class TargetFileSpec(StrictModel):
    """Target samples S_G from a .npy, .csv or .safetensors file."""

    file: File  # the target's samples, one per row (m, d_y)


@dataclass
class CDMProblem:
    """Everything a campaign needs about one problem: what a problem factory returns (every part built)."""

    name: str
    prior: DiffusionPrior
    fast_sampler: ConditionalSampler  # MLGD-F
    full_sampler: ConditionalSampler | None  # MLGD
    target: Target
    metrics: MetricsFn | None = None  # exact metrics per chain, x (B, *event) -> name -> (B,)
    x_star: torch.Tensor | None = None
    x_star_unique: bool = False
    params: dict[str, Any] = field(default_factory=dict)  # what to save next to results

    def sampler(self, method: str) -> ConditionalSampler:
        """The inner sampler a method uses: 'mlgd' the full chain, every other the fast one."""
        if method == "mlgd":
            if self.full_sampler is None:
                raise InputError(f"problem {self.name}: no full-chain sampler, so method 'mlgd' is unavailable")
            return self.full_sampler
        return self.fast_sampler


def _either(loader: type, key: str, expected: str) -> Any:
    return Annotated[
        Annotated[loader, Tag(f"{UNION_TAG}{key}")] | Annotated[FactorySpec, Tag(f"{UNION_TAG}factory")],
        Discriminator(
            _by_key(key, "factory"),
            custom_error_type="spec_kind",
            custom_error_message=f"expected {expected} or {{factory: 'package.module:function', args: {{...}}}}",
        ),
    ]


PriorSpec = _either(DiffusersPriorSpec, "diffusers", "{diffusers: FOLDER, ...}")
SamplerSpec = Annotated[
    Annotated[FlowSamplerSpec, Tag(f"{UNION_TAG}flow")]
    | Annotated[GeneratorSamplerSpec, Tag(f"{UNION_TAG}generator")]
    | Annotated[FactorySpec, Tag(f"{UNION_TAG}factory")],
    Discriminator(
        _by_key("flow", "generator", "factory"),
        custom_error_type="spec_kind",
        custom_error_message="expected {flow: FOLDER, steps: N}, {generator: FOLDER, ...} or "
        "{factory: 'package.module:function', args: {...}}",
    ),
]
TargetSpec = _either(TargetFileSpec, "file", "{file: PATH}")
DecoderSpec = _either(VaeDecoderSpec, "vae", "{vae: FOLDER, ...}")
PARTS = ("prior", "sampler", "full_sampler", "target", "metrics", "decoder")


class ProblemConfig(StrictModel):
    """Which CDM problem: a registered name, a factory, or parts (prior, sampler, target; see the module docstring)."""

    name: str | None = None  # a registered problem: gmm2d (default), gmm5d, gmm10d, digits, scribbles, or a plugin's
    factory: str | None = None  # "package.module:function" returning a CDMProblem
    args: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of the named problem or the factory
    prior: PriorSpec | None = None  # the diffusion prior P(X) (parts spec)
    sampler: SamplerSpec | None = None  # the fast sampler (MLGD-F)
    full_sampler: SamplerSpec | None = None  # the full-chain sampler (MLGD)
    target: TargetSpec | None = None  # with a name or factory: replaces its target (and drops its exact metrics)
    metrics: FactorySpec | None = None  # exact metrics per chain: x (B, *event) -> {name: (B,)}
    target_file: File | None = None  # shorthand for target: {file: ...}
    # x -> what the samplers see (they get DecodedSampler around them); default: a latent diffusers prior's VAE
    decoder: DecoderSpec | None = Field(default=None, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        """Older configs: built-in fields next to `name` become its args; no kind at all means gmm2d."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        legacy = {k: data.pop(k) for k in LEGACY_PROBLEM_FIELDS if k in data}
        if legacy:
            args = data.get("args") or {}
            if not isinstance(args, dict):
                return data  # the field check names it
            data["args"] = {**legacy, **args}
        if not any(data.get(k) is not None for k in ("name", "factory", "prior", "sampler")):
            data["name"] = "gmm2d"
        return data

    @field_validator("factory")
    @classmethod
    def _factory_format(cls, value: str | None) -> str | None:
        return None if value is None else factory_format(value)

    @field_validator("decoder")
    @classmethod
    def _latent_prior_decoder(cls, value: Any, info: ValidationInfo) -> Any:
        """No decoder given: a latent diffusers prior's VAE."""
        prior = info.data.get("prior")
        return prior.decoder if value is None and isinstance(prior, DiffusersPriorSpec) else value

    @field_serializer("decoder", mode="wrap")
    def _unless_from_prior(self, value: Any, write: SerializerFunctionWrapHandler) -> Any:
        """The prior's own VAE is written as null, so a changed prior brings its decoder along."""
        prior = self.prior
        return None if isinstance(prior, DiffusersPriorSpec) and value == prior.decoder else write(value)

    @model_validator(mode="after")
    def _one_kind(self) -> ProblemConfig:
        kinds = [k for k in ("name", "factory") if getattr(self, k) is not None]
        parts = [p for p in ("prior", "sampler", "full_sampler", "metrics", "decoder") if getattr(self, p) is not None]
        if len(kinds) > 1:
            raise ValueError("give either name or factory, not both")
        if kinds and parts:
            raise ValueError(f"{kinds[0]} builds the whole problem; {parts} are only for parts specs")
        if not kinds:
            missing = [p for p in ("prior", "sampler") if getattr(self, p) is None]
            if self.target is None and self.target_file is None:
                missing.append("target")
            if missing:
                raise ValueError(f"a parts spec needs prior, sampler and target; {missing} missing")
            if self.args:
                raise ValueError("args belong to a name or factory; give each part its own args")
        if self.target is not None and self.target_file is not None:
            raise ValueError("give either target or target_file, not both")
        return self

    @property
    def kind(self) -> str:
        """'name', 'factory' or 'parts'."""
        return "name" if self.name is not None else "factory" if self.factory is not None else "parts"

    @property
    def target_override(self) -> TargetSpec | None:
        """The user's own target, which replaces the problem's."""
        if self.target_file is not None:
            return TargetFileSpec(file=self.target_file)
        return self.target

    def label(self) -> str:
        """A short name for reports."""
        if self.name is not None:
            return self.name
        if self.factory is not None:
            return self.factory
        return "parts"
