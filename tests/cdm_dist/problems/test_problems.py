import json

import pytest
import torch

from cdm_dist.errors import InputError
from cdm_dist.problems.builtins import gmm_problem


@pytest.mark.parametrize("name", ["gmm5d", "gmm10d"])
def test_higher_dimensional_targets_have_two_modes_at_x_star(name):
    problem = gmm_problem(name)
    dim = int(name[3:-1])
    assert problem.x_star.shape == (dim - 1,)
    assert len(problem.params["target"]["weights"]) == 2
    # the exact metric is zero at x* up to the dropped tiny components
    metrics = problem.metrics(problem.x_star[None])
    assert metrics["l2_gmm"].item() < 1e-3 and metrics["x_err"].item() == 0
    json.dumps(problem.params)  # saved next to results


@pytest.mark.parametrize("name", ["gmm5d", "gmm10d"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_joints_give_well_posed_bimodal_targets(name, seed):
    target = gmm_problem(name, joint_seed=seed).params["target"]
    weights = torch.tensor(target["weights"])
    means = torch.tensor(target["means"])[:, 0]
    stds = torch.tensor(target["covs"])[:, 0, 0].sqrt()
    assert len(weights) == 2 and weights.min() >= 0.2
    assert stds.min() >= 0.05**0.5 and stds.max() <= 5**0.5
    assert (means[0] - means[1]).abs() >= 2 * stds.sum()  # two separate modes, as the 2D reference's ±5


def test_a_spiky_draw_of_the_recipe_is_redrawn():
    from cdm_dist.problems.builtins import conditional_target, draw_joint

    # the first 10D draw from seed 1 puts a mode of variance ~1e-3 at x*: its l2_gmm floor is above 1
    joint, x_star = draw_joint(10, 4, 5.0, torch.Generator().manual_seed(1))
    spiky = conditional_target(joint.condition(list(range(9)), [9]), x_star, 0.001)
    assert spiky.covs[:, 0, 0].min() < 0.01
    assert gmm_problem("gmm10d").params["x_star"] != x_star.tolist()


def test_problems_are_reproducible():
    a, b = gmm_problem("gmm5d"), gmm_problem("gmm5d")
    assert a.params == b.params
    assert torch.equal(a.target.samples, b.target.samples)
    assert gmm_problem("gmm5d", joint_seed=2).params["x_star"] != a.params["x_star"]


def test_2d_problem_matches_the_reference(gmm2d):
    assert gmm2d.x_star.tolist() == [-5.0]
    assert gmm2d.params["target"]["weights"] == pytest.approx([0.5, 0.5], abs=1e-3)
    assert gmm2d.metrics(torch.tensor([[-4.718685626983643]], dtype=torch.float64))["l2_gmm"].item() == pytest.approx(
        0.019227, abs=1e-4
    )


def test_unknown_problem_is_named():
    with pytest.raises(InputError, match="problem: unknown 'gmm3d'"):
        gmm_problem("gmm3d")


def test_learned_mixture_problem_keeps_the_exact_target_and_metrics(tiny_checkpoints):
    from cdm_dist.models.adapters import DiffusersPrior
    from cdm_dist.models.learned import FlowSampler
    from cdm_dist.problems.shipped import learned_gmm_problem

    exact = gmm_problem("gmm5d")
    learned = learned_gmm_problem("gmm5d", tiny_checkpoints("gmm5d"), fast_steps=3, full_chain_steps=9)
    assert isinstance(learned.prior, DiffusersPrior) and isinstance(learned.fast_sampler, FlowSampler)
    assert (learned.fast_sampler.num_steps, learned.full_sampler.num_steps) == (3, 9)
    assert torch.equal(learned.target.samples, exact.target.samples)
    x = exact.x_star[None]
    assert learned.metrics(x)["l2_gmm"].item() == exact.metrics(x)["l2_gmm"].item()
    assert learned.params["models"] == "learned" and set(learned.params["weights_sha256"]) == {"prior", "sampler"}
    assert learned.name == "gmm5d" and torch.equal(learned.x_star, exact.x_star) and not learned.x_star_unique
    assert {k: v for k, v in learned.params.items() if k in exact.params} == exact.params


def test_learned_problems_reject_the_wrong_checkpoints(tiny_checkpoints, tmp_path):
    from cdm_dist.problems.shipped import digits_problem, learned_gmm_problem

    with pytest.raises(InputError, match="does not hold models for gmm2d"):
        learned_gmm_problem("gmm2d", tiny_checkpoints("gmm5d"))
    with pytest.raises(InputError, match="does not hold models for digits"):
        digits_problem("uniform", tiny_checkpoints("gmm5d"))
    with pytest.raises(InputError, match="is not a folder"):
        learned_gmm_problem("gmm2d", tmp_path / "nowhere")


def test_digits_problem_has_image_chains_and_circle_targets(tiny_checkpoints):
    from cdm_dist.problems.shipped import digits_problem

    problem = digits_problem("unimodal", tiny_checkpoints("digits"), target_size=300)
    assert problem.prior.event_shape == (1, 16, 16) and problem.fast_sampler.y_dim == 2
    assert problem.target.samples.shape == (300, 2)
    torch.testing.assert_close(problem.target.samples.norm(dim=1), torch.ones(300, dtype=torch.float64))
    assert problem.metrics is None and problem.x_star is None
    assert problem.name == "digits" and problem.params["target"] == "unimodal" and problem.params["target_size"] == 300


@pytest.mark.parametrize("name", ["gmm2d", "gmm5d", "gmm10d", "digits"])
def test_the_one_step_sampler_is_a_config_choice(name):
    """sampler_kind: one_step swaps the fast sampler for the shipped distillation, one step; the full chain keeps the
    flow. Both are the shipped files, recorded by sha256 in the problem's params."""
    from cdm_dist.models.learned import FlowSampler
    from cdm_dist.models.manifest import read_manifest
    from cdm_dist.problems.builtins import SHIPPED_CHECKPOINTS
    from cdm_dist.problems.shipped import digits_problem, learned_gmm_problem

    make = (lambda **k: digits_problem(**k)) if name == "digits" else (lambda **k: learned_gmm_problem(name, **k))
    flow, one_step = make(), make(sampler_kind="one_step")
    assert isinstance(one_step.fast_sampler, FlowSampler) and one_step.fast_sampler.num_steps == 1
    assert flow.fast_sampler.num_steps == 8 and one_step.full_sampler.num_steps == flow.full_sampler.num_steps
    shipped = read_manifest(SHIPPED_CHECKPOINTS / name / "sampler_one_step")
    assert shipped["kind"] == "one_step" and one_step.params["sampler_kind"] == "one_step"
    assert one_step.params["weights_sha256"]["sampler_one_step"] == shipped["weights_sha256"]
    x = torch.zeros(2, *one_step.fast_sampler.x_shape)
    eta = torch.randn(2, 3, *one_step.fast_sampler.noise_shape)
    assert not torch.equal(one_step.fast_sampler.sample(x, eta), flow.fast_sampler.sample(x, eta))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            {"models": "learned", "sampler_kind": "one_step", "fast_steps": 4},
            "fast_steps: the one-step sampler takes 1",
        ),
        ({"sampler_kind": "one_step"}, "sampler_kind: only used with models: learned"),
    ],
)
def test_one_step_settings_that_contradict_are_one_line(args, message):
    from cdm_dist.models.spec import ProblemConfig
    from cdm_dist.problems.registry import resolve_problem

    with pytest.raises(InputError, match=message):
        resolve_problem(ProblemConfig(name="gmm2d", args=args)).build()
