import math

import pytest
import torch

from cdm_dist.chains.config import MLGDConfig, ZetaConfig
from cdm_dist.chains.diffusion import ddim_sample
from cdm_dist.chains.losses import MMDLoss
from cdm_dist.chains.mlgd import (
    Chains,
    ChainState,
    GradRequest,
    GuidedChains,
    begin_step,
    finish_step,
    guided_step,
    run_chains,
)
from cdm_dist.chains.targets import Target
from cdm_dist.errors import InputError

SMALL = MLGDConfig(num_steps=8, n_c=12, n_guess=2, target_batch=10, refine_steps=2, dtype="float64")  # exact refs
ZETAS = [
    ZetaConfig(scale=1.0),
    ZetaConfig(kind="linear", scale=2.0, final=0.1),
    ZetaConfig(kind="rt", normalize=True),
    ZetaConfig(kind="cosine", trust_radius=0.5),
    ZetaConfig(kind="cdms", beta=2.0),
]


def _run(problem, chains, config=SMALL, method="mlgd_f"):
    runner = GuidedChains(problem.prior, problem.sampler(method), problem.target, chains, config)
    return run_chains(runner, problem.metrics)


@pytest.mark.parametrize("method", ["mlgd_f", "mlgd"])
def test_a_chain_does_not_depend_on_its_batch(gmm2d, method):
    chains = Chains.make([11, 3, 7, 42, 5], ZETAS)
    together = _run(gmm2d, chains, method=method)
    split = [_run(gmm2d, chains[0:2], method=method), _run(gmm2d, chains[2:5], method=method)]
    alone = _run(gmm2d, chains[3:4], method=method)
    torch.testing.assert_close(torch.cat([r.x for r in split]), together.x, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat([r.final_loss for r in split]), together.final_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(alone.x[0], together.x[3], rtol=0, atol=1e-12)


def _guidance(runner, x, i):
    """x̂0, the smoothed loss and dL/dx_t at x_t = x and step i, through the split stages."""
    state = runner.prior_side.initial_state()
    state.x, state.step = x, i
    denoised = runner.prior_side.tweedie(state)
    loss, grad = runner.sampler_side.matching_grad(GradRequest(i, denoised.x0, denoised.radius))
    if denoised.x0_graph is not None:
        (grad,) = torch.autograd.grad(denoised.x0_graph, denoised.x_in, grad)
    return denoised.x0, loss, grad


def test_zero_step_size_is_unguided_prior_sampling(gmm2d):
    chains = Chains.make([1, 2, 3], ZetaConfig(scale=0.0))
    runner = GuidedChains(
        gmm2d.prior, gmm2d.fast_sampler, gmm2d.target, chains, SMALL.model_copy(update={"refine_steps": 0})
    )
    x_T = runner.prior_side.initial_state().x
    expected = ddim_sample(gmm2d.prior.predict_noise, x_T, gmm2d.prior.schedule(SMALL.num_steps))
    torch.testing.assert_close(run_chains(runner).x, expected)


def test_guidance_gradient_is_the_derivative_of_the_smoothed_loss(gmm2d):
    """With common random numbers and a fixed bandwidth the guidance loss is a smooth function of x_t."""
    config = SMALL.model_copy(update={"common_random_numbers": True, "loss": MMDLoss(bandwidth=1.0)})
    runner = GuidedChains(gmm2d.prior, gmm2d.fast_sampler, gmm2d.target, Chains.make([4, 9], ZetaConfig()), config)
    x = torch.tensor([[-3.0], [1.5]], dtype=torch.float64)
    i, h = 5, 1e-6
    _, _, grad = _guidance(runner, x, i)
    plus, minus = _guidance(runner, x + h, i)[1], _guidance(runner, x - h, i)[1]
    torch.testing.assert_close(grad[:, 0], (plus - minus) / (2 * h), rtol=1e-5, atol=1e-8)


def test_identity_gradient_is_the_gradient_at_x0_hat(gmm2d):
    config = SMALL.model_copy(
        update={"common_random_numbers": True, "grad": "identity", "loss": MMDLoss(bandwidth=1.0)}
    )
    runner = GuidedChains(gmm2d.prior, gmm2d.fast_sampler, gmm2d.target, Chains.make([4], ZetaConfig()), config)
    x = torch.tensor([[-3.0]], dtype=torch.float64)
    x0, _, grad = _guidance(runner, x, 5)
    x0_var = x0.clone().requires_grad_(True)
    guesses = x0_var.unsqueeze(1) + runner.prior_side.radius[5] * runner.noise.normal(3, 0, (2, 1))
    loss = -(torch.logsumexp(-runner.sampler_side.sample_loss(guesses, 0, 2), -1) - math.log(2))
    torch.testing.assert_close(grad, torch.autograd.grad(loss.sum(), x0_var)[0])


def test_resuming_from_a_checkpoint_gives_the_same_chains(gmm2d):
    chains = Chains.make([1, 2, 3], ZETAS[:3])
    runner = GuidedChains(gmm2d.prior, gmm2d.fast_sampler, gmm2d.target, chains, SMALL.model_copy(update={"eta": 1.0}))
    full = list(runner.states())
    saved = full[3].checkpoint()
    resumed = list(runner.states(runner.prior_side.resume(saved)))
    assert len(full) == SMALL.num_steps and len(resumed) == SMALL.num_steps - 4
    torch.testing.assert_close(resumed[-1].x, full[-1].x, rtol=0, atol=0)


def test_a_diverging_chain_is_marked_failed_and_leaves_the_others_alone(gmm2d):
    chains = Chains.make([1, 2, 3], [ZetaConfig(), ZetaConfig(scale=1e308), ZetaConfig()])
    result = _run(gmm2d, chains)
    assert result.failed.tolist() == [False, True, False]
    assert math.isinf(result.final_loss[1].item()) and math.isnan(result.metrics["l2_gmm"][1].item())
    alone = _run(gmm2d, Chains.make([1, 3], [ZetaConfig(), ZetaConfig()]))
    torch.testing.assert_close(result.x[[0, 2]], alone.x, rtol=0, atol=1e-12)


def test_mlgd_f_finds_the_2d_solution(gmm2d):
    config = MLGDConfig(num_steps=100, n_c=48, target_batch=48, grad="identity")
    chains = Chains.make(range(6), ZetaConfig(kind="linear", scale=3.0, final=0.1))
    result = _run(gmm2d, chains, config)
    # half the chains or more end at x* = -5, and the held-out loss ranks them as the exact l2 distance does
    assert (result.metrics["x_err"] < 0.3).sum() >= 3
    best = result.final_loss.argmin()
    assert result.metrics["x_err"][best] < 0.3
    assert result.loss_history.shape == (6, 100)


def test_float32_runs_and_agrees_with_float64(gmm2d):
    chains = Chains.make([1, 2], ZetaConfig())
    r64 = _run(gmm2d, chains, SMALL.model_copy(update={"refine_steps": 0}))
    r32 = _run(gmm2d, chains, SMALL.model_copy(update={"refine_steps": 0, "dtype": "float32"}))
    assert r32.x.dtype == torch.float32
    torch.testing.assert_close(r32.x.double(), r64.x, rtol=1e-3, atol=1e-3)


def test_target_dimension_must_match_the_sampler(gmm2d):
    with pytest.raises(InputError, match="dimension 2"):
        GuidedChains(gmm2d.prior, gmm2d.fast_sampler, Target(torch.zeros(5, 2)), Chains.make([1], ZetaConfig()), SMALL)


def test_chains_need_one_schedule_each():
    with pytest.raises(InputError, match="2 seeds but 1 zeta"):
        Chains((1, 2), (ZetaConfig(),))


def test_the_step_paused_at_its_request_and_resumed_later_is_the_step_taken_at_once(gmm2d):
    """The split prior actor holds paused steps while the sampler answers: same states, bitwise, as in-process."""
    config = SMALL.model_copy(update={"guidance_start": 0.25, "eta": 1.0})  # steps 0 and 1 unguided
    chains = Chains.make([1, 2, 3], ZETAS[:3])
    runner = GuidedChains(gmm2d.prior, gmm2d.fast_sampler, gmm2d.target, chains, config)
    at_once = list(runner.states())
    state, kinds = runner.prior_side.initial_state(), []
    while state.step < config.num_steps:
        paused = [guided_step(runner.prior_side, state)]  # kept in a list, as a resident micro-batch keeps it
        begun = begin_step(paused[0])
        kinds.append(type(begun).__name__)
        if isinstance(begun, GradRequest):
            assert begun.step == state.step and begun.radius == runner.prior_side.radius[state.step]
            state = finish_step(paused.pop(), runner.sampler_side.matching_grad(begun))
        else:
            state = begun
        torch.testing.assert_close(state.x, at_once[state.step - 1].x, rtol=0, atol=0)
    assert kinds == ["ChainState"] * 2 + ["GradRequest"] * 6
    assert torch.isnan(at_once[1].loss).all() and torch.isfinite(at_once[2].loss).all()


def test_a_guided_step_takes_exactly_one_answer(gmm2d):
    runner = GuidedChains(gmm2d.prior, gmm2d.fast_sampler, gmm2d.target, Chains.make([4], ZetaConfig()), SMALL)
    step = guided_step(runner.prior_side, runner.prior_side.initial_state())
    request = begin_step(step)
    after = finish_step(step, runner.sampler_side.matching_grad(request))
    assert isinstance(after, ChainState) and after.step == 1
    with pytest.raises(StopIteration):
        step.send(runner.sampler_side.matching_grad(request))  # a finished step takes no second answer


# -- editing chains: from a source noised to a start step (SDEdit) ---------------------------------------------


def _source(problem):
    shape = tuple(problem.prior.event_shape)
    return torch.linspace(0.7, -0.4, math.prod(shape), dtype=torch.float64).reshape(1, *shape)  # (1, *event)


def test_an_unguided_edit_is_ddim_from_the_noised_source(gmm2d):
    """ζ = 0: x* is deterministic DDIM over the steps from K on, started at sqrt(ᾱ_K) x_src + sqrt(1 - ᾱ_K) ε."""
    from cdm_dist.chains.rng import Stream, chain_normal

    source, start = _source(gmm2d), 5
    chains = Chains.make([4, 9], ZetaConfig(scale=0.0), starts=[start, start])
    config = SMALL.model_copy(update={"refine_steps": 0})
    runner = GuidedChains(gmm2d.prior, gmm2d.fast_sampler, gmm2d.target, chains, config, source=source)
    schedule = gmm2d.prior.schedule(config.num_steps)
    eps = chain_normal(torch.tensor([4, 9]), Stream.SOURCE, 0, tuple(gmm2d.prior.event_shape))
    ab = schedule.alpha_bar[start].item()
    x = math.sqrt(ab) * source + math.sqrt(1 - ab) * eps
    for i in range(start, config.num_steps):  # DDIM (eta 0), written out
        a, a_prev = schedule.alpha_bar[i].item(), schedule.alpha_bar_prev[i].item()
        e = gmm2d.prior.predict_noise(x, schedule.timesteps[i])
        x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * e
    states = list(runner.states())
    assert runner.prior_side.initial_state().step == start and len(states) == config.num_steps - start
    torch.testing.assert_close(states[-1].x, x, rtol=0, atol=1e-10)


def test_editing_chains_with_different_starts_do_not_depend_on_their_batch(gmm2d):
    """A batch runs from its earliest start; a chain whose start is ahead keeps its x and is not guided."""
    source = _source(gmm2d)
    chains = Chains.make([11, 3, 7, 42], ZETAS[:4], starts=[0, 3, 5, 3])
    together_runner = GuidedChains(gmm2d.prior, gmm2d.fast_sampler, gmm2d.target, chains, SMALL, source=source)
    together = run_chains(together_runner, gmm2d.metrics)
    for index in range(4):
        alone_runner = GuidedChains(
            gmm2d.prior, gmm2d.fast_sampler, gmm2d.target, chains[index : index + 1], SMALL, source=source
        )
        alone = run_chains(alone_runner, gmm2d.metrics)
        torch.testing.assert_close(alone.x[0], together.x[index], rtol=0, atol=1e-12)
        torch.testing.assert_close(alone.final_loss[0], together.final_loss[index], rtol=0, atol=1e-12)
    history = together.loss_history  # (B, T): NaN (unguided) before each chain's start
    assert history.shape == (4, SMALL.num_steps)
    assert torch.isnan(history[1, :3]).all() and torch.isfinite(history[1, 3:]).all()
    assert torch.isnan(history[2, :5]).all() and torch.isfinite(history[2, 5:]).all()


def test_resuming_an_editing_batch_gives_the_same_chains(gmm2d):
    chains = Chains.make([1, 2, 3], ZETAS[:3], starts=[2, 4, 2])
    runner = GuidedChains(gmm2d.prior, gmm2d.fast_sampler, gmm2d.target, chains, SMALL, source=_source(gmm2d))
    full = list(runner.states())
    saved = full[1].checkpoint()  # step 4: chain 1 starts now
    resumed = list(runner.states(runner.prior_side.resume(saved)))
    torch.testing.assert_close(resumed[-1].x, full[-1].x, rtol=0, atol=0)


def test_an_edit_reports_its_source_loss_and_improvement(gmm2d):
    """source_loss is the source's held-out loss (a chain of seed eval_seed at x_src), the same for every chain."""
    source = _source(gmm2d)
    chains = Chains.make([5, 6], ZETAS[:2], starts=[3, 3])
    result = run_chains(GuidedChains(gmm2d.prior, gmm2d.fast_sampler, gmm2d.target, chains, SMALL, source=source))
    reference = GuidedChains(
        gmm2d.prior, gmm2d.fast_sampler, gmm2d.target, Chains.make([SMALL.eval_seed], ZETAS[0]), SMALL
    ).sampler_side.heldout_loss(source)[0]
    torch.testing.assert_close(result.metrics["source_loss"], reference.expand(2), rtol=0, atol=1e-12)
    expected = (reference - result.final_loss) / reference
    torch.testing.assert_close(result.metrics["improvement"], expected, rtol=0, atol=1e-12)


def test_editing_chains_need_a_source(gmm2d):
    chains = Chains.make([1], ZETAS[0], starts=[3])
    with pytest.raises(InputError, match="no source"):
        GuidedChains(gmm2d.prior, gmm2d.fast_sampler, gmm2d.target, chains, SMALL)
    with pytest.raises(InputError, match="beyond"):
        GuidedChains(gmm2d.prior, gmm2d.fast_sampler, gmm2d.target, Chains.make([1], ZETAS[0], starts=[8]), SMALL,
                     source=_source(gmm2d))  # fmt: skip


def test_a_timestep_window_is_the_step_fraction_window_it_coincides_with(gmm2d):
    chains = Chains.make([4, 9], ZETAS[:2])
    timesteps = GuidedChains(gmm2d.prior, gmm2d.fast_sampler, gmm2d.target, chains, SMALL).prior_side.schedule.timesteps
    by_t = SMALL.model_copy(update={"guidance_min_t": timesteps[5]})  # steps 0..5 are at t >= timesteps[5]
    by_fraction = SMALL.model_copy(update={"guidance_stop": 6 / SMALL.num_steps})
    runner = GuidedChains(gmm2d.prior, gmm2d.fast_sampler, gmm2d.target, chains, by_t)
    assert runner.prior_side.guided == [True] * 6 + [False] * 2
    states = list(runner.states())
    assert all(bool(s.zeta.eq(0).all()) and bool(s.loss.isnan().all()) for s in states[6:])
    torch.testing.assert_close(_run(gmm2d, chains, by_t).x, _run(gmm2d, chains, by_fraction).x, rtol=0, atol=0)


def test_a_timestep_window_that_leaves_no_step_guided_names_the_field(gmm2d):
    config = SMALL.model_copy(update={"guidance_min_t": 10**6})
    with pytest.raises(InputError, match=r"^method\.guidance_min_t: 1000000 leaves no step guided"):
        GuidedChains(gmm2d.prior, gmm2d.fast_sampler, gmm2d.target, Chains.make([1], ZETAS[0]), config)


def test_cleanup_eta_adds_noise_only_to_the_unguided_steps_after_the_last_guided_one(gmm2d):
    """cleanup_eta: σ_t is DDIM's at eta up to the last guided step and at cleanup_eta after it; the chain's states
    up to that step are the same as without it, and its end differs (fresh noise)."""
    chains = Chains.make([4, 9], ZETAS[:2])
    base = SMALL.model_copy(update={"guidance_stop": 5 / SMALL.num_steps})  # steps 0..4 guided
    clean = base.model_copy(update={"cleanup_eta": 1.0})
    schedule = GuidedChains(gmm2d.prior, gmm2d.fast_sampler, gmm2d.target, chains, base).prior_side.schedule
    runner = GuidedChains(gmm2d.prior, gmm2d.fast_sampler, gmm2d.target, chains, clean)
    ddim, ddpm = schedule.ddim_sigma(0.0).tolist(), schedule.ddim_sigma(1.0).tolist()
    assert runner.prior_side.sigma == ddim[:5] + ddpm[5:] and all(s > 0 for s in ddpm[5:-1])
    plain = GuidedChains(gmm2d.prior, gmm2d.fast_sampler, gmm2d.target, chains, base)
    states, plain_states = list(runner.states()), list(plain.states())
    for a, b in zip(states[:5], plain_states[:5], strict=True):  # after steps 0..4 (the guided ones): the same x
        torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    assert not torch.allclose(states[5].x, plain_states[5].x)  # step 5 (the first clean-up step) adds noise
    unguided = SMALL.model_copy(update={"guidance": False, "cleanup_eta": 1.0})  # no guided step: nothing to clean
    assert GuidedChains(gmm2d.prior, gmm2d.fast_sampler, gmm2d.target, chains, unguided).prior_side.sigma == ddim
