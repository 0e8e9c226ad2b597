"""The source of an editing campaign: tensor files, images of pixel priors, images encoded by a latent prior's VAE."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cdm_dist.errors import InputError
from cdm_dist.models.sources import load_source


def test_a_tensor_file_in_the_event_shape_is_the_source(tmp_path):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.save(tmp_path / "x.npy", x)
    save_file({"source": torch.from_numpy(x)[None]}, str(tmp_path / "x.safetensors"))
    for name in ("x.npy", "x.safetensors"):
        got = load_source(tmp_path / name, (2, 3))
        assert got.dtype == torch.float64 and got.shape == (1, 2, 3)
        torch.testing.assert_close(got[0], torch.from_numpy(x).double())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: np.save(d / "s.npy", np.zeros((3, 2))), r"has shape \[3, 2\]; the prior.s x has shape \[2, 3"),
        (lambda d: np.save(d / "s.npy", np.array([[np.nan] * 3] * 2)), r"s\.npy holds NaN"),
        (lambda d: (d / "s.txt").write_text("1"), r"unknown file type '\.txt'"),
        (lambda d: (d / "s.png").write_bytes(b"not a png"), r"s\.png is not a readable image"),
        (
            lambda d: save_file({"a": torch.zeros(2, 3), "b": torch.zeros(2, 3)}, str(d / "s.safetensors")),
            r"holds \['a', 'b'\]; a source file holds one tensor",
        ),
    ],
)
def test_a_bad_source_file_is_one_line_naming_it(tmp_path, make, message):
    make(tmp_path)
    path = next(p for p in tmp_path.iterdir())
    shape = (1, 2, 3) if path.suffix == ".png" else (2, 3)  # an image is read for image-shaped x only
    with pytest.raises(InputError, match=rf"chains\.source\.file: .*{message}"):
        load_source(path, shape)


def test_an_image_is_the_x_of_a_pixel_prior_in_minus_one_to_one(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(8, 6), dtype=np.uint8)  # H=8, W=6
    Image.fromarray(pixels, mode="L").save(tmp_path / "s.png")
    got = load_source(tmp_path / "s.png", (1, 8, 6))
    torch.testing.assert_close(got[0, 0], torch.from_numpy(pixels).double() / 127.5 - 1, rtol=0, atol=1e-6)
    with pytest.raises(InputError, match=r"is a 1-channel 6x8 image; the prior takes 1-channel 8x8 images"):
        load_source(tmp_path / "s.png", (1, 8, 8))
    with pytest.raises(InputError, match=r"is an image, but the prior's x has shape \[12\]"):
        load_source(tmp_path / "s.png", (12,))


def test_an_image_source_of_a_latent_prior_is_its_vae_posterior_mean_times_the_scaling_factor(tmp_path):
    from cdm_dist.models.adapters import LatentDecoder
    from cdm_dist.models.tiny import tiny_vae

    decoder = LatentDecoder(tiny_vae(image_size=16), checkpointing=False)
    rgb = np.random.default_rng(1).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "s.png")
    got = load_source(tmp_path / "s.png", (4, 8, 8), decoder.encode)
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1  # read another way
    with torch.no_grad():
        mean = decoder.vae.encode(image).latent_dist.mean
    torch.testing.assert_close(got, (mean * decoder.scaling_factor).double(), rtol=0, atol=1e-5)
    Image.fromarray(rgb[:8, :8], mode="RGB").save(tmp_path / "small.png")
    with pytest.raises(InputError, match=r"small\.png \(8x8 pixels\) encodes to latents of shape \[4, 4, 4\]"):
        load_source(tmp_path / "small.png", (4, 8, 8), decoder.encode)
