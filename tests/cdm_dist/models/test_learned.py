import json

import pytest
import torch
from diffusers import UNet2DModel

from cdm_dist.chains.diffusion import make_scheduler
from cdm_dist.chains.mixtures import GaussianMixture
from cdm_dist.chains.priors import GaussianMixturePrior
from cdm_dist.errors import InputError
from cdm_dist.models.adapters import DiffusersPrior
from cdm_dist.models.learned import FlowSampler, euler_flow, load_prior, load_sampler
from cdm_dist.models.manifest import sha256
from cdm_dist.models.networks import ConditionalVelocityModel, MLPNoiseModel


def _manifest(folder, role):
    weights = sha256(folder / "diffusion_pytorch_model.safetensors")
    (folder / "manifest.json").write_text(json.dumps({"role": role, "weights_sha256": weights}))


def _perturbed(model):
    """Random non-zero weights everywhere (diffusers zero-initialises some output layers)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("kind", ["mlp", "mlp-edm", "unet"])
def test_prior_save_load_gives_identical_noise_predictions(tmp_path, kind):
    torch.manual_seed(0)
    if kind.startswith("mlp"):
        model = MLPNoiseModel(
            dim=3,
            width=16,
            blocks=2,
            data_mean=[1.0, -2.0, 0.5],
            data_std=[2.0, 1.0, 3.0],
            preconditioning="edm" if kind == "mlp-edm" else "none",
        )
        x = 3 * torch.randn(5, 3)
    else:
        model = UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            layers_per_block=1,
            block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4,
        )
        x = torch.randn(5, 1, 8, 8)
    prior = DiffusersPrior(_perturbed(model), make_scheduler(num_train_timesteps=1000))
    prior.save(tmp_path)
    _manifest(tmp_path, "prior")
    loaded = load_prior(tmp_path)
    assert loaded.event_shape == prior.event_shape
    assert torch.equal(loaded.scheduler.alphas_cumprod, prior.scheduler.alphas_cumprod)
    for t in (0, 417, 999):
        expected = prior.predict_noise(x, t)
        assert expected.abs().sum() > 0
        assert torch.equal(loaded.predict_noise(x, t), expected)


@pytest.mark.parametrize("x_shape", [[4], [1, 8, 8]])
def test_sampler_save_load_gives_identical_samples(tmp_path, x_shape):
    torch.manual_seed(0)
    model = _perturbed(ConditionalVelocityModel(x_shape=x_shape, y_dim=2, width=16, blocks=1, encoder_width=8))
    model.save_pretrained(tmp_path)
    _manifest(tmp_path, "sampler")
    x, eta = torch.randn(3, *x_shape), torch.randn(3, 7, 2)
    expected = FlowSampler(model, 3).sample(x, eta)
    assert torch.equal(load_sampler(tmp_path, 3).sample(x, eta), expected)


def test_weights_whose_bytes_differ_from_the_manifest_are_refused(tmp_path):
    model = _perturbed(MLPNoiseModel(dim=2, width=8, blocks=1))
    DiffusersPrior(model, make_scheduler(num_train_timesteps=1000)).save(tmp_path)
    _manifest(tmp_path, "prior")
    load_prior(tmp_path)  # intact
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight: shapes and header unchanged
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"does not match the sha256 in .*manifest\.json"):
        load_prior(tmp_path)


def test_loading_checks_roles_and_folders(tmp_path):
    model = MLPNoiseModel(dim=2, width=8, blocks=1)
    model.save_pretrained(tmp_path)
    with pytest.raises(InputError, match=r"no manifest\.json"):
        load_prior(tmp_path)
    _manifest(tmp_path, "sampler")
    with pytest.raises(InputError, match="not a prior checkpoint"):
        load_prior(tmp_path)
    with pytest.raises(InputError, match="not a checkpoint folder"):
        load_sampler(tmp_path / "missing", 2)


def test_noise_model_rows_are_independent_of_the_batch():
    torch.manual_seed(1)
    model = _perturbed(MLPNoiseModel(dim=2, width=16, blocks=2, data_std=[3.0, 0.5]))
    x, t = torch.randn(6, 2), torch.tensor([0, 10, 100, 500, 900, 999])
    together = model(x, t)
    for i in range(6):
        torch.testing.assert_close(together[i : i + 1], model(x[i : i + 1], t[i]), rtol=1e-6, atol=1e-6)


def test_noise_model_preconditioning_is_the_edm_input_scaling():
    """Mean and std in the config act as c_in(t) (x_t - sqrt(ᾱ_t) μ) in front of an unscaled network."""
    torch.manual_seed(2)
    mean, std = torch.tensor([4.0, -1.0]), torch.tensor([2.0, 0.5])
    scaled = _perturbed(MLPNoiseModel(dim=2, width=16, blocks=1, data_mean=mean.tolist(), data_std=std.tolist()))
    plain = MLPNoiseModel(dim=2, width=16, blocks=1)
    plain.load_state_dict(scaled.state_dict())
    x, t = torch.randn(4, 2), 300
    ab = scaled.alphas_cumprod[t]
    c_in = 1 / torch.sqrt(ab * std**2 + 1 - ab)
    torch.testing.assert_close(scaled(x, t), plain(c_in * (x - ab.sqrt() * mean), t))


def _edm_pair(mean: list[float], std: list[float]) -> tuple[MLPNoiseModel, MLPNoiseModel]:
    """An EDM-preconditioned model and a plain one sharing its weights (the plain one's output is F)."""
    edm = _perturbed(MLPNoiseModel(dim=2, width=16, blocks=1, data_mean=mean, data_std=std, preconditioning="edm"))
    plain = MLPNoiseModel(dim=2, width=16, blocks=1, data_mean=mean, data_std=std).double()
    plain.load_state_dict(edm.state_dict())
    return edm.double(), plain


def test_edm_noise_model_denoises_as_karras_et_al():
    """x̂0 = μ + c_skip (x_t/sqrt(ᾱ) - μ) + c_out F in EDM's sigma = sqrt((1 - ᾱ)/ᾱ), written out per noise level."""
    torch.manual_seed(4)
    mean, std = [3.0, -1.0], [4.0, 0.5]
    edm, plain = _edm_pair(mean, std)
    mu, sd = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    x = 2 * torch.randn(5, 2, dtype=torch.float64)
    for t in (0, 250, 999):
        ab = edm.alphas_cumprod[t].double()
        sigma = ((1 - ab) / ab).sqrt()
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
        x0_expected = mu + c_skip * (x / ab.sqrt() - mu) + c_out * plain(x, t)
        x0 = (x - (1 - ab).sqrt() * edm(x, t)) / ab.sqrt()
        torch.testing.assert_close(x0, x0_expected, rtol=1e-6, atol=1e-6 * float(1 / ab.sqrt()))


def test_edm_noise_model_with_zero_residual_is_the_exact_gaussian_prior():
    """F = 0 leaves the Gaussian skip: ε̂ equals the closed-form prior of N(μ, diag σ²)."""
    mean, std = [3.0, -1.0], [4.0, 0.5]
    edm, _ = _edm_pair(mean, std)
    torch.nn.init.zeros_(edm.net.out[-1].weight)
    torch.nn.init.zeros_(edm.net.out[-1].bias)
    gaussian = GaussianMixturePrior(
        GaussianMixture(
            torch.ones(1, dtype=torch.float64),
            torch.tensor([mean], dtype=torch.float64),
            torch.diag(torch.tensor(std, dtype=torch.float64) ** 2)[None],
        ),
        make_scheduler(num_train_timesteps=1000, beta_schedule="linear"),
    )
    x = 5 * torch.randn(6, 2, dtype=torch.float64)
    for t in (0, 100, 600, 999):
        torch.testing.assert_close(edm(x, t), gaussian.predict_noise(x, t), rtol=1e-5, atol=1e-6)


def test_edm_loss_weight_turns_the_epsilon_error_into_the_residual_error():
    """λ(t) (ε̂ - ε)² = (F - F_target)², F_target = (x0 - μ - c_skip (x_t/sqrt(ᾱ) - μ)) / c_out (EDM's loss)."""
    torch.manual_seed(5)
    mean, std = [3.0, -1.0], [4.0, 0.5]
    edm, plain = _edm_pair(mean, std)
    mu, sd = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    t = torch.tensor([0, 10, 300, 700, 999])
    x0, eps = mu + sd * torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    ab = edm.alphas_cumprod[t].double()[:, None]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    sigma = ((1 - ab) / ab).sqrt()
    c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
    f_target = (x0 - mu - c_skip * (x_t / ab.sqrt() - mu)) / c_out
    weighted = edm.loss_weight(t).double() * (edm(x_t, t) - eps) ** 2
    torch.testing.assert_close(weighted, (plain(x_t, t) - f_target) ** 2, rtol=1e-5, atol=1e-8)
    assert torch.equal(MLPNoiseModel(dim=2, width=8, blocks=1).loss_weight(t), torch.ones(5, 2))


def test_noise_model_rejects_an_unknown_preconditioning():
    with pytest.raises(ValueError, match="preconditioning: unknown 'vp'"):
        MLPNoiseModel(dim=2, preconditioning="vp")


def test_flow_sampler_is_euler_integration_in_data_units():
    """A second implementation: the Euler loop written per sample in float64."""
    torch.manual_seed(3)
    model = _perturbed(ConditionalVelocityModel(x_shape=[2], y_dim=1, width=16, blocks=1, y_mean=[5.0], y_std=[2.0]))
    model = model.double()
    x, eta = torch.randn(2, 2, dtype=torch.float64), torch.randn(2, 3, 1, dtype=torch.float64)
    y = FlowSampler(model, 4).sample(x, eta)
    for b in range(2):
        for j in range(3):
            z = eta[b, j : j + 1]
            for k in range(4):
                s = torch.tensor([k / 4], dtype=torch.float64)
                z = z + model(z, s, x[b : b + 1]) / 4
            torch.testing.assert_close(y[b, j], (z * 2.0 + 5.0)[0])


def test_flow_sampler_is_differentiable_in_x():
    torch.manual_seed(4)
    model = _perturbed(ConditionalVelocityModel(x_shape=[2], y_dim=1, width=8, blocks=1)).double()
    sampler = FlowSampler(model, 3)
    eta = torch.randn(2, 4, 1, dtype=torch.float64)
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: sampler.sample(v, eta), (x,))


def test_image_flow_sampler_is_differentiable_and_batch_independent():
    torch.manual_seed(5)
    model = _perturbed(ConditionalVelocityModel(x_shape=[1, 8, 8], y_dim=2, width=8, blocks=1, encoder_width=8))
    sampler = FlowSampler(model, 2)
    x, eta = torch.randn(3, 1, 8, 8, requires_grad=True), torch.randn(3, 5, 2)
    y = sampler.sample(x, eta)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert grad.shape == x.shape and grad.abs().sum() > 0
    torch.testing.assert_close(y[1:2], sampler.sample(x[1:2], eta[1:2]), rtol=1e-5, atol=1e-5)


def test_one_euler_step_is_the_velocity_at_the_noise():
    torch.manual_seed(6)
    model = _perturbed(ConditionalVelocityModel(x_shape=[1], y_dim=1, width=8, blocks=1))
    z, features = torch.randn(5, 1), torch.randn(5, 1)
    expected = model.to_data(z + model.velocity(z, torch.zeros(5), features))
    torch.testing.assert_close(euler_flow(model, z, features, 1), expected)


def test_flow_sampler_rejects_zero_steps():
    with pytest.raises(InputError, match="sampler steps"):
        FlowSampler(ConditionalVelocityModel(x_shape=[1], y_dim=1, width=8, blocks=1), 0)
