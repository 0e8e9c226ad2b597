"""The consistency-style (re-noised) flow sampler: problem.sampler.renoise, sampler_kind consistency."""

import pytest
import torch

from cdm_dist.models.learned import FlowSampler, euler_flow, renoised_flow_map
from cdm_dist.models.networks import ConditionalVelocityModel


class ToPoint:
    """The exact rectified flow of a point mass at c: v(z, s) = (c - z) / (1 - s)."""

    def __init__(self, c):
        self.c = c

    def velocity(self, z, s, features):
        return (self.c - z) / (1 - s[:, None])


class Constant:
    """v(z, s) = a whatever z and s."""

    def __init__(self, a):
        self.a = a

    def velocity(self, z, s, features):
        return self.a.expand_as(z)


def test_a_point_mass_flow_lands_on_the_point_whatever_the_fresh_noise():
    c = torch.tensor([0.3, -1.2], dtype=torch.float64)
    noise = torch.randn(5, 6, 2, dtype=torch.float64)
    torch.testing.assert_close(renoised_flow_map(ToPoint(c), noise, None), c.expand(5, 2), rtol=0, atol=1e-12)


def test_renoised_steps_equal_a_float64_loop():
    a = torch.tensor([[0.5, -2.0]], dtype=torch.float64)
    noise = torch.randn(3, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for n in range(3):
        z = noise[n, 0].tolist()
        for k in range(4):  # jump to the endpoint, then re-noise to the next time
            y1 = [z[j] + (1 - k / 4) * float(a[0, j]) for j in range(2)]
            if k < 3:
                z = [(k + 1) / 4 * y1[j] + (1 - (k + 1) / 4) * float(noise[n, k + 1, j]) for j in range(2)]
        assert renoised_flow_map(Constant(a), noise, None)[n].tolist() == pytest.approx(y1, rel=1e-12)


def test_the_renoised_sampler_takes_one_draw_per_step_and_one_step_is_euler():
    torch.manual_seed(0)
    model = ConditionalVelocityModel(x_shape=[4], y_dim=2, width=16, blocks=1)
    sampler = FlowSampler(model, 6, renoise=True)
    assert sampler.noise_shape == (6, 2)
    x, eta = torch.randn(3, 4), torch.randn(3, 5, 6, 2)
    y = sampler.sample(x, eta)
    assert y.shape == (3, 5, 2)
    torch.testing.assert_close(sampler.sample(x[1:2], eta[1:2]), y[1:2], rtol=0, atol=1e-6)  # rows independent
    one = FlowSampler(model, 1, renoise=True).sample(x, eta[:, :, :1])
    features = model.condition(x)[:, None].expand(3, 5, -1).reshape(15, -1)
    euler = euler_flow(model, eta[:, :, 0].reshape(15, 2), features, 1).reshape(3, 5, 2)
    torch.testing.assert_close(one, euler, rtol=0, atol=1e-6)


def test_the_digits_consistency_kind_is_the_shipped_flow_renoised_over_6_steps():
    from cdm_dist.problems.shipped import digits_problem

    sampler = digits_problem("uniform", sampler_kind="consistency").fast_sampler
    assert (sampler.num_steps, sampler.renoise, sampler.noise_shape) == (6, True, (6, 2))
