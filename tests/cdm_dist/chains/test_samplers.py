import pytest
import torch

from cdm_dist.chains.mixtures import GaussianMixture
from cdm_dist.chains.samplers import MixtureDiffusionSampler, MixtureInverseCDFSampler
from cdm_dist.errors import InputError
from cdm_dist.problems.builtins import joint_2d


def _ks(samples: torch.Tensor, mixture: GaussianMixture) -> float:
    """Kolmogorov-Smirnov distance of 1-D samples to a mixture."""
    s = torch.sort(samples.flatten()).values
    stds = mixture.covs[:, 0, 0].sqrt()
    cdf = (mixture.weights * torch.special.ndtr((s[:, None] - mixture.means[:, 0]) / stds)).sum(1)
    n = s.numel()
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    return float(torch.maximum((grid - cdf).abs(), (grid - 1 / n - cdf).abs()).max())


@pytest.mark.parametrize("x_value", [-5.0, -1.3, 5.5])
def test_both_samplers_draw_the_exact_conditional(x_value):
    joint, _ = joint_2d()
    cond = joint.condition([0], [1])
    x = torch.tensor([[x_value]], dtype=torch.float64)
    exact = cond.mixture_at(x[0])
    eta = torch.randn(1, 20_000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    fast = MixtureInverseCDFSampler(cond).sample(x, eta)
    full = MixtureDiffusionSampler(cond, num_steps=100).sample(x, eta)
    assert fast.shape == full.shape == (1, 20_000, 1)
    assert _ks(fast, exact) < 0.012  # 1.36 / sqrt(n) = 0.0096 is the 95% KS band
    assert _ks(full, exact) < 0.02  # plus the DDIM discretisation error


def test_full_chain_sampler_is_differentiable_in_x():
    joint, _ = joint_2d()
    sampler = MixtureDiffusionSampler(joint.condition([0], [1]), num_steps=10)
    x = torch.tensor([[-4.0], [1.0]], dtype=torch.float64, requires_grad=True)
    eta = torch.randn(2, 64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = sampler.sample(x, eta)
    (grad,) = torch.autograd.grad(y.mean(), x)
    h = 1e-6
    fd = (sampler.sample(x.detach() + h, eta).mean() - sampler.sample(x.detach() - h, eta).mean()) / (2 * h)
    assert grad.sum().item() == pytest.approx(fd.item(), rel=1e-5)


def test_inverse_cdf_sampler_needs_1d_y():
    joint = GaussianMixture(
        torch.ones(1, dtype=torch.float64),
        torch.zeros(1, 3, dtype=torch.float64),
        torch.eye(3, dtype=torch.float64)[None],
    )
    with pytest.raises(InputError, match="1-D Y"):
        MixtureInverseCDFSampler(joint.condition([0], [1, 2]))
