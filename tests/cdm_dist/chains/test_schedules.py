import math

import pytest
import torch

from cdm_dist.chains.config import ZetaConfig
from cdm_dist.chains.diffusion import DiffusionSchedule, ddim_step, make_scheduler
from cdm_dist.chains.schedules import apply_step_rule, guided_mask, zeta_table

GRID = DiffusionSchedule.from_scheduler(make_scheduler(num_train_timesteps=100), 50)


def test_shapes_and_endpoints():
    for kind in ("linear", "cosine", "power"):
        table = zeta_table(ZetaConfig(kind=kind, scale=2.0, final=0.25, power=3.0), GRID, 0.0)
        assert table.shape == (50,)
        assert table[0].item() == pytest.approx(2.0)
        assert table[-1].item() == pytest.approx(0.5)
    assert torch.all(zeta_table(ZetaConfig(scale=0.3), GRID, 0.0) == 0.3)
    mid = zeta_table(
        ZetaConfig(kind="cosine", scale=1.0, final=0.0),
        DiffusionSchedule.from_scheduler(make_scheduler(num_train_timesteps=100), 3),
        0.0,
    )
    assert mid[1].item() == pytest.approx(0.5)


def test_inv_sqrt_alpha_and_rt():
    beta = 1 - GRID.alpha_bar / GRID.alpha_bar_prev
    torch.testing.assert_close(zeta_table(ZetaConfig(kind="inv_sqrt_alpha"), GRID, 0.0), 1 / torch.sqrt(1 - beta))
    torch.testing.assert_close(
        zeta_table(ZetaConfig(kind="rt", scale=2.0), GRID, 0.0), 2 * beta / torch.sqrt(1 + beta**2)
    )


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_cdms_step_is_the_score_correction(eta):
    """zeta_t grad moves x_{t-1} exactly as adding sqrt(1-ᾱ_t) beta grad to eps does."""
    beta = 3.0
    table = zeta_table(ZetaConfig(kind="cdms", beta=beta), GRID, eta)
    x, eps, grad = (torch.randn(4, 2, dtype=torch.float64) for _ in range(3))
    for i in (0, 20, 49):
        ab, ab_prev, sigma = GRID.alpha_bar[i], GRID.alpha_bar_prev[i], GRID.ddim_sigma(eta)[i]
        guided_eps = eps + math.sqrt(1 - ab) * beta * grad
        expected = ddim_step(x, guided_eps, ab, ab_prev, sigma)
        torch.testing.assert_close(ddim_step(x, eps, ab, ab_prev, sigma) - table[i] * grad, expected)


def test_step_rule_normalises_and_clips_per_chain():
    grad = torch.tensor([[3.0, 4.0], [3.0, 4.0], [3.0, 4.0]], dtype=torch.float64)
    zeta = torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64)
    step = apply_step_rule(
        grad, zeta, torch.tensor([False, True, False]), torch.tensor([math.inf, math.inf, 1.0], dtype=torch.float64)
    )
    torch.testing.assert_close(step[0], torch.tensor([6.0, 8.0], dtype=torch.float64))
    torch.testing.assert_close(step[1], torch.tensor([1.2, 1.6], dtype=torch.float64))
    torch.testing.assert_close(step[2], torch.tensor([0.6, 0.8], dtype=torch.float64))


def test_guided_mask_fractions():
    mask = guided_mask(10, 0.2, 0.7)
    assert mask.tolist() == [False, False, True, True, True, True, True, False, False, False]
