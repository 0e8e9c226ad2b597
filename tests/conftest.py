import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(2)
    torch.manual_seed(0)  # tests that draw with the global generator are reproducible
    yield


@pytest.fixture(scope="session")
def gmm2d():
    from cdm_dist.problems import gmm_problem

    return gmm_problem("gmm2d", full_chain_steps=20)
