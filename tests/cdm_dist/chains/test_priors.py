"""prior_fit: the prior's noise-prediction error at x, against its closed form for a Gaussian prior."""

import torch

from cdm_dist.chains.mixtures import GaussianMixture
from cdm_dist.chains.priors import PRIOR_FIT_LEVELS, GaussianMixturePrior, prior_fit


def _gaussian_prior(mean, var):
    d = mean.shape[-1]
    return GaussianMixturePrior(
        GaussianMixture(torch.ones(1, dtype=torch.float64), mean, var * torch.eye(d, dtype=torch.float64)[None])
    )


def test_prior_fit_matches_its_closed_form_for_a_gaussian_prior():
    mean, var = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64), 0.6
    prior = _gaussian_prior(mean, var)
    x = mean + torch.tensor([[0.0], [0.5], [2.0], [6.0]], dtype=torch.float64) * torch.ones(1, 3)  # (4, 3)
    # eps_hat = c (sqrt(ab) (x - m) + sqrt(1 - ab) eps) with c = sqrt(1 - ab) / (ab var + 1 - ab), so
    # E ||eps_hat - eps||^2 / d = c^2 ab ||x - m||^2 / d + (c sqrt(1 - ab) - 1)^2, averaged over the levels
    size = prior.scheduler.config.num_train_timesteps
    expected = torch.zeros(4, dtype=torch.float64)
    for level in PRIOR_FIT_LEVELS:
        ab = prior.scheduler.alphas_cumprod[max(1, round(level * size))].double()
        c = (1 - ab).sqrt() / (ab * var + 1 - ab)
        expected += c**2 * ab * (x - mean).square().mean(1) + (c * (1 - ab).sqrt() - 1) ** 2
    expected /= len(PRIOR_FIT_LEVELS)
    measured = prior_fit(prior, x, draws=4000)
    torch.testing.assert_close(measured, expected, rtol=0.05, atol=0.002)
    assert (measured.diff() > 0).all()  # further from the prior's mass, worse fit


def test_prior_fit_of_a_row_does_not_depend_on_the_other_rows():
    prior = _gaussian_prior(torch.zeros(1, 2, dtype=torch.float64), 1.0)
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    whole = prior_fit(prior, x, seed=7)
    parts = torch.cat([prior_fit(prior, x[:1], seed=7), prior_fit(prior, x[1:], seed=7)])
    torch.testing.assert_close(whole, parts, rtol=0, atol=0)
    assert not torch.equal(whole, prior_fit(prior, x, seed=8))  # the seed picks the noise


def test_the_shipped_digits_prior_scores_digits_far_below_noise():
    from cdm_dist.problems.digits import rotated_batch
    from cdm_dist.problems.shipped import digits_problem

    prior = digits_problem("uniform").prior
    digits, _ = rotated_batch(16, torch.Generator().manual_seed(0), split="heldout")  # (16, 1, 16, 16) in [-1, 1]
    noise = torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    on, off = prior_fit(prior, digits), prior_fit(prior, noise)
    assert on.max() < 0.2 and off.min() > 1.0
