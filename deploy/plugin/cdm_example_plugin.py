"""A stand-in for a user's problem package: not installed in the image, it reaches every actor only through the
study's `resources.runtime_env.working_dir` (deploy/study.yaml). Replace it with your own models."""

from cdm_dist.problems.builtins import gmm_fast_sampler, gmm_metrics, gmm_prior, gmm_target


def prior(name: str = "gmm5d"):
    return gmm_prior(name)


def sampler(name: str = "gmm5d"):
    return gmm_fast_sampler(name)


def target(name: str = "gmm5d"):
    return gmm_target(name)


def metrics(name: str = "gmm5d"):
    return gmm_metrics(name)
