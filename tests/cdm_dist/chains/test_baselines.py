import math

import pytest
import torch

from cdm_dist.chains.baselines import BestOfNConfig, DFlowConfig, _prior_ddim, best_of_n, chi_regulariser, dflow
from cdm_dist.chains.config import MLGDConfig, ZetaConfig
from cdm_dist.chains.mlgd import Chains, GuidedChains
from cdm_dist.chains.rng import Stream

CONFIG = MLGDConfig(num_steps=10, n_c=16, target_batch=16)


def test_chi_regulariser_is_the_chi_negative_log_density():
    z = torch.randn(3, 5, dtype=torch.float64)
    r = z.norm(dim=1)
    log_chi = (4) * torch.log(r) - r**2 / 2 - (5 / 2 - 1) * math.log(2) - math.lgamma(5 / 2)
    differences = chi_regulariser(z) + log_chi
    torch.testing.assert_close(differences, differences[0].expand(3))  # equal up to the constant


def test_best_of_n_keeps_the_candidate_with_the_lowest_selection_loss(gmm2d):
    chains = Chains.make([5, 6], ZetaConfig())
    config = BestOfNConfig(n=6, num_steps=10)
    result = best_of_n(gmm2d.prior, gmm2d.fast_sampler, gmm2d.target, chains, CONFIG, config)
    evaluator = GuidedChains(gmm2d.prior, gmm2d.fast_sampler, gmm2d.target, chains, CONFIG)
    for b in range(2):
        z = evaluator.noise.normal(Stream.INIT, 0, (6, 1))[b]
        candidates = _prior_ddim(gmm2d.prior, z, 10)
        one = GuidedChains(gmm2d.prior, gmm2d.fast_sampler, gmm2d.target, chains[b : b + 1], CONFIG)
        losses = one.sampler_side.sample_loss(candidates[None], 0, Stream.SELECT)[0]
        torch.testing.assert_close(result.x[b], candidates[losses.argmin()])


def test_dflow_lowers_the_loss_and_checkpointing_changes_nothing(gmm2d):
    chains = Chains.make([3], ZetaConfig())
    start = GuidedChains(gmm2d.prior, gmm2d.fast_sampler, gmm2d.target, chains, CONFIG)
    z = start.noise.normal(Stream.INIT, 0, (1,))
    x_start = _prior_ddim(gmm2d.prior, z, 5)
    before = start.sampler_side.sample_loss(x_start[:, None], 0, Stream.DFLOW)[0, 0].item()
    results = [
        dflow(
            gmm2d.prior,
            gmm2d.fast_sampler,
            gmm2d.target,
            chains,
            CONFIG,
            DFlowConfig(num_steps=5, iterations=2, chi_weight=0.01, checkpoint=c),
        )
        for c in (False, True)
    ]
    after = start.sampler_side.sample_loss(results[0].x[:, None], 0, Stream.DFLOW)[0, 0].item()
    assert after < before
    torch.testing.assert_close(results[0].x, results[1].x)


def test_baseline_configs_reject_bad_values():
    with pytest.raises(ValueError, match="n"):
        BestOfNConfig(n=0)
    with pytest.raises(ValueError, match="chi_weight"):
        DFlowConfig(chi_weight=-1.0)
