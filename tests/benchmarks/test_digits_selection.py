import math

import pytest
import torch

from benchmarks.digits_selection import (
    KernelAngleSampler,
    angle_posterior,
    blurred_digits_data,
    gaussian_blur,
    posterior_moments,
    rotated_templates,
    sdedit_variations,
    top5_rows,
)
from cdm_dist.chains.mixtures import GaussianMixture
from cdm_dist.chains.priors import GaussianMixturePrior
from cdm_dist.problems.digits import to_model_space
from cdm_dist.problems.training import training_data


def test_the_kernel_angle_posterior_matches_a_float64_loop():
    gen = torch.Generator().manual_seed(0)
    templates = torch.randn(3, 4, 5, generator=gen)  # 3 digits at 4 angles, 5 pixels
    x = torch.randn(2, 5, generator=gen)
    for s in (0.7, 2.0):
        p = angle_posterior(x, templates, s, chunk=1)
        for b in range(2):
            weights = [
                sum(math.exp(-sum((float(x[b, k]) - float(templates[i, a, k])) ** 2 for k in range(5)) / (2 * s * s))
                for i in range(3))
                for a in range(4)
            ]  # fmt: skip
            expected = [w / sum(weights) for w in weights]
            assert torch.allclose(p[b].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)


def test_circular_moments_are_zero_for_uniform_and_one_for_a_point_mass():
    theta = torch.arange(8) * (2 * math.pi / 8)
    uniform = torch.full((1, 8), 1 / 8)
    assert posterior_moments(uniform, theta, (1, 2, 4)).abs().max() < 1e-6
    point = torch.zeros(1, 8)
    point[0, 3] = 1
    assert torch.allclose(posterior_moments(point, theta, (1, 2, 4)), torch.ones(1, 3))
    two = torch.zeros(1, 8)
    two[0, [1, 5]] = 0.5  # two opposite modes: no first moment, a full second one
    assert torch.allclose(posterior_moments(two, theta, (1, 2)), torch.tensor([[0.0, 1.0]]), atol=1e-6)


def test_templates_at_angle_zero_are_the_images():
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    templates, theta = rotated_templates(images, angles=4)
    assert templates.shape == (2, 4, 256) and torch.allclose(theta, torch.tensor([0, 0.5, 1, 1.5]) * math.pi)
    assert torch.allclose(templates[:, 0], to_model_space(images).flatten(1), atol=1e-5)


def test_gaussian_blur_keeps_the_ink_and_matches_the_2d_kernel():
    x = torch.zeros(2, 1, 16, 16)
    x[:, 0, 8, 7] = 1.0  # a point far from the border
    out = gaussian_blur(x, torch.tensor([1.2, 0.01]))
    assert torch.allclose(out.sum((1, 2, 3)), torch.ones(2))
    assert torch.allclose(out[1], x[1], atol=1e-6)  # a vanishing width is the identity
    r = range(-3, 4)
    norm = sum(math.exp(-(i * i) / (2 * 1.2**2)) for i in r) ** 2
    for dy in (-2, 0, 1):
        for dx in (-3, 0, 2):
            expected = math.exp(-(dx * dx + dy * dy) / (2 * 1.2**2)) / norm
            assert abs(float(out[0, 0, 8 + dy, 7 + dx]) - expected) < 1e-6


def test_blurred_training_data_keeps_the_angles_and_changes_the_images():
    data = blurred_digits_data()
    plain_x, plain_y = training_data("digits").draw(64, torch.Generator().manual_seed(3))
    x, y = data.draw(64, torch.Generator().manual_seed(3))
    assert torch.equal(y, plain_y) and x.shape == plain_x.shape
    changed = (x - plain_x).flatten(1).abs().amax(1) > 1e-4
    assert 0.4 < changed.double().mean() < 1.0  # about 3 in 4 are blurred, noisy or both
    assert "blurred" in data.description


def test_sdedit_variations_follow_ddim_on_a_gaussian_prior():
    mu, s = 0.5, 0.7
    prior = GaussianMixturePrior(GaussianMixture(torch.ones(1), torch.full((1, 1), mu), torch.full((1, 1, 1), s * s)))
    x = torch.tensor([[1.3], [-0.4]], dtype=torch.float64)
    out = sdedit_variations(prior, x, t=50, draws=2, seed=5, steps=20)
    schedule = prior.schedule(20)
    start = next(i for i, step in enumerate(schedule.timesteps) if step <= 50)
    gen = torch.Generator().manual_seed(5)
    for draw in range(2):
        a = float(schedule.alpha_bar[start])
        x_t = a**0.5 * x + (1 - a) ** 0.5 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        k = 1.0  # x_i = sqrt(ᾱ_i) μ + k_i (x_t - sqrt(ᾱ_start) μ): each DDIM step scales the deviation
        for i in range(start, len(schedule)):
            ab, prev = float(schedule.alpha_bar[i]), float(schedule.alpha_bar_prev[i])
            k *= (s * s * math.sqrt(ab * prev) + math.sqrt((1 - prev) * (1 - ab))) / (ab * s * s + 1 - ab)
        expected = mu + k * (x_t - a**0.5 * mu)
        assert torch.allclose(out[draw], expected, atol=1e-9)


def test_top5_rows_rank_each_block_of_64_seeds_on_its_own():
    scores = torch.arange(70, 0, -1, dtype=torch.float64)  # the last seed is best
    fit = torch.zeros(70)
    fit[69] = 1.0  # over the limit
    labels = [0 if i % 2 else 3 for i in range(70)]
    rows = top5_rows(scores, fit, 0.5, labels, torch.zeros(70))
    assert [r["seeds"] for r in rows] == ["0-63", "64-69"]
    assert rows[0]["top5_seeds"] == [63, 62, 61, 60, 59] and rows[0]["top5_zeros"] == 3
    assert rows[1]["top5_seeds"] == [68, 67, 66, 65, 64] and rows[1]["top5_judged"] == [3, 0, 3, 0, 3]


def test_the_kernel_sampler_inverts_the_posteriors_cdf_and_is_differentiable():
    gen = torch.Generator().manual_seed(2)
    templates = 0.05 * torch.randn(3, 4, 256, generator=gen)
    sampler = KernelAngleSampler(templates, s=0.5)
    x = 0.05 * torch.randn(2, 1, 16, 16, generator=gen)
    eta = torch.randn(2, 6, 1, generator=gen)
    y = sampler.sample(x, eta)
    p = angle_posterior(x, templates, 0.5).double()
    for b in range(2):
        for j in range(6):
            u = 0.5 * (1 + math.erf(float(eta[b, j, 0]) / math.sqrt(2)))
            below = 0.0
            for a in range(4):  # the bin whose CDF interval holds u, and u's place in it
                if u <= below + float(p[b, a]) or a == 3:
                    theta = (a + (u - below) / float(p[b, a])) * math.pi / 2
                    break
                below += float(p[b, a])
            assert abs(float(y[b, j, 0]) - math.cos(theta)) < 1e-4 and abs(float(y[b, j, 1]) - math.sin(theta)) < 1e-4
    # d mean(cos θ) / dx against a central difference along a random direction
    x64 = x.clone().requires_grad_(True)
    sampler.sample(x64, eta)[..., 0].mean().backward()
    direction = torch.randn(x.shape, generator=gen)
    h = 1e-2
    plus = sampler.sample(x + h * direction, eta)[..., 0].mean()
    minus = sampler.sample(x - h * direction, eta)[..., 0].mean()
    assert float((x64.grad * direction).sum()) == pytest.approx(float(plus - minus) / (2 * h), rel=2e-2, abs=1e-4)
