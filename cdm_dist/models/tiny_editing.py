"""Tiny models of the editing experiment (MLGD-F paper, Exp. 2), built from configs with seeded random weights and
written with save_pretrained (as diffusers' own tests build their dummy components): a few-step generator (UNet +
ControlNet + scheduler + VAE + prompt files), a CLIP vision model with its preprocessor config, and zero-shot class
embeddings. For tests, examples and device checks; nothing here is trained.

The generator takes the 3 x 16 x 16 images that the tiny latent prior of cdm_dist.models.tiny decodes to, and
generates 3 x 16 x 16 images (8 x 8 latents), which the tiny CLIP model takes as they are.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel
from safetensors.torch import save_file

from cdm_dist.models.tiny import save_text_conditioning, tiny_scheduler, tiny_unet, tiny_vae

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def tiny_controlnet(unet, conditioning_channels: int = 3, image_size: int = 16, seed: int = 0) -> ControlNetModel:
    """A ControlNet copied from the UNet (ControlNetModel.from_unet) whose conditioning embedding maps
    conditioning_channels x image_size² images onto the UNet's latents. A fresh ControlNet's zero convolutions make
    it a no-op; here they get small seeded weights, as after training, so the output depends on the image."""
    latent = unet.config.sample_size
    levels = int(math.log2(image_size // latent))
    embedding = tuple(8 * 2**i for i in range(levels + 1))  # (8, 16) for 16 -> 8: one stride-2 convolution
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=embedding, conditioning_channels=conditioning_channels
    )
    gen = torch.Generator().manual_seed(seed + 1)
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                  controlnet.controlnet_cond_embedding.conv_out]  # fmt: skip
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(0.1 * torch.randn(conv.weight.shape, generator=gen))
            conv.bias.copy_(0.1 * torch.randn(conv.bias.shape, generator=gen))
    return controlnet


def save_tiny_generator(
    folder: str | Path,
    sdxl: bool = False,
    seed: int = 0,
    prediction_type: str = "epsilon",
    conditioning_channels: int = 3,
    control_size: int = 16,
    latent_size: int = 8,
    unet_channels: tuple[int, int] = (16, 32),
    vae_channels: tuple[int, int] = (8, 16),
) -> Path:
    """Write unet/, controlnet/, scheduler/ (trailing DDIM), vae/ (save_pretrained) and prompt.safetensors +
    negative.safetensors. It takes conditioning_channels x control_size² images and generates 3 x (2 latent_size)²."""
    folder = Path(folder)
    unet = tiny_unet(sdxl, seed, latent_size, unet_channels)
    unet.save_pretrained(folder / "unet")
    tiny_controlnet(unet, conditioning_channels, control_size, seed + 1).save_pretrained(folder / "controlnet")
    tiny_vae(seed=seed + 2, image_size=2 * latent_size, channels=vae_channels).save_pretrained(folder / "vae")
    tiny_scheduler(prediction_type).save_pretrained(folder / "scheduler")
    save_text_conditioning(folder, ("prompt", "negative"), sdxl, 2 * latent_size, seed + 3)
    return folder


def save_tiny_clip(
    folder: str | Path, image_size: int = 16, projection_dim: int = 8, seed: int = 0, center_crop: bool = True
) -> Path:
    """Write a tiny CLIPVisionModelWithProjection (hidden size 16, 2 layers, 4 x 4 patches) and its
    preprocessor_config.json (CLIPImageProcessor's fields)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=4,
        projection_dim=projection_dim,
        num_channels=3,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    preprocess = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,
        "do_center_crop": center_crop,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "do_convert_rgb": True,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocess, indent=2))
    return folder


def save_tiny_classes(
    file: str | Path, clip_folder: str | Path, classes: tuple[str, ...] = ("a", "b"), seed: int = 0
) -> Path:
    """Write zero-shot class embeddings for the CLIP model in clip_folder: "embeddings" (K, projection_dim), unit
    rows (as CLIP's normalized text embeddings, seeded random here), and "logit_scale" (CLIP's 100)."""
    projection_dim = json.loads((Path(clip_folder) / "config.json").read_text())["projection_dim"]
    gen = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(len(classes), projection_dim, generator=gen)
    embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
    file = Path(file)
    save_file({"embeddings": embeddings, "logit_scale": torch.tensor(100.0)}, str(file))
    return file


def scribble(kind: str, size: int = 16) -> np.ndarray:
    """A size x size RGB scribble (uint8): dark strokes on white, 'rows' (horizontal) or 'columns' (vertical)."""
    image = np.full((size, size, 3), 255, dtype=np.uint8)
    for k in range(2, size - 2, 4):
        if kind == "rows":
            image[k, 2 : size - 2] = 0
        else:
            image[2 : size - 2, k] = 0
    return image


def save_tiny_editing(root: str | Path, target_size: int = 400, seed: int = 0) -> dict[str, Path]:
    """Everything a tiny editing campaign needs under root: prior/ (a latent prior), generator/, clip/, source.png
    (a scribble of rows), target.npy (y of the source and of a scribble of columns, half each: a 50% attribute
    mix) and classes.safetensors (zero-shot embeddings of 'rows' and 'columns': the mean y of each, normalized).
    With random weights y hardly depends on the scribble: this exercises the machinery, it measures nothing."""
    from PIL import Image

    from cdm_dist.models.adapters import DecodedSampler, load_latent_decoder
    from cdm_dist.models.generator import load_generator_sampler
    from cdm_dist.models.spec import ClipEmbedSpec, GeneratorSamplerSpec, VaeDecoderSpec
    from cdm_dist.models.tiny import save_tiny_latent_pipeline

    root = Path(root)
    prior = save_tiny_latent_pipeline(root / "prior", seed=seed)
    generator = save_tiny_generator(root / "generator", seed=seed + 10)
    clip = save_tiny_clip(root / "clip", seed=seed + 20)
    decoder = load_latent_decoder(VaeDecoderSpec(vae=str(prior / "vae")), "cpu", "tiny")
    spec = GeneratorSamplerSpec(generator=str(generator), prompt=str(generator / "prompt.safetensors"),
                                embed=ClipEmbedSpec(clip=str(clip)), steps=2)  # fmt: skip
    sampler = DecodedSampler(decoder, load_generator_sampler(spec, "cpu"))
    Image.fromarray(scribble("rows")).save(root / "source.png")
    gen = torch.Generator().manual_seed(seed)
    ys = []
    for kind in ("rows", "columns"):
        image = torch.from_numpy(scribble(kind)).permute(2, 0, 1)[None].float() / 127.5 - 1
        eta = torch.randn(1, target_size // 2, *sampler.noise_shape, generator=gen)
        with torch.no_grad():
            ys.append(sampler.sample(decoder.encode(image), eta)[0])  # (n, d_y)
    np.save(root / "target.npy", torch.cat(ys).numpy())
    means = torch.stack([y.mean(0) for y in ys])
    save_file({"embeddings": means / means.norm(dim=-1, keepdim=True), "logit_scale": torch.tensor(100.0)},
              str(root / "classes.safetensors"))  # fmt: skip
    names = ("prior", "generator", "clip", "source.png", "target.npy", "classes.safetensors")
    return {name: root / name for name in names}


if __name__ == "__main__":
    import sys

    written = save_tiny_editing(sys.argv[1] if len(sys.argv) > 1 else "out/tiny_editing")
    print("\n".join(str(path) for path in written.values()))
