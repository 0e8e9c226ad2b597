"""The committed checkpoints: intact, reproducible by name, and measured good against the truth."""

import json

import pytest
import torch

from cdm_dist.chains.diffusion import tweedie_x0
from cdm_dist.chains.priors import GaussianMixturePrior
from cdm_dist.models.learned import load_prior, load_sampler
from cdm_dist.problems.builtins import SHIPPED_CHECKPOINTS, gmm_problem
from cdm_dist.problems.training import digits_sampler_quality, gmm_sampler_quality, prior_quality, sha256, training_data

PROBLEMS = ["gmm2d", "gmm5d", "gmm10d", "digits"]
# Bounds sit about 1.5x above what the shipped models measure (their manifests); the mixtures' Y spreads over
# about 10 units, the exact-sample W1 floor is ~0.06-0.08, and a prior MMD² of 0.005 is a clearly visible misfit.
W1_MEAN_BOUND = 0.35
W1_X_STAR_BOUND = 0.35
PRIOR_MMD_BOUND = {"gmm2d": 0.005, "gmm5d": 0.005, "gmm10d": 0.005, "digits": 0.01}
# Digits: error to the nearest readable label, 16.7° (8 steps) and 18.3° (one step), a draw between two labels is
# far from both; the share of draws at a readable turn other than the rotation, 0.33 and 0.32 (the labels' own share
# 0.52), where the sampler trained on the rotations alone puts 0.19 (the half turns a 1 or a 0 leaves open).
DIGITS_ANGLE_BOUND_DEG = 25.0
DIGITS_EXTRA_TURN_FLOOR = 0.25


def test_every_checkpoint_has_a_manifest_that_matches_its_weights():
    total = 0
    for problem in PROBLEMS:
        for role in ("prior", "sampler"):
            folder = SHIPPED_CHECKPOINTS / problem / role
            manifest = json.loads((folder / "manifest.json").read_text())
            weights = folder / "diffusion_pytorch_model.safetensors"
            assert manifest["role"] == role and manifest["problem"] == problem
            assert manifest["weights_sha256"] == sha256(weights)
            assert manifest["command"].startswith(f"cdm train {role} --problem {problem} ")
            assert not manifest["tiny"]
        for role in ("sampler_one_step",):
            folder = SHIPPED_CHECKPOINTS / problem / role
            manifest = json.loads((folder / "manifest.json").read_text())
            assert manifest["kind"] == "one_step" and manifest["problem"] == problem
            assert manifest["weights_sha256"] == sha256(folder / "diffusion_pytorch_model.safetensors")
            teacher = SHIPPED_CHECKPOINTS / problem / "sampler" / "diffusion_pytorch_model.safetensors"
            assert manifest["teacher"]["weights_sha256"] == sha256(teacher)  # distilled from the shipped flow
            assert manifest["command"].startswith(f"cdm train sampler --problem {problem} --kind one_step ")
    total = sum(p.stat().st_size for p in SHIPPED_CHECKPOINTS.rglob("*") if p.is_file())
    assert total <= 25 * 2**20  # the whole checkpoints/ folder


@pytest.mark.parametrize("problem", ["gmm2d", "gmm5d", "gmm10d"])
def test_mixture_samplers_match_the_exact_conditional(problem):
    """Wasserstein-1 to the exact P(Y | x), at random x from the prior and at x*, with the fast 8 Euler steps."""
    sampler = load_sampler(SHIPPED_CHECKPOINTS / problem / "sampler", 8)
    quality = gmm_sampler_quality(sampler.model, problem, torch.Generator().manual_seed(1), points=16, n=500)
    assert quality["w1_mean_8_steps"] < W1_MEAN_BOUND
    assert quality["w1_at_x_star_8_steps"] < W1_X_STAR_BOUND
    assert quality["w1_mean_32_steps"] <= quality["w1_mean_1_steps"]  # more steps, closer


@pytest.mark.parametrize("problem", ["gmm2d", "gmm5d", "gmm10d"])
def test_one_step_samplers_match_the_exact_conditional_as_well_as_eight_flow_steps(problem):
    """W1 to the exact P(Y | x) with ONE step of the distilled sampler: within the 8-step bound, and far from the
    flow's own one-step collapse to the conditional mean."""
    one_step = load_sampler(SHIPPED_CHECKPOINTS / problem / "sampler_one_step", 1)
    flow = load_sampler(SHIPPED_CHECKPOINTS / problem / "sampler", 8)
    quality = gmm_sampler_quality(one_step.model, problem, torch.Generator().manual_seed(1), points=16, n=500,
                                  flow_steps=(1,))  # fmt: skip
    collapse = gmm_sampler_quality(flow.model, problem, torch.Generator().manual_seed(1), points=16, n=500,
                                   flow_steps=(1,))  # fmt: skip
    assert quality["w1_mean_1_steps"] < W1_MEAN_BOUND and quality["w1_at_x_star_1_steps"] < W1_X_STAR_BOUND
    assert quality["w1_mean_1_steps"] < 0.3 * collapse["w1_mean_1_steps"]


@pytest.mark.parametrize("problem", PROBLEMS)
def test_priors_sample_the_data_distribution(problem):
    prior = load_prior(SHIPPED_CHECKPOINTS / problem / "prior")
    n = 200 if problem == "digits" else 1000
    quality = prior_quality(prior, training_data(problem), torch.Generator().manual_seed(2), n=n, steps=50)
    assert quality["prior_mmd2"] < PRIOR_MMD_BOUND[problem]


@pytest.mark.parametrize("problem", ["gmm2d", "gmm5d", "gmm10d"])
def test_mixture_priors_denoise_like_the_exact_prior_at_every_noise_level(problem):
    """Tweedie's x̂0 against the closed-form prior's on noised data, within 5% of the data's spread, from t = 999
    (ᾱ = 4e-5, where plain ε-prediction priors were off by 35-50%) down to t = 10: guidance reads x̂0 there."""
    learned = load_prior(SHIPPED_CHECKPOINTS / problem / "prior")
    mixture = gmm_problem(problem).prior.mixture
    exact = GaussianMixturePrior(mixture, learned.scheduler)
    gen = torch.Generator().manual_seed(4)
    x0 = mixture.sample(1000, gen)  # (N, d)
    spread = (x0 - x0.mean(0)).square().sum(1).mean().sqrt()
    for t in (999, 900, 700, 500, 300, 100, 10):
        alpha_bar = float(learned.scheduler.alphas_cumprod[t])
        x_t = alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
        x0_exact = tweedie_x0(x_t, exact.predict_noise(x_t, t), alpha_bar)
        x0_learned = tweedie_x0(x_t, learned.predict_noise(x_t.float(), t).double(), alpha_bar)
        rms = (x0_learned - x0_exact).square().sum(1).mean().sqrt()
        assert rms < 0.05 * spread, f"t = {t}: x̂0 off by {float(rms):.3f} (data spread {float(spread):.2f})"


@pytest.mark.parametrize(("role", "steps"), [("sampler", 8), ("sampler_one_step", 1)])
def test_digits_sampler_reads_the_angles_at_which_a_digit_reads_as_one(role, steps):
    sampler = load_sampler(SHIPPED_CHECKPOINTS / "digits" / role, steps)
    gen = torch.Generator().manual_seed(3)
    quality = digits_sampler_quality(sampler.model, gen, 1000, flow_steps=(steps,))
    assert quality[f"median_abs_angle_error_deg_{steps}_steps"] < DIGITS_ANGLE_BOUND_DEG
    assert quality[f"extra_turn_share_{steps}_steps"] > DIGITS_EXTRA_TURN_FLOOR


def test_the_digits_prior_predicts_v_so_its_x0_is_sane_at_high_noise():
    """v-prediction: Tweedie's x̂0 on held-out digits noised to t = 999, where x_t says almost nothing, is about
    the mean image (error ≈ the pixels' spread around it); the ε-prior it replaced was 7.7x that, dividing its
    ε error by sqrt(ᾱ) = 0.006."""
    from cdm_dist.problems.training import x0_errors

    prior = load_prior(SHIPPED_CHECKPOINTS / "digits" / "prior")
    assert prior.prediction_type == "v_prediction"
    x0 = training_data("digits").heldout(256, torch.Generator().manual_seed(5))[0]
    errors = x0_errors(prior, x0, torch.Generator().manual_seed(6))
    spread = float((x0 - x0.mean(0)).square().mean().sqrt())
    assert errors["999"] < 1.1 * spread  # about as good as the best guess there, the mean image
    assert errors["250"] < errors["999"]
