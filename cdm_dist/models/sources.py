"""The source of an editing campaign (chains.source.file): a tensor in the prior's event shape, or an image that a
latent prior's VAE encodes (posterior mean x scaling factor, as diffusers' img2img pipelines do)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cdm_dist.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TENSOR_SUFFIXES = (".npy", ".safetensors")
FIELD = "chains.source.file"
Encoder = Callable[[torch.Tensor], torch.Tensor]  # images (1, 3, H, W) in [-1, 1] -> x (1, *event)


def is_image(file: str | Path) -> bool:
    """Whether a source file is an image (by its suffix)."""
    return Path(file).suffix.lower() in IMAGE_SUFFIXES


def read_tensor(path: Path) -> torch.Tensor:
    """The one tensor of a .npy or .safetensors file."""
    try:
        if path.suffix.lower() == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False))
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    except Exception as exc:
        raise InputError(f"{FIELD}: {path} cannot be read ({type(exc).__name__}: {exc})") from None
    if len(tensors) != 1:
        raise InputError(f"{FIELD}: {path} holds {sorted(tensors)}; a source file holds one tensor")
    return next(iter(tensors.values()))


def read_image(path: Path, channels: int) -> torch.Tensor:
    """An image file as (1, channels, H, W) in [-1, 1]: grey for 1 channel, RGB for 3 (alpha dropped)."""
    from PIL import Image, UnidentifiedImageError

    modes = {1: "L", 3: "RGB"}
    if channels not in modes:
        raise InputError(f"{FIELD}: {path} is an image, but the sampler-side images have {channels} channels")
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert(modes[channels]), dtype=np.float32)
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{FIELD}: {path} is not a readable image ({exc})") from None
    pixels = torch.from_numpy(array.copy()).reshape(array.shape[0], array.shape[1], channels)
    return (pixels.permute(2, 0, 1)[None] / 127.5 - 1.0).contiguous()


def load_source(
    file: str | Path, event_shape: tuple[int, ...], encode: Encoder | None = None, image_channels: int | None = None
) -> torch.Tensor:
    """x_src (1, *event) in float64 from a tensor file or an image (encoded when `encode` is given: a latent prior;
    else the image is x itself, so its channels and size must be the event's). Nothing is resized."""
    path = Path(file)
    shape = tuple(event_shape)
    suffix = path.suffix.lower()
    if suffix in TENSOR_SUFFIXES:
        x = read_tensor(path).to(torch.float64)
        if tuple(x.shape) not in (shape, (1, *shape)):
            raise InputError(f"{FIELD}: {path} has shape {list(x.shape)}; the prior's x has shape {list(shape)}")
    elif suffix in IMAGE_SUFFIXES:
        if encode is None:
            if len(shape) != 3:
                raise InputError(f"{FIELD}: {path} is an image, but the prior's x has shape {list(shape)}")
            x = read_image(path, shape[0]).to(torch.float64)
            if tuple(x.shape[1:]) != shape:
                raise InputError(
                    f"{FIELD}: {path} is a {x.shape[1]}-channel {x.shape[3]}x{x.shape[2]} image; the prior takes "
                    f"{shape[0]}-channel {shape[2]}x{shape[1]} images (resize it yourself: nothing is resized)"
                )
        else:
            image = read_image(path, image_channels or 3)
            with torch.no_grad():
                x = encode(image).to(torch.float64)
            if tuple(x.shape[1:]) != shape:
                raise InputError(
                    f"{FIELD}: {path} ({image.shape[3]}x{image.shape[2]} pixels) encodes to latents of shape "
                    f"{list(x.shape[1:])}; the prior's x has shape {list(shape)} (resize the image: nothing is resized)"
                )
    else:
        known = [*TENSOR_SUFFIXES, *IMAGE_SUFFIXES]
        raise InputError(f"{FIELD}: {path}: unknown file type {suffix!r}; expected one of {known}")
    if not torch.isfinite(x).all():
        raise InputError(f"{FIELD}: {path} holds NaN or Inf")
    return x.reshape(1, *shape)
