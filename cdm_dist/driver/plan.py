"""`cdm check --plan`: a real-size memory plan of a campaign, without its weights.

Every module a role loads is built from its folder's config.json on the meta device (accelerate's
`init_empty_weights`: shapes only, no memory, no weights), so parameter counts are exact and weight memory is
params x the configured dtype. What is not exact is the activation memory; it is estimated like this:

1. Trace. Each module runs forward once on the meta device at the configured resolution and dtype, batch 1, with its
   weights frozen and gradients flowing as in the campaign (x_t into the prior's UNet; the decoded x̂0 through the
   ControlNet, the generator's UNet, its VAE decoder and the embedding). A `saved_tensors_hooks` pack hook records
   every tensor autograd keeps for the backward (weights and buffers excluded, a storage counted once). Attention is
   counted as PyTorch's fused GPU kernels keep it (q, k, v, the output and the log-sum-exp; never the N x N matrix),
   not as the meta device's math fallback would.
2. Checkpointing. A module with activation checkpointing on gets a `gradient_checkpointing_func` (diffusers' own
   hook, so the blocks are exactly the ones diffusers checkpoints; for CLIP, each encoder layer) that keeps the
   block's inputs instead of what it saves, and records the largest block: during the backward one block at a time
   is recomputed and holds its saved tensors again.
3. Scaling. Activations are linear in the batch: each module's batch-1 figures are multiplied by the samples that go
   through it at once: the prior's UNet, micro_batch chains x 2 with classifier-free guidance x the micro-batches in
   flight whose paused step keeps its graph (split placement); the problem's decoder, micro_batch x n_guess decoded
   guesses; the generator's ControlNet, UNet, VAE decoder and embedding, sample_chunk samples (GeneratorSampler
   makes each chunk one activation checkpoint, so the backward holds one chunk's graph) x 2 with guidance x steps.
4. Peak. Per role: weights + the sum of what every module keeps + the largest recomputed block + twice the largest
   saved tensor (the gradient being formed and its input's); a module that runs without gradients (the VAE encoder of
   an editing source, the prior's UNet with `grad: identity`) counts three of its largest tensors. Activations get
   10% for allocator fragmentation, and each GPU 1.5 GiB for the CUDA context and the part of its nominal size that is
   not addressable (an "80 GB" card has about 79.6 GiB).

This is an estimate of the peak, not a measurement: kernels' workspaces, cuDNN algorithm choice and allocator
behaviour differ per GPU, and the backward's own temporaries are modelled, not traced. Against a real forward +
backward on CPU (peak RSS, PyTorch's CPU flash attention), small diffusers models came out at: VAE decoder +4%
without checkpointing, +23% with; UNet with cross-attention +4% without, +13 to +18% with (checkpointing errs high:
a recomputed block is counted whole). `cdm check CONFIG` on the real machine measures one guided step's peak.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from cdm_dist.driver.campaign import CampaignConfig
from cdm_dist.errors import InputError, first_line
from cdm_dist.models.spec import (
    ClipEmbedSpec,
    DiffusersPriorSpec,
    GeneratorSamplerSpec,
    VaeDecoderSpec,
    read_json,
)

GPU_GIB = (16, 24, 40, 48, 80, 141)  # nominal GPU memory sizes the plan checks
RESERVE_GIB = 1.5  # per GPU: the CUDA context and the part of the nominal size that is not addressable
FRAGMENTATION = 0.10  # on activations: the caching allocator's slack
GIB = 2**30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
IMAGES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # an editing source that a latent prior's VAE encodes
VAE_PARTS = {"encode": ("encoder", "quant_conv"), "decode": ("decoder", "post_quant_conv")}
HOW = (
    "activations are estimated, not measured: each module traced once on the meta device at the configured "
    "resolution and dtype (batch 1), counting the tensors autograd keeps for the backward (weights excluded; "
    "attention as fused GPU kernels keep it; checkpointed blocks keep their inputs and are recomputed one at a time), "
    "times the samples in flight; a role's peak = weights + what every module keeps + the largest recomputed block + "
    "2 x the largest saved tensor (3 x the largest tensor without gradients); activations +"
    f"{FRAGMENTATION:.0%} for the allocator, {RESERVE_GIB} GiB per GPU for the CUDA context"
)


# -- tracing -----------------------------------------------------------------------------------------------------


@dataclass
class Activations:
    """Activation bytes of one module for its samples in flight (see the module docstring)."""

    kept: int = 0  # kept for the backward (outside checkpointed blocks, plus those blocks' inputs)
    block: int = 0  # the largest checkpointed block, recomputed in the backward
    largest: int = 0  # the largest single saved tensor
    grad: bool = True  # False: a forward without gradients (peak ~ 3 x largest)

    def scaled(self, items: int) -> Activations:
        return Activations(self.kept * items, self.block * items, self.largest * items, self.grad)

    def divided(self, parts: int) -> Activations:
        return Activations(self.kept // parts, self.block // parts, self.largest // parts, self.grad)

    def plus(self, other: Activations) -> Activations:
        """Two forward passes whose graphs live together (e.g. two generator steps)."""
        return Activations(self.kept + other.kept, max(self.block, other.block), max(self.largest, other.largest),
                           self.grad or other.grad)  # fmt: skip

    @property
    def transient(self) -> int:
        """Gradients in flight in the backward, or a forward's live tensors without gradients."""
        return 2 * self.largest if self.grad else 3 * self.largest

    @property
    def peak(self) -> int:
        """This module alone."""
        return (self.kept + self.block if self.grad else 0) + self.transient


class _FusedAttention(torch.autograd.Function):
    """What fused scaled-dot-product attention (flash / memory-efficient) keeps for the backward: q, k, v, the output
    and the log-sum-exp per query. Meta tensors only: never run backward."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        saved = (q, k, v, out, lse) + ((mask,) if isinstance(mask, torch.Tensor) else ())
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:  # pragma: no cover - meta traces never run backward
        raise RuntimeError("the plan's attention stand-in has no backward")


class _FusedAttentionMode(TorchFunctionMode):
    """scaled_dot_product_attention as the fused GPU kernels keep it (the meta device would take the math path, which
    keeps the N x N attention matrix in float32)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            return _FusedAttention.apply(q, k, v, mask)
        return func(*args, **kwargs)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif hasattr(value, "to_tuple"):  # diffusers / transformers output classes
        yield from _tensors(value.to_tuple())


def _key(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage._cdata, storage.nbytes()


class _Tracer:
    """Records what autograd keeps during one meta forward, split into checkpointed blocks."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.weights = {_key(t)[0] for t in [*model.parameters(), *model.buffers()]}
        self.kept: dict[int, tuple[int, torch.Tensor]] = {}  # the tensors stay referenced: storage ids stay unique
        self.block: dict[int, tuple[int, torch.Tensor]] | None = None
        self.largest_block = 0
        self.largest = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        cdata, nbytes = _key(tensor)
        if cdata not in self.weights:
            self.largest = max(self.largest, nbytes)
            (self.kept if self.block is None else self.block)[cdata] = (nbytes, tensor)
        return tensor

    def enter(self) -> bool:
        """Start a checkpointed block (False inside one already: the outer block is the unit)."""
        if self.block is not None:
            return False
        self.block = {}
        return True

    def leave(self, inputs: Any, output: Any) -> None:
        block, self.block = self.block or {}, None
        self.largest_block = max(self.largest_block, sum(n for n, _ in block.values()))
        if any(t.requires_grad for t in _tensors(output)):  # the checkpoint keeps its inputs for the recompute
            for tensor in _tensors(inputs):
                cdata, nbytes = _key(tensor)
                if cdata not in self.weights:
                    self.kept[cdata] = (nbytes, tensor)

    def checkpoint(self, module: Callable[..., Any], *args: Any) -> Any:
        """diffusers' gradient_checkpointing_func(module, *args)."""
        if not self.enter():
            return module(*args)
        output = None
        try:
            output = module(*args)
        finally:
            self.leave(args, output)
        return output

    def result(self, grad: bool) -> Activations:
        return Activations(sum(n for n, _ in self.kept.values()), self.largest_block, self.largest, grad)


def trace(
    model: torch.nn.Module, run: Callable[[], Any], checkpointing: bool, blocks: list[torch.nn.Module] = ()
) -> Activations:
    """What one meta forward `run()` keeps for the backward (see the module docstring). With checkpointing, a
    diffusers model checkpoints through its own gradient_checkpointing_func; other models through `blocks`."""
    tracer = _Tracer(model)
    hooks = []
    uses_diffusers_hook = checkpointing and getattr(model, "_supports_gradient_checkpointing", False)
    if uses_diffusers_hook:
        model.enable_gradient_checkpointing(tracer.checkpoint)
    elif checkpointing:
        entered: dict[int, bool] = {}

        def before(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            entered[id(module)] = tracer.enter()

        def after(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if entered.pop(id(module), False):
                tracer.leave((args, kwargs), output)

        for block in blocks:
            hooks.append(block.register_forward_pre_hook(before, with_kwargs=True))
            hooks.append(block.register_forward_hook(after, with_kwargs=True))
    try:
        with (
            torch.autograd.graph.saved_tensors_hooks(tracer.pack, lambda t: t),
            _FusedAttentionMode(),
            torch.enable_grad(),
        ):
            run()
    finally:
        for hook in hooks:
            hook.remove()
        if uses_diffusers_hook:
            model.disable_gradient_checkpointing()
    return tracer.result(grad=True)


def meta(*shape: int, dtype: torch.dtype = torch.float32, grad: bool = False) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)


# -- building on the meta device ---------------------------------------------------------------------------------


@dataclass
class Built:
    """A module built from its config.json on the meta device."""

    model: torch.nn.Module
    config: dict[str, Any]
    class_name: str
    folder: Path
    dtype: str

    def params(self, parts: tuple[str, ...] = ()) -> int:
        modules = [getattr(self.model, p) for p in parts if hasattr(self.model, p)] if parts else [self.model]
        return sum(p.numel() for m in modules for p in m.parameters())

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.model.parameters(), *self.model.buffers()])


def model_config(folder: Path, field: str, what: str) -> dict[str, Any]:
    """A model folder's config.json, with the config field first in every error."""
    try:
        return read_json(folder / "config.json", f"{what} needs it")
    except InputError as exc:
        raise InputError(f"{field}: {exc}") from None


def build_diffusers(folder: Path, class_name: str | None, dtype: str, field: str) -> Built:
    """A diffusers ModelMixin from `folder`/config.json, on the meta device, frozen, in `dtype`."""
    from accelerate import init_empty_weights

    from cdm_dist.models.adapters import model_class

    config = model_config(folder, field, "a diffusers model folder")
    cls = model_class(class_name or config.get("_class_name", ""), field)
    try:
        with init_empty_weights(include_buffers=True):
            model = cls.from_config(config)
    except Exception as exc:
        raise InputError(
            f"{field}: {folder / 'config.json'} does not build a {cls.__name__} ({first_line(exc)})"
        ) from None
    torch.nn.Module.to(model, dtype=DTYPES[dtype])  # nn.Module's own .to: diffusers' warns about fp32 modules
    return Built(model.requires_grad_(False).eval(), config, cls.__name__, folder, dtype)


def build_clip(folder: Path, dtype: str, field: str) -> Built:
    """transformers' CLIPVisionModelWithProjection from `folder`/config.json (a CLIPModel's or a vision config)."""
    config = model_config(folder, field, "a CLIP model folder")
    try:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    except ImportError:
        raise InputError(f"{field}: a CLIP embed needs transformers (pip install transformers)") from None
    from accelerate import init_empty_weights

    try:
        vision = CLIPVisionConfig.from_pretrained(str(folder), local_files_only=True)
        vision._attn_implementation = "sdpa"  # what runs on GPUs; the trace counts it as the fused kernels keep it
        with init_empty_weights(include_buffers=True):
            model = CLIPVisionModelWithProjection(vision)
    except Exception as exc:
        raise InputError(f"{field}: {folder / 'config.json'} does not build a CLIP vision model "
                         f"({first_line(exc)})") from None  # fmt: skip
    model.to(dtype=DTYPES[dtype])
    return Built(model.requires_grad_(False).eval(), config, "CLIPVisionModelWithProjection", folder, dtype)


def vae_factor(config: dict[str, Any]) -> int:
    """Image pixels per latent pixel of an AutoencoderKL."""
    return 2 ** (len(config.get("block_out_channels", [1])) - 1)


def spatial(size: Any) -> tuple[int, int]:
    return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))


# -- conditioning shapes -----------------------------------------------------------------------------------------


def prompt_shapes(file: str | None, field: str) -> dict[str, tuple[int, ...]]:
    """The tensor shapes in a conditioning .safetensors (its header only)."""
    if file is None:
        return {}
    from safetensors import safe_open

    try:
        with safe_open(file, "pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:
        raise InputError(f"{field}: {file} is not a readable .safetensors ({first_line(exc)})") from None


def unet_kwargs(built: Built, shapes: dict[str, tuple[int, ...]], batch: int, notes: list[str]) -> dict[str, Any]:
    """The conditioning a UNet's forward takes, as meta tensors: text states, SDXL's added_cond_kwargs, labels."""
    config, dtype, kwargs = built.config, DTYPES[built.dtype], {}
    signature = inspect.signature(built.model.forward).parameters
    cross = config.get("cross_attention_dim")
    if "encoder_hidden_states" in signature and cross is not None:
        width = cross[0] if isinstance(cross, (list, tuple)) else int(cross)
        length, dim = shapes.get("encoder_hidden_states", (77, width))[-2:]
        if dim != width:
            notes.append(f"{built.folder}: the conditioning's encoder_hidden_states have width {dim}, the model's "
                         f"cross_attention_dim is {width}")  # fmt: skip
        kwargs["encoder_hidden_states"] = meta(batch, length, width, dtype=dtype)
    if config.get("addition_embed_type") == "text_time":
        time_dim = int(config.get("addition_time_embed_dim") or 256)
        time_ids = shapes.get("time_ids", (6,))[-1]
        text = int(config.get("projection_class_embeddings_input_dim") or 0) - time_ids * time_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": meta(batch, text, dtype=dtype),
                                       "time_ids": meta(batch, time_ids, dtype=dtype)}  # fmt: skip
    if config.get("num_class_embeds") and "class_labels" in signature:
        kwargs["class_labels"] = torch.zeros(batch, dtype=torch.long, device="meta")
    return kwargs


# -- the plan ----------------------------------------------------------------------------------------------------


@dataclass
class ModulePlan:
    """One module a role loads."""

    role: str
    module: str
    folder: str
    class_name: str
    params: int  # the whole model the role loads (what its weights take)
    part_params: int  # the part the role runs (e.g. a VAE's decoder)
    dtype: str
    weight_bytes: int
    items: int  # samples through it at once
    items_how: str
    checkpointing: bool
    activations: Activations | None
    note: str = ""


@dataclass
class RolePlan:
    role: str
    modules: list[ModulePlan] = field(default_factory=list)

    @property
    def weight_bytes(self) -> int:
        return sum(m.weight_bytes for m in self.modules)

    @property
    def activation_bytes(self) -> int:
        acts = [m.activations for m in self.modules if m.activations is not None]
        if not acts:
            return 0
        kept = sum(a.kept for a in acts if a.grad)
        block = max((a.block for a in acts if a.grad), default=0)
        return int((kept + block + max(a.transient for a in acts)) * (1 + FRAGMENTATION))

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes


def fits(total_bytes: int) -> dict[str, bool]:
    return {str(g): total_bytes + RESERVE_GIB * GIB <= g * GIB for g in GPU_GIB}


class Planner:
    """Builds each role's modules on the meta device and estimates their activations."""

    def __init__(self, config: CampaignConfig, activations: bool = True) -> None:
        self.config = config
        self.activations = activations
        self.notes: list[str] = []
        self.paused = 1  # micro-batches whose paused prior step keeps its graph (split placement)

    def _activations(self, what: str, measure: Callable[[], Activations]) -> Activations | None:
        if not self.activations:
            return None
        try:
            return measure()
        except InputError:
            raise
        except Exception as exc:  # a model whose forward does not trace on the meta device
            self.notes.append(f"{what}: activations not traced ({type(exc).__name__}: {first_line(exc)})")
            return None

    # -- prior -------------------------------------------------------------------------------------------------

    def colocated_prior(self, prior: RolePlan) -> RolePlan:
        """The prior role as it would be next to the sampler: one paused step at a time (drive_step answers at once)."""
        if self.paused == 1:
            return prior
        modules = [replace(m, activations=m.activations.divided(self.paused)) if m.module == "unet" and m.activations
                   else m for m in prior.modules]  # fmt: skip
        return RolePlan(prior.role, modules)

    def prior(self, spec: DiffusersPriorSpec) -> tuple[RolePlan, tuple[int, ...]]:
        """The prior role: its UNet (+ the VAE's encoder for an image source). Returns the event shape too."""
        config, resources, method = self.config, self.config.resources, self.config.method
        role = RolePlan("prior")
        unet = build_diffusers(spec.model_folder, spec.model_class, spec.dtype, "problem.prior")
        event = tuple(spec.event_shape or (int(unet.config.get("in_channels", 4)),
                                           *spatial(unet.config.get("sample_size", 64))))  # fmt: skip
        cond = spec.conditioning
        cfg = 2 if cond is not None and cond.guidance_scale != 1.0 else 1
        batch = min(resources.micro_batch, config.chains.count)
        paused = resources.in_flight if resources.executor == "ray" and resources.placement == "split" else 1
        grad = method.grad == "full"
        self.paused = paused if grad else 1
        items = batch * cfg * (paused if grad else 1)
        how = f"{batch} chains" + (" x 2 CFG" if cfg == 2 else "")
        if grad and paused > 1:
            how += f" x {paused} micro-batches in flight"
            self.notes.append(f"prior: split placement, so each of the {paused} micro-batches in flight "
                              "(in_flight) keeps its paused step's UNet graph while the sampler answers")  # fmt: skip
        shapes = prompt_shapes(cond.file if cond is not None else None, "problem.prior.conditioning.file")

        def measure() -> Activations:
            kwargs = unet_kwargs(unet, shapes, 1, self.notes)
            sample = meta(1, *event, dtype=DTYPES[spec.dtype], grad=True)
            timestep = torch.full((1,), 500.0, device="meta")
            acts = trace(unet.model, lambda: unet.model(sample, timestep, **kwargs), checkpointing=False)
            return acts if grad else Activations(largest=acts.largest, grad=False)

        acts = self._activations("prior unet", measure)
        role.modules.append(ModulePlan(
            "prior", "unet", str(unet.folder), unet.class_name, unet.params(), unet.params(), spec.dtype,
            unet.weight_bytes, items, how if grad else f"{how}, no gradients (grad: identity)", False,
            acts.scaled(items) if acts else None))  # fmt: skip
        source = config.chains.source
        if source is not None and spec.vae_subfolder is not None and Path(source.file).suffix.lower() in IMAGES:
            encoder, factor = self._vae("prior", "vae encoder", "encode", Path(spec.diffusers) / spec.vae_subfolder,
                                        spec.vae_dtype or spec.dtype, event, 1, "the source image, no gradients",
                                        False, grad=False, field="problem.prior.vae_subfolder")  # fmt: skip
            role.modules.append(encoder)
            self._check_source_size(source.file, event, factor)
        return role, event

    def _check_source_size(self, file: str, event: tuple[int, ...], factor: int) -> None:
        try:
            from PIL import Image

            with Image.open(file) as image:
                width, height = image.size
        except Exception:
            return  # the source loader names an unreadable image when the campaign starts
        want = (event[-2] * factor, event[-1] * factor)
        if (height, width) != want:
            self.notes.append(f"chains.source.file: {file} is {width}x{height}; the prior's images are "
                              f"{want[1]}x{want[0]} (nothing is resized)")  # fmt: skip

    def _vae(
        self, role: str, name: str, direction: str, folder: Path, dtype: str, latent: tuple[int, ...], items: int,
        how: str, checkpointing: bool, grad: bool, field: str,
    ) -> tuple[ModulePlan, int]:  # fmt: skip
        """A VAE's encode or decode and its pixels per latent pixel."""
        vae = build_diffusers(folder, None, dtype, field)
        if not hasattr(vae.model, "decode"):
            raise InputError(f"{field}: {vae.class_name} is not an autoencoder with encode() and decode()")
        factor = vae_factor(vae.config)
        torch_dtype = DTYPES[dtype]

        def measure() -> Activations:
            if direction == "decode":
                z = meta(1, *latent, dtype=torch_dtype, grad=grad)
                acts = trace(vae.model, lambda: vae.model.decode(z).sample, checkpointing)
            else:
                channels = int(vae.config.get("in_channels", 3))
                image = meta(1, channels, latent[-2] * factor, latent[-1] * factor, dtype=torch_dtype,
                             grad=True)  # fmt: skip
                acts = trace(vae.model, lambda: vae.model.encode(image).latent_dist.mean, checkpointing=False)
            return acts if grad else Activations(largest=acts.largest, grad=False)

        acts = self._activations(f"{role} {name}", measure)
        part = vae.params(VAE_PARTS[direction])
        plan = ModulePlan(role, name, str(folder), vae.class_name, vae.params(), part, dtype, vae.weight_bytes, items,
                          how, checkpointing and grad, acts.scaled(items) if acts else None)  # fmt: skip
        return plan, factor

    # -- sampler -----------------------------------------------------------------------------------------------

    def sampler(self, spec: GeneratorSamplerSpec, decoder: VaeDecoderSpec | None, event: tuple[int, ...]) -> RolePlan:
        """The sampler role: the problem's decoder (a latent prior's VAE), then the generator's ControlNet, UNet,
        VAE decoder and embedding, for every conditional sample in flight."""
        config, method = self.config, self.config.method
        role = RolePlan("sampler")
        batch = min(config.resources.micro_batch, config.chains.count)
        images = batch * method.n_guess
        samples = images * method.n_c
        chunk = min(spec.sample_chunk or samples, samples)
        cfg = 2 if spec.guidance_scale != 1.0 else 1
        image_hw = event[-2:]
        if decoder is not None:
            how = f"{batch} chains x {method.n_guess} guess{'es' if method.n_guess > 1 else ''}"
            module, factor = self._vae("sampler", "decoder (prior vae)", "decode", Path(decoder.vae), decoder.dtype,
                                       event, images, how, decoder.checkpointing, grad=True,
                                       field="problem.decoder")  # fmt: skip
            role.modules.append(module)
            image_hw = (event[-2] * factor, event[-1] * factor)
        else:
            self.notes.append("problem.decoder: none; the generator's ControlNet sees x̂0 itself as its image")
        root = Path(spec.generator)
        shapes = prompt_shapes(spec.prompt, "problem.sampler.prompt")
        chunk_how = f"sample_chunk {chunk}" if spec.sample_chunk else f"all {samples} samples (no sample_chunk)"
        cfg_how = " x 2 CFG" if cfg == 2 else ""
        steps = spec.steps

        unet = build_diffusers(root / "unet", None, spec.module_dtype("unet"), "problem.sampler.generator")
        controlnet = build_diffusers(spec.controlnet_folder, None, spec.module_dtype("controlnet"),
                                     "problem.sampler.controlnet")  # fmt: skip
        # as GeneratorSampler: latents of the UNet's sample_size; the control image at the size the ControlNet's
        # conditioning embedding maps onto them (x̂0's decoded image is resized to it when it differs)
        latent = (int(unet.config.get("in_channels", 4)), *spatial(unet.config.get("sample_size", 64)))
        embedding = controlnet.config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
        control_hw = (latent[1] * 2 ** (len(embedding) - 1), latent[2] * 2 ** (len(embedding) - 1))
        if tuple(image_hw) != control_hw:
            self.notes.append(f"problem.sampler: the decoded x̂0 is {image_hw[1]}x{image_hw[0]}, the ControlNet takes "
                              f"{control_hw[1]}x{control_hw[0]} (GeneratorSampler resizes it)")  # fmt: skip
        timestep = torch.full((1,), 999.0, device="meta")
        residuals: dict[str, Any] = {}

        def measure_controlnet() -> Activations:
            kwargs = unet_kwargs(controlnet, shapes, 1, self.notes)
            channels = int(controlnet.config.get("conditioning_channels", 3))
            dtype = DTYPES[controlnet.dtype]
            image = meta(1, channels, *control_hw, dtype=dtype, grad=True)
            sample = meta(1, *latent, dtype=dtype)

            def run() -> None:
                down, mid = controlnet.model(sample, timestep, controlnet_cond=image, return_dict=False, **kwargs)
                residuals.update(down=[d.to(DTYPES[unet.dtype]) for d in down], mid=mid.to(DTYPES[unet.dtype]))

            acts = trace(controlnet.model, run, spec.module_checkpointing("controlnet"))
            return acts.scaled(steps)

        items = chunk * cfg
        acts = self._activations("sampler controlnet", measure_controlnet)
        role.modules.append(ModulePlan(
            "sampler", "controlnet", str(controlnet.folder), controlnet.class_name, controlnet.params(),
            controlnet.params(), controlnet.dtype, controlnet.weight_bytes, items,
            f"{chunk_how}{cfg_how}" + (f" x {steps} steps" if steps > 1 else ""),
            spec.module_checkpointing("controlnet"), acts.scaled(items) if acts else None))  # fmt: skip

        def measure_unet() -> Activations:
            kwargs = unet_kwargs(unet, shapes, 1, self.notes)
            checkpointing = spec.module_checkpointing("unet")
            if not residuals:
                raise RuntimeError("the ControlNet's residuals are missing (its trace failed)")
            dtype = DTYPES[unet.dtype]

            def run(sample: torch.Tensor) -> Callable[[], Any]:
                return lambda: unet.model(sample, timestep, down_block_additional_residuals=residuals["down"],
                                          mid_block_additional_residual=residuals["mid"], **kwargs).sample  # fmt: skip

            first = trace(unet.model, run(meta(1, *latent, dtype=dtype)), checkpointing)  # noise in, no gradient
            if steps == 1:
                return first
            later = trace(unet.model, run(meta(1, *latent, dtype=dtype, grad=True)), checkpointing)
            return first.plus(later.scaled(steps - 1))

        acts = self._activations("sampler unet", measure_unet)
        role.modules.append(ModulePlan(
            "sampler", "unet", str(unet.folder), unet.class_name, unet.params(), unet.params(), unet.dtype,
            unet.weight_bytes, items, f"{chunk_how}{cfg_how}" + (f" x {steps} steps" if steps > 1 else ""),
            spec.module_checkpointing("unet"), acts.scaled(items) if acts else None))  # fmt: skip
        module, factor = self._vae("sampler", "vae decoder", "decode", root / "vae", spec.module_dtype("vae"), latent,
                                   chunk, chunk_how, spec.module_checkpointing("vae"), grad=True,
                                   field="problem.sampler.generator")  # fmt: skip
        role.modules.append(module)
        generated = (latent[-2] * factor, latent[-1] * factor)
        if isinstance(spec.embed, ClipEmbedSpec):
            role.modules.append(self._clip(spec, generated, chunk, chunk_how))
        else:
            self.notes.append("problem.sampler.embed: a factory (user code); its memory is not in the plan")
        return role

    def _clip(self, spec: GeneratorSamplerSpec, generated: tuple[int, int], items: int, how: str) -> ModulePlan:
        embed = spec.embed
        assert isinstance(embed, ClipEmbedSpec)
        dtype = spec.module_dtype("embed")
        clip = build_clip(Path(embed.clip), dtype, "problem.sampler.embed.clip")
        size = int(clip.model.config.image_size)
        if not embed.resize and generated != (size, size):
            self.notes.append(f"problem.sampler.embed: the generated images are {generated[1]}x{generated[0]}, the "
                              f"CLIP model takes {size}x{size}; set resize: true")  # fmt: skip
        checkpointing = spec.module_checkpointing("embed")

        def measure() -> Activations:
            pixels = meta(1, 3, size, size, dtype=DTYPES[dtype], grad=True)
            layers = list(clip.model.vision_model.encoder.layers)
            return trace(clip.model, lambda: clip.model(pixel_values=pixels).image_embeds, checkpointing, layers)

        acts = self._activations("sampler embed", measure)
        return ModulePlan("sampler", "embed (clip)", str(clip.folder), clip.class_name, clip.params(), clip.params(),
                          dtype, clip.weight_bytes, items, how, checkpointing,
                          acts.scaled(items) if acts else None)  # fmt: skip


def plan_campaign(config: CampaignConfig, activations: bool = True) -> dict[str, Any]:
    """The memory plan of a campaign whose problem is a diffusers prior (+ a generator sampler): per role, every
    module's exact parameter count and weight memory, the estimated activations and which GPU sizes fit (see the
    module docstring for how activations are estimated). Needs config.json files only, no weights."""
    problem, resources = config.problem, config.resources
    if problem.kind != "parts" or not isinstance(problem.prior, DiffusersPriorSpec):
        what = f"problem {problem.label()!r}" if problem.kind != "parts" else "problem.prior (a factory)"
        raise InputError(f"cdm check --plan: plans diffusers priors built from config.json; {what} is built by code "
                         "(`cdm check CONFIG` builds it and measures one step)")  # fmt: skip
    sampler_spec = problem.full_sampler if config.method.name == "mlgd" else problem.sampler
    if isinstance(sampler_spec, GeneratorSamplerSpec) and isinstance(sampler_spec.embed, ClipEmbedSpec):
        model_config(Path(sampler_spec.embed.clip), "problem.sampler.embed.clip", "a CLIP model folder")  # fail fast
    planner = Planner(config, activations)
    prior, event = planner.prior(problem.prior)
    roles = [prior]
    decoder = problem.decoder if isinstance(problem.decoder, VaeDecoderSpec) else None
    if problem.decoder is not None and decoder is None:
        planner.notes.append("problem.decoder: a factory (user code); its memory is not in the plan")
    if isinstance(sampler_spec, GeneratorSamplerSpec):
        roles.append(planner.sampler(sampler_spec, decoder, event))
    else:
        kind = "none" if sampler_spec is None else type(sampler_spec).__name__.removesuffix("Spec").lower()
        where = "problem.full_sampler" if config.method.name == "mlgd" else "problem.sampler"
        planner.notes.append(f"{where}: {kind}; only generator samplers are planned (`cdm check` measures the "
                             "others)")  # fmt: skip
    split = resources.executor == "ray" and resources.placement == "split"
    placement = (f"ray split: prior and sampler on separate actors, num_gpus {resources.num_gpus:g} each"
                 if split else f"{resources.executor_name}: both roles in one process (one GPU)")  # fmt: skip
    result: dict[str, Any] = {
        "campaign": config.name,
        "placement": placement,
        "split": split,
        "event_shape": list(event),
        "gpu_gib": list(GPU_GIB),
        "roles": [],
        "how": HOW,
        "notes": planner.notes,
    }
    for role in roles:
        result["roles"].append({
            "role": role.role,
            "modules": [_module_json(m) for m in role.modules],
            "weight_bytes": role.weight_bytes,
            "activation_bytes": role.activation_bytes,
            "total_bytes": role.total_bytes,
            "fits": fits(role.total_bytes),
        })  # fmt: skip
    both = sum(r.total_bytes for r in [planner.colocated_prior(prior), *roles[1:]])
    result["both_roles"] = {"total_bytes": both, "fits": fits(both)}
    result["applies"] = "per role" if split else "both roles"
    return result


def _module_json(module: ModulePlan) -> dict[str, Any]:
    data = asdict(module)
    acts = module.activations
    data["activations"] = None if acts is None else {**asdict(acts), "peak": acts.peak}
    return data


# -- text --------------------------------------------------------------------------------------------------------


def _size(nbytes: int) -> str:
    if nbytes >= GIB / 10:
        return f"{nbytes / GIB:.2f} GiB"
    return f"{nbytes / 2**20:.0f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.0f} KiB"


def _fit_line(fit: dict[str, bool]) -> str:
    sizes = [g for g, ok in fit.items() if ok]
    return f"fits {', '.join(sizes)} GiB GPUs" if sizes else f"fits no GPU up to {GPU_GIB[-1]} GiB"


def format_plan(plan: dict[str, Any]) -> str:
    """The table `cdm check --plan` prints."""
    shape = " x ".join(map(str, plan["event_shape"]))
    lines = [f"memory plan of campaign {plan['campaign']}: {plan['placement']}; x is {shape}"]
    lines.append(f"  {'role':<8} {'module':<22} {'class':<29} {'params':>13}  {'dtype':<8} {'weights':>9}  "
                 f"{'activations*':>12}  samples in flight")  # fmt: skip
    for role in plan["roles"]:
        for m in role["modules"]:
            acts = m["activations"]
            act = "-" if acts is None else _size(acts["peak"])
            ckpt = ", checkpointed" if m["checkpointing"] else ""
            part = f"; runs {m['part_params']:,} of its params" if m["part_params"] != m["params"] else ""
            lines.append(f"  {role['role']:<8} {m['module']:<22} {m['class_name']:<29} {m['params']:>13,}  "
                         f"{m['dtype']:<8} {_size(m['weight_bytes']):>9}  {act:>12}  "
                         f"{m['items']} = {m['items_how']}{ckpt}{part}")  # fmt: skip
    lines.append("  peak per GPU = weights + activations*:")
    for role in plan["roles"]:
        alone = "" if plan["split"] else " (alone)"
        lines.append(f"  {role['role']:<8} {_size(role['weight_bytes'])} + {_size(role['activation_bytes'])} = "
                     f"{_size(role['total_bytes'])}{alone}: {_fit_line(role['fits'])}")  # fmt: skip
    both = plan["both_roles"]
    where = "if colocated" if plan["split"] else "this placement"
    lines.append(f"  {'both':<8} {_size(both['total_bytes'])} on one GPU ({where}): {_fit_line(both['fits'])}")
    lines.append(f"  * {plan['how']}")
    lines.extend(f"  note: {note}" for note in plan["notes"])
    return "\n".join(lines)


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """diffusers' and transformers' info logs off while building (config keys they ignore, and the like)."""
    import diffusers

    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers.utils.logging.set_verbosity(level)


def plan_file(path: str, overrides: list[str] = (), executor: str | None = None) -> dict[str, Any]:
    """`cdm check --plan CONFIG`: load the campaign YAML and plan it."""
    from cdm_dist.driver.campaign import load_config

    config = load_config(path, overrides, executor)
    with _quiet_libraries():
        return plan_campaign(config)
