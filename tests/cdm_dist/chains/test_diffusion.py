import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from cdm_dist.chains.diffusion import (
    CosineScheduler,
    DiffusionSchedule,
    ddim_sample,
    ddim_step,
    make_scheduler,
    tweedie_x0,
)
from cdm_dist.chains.mixtures import GaussianMixture
from cdm_dist.chains.priors import GaussianMixturePrior


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_step_matches_diffusers(spacing):
    sched = DDIMScheduler(
        num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=False, timestep_spacing=spacing
    )
    grid = DiffusionSchedule.from_scheduler(sched, 10)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    noise = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    for i, t in enumerate(grid.timesteps):
        for eta in (0.0, 1.0):
            ours = ddim_step(x, eps, grid.alpha_bar[i], grid.alpha_bar_prev[i], grid.ddim_sigma(eta)[i], noise)
            theirs = sched.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)  # diffusers does sqrt(ᾱ) in float32


def test_ddpm_step_is_ddim_with_eta_one():
    sched = DDPMScheduler(
        num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=False, timestep_spacing="trailing"
    )
    grid = DiffusionSchedule.from_scheduler(sched, 25)
    x = torch.randn(4, 2, dtype=torch.float64)
    eps = torch.randn(4, 2, dtype=torch.float64)
    for i, t in enumerate(grid.timesteps[:-1]):  # diffusers adds no noise at the last step
        noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        ours = ddim_step(x, eps, grid.alpha_bar[i], grid.alpha_bar_prev[i], grid.ddim_sigma(1.0)[i], noise)
        theirs = sched.step(eps, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_tweedie_with_exact_noise_is_the_gaussian_posterior_mean():
    mean, var = torch.tensor([[1.5, -2.0]], dtype=torch.float64), 0.7
    prior = GaussianMixturePrior(
        GaussianMixture(torch.ones(1, dtype=torch.float64), mean, var * torch.eye(2, dtype=torch.float64)[None])
    )
    x_t = torch.randn(5, 2, dtype=torch.float64)
    for t in (0, 30, 99):
        ab = prior.scheduler.alphas_cumprod[t].double()
        x0 = tweedie_x0(x_t, prior.predict_noise(x_t, t), ab)
        expected = mean + var * ab.sqrt() / (ab * var + 1 - ab) * (x_t - ab.sqrt() * mean)
        torch.testing.assert_close(x0, expected, rtol=1e-9, atol=1e-9)


def test_ddim_sampling_a_gaussian_prior_reaches_its_law():
    mean, std = torch.tensor([[3.0]], dtype=torch.float64), 0.5
    prior = GaussianMixturePrior(
        GaussianMixture(torch.ones(1, dtype=torch.float64), mean, torch.tensor([[[std**2]]], dtype=torch.float64))
    )
    z = torch.randn(20_000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = ddim_sample(prior.predict_noise, z, prior.schedule(50))
    assert abs(x.mean().item() - 3.0) < 0.02
    assert abs(x.std().item() - std) < 0.02


def test_checkpointing_changes_nothing_but_memory():
    prior = GaussianMixturePrior(
        GaussianMixture(
            torch.tensor([0.5, 0.5], dtype=torch.float64),
            torch.tensor([[-2.0], [2.0]], dtype=torch.float64),
            torch.full((2, 1, 1), 0.3, dtype=torch.float64),
        )
    )
    grads = []
    for checkpoint in (False, True):
        z = torch.linspace(-1, 1, 7, dtype=torch.float64)[:, None].requires_grad_(True)
        ddim_sample(prior.predict_noise, z, prior.schedule(10), checkpoint=checkpoint).pow(2).sum().backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_bad_schedule_inputs_are_named():
    with pytest.raises(ValueError, match="scheduler kind"):
        make_scheduler("euler")
    with pytest.raises(ValueError, match="num_steps"):
        DiffusionSchedule.from_scheduler(make_scheduler(num_train_timesteps=100), 101)


@pytest.mark.parametrize("train_steps", [100, 1000])
def test_the_cosine_scheduler_is_diffusers_grid_without_diffusers(train_steps):
    """CosineScheduler against diffusers' own DDPMScheduler (the reference): the same float32 ᾱ_t, bit for bit, and
    the same 'trailing' timesteps for every number of inference steps."""
    ours, theirs = CosineScheduler(train_steps), make_scheduler(num_train_timesteps=train_steps)
    assert ours.alphas_cumprod.dtype == torch.float32 and torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    for steps in range(1, train_steps + 1):
        a, b = DiffusionSchedule.from_scheduler(ours, steps), DiffusionSchedule.from_scheduler(theirs, steps)
        assert a.timesteps == b.timesteps and torch.equal(a.alpha_bar, b.alpha_bar)
        assert torch.equal(a.alpha_bar_prev, b.alpha_bar_prev)


def test_the_chains_and_the_actors_import_no_diffusers():
    """The exact problems' workers never import diffusers (about 2 s of CPU at each process's start); learned models
    import it where they load."""
    import subprocess
    import sys

    modules = "actors.coordinator, cdm_dist.driver.runner, cdm_dist.driver.worker, cdm_dist.problems.builtins"
    code = f"import sys, {modules}; print(sorted(m for m in ('diffusers', 'torch._dynamo') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
