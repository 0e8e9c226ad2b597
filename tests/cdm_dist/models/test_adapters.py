"""The diffusers adapters against closed forms and direct calls of the same diffusers models (tiny, from configs)."""

import json
import math

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import save_file

from cdm_dist.errors import InputError
from cdm_dist.models.adapters import DecodedSampler, load_diffusers_prior, load_latent_decoder
from cdm_dist.models.spec import DiffusersPriorSpec
from cdm_dist.models.tiny import (
    GaussianNoiseModel,
    ImageFeatureSampler,
    save_tiny_latent_pipeline,
    tiny_scheduler,
)

MEAN, STD = 0.5, 0.7


def _gaussian_folder(folder, prediction_type, dim=3):
    GaussianNoiseModel(dim=dim, mean=MEAN, std=STD, prediction_type=prediction_type).save_pretrained(folder)
    DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type).save_pretrained(folder)
    return folder


def _closed_form(x_t, alpha_bar):
    """ε̂ and x̂0 of N(MEAN, STD²) data, computed directly in float64."""
    a, s = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    x0 = MEAN + a * STD**2 / (a**2 * STD**2 + s**2) * (x_t - a * MEAN)
    return (x_t - a * x0) / s, x0


def test_every_prediction_type_gives_the_same_eps_and_x0_at_every_step(tmp_path):
    """float64 weights: the conversions themselves are exact (in float32 an ε-model's x̂0 at t ≈ T carries its
    rounding divided by sqrt(ᾱ_t) ≈ 0.01, which is why v- and x0-models give x̂0 directly)."""
    priors = {
        kind: load_diffusers_prior(
            DiffusersPriorSpec(diffusers=str(_gaussian_folder(tmp_path / kind, kind)), dtype="float64"), "cpu", "p"
        )
        for kind in ("epsilon", "v_prediction", "sample")
    }
    x_t = 2 * torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    schedule = priors["epsilon"].schedule(50)
    for timestep, alpha_bar in zip(schedule.timesteps, schedule.alpha_bar.tolist(), strict=True):
        eps_ref, x0_ref = _closed_form(x_t, alpha_bar)
        for kind, prior in priors.items():
            eps, x0 = prior.denoise(x_t, timestep)
            torch.testing.assert_close(eps, eps_ref, rtol=0, atol=1e-6, msg=f"{kind} eps at t={timestep}")
            torch.testing.assert_close(x0, x0_ref, rtol=0, atol=1e-6, msg=f"{kind} x0 at t={timestep}")
    assert [p.prediction_type for p in priors.values()] == ["epsilon", "v_prediction", "sample"]


def test_the_spec_prediction_type_overrides_the_scheduler_config(tmp_path):
    folder = tmp_path / "g"
    GaussianNoiseModel(dim=2, mean=MEAN, std=STD, prediction_type="sample").save_pretrained(folder)
    DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon").save_pretrained(folder)
    with pytest.raises(ValueError, match="prediction_type: 'sample', but the scheduler's config says 'epsilon'"):
        DiffusersPriorSpec(diffusers=str(folder), prediction_type="sample")  # a mismatch must be confirmed
    spec = DiffusersPriorSpec(diffusers=str(folder), prediction_type="sample", prediction_type_overrides_scheduler=True)
    prior = load_diffusers_prior(spec, "cpu", "p")
    assert prior.reading["prediction_type"] == "sample" and "overriding the scheduler's config" in prior.reading["from"]
    x_t = torch.randn(3, 2, dtype=torch.float64)
    torch.testing.assert_close(prior.denoise(x_t, 500)[1], _closed_form(x_t, float(prior._alpha_bar[500]))[1])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return save_tiny_latent_pipeline(tmp_path_factory.mktemp("tiny") / "pipe")


def _latent_spec(folder, **fields):
    return DiffusersPriorSpec(
        diffusers=str(folder),
        subfolder="unet",
        vae_subfolder="vae",
        conditioning={"file": str(folder / "conditioning.safetensors")} | fields.pop("conditioning", {}),
        **fields,
    )


def _direct(unet, x, t, file, **extra):
    """The UNet called by hand with the conditioning file's tensors, batch-expanded."""
    from safetensors.torch import load_file

    tensors = load_file(str(file))
    n = x.shape[0]
    kwargs = {"encoder_hidden_states": tensors["encoder_hidden_states"][None].expand(n, -1, -1)}
    if "text_embeds" in tensors:
        kwargs["added_cond_kwargs"] = {k: tensors[k][None].expand(n, -1) for k in ("text_embeds", "time_ids")}
    return unet(x, t, **kwargs, **extra).sample


def test_a_latent_prior_predicts_what_the_unet_predicts(pipeline):
    prior = load_diffusers_prior(_latent_spec(pipeline), "cpu", "problem.prior")
    assert prior.event_shape == (4, 8, 8) and prior.prediction_type == "v_prediction"
    x_t = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    v = _direct(prior.model, x_t.float(), 250, pipeline / "conditioning.safetensors").double()
    a, s = math.sqrt(prior._alpha_bar[250]), math.sqrt(1 - prior._alpha_bar[250])
    eps, x0 = prior.denoise(x_t, 250)
    torch.testing.assert_close(eps, a * v + s * x_t, rtol=0, atol=1e-12)
    torch.testing.assert_close(x0, a * x_t - s * v, rtol=0, atol=1e-12)


def test_classifier_free_guidance_mixes_the_two_branches(pipeline):
    prior = load_diffusers_prior(
        _latent_spec(
            pipeline,
            conditioning={"guidance_scale": 3.0, "negative_file": str(pipeline / "negative.safetensors")},
        ),
        "cpu",
        "p",
    )
    x_t = torch.randn(2, 4, 8, 8)
    positive = _direct(prior.model, x_t, 500, pipeline / "conditioning.safetensors")
    negative = _direct(prior.model, x_t, 500, pipeline / "negative.safetensors")
    torch.testing.assert_close(prior.model_output(x_t, 500), negative + 3.0 * (positive - negative))


def test_sdxl_added_conditions_come_from_the_conditioning_file(tmp_path):
    folder = save_tiny_latent_pipeline(tmp_path / "xl", sdxl=True)
    prior = load_diffusers_prior(_latent_spec(folder), "cpu", "p")
    x_t = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(
        prior.model_output(x_t, 100), _direct(prior.model, x_t, 100, folder / "conditioning.safetensors")
    )


def test_class_label_conditioning(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=3,
    )  # fmt: skip
    unet.save_pretrained(tmp_path)
    tiny_scheduler("epsilon").save_pretrained(tmp_path)
    prior = load_diffusers_prior(
        DiffusersPriorSpec(diffusers=str(tmp_path), conditioning={"class_label": 2}), "cpu", "p"
    )
    x_t = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(
        prior.model_output(x_t, 40), prior.model(x_t, 40, class_labels=torch.tensor([2, 2])).sample
    )
    with pytest.raises(InputError, match=r"class_label 5 is outside 0\.\.2"):
        load_diffusers_prior(DiffusersPriorSpec(diffusers=str(tmp_path), conditioning={"class_label": 5}), "cpu", "p")


def test_gradients_reach_the_latent_through_the_decoder_with_or_without_checkpointing(pipeline):
    sampler = ImageFeatureSampler(y_dim=2)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    eta = torch.randn(2, 5, 2, dtype=torch.float64)
    grads = []
    for checkpointing in (True, False):
        decoder = load_latent_decoder(_latent_spec(pipeline, decoder_checkpointing=checkpointing).decoder, "cpu", "p")
        assert decoder.vae.is_gradient_checkpointing == checkpointing
        x_in = x.clone().requires_grad_(True)
        DecodedSampler(decoder, sampler).sample(x_in, eta).square().sum().backward()
        grads.append(x_in.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    decoder = load_latent_decoder(_latent_spec(pipeline).decoder, "cpu", "p")
    images = decoder(x)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float64
    scale = decoder.vae.config.scaling_factor
    torch.testing.assert_close(images, decoder.vae.decode(x.float() / scale).sample.double())


def test_bfloat16_weights_run_on_cpu_and_keep_the_chain_in_float64(pipeline):
    full = load_diffusers_prior(_latent_spec(pipeline), "cpu", "p")
    half = load_diffusers_prior(_latent_spec(pipeline, dtype="bfloat16"), "cpu", "p")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    x_t = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    eps_half, x0_half = half.denoise(x_t, 300)
    eps_full, _ = full.denoise(x_t, 300)
    assert eps_half.dtype == x0_half.dtype == torch.float64
    assert (eps_half - eps_full).abs().max() < 0.1 * eps_full.abs().max()  # bf16 has 8 bits of mantissa


# -- bad input: one line naming the field or file ---------------------------------------------------------------


def test_a_folder_without_a_model_or_scheduler_config_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty/config\.json is missing: not a diffusers folder"):
        DiffusersPriorSpec(diffusers=str(tmp_path / "empty"))
    GaussianNoiseModel(dim=2).save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match=r"no scheduler_config\.json"):
        DiffusersPriorSpec(diffusers=str(tmp_path / "model"))


def test_unknown_prediction_types_and_model_classes_are_named(tmp_path):
    folder = _gaussian_folder(tmp_path / "g", "epsilon")
    config = json.loads((folder / "scheduler_config.json").read_text()) | {"prediction_type": "flow"}
    (folder / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"prior\.prediction_type: unknown 'flow'"):
        load_diffusers_prior(DiffusersPriorSpec(diffusers=str(folder)), "cpu", "prior")
    with pytest.raises(InputError, match=r"unknown model class 'NoSuchUNet'"):
        load_diffusers_prior(DiffusersPriorSpec(diffusers=str(folder), model_class="NoSuchUNet"), "cpu", "prior")


def test_a_vae_whose_latent_channels_differ_from_the_unet_is_refused(tmp_path, pipeline):
    from cdm_dist.models.tiny import tiny_vae

    tiny_vae(latent_channels=8).save_pretrained(tmp_path / "vae8")
    with pytest.raises(ValueError, match=r"latent_channels \(8\) differ from the model's in_channels \(4\)"):
        DiffusersPriorSpec(
            diffusers=str(pipeline), subfolder="unet", vae_subfolder=str(tmp_path / "vae8"),
            conditioning={"file": str(pipeline / "conditioning.safetensors")},
        )  # fmt: skip


def test_a_conditioning_file_of_the_wrong_shape_is_named(tmp_path, pipeline):
    save_file({"encoder_hidden_states": torch.zeros(5, 7)}, str(tmp_path / "bad.safetensors"))
    spec = _latent_spec(pipeline, conditioning={"file": str(tmp_path / "bad.safetensors")})
    with pytest.raises(InputError, match=r"bad\.safetensors: encoder_hidden_states has shape \(5, 7\); expected"):
        load_diffusers_prior(spec, "cpu", "problem.prior")
    save_file({"something": torch.zeros(5, 16)}, str(tmp_path / "other.safetensors"))
    spec = _latent_spec(pipeline, conditioning={"file": str(tmp_path / "other.safetensors")})
    with pytest.raises(InputError, match="has no 'encoder_hidden_states' tensor"):
        load_diffusers_prior(spec, "cpu", "problem.prior")
    spec = DiffusersPriorSpec(diffusers=str(pipeline), subfolder="unet")
    with pytest.raises(
        InputError, match=r"problem\.prior\.conditioning: UNet2DConditionModel needs encoder_hidden_states"
    ):
        load_diffusers_prior(spec, "cpu", "problem.prior")


def test_a_dtype_the_device_cannot_run_is_named(pipeline, monkeypatch):
    real = torch.nn.functional.conv2d

    def no_half_convolutions(x, *args, **kwargs):
        if x.dtype == torch.float16:
            raise RuntimeError('"slow_conv2d_cpu" not implemented for Half')
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", no_half_convolutions)
    with pytest.raises(InputError, match=r"problem\.prior\.dtype: dtype float16 does not run on cpu"):
        load_diffusers_prior(_latent_spec(pipeline, dtype="float16"), "cpu", "problem.prior")


def test_a_latent_prior_fills_the_decoder_part_with_its_vae(pipeline):
    """No decoder given: the prior's VAE is the decoder part, and the spec is written out without it."""
    from cdm_dist.models.adapters import LatentDecoder
    from cdm_dist.models.spec import ProblemConfig, VaeDecoderSpec
    from cdm_dist.problems.registry import resolve_problem

    parts = {
        "prior": _latent_spec(pipeline, vae_dtype="float64", decoder_checkpointing=False).model_dump(),
        "sampler": {"factory": ImageFeatureSampler},
        "target": {"factory": "cdm_dist.models.tiny:gaussian_target"},
    }
    spec = ProblemConfig.model_validate(parts)
    assert spec.decoder == VaeDecoderSpec(vae=str(pipeline / "vae"), dtype="float64", checkpointing=False)
    dumped = spec.model_dump(mode="json")
    assert dumped["decoder"] is None and dumped["sampler"]["factory"] == "cdm_dist.models.tiny:ImageFeatureSampler"
    assert ProblemConfig.model_validate(dumped).decoder == spec.decoder
    dumped["prior"]["vae_dtype"] = "float32"
    assert ProblemConfig.model_validate(dumped).decoder.dtype == "float32"
    source = resolve_problem(spec)
    sampler = source.fast_sampler
    assert isinstance(sampler, DecodedSampler) and isinstance(source.decoder, LatentDecoder)
    assert source.decoder.weights_dtype == torch.float64 and not source.decoder.vae.is_gradient_checkpointing
    assert dict(source.built) == {"decoder": 1, "sampler": 1}
    x, eta = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 3, 2, dtype=torch.float64)
    torch.testing.assert_close(sampler.sample(x, eta), sampler.inner.sample(source.decoder(x), eta))
    given = ProblemConfig.model_validate(parts | {"decoder": {"factory": "my_pkg.vae:decode"}})
    assert given.decoder.factory == "my_pkg.vae:decode"  # a decoder given is kept, and written out
    assert given.model_dump(mode="json")["decoder"]["factory"] == "my_pkg.vae:decode"
