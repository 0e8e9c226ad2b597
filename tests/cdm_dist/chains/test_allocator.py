import os
import subprocess
import sys

import pytest

STEPS = """
import resource
from cdm_dist.chains.allocator import keep_large_allocations
from cdm_dist.chains.config import MLGDConfig, ZetaConfig
from cdm_dist.chains.mlgd import Chains, GuidedChains
from cdm_dist.problems.builtins import gmm_problem

kept = keep_large_allocations()
problem = gmm_problem("gmm2d")  # 1000 target samples, batches of 250 per chain and guess: megabyte blocks
config = MLGDConfig(num_steps=20, n_c=16, n_guess=2, dtype="float32")
runner = GuidedChains(problem.prior, problem.fast_sampler, problem.target, Chains.make(range(32), ZetaConfig()), config)
states = runner.states()
for _ in range(5):  # the heap grows to its size
    next(states)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    next(states)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _steps_faults(switch: str) -> tuple[str, int]:
    """Whether the allocator was set, and the page faults of 10 guided steps, in a fresh process."""
    env = os.environ | {"CDM_KEEP_ALLOCATIONS": switch}
    out = subprocess.run([sys.executable, "-c", STEPS], env=env, capture_output=True, text=True, check=True).stdout
    kept, faults = out.split()
    return kept, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_steps_blocks_are_reused_instead_of_faulted_in_every_step():
    kept, faults = _steps_faults("1")
    plain_kept, plain_faults = _steps_faults("0")
    assert (kept, plain_kept) == ("True", "False")
    assert plain_faults > 10_000  # glibc's default: the megabyte temporaries come back as fresh pages every step
    assert faults < plain_faults / 10  # here 0 against 47,000; on CI's machine 1,778 against 66,510
