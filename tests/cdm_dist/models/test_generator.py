"""The few-step ControlNet generator as a fast sampler (MLGD-F paper, Exp. 2), on tiny seeded models: its steps
against diffusers' own scheduler, gradients against finite differences, chunking, batch invariance, dtypes, the spec
path through the registry, and one-line errors."""

import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file

from cdm_dist.chains.config import parse
from cdm_dist.errors import InputError
from cdm_dist.models.adapters import DecodedSampler
from cdm_dist.models.generator import GeneratorSampler, load_generator_sampler, trailing_timesteps
from cdm_dist.models.spec import GeneratorSamplerSpec, ProblemConfig
from cdm_dist.models.tiny import save_tiny_latent_pipeline
from cdm_dist.models.tiny_editing import save_tiny_classes, save_tiny_clip, save_tiny_generator
from cdm_dist.problems.registry import ProblemSource

Y_DIM = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("editing")
    return {
        "sd": save_tiny_generator(root / "sd"),
        "xl": save_tiny_generator(root / "xl", sdxl=True, seed=5),
        "clip": save_tiny_clip(root / "clip", projection_dim=Y_DIM),
        "root": root,
    }


def _spec(models, generator="sd", **fields):
    folder = models[generator]
    data = {"generator": str(folder), "prompt": str(folder / "prompt.safetensors"), "steps": 2,
            "embed": {"clip": str(models["clip"])}} | fields  # fmt: skip
    return GeneratorSamplerSpec.model_validate(data)


def _inputs(sampler, batch, n_c, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (0.8 * torch.rand(batch, 3, 16, 16, generator=gen, dtype=torch.float64) - 0.4).to(dtype)
    eta = torch.randn(batch, n_c, *sampler.noise_shape, generator=gen, dtype=torch.float64).to(dtype)
    return x, eta


def _value_and_grad(sampler, x, eta, weights):
    x = x.clone().requires_grad_(True)
    y = sampler.sample(x, eta)
    (y * weights).sum().backward()
    return y.detach(), x.grad


def test_the_steps_are_diffusers_ddim_on_trailing_timesteps_with_the_controlnet_residuals(models):
    """Two steps by hand with diffusers' DDIMScheduler: the first step's prev_sample, the last step's x̂0."""
    sampler = load_generator_sampler(_spec(models), "cpu", "problem.sampler")
    assert sampler.noise_shape == (4, 8, 8) and sampler.image_shape == (3, 16, 16) and sampler.y_dim == Y_DIM
    assert trailing_timesteps(1000, 4) == [999, 749, 499, 249] and sampler.timesteps == [999, 499]
    x, eta = _inputs(sampler, 2, 1)
    scheduler = DDIMScheduler.from_pretrained(models["sd"] / "scheduler")
    scheduler.set_timesteps(2)
    assert scheduler.timesteps.tolist() == [999, 499]
    states = load_file(str(models["sd"] / "prompt.safetensors"))["encoder_hidden_states"][None].expand(2, -1, -1)
    latent = eta[:, 0]
    with torch.no_grad():
        for t in scheduler.timesteps:
            down, mid = sampler.controlnet(latent, t, encoder_hidden_states=states, controlnet_cond=(x + 1) / 2,
                                           return_dict=False)  # fmt: skip
            eps = sampler.unet(latent, t, encoder_hidden_states=states, down_block_additional_residuals=down,
                               mid_block_additional_residual=mid).sample  # fmt: skip
            step = scheduler.step(eps, t, latent)
            latent = step.prev_sample if t == 999 else step.pred_original_sample
        expected = sampler.vae.decode(latent / sampler.vae.config.scaling_factor).sample
        torch.testing.assert_close(sampler.generate(x, eta[:, 0]), expected, rtol=1e-4, atol=1e-5)
        y, images = sampler.sample_with_images(x, eta)
        torch.testing.assert_close(images[:, 0], expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sampler.images(x, eta), images, rtol=0, atol=0)
        torch.testing.assert_close(y[:, 0], sampler.embed(expected), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sampler.sample(x, eta), y, rtol=1e-5, atol=1e-6)


def test_the_gradient_matches_central_finite_differences_in_float64(models):
    """SDXL conditioning, classifier-free guidance and module checkpointing, every module in float64."""
    xl = models["xl"]
    spec = _spec(models, "xl", dtype="float64", guidance_scale=2.0, negative_prompt=str(xl / "negative.safetensors"))
    sampler = load_generator_sampler(spec, "cpu", "problem.sampler")
    assert sampler.conditioning.negative is not None
    assert "added_cond_kwargs" in sampler.conditioning.kwargs
    x, eta = _inputs(sampler, 2, 2, torch.float64)
    weights = torch.randn(2, 2, Y_DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, grad = _value_and_grad(sampler, x, eta, weights)
    assert grad.abs().sum() > 0
    h = 1e-5
    with torch.no_grad():
        for seed in (2, 3):
            direction = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            up = (sampler.sample(x + h * direction, eta) * weights).sum()
            down = (sampler.sample(x - h * direction, eta) * weights).sum()
            numeric = (up - down) / (2 * h)
            torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-5, atol=1e-9)


def test_chunks_give_the_unchunked_result_and_gradient_and_bound_every_batch(models):
    """sample_chunk 3 over 2 x 8 samples: each chunk is recomputed in the backward, one chunk at a time, so no
    module ever sees more than 3 samples; the y and gradients are the unchunked ones (with or without the modules'
    own checkpointing)."""
    plain = load_generator_sampler(_spec(models, checkpointing=False), "cpu", "problem.sampler")
    whole = load_generator_sampler(_spec(models), "cpu", "problem.sampler")
    chunked = load_generator_sampler(_spec(models, sample_chunk=3), "cpu", "problem.sampler")
    x, eta = _inputs(whole, 2, 8)
    weights = torch.randn(2, 8, Y_DIM, generator=torch.Generator().manual_seed(1))
    y_plain, grad_plain = _value_and_grad(plain, x, eta, weights)
    y_whole, grad_whole = _value_and_grad(whole, x, eta, weights)
    batches: list[int] = []
    hook = chunked.unet.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    y_chunked, grad_chunked = _value_and_grad(chunked, x, eta, weights)
    hook.remove()
    assert max(batches) == 3 and len(batches) == 2 * 2 * 6  # 2 steps x 6 chunks, forward and recomputation
    assert grad_whole.abs().sum() > 0
    for y, grad in ((y_whole, grad_whole), (y_chunked, grad_chunked)):
        torch.testing.assert_close(y, y_plain, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, grad_plain, rtol=1e-4, atol=1e-8)


def test_each_row_depends_only_on_its_own_x_and_eta(models):
    sampler = load_generator_sampler(_spec(models, sample_chunk=5), "cpu", "problem.sampler")
    x, eta = _inputs(sampler, 4, 3)
    with torch.no_grad():
        y = sampler.sample(x, eta)
        torch.testing.assert_close(sampler.sample(x[:2], eta[:2]), y[:2], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sampler.sample(x[3:], eta[3:]), y[3:], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(y[0], y[1])  # different x, different samples


def test_bfloat16_unet_and_controlnet_return_y_in_float64(models):
    half = load_generator_sampler(_spec(models, dtypes={"unet": "bfloat16", "controlnet": "bfloat16"}), "cpu", "p")
    full = load_generator_sampler(_spec(models, dtype="float64"), "cpu", "p")
    assert next(half.unet.parameters()).dtype == next(half.controlnet.parameters()).dtype == torch.bfloat16
    assert next(half.vae.parameters()).dtype == torch.float32
    x, eta = _inputs(half, 2, 2, torch.float64)
    y, grad = _value_and_grad(half, x, eta, torch.ones(2, 2, Y_DIM, dtype=torch.float64))
    assert y.dtype == grad.dtype == torch.float64 and torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.no_grad():
        y_full = full.sample(x, eta)
    assert (y - y_full).abs().max() < 0.1 * y_full.abs().max()  # bf16: 8 bits of mantissa


def _problem(models, pipeline, **sampler):
    target = models["root"] / "target.npy"
    np.save(target, np.random.default_rng(0).normal(size=(50, Y_DIM)))
    return {
        "prior": {"diffusers": str(pipeline), "subfolder": "unet", "vae_subfolder": "vae",
                  "conditioning": {"file": str(pipeline / "conditioning.safetensors")}},
        "sampler": {"generator": str(models["sd"]), "prompt": str(models["sd"] / "prompt.safetensors"),
                    "steps": 2, "sample_chunk": 4, "embed": {"clip": str(models["clip"])}} | sampler,
        "target_file": str(target),
    }  # fmt: skip


def test_the_spec_path_samples_from_the_latent_prior_decoded(models):
    pipeline = save_tiny_latent_pipeline(models["root"] / "prior")
    source = ProblemSource(parse(ProblemConfig, _problem(models, pipeline)), "cpu")
    sampler = source.fast_sampler
    assert isinstance(sampler, DecodedSampler) and isinstance(sampler.inner, GeneratorSampler)
    assert sampler.y_dim == source.target.dim == Y_DIM and sampler.noise_shape == (4, 8, 8)
    x = torch.randn(2, *source.prior.event_shape, requires_grad=True)
    eta = torch.randn(2, 5, *sampler.noise_shape)
    y = sampler.sample(x, eta)
    assert y.shape == (2, 5, Y_DIM) and y.dtype == torch.float32
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    classes = load_file(str(save_tiny_classes(models["root"] / "classes.safetensors", models["clip"], ("a", "b", "c"))))
    assert classes["embeddings"].shape == (3, Y_DIM) and float(classes["logit_scale"]) == 100.0


def _embed_factory(width):
    def embed(images):
        return images.flatten(1)[:, :width] if width else images.mean(dim=(1, 2, 3))

    return embed


def test_a_factory_embedding_sets_y_dim_and_a_wrong_shape_is_named(models):
    sampler = load_generator_sampler(_spec(models, embed={"factory": _embed_factory, "args": {"width": 5}}), "cpu",
                                     "problem.sampler")  # fmt: skip
    x, eta = _inputs(sampler, 2, 3)
    assert sampler.y_dim == 5 and sampler.sample(x, eta).shape == (2, 3, 5)
    with pytest.raises(InputError, match=r"^problem\.sampler\.embed: the embedding returned \(2,\)") as error:
        load_generator_sampler(_spec(models, embed={"factory": _embed_factory, "args": {"width": 0}}), "cpu",
                               "problem.sampler")  # fmt: skip
    assert "\n" not in str(error.value)


def test_a_clip_size_mismatch_needs_resize(models):
    small = save_tiny_clip(models["root"] / "clip8", image_size=8, projection_dim=Y_DIM)
    with pytest.raises(InputError, match=r"problem\.sampler\.embed\.clip: the generated images are 16x16.*takes "
                       r"8x8; set resize: true") as error:  # fmt: skip
        load_generator_sampler(_spec(models, embed={"clip": str(small)}), "cpu", "problem.sampler")
    assert "\n" not in str(error.value)
    sampler = load_generator_sampler(_spec(models, embed={"clip": str(small), "resize": True}), "cpu", "p")
    x, eta = _inputs(sampler, 1, 2)
    assert sampler.embed.pixel_values(torch.zeros(1, 3, 16, 16)).shape == (1, 3, 8, 8)
    assert sampler.sample(x, eta).shape == (1, 2, Y_DIM)


def test_controlnet_conditioning_channels_must_match_the_images(models):
    gray = save_tiny_generator(models["root"] / "gray", conditioning_channels=1)
    pipeline = save_tiny_latent_pipeline(models["root"] / "prior3")
    spec = parse(ProblemConfig, _problem(models, pipeline, generator=str(gray)))
    with pytest.raises(InputError, match=r"^problem\.sampler\.controlnet: the ControlNet takes 1-channel .* has 3 "
                       "channels") as error:  # fmt: skip
        ProblemSource(spec, "cpu").fast_sampler  # noqa: B018
    assert "\n" not in str(error.value)
    sampler = load_generator_sampler(_spec(models, generator="sd"), "cpu", "problem.sampler")
    with pytest.raises(InputError, match=r"^problem\.sampler\.controlnet: the ControlNet takes 3-channel"):
        sampler.sample(torch.zeros(1, 1, 16, 16), torch.zeros(1, 2, *sampler.noise_shape))


@pytest.mark.parametrize("part", ["controlnet", "scheduler"])
def test_a_generator_folder_without_a_part_is_named(models, part):
    broken = models["root"] / f"no_{part}"
    if not broken.exists():
        shutil.copytree(models["sd"], broken, ignore=shutil.ignore_patterns(part))
    data = {"sampler": _problem(models, models["sd"])["sampler"] | {"generator": str(broken)}}
    data |= {"prior": {"factory": "cdm_dist.models.tiny:GaussianNoiseModel"}, "target_file": str(broken / "x")}
    (broken / "x").write_text("")
    with pytest.raises(InputError, match=rf"^problem: sampler: .*{part}") as error:
        parse(ProblemConfig, data, source="problem")
    assert "\n" not in str(error.value)
