import json

import pytest
import torch

from cdm_dist.errors import InputError
from cdm_dist.problems import gmm_problem


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
