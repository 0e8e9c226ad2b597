"""`cdm check`: one guided step through the campaign's own workers; each way a campaign would be wasted is one line
and exit status 2."""

import json

import pytest

from cdm_cli.main import main
from cdm_dist.models.tiny import save_tiny_latent_pipeline

BROKEN = '''
import torch
from cdm_dist.problems.builtins import gmm_fast_sampler, gmm_prior
from cdm_dist.chains.samplers import ConditionalSampler


class NaNPrior(type(gmm_prior("gmm2d"))):
    def predict_noise(self, x_t, timestep):
        return torch.full_like(x_t, float("nan"))


def nan_prior():
    prior = gmm_prior("gmm2d")
    prior.__class__ = NaNPrior
    return prior


class NaNSampler(ConditionalSampler):
    y_dim, noise_shape = 1, (1,)

    def sample(self, x, eta):
        return x[:, None, :1] * float("nan") + eta


def nan_sampler():
    return NaNSampler()


class Picky(ConditionalSampler):
    """Declares no x_shape, and takes only images."""
    y_dim, noise_shape = 1, (1,)

    def sample(self, x, eta):
        return torch.nn.functional.avg_pool2d(x, 2).mean((1, 2, 3))[:, None, None] + eta


def picky_sampler():
    return Picky()
'''


@pytest.fixture(scope="module")
def latent(tmp_path_factory):
    return save_tiny_latent_pipeline(tmp_path_factory.mktemp("latent") / "pipe")


def _config(tmp_path, problem, **extra):
    """A small campaign config file with this problem section; returns its path."""
    config = {
        "name": "check",
        "problem": problem,
        "method": {"num_steps": 10, "n_c": 8, "target_batch": 8, "n_guess": 1, "grad": "full"},
        "chains": {"count": 6},
        "resources": {"executor": "local", "micro_batch": 3},
        "tracking": {"enabled": False},
        "output": str(tmp_path / "out"),
    } | extra
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def _latent_problem(folder, **sampler_args):
    return {
        "prior": {
            "diffusers": str(folder),
            "subfolder": "unet",
            "vae_subfolder": "vae",
            "conditioning": {"file": str(folder / "conditioning.safetensors")},
        },
        "sampler": {"factory": "cdm_dist.models.tiny:ImageFeatureSampler", "args": sampler_args},
        "target": {"factory": "cdm_dist.models.tiny:gaussian_target"},
    }


def test_check_reports_every_role_and_estimates_the_campaign(tmp_path, latent, capsys):
    out = tmp_path / "check.json"
    assert main(["check", str(_config(tmp_path, _latent_problem(latent))), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (worker,) = report["workers"]
    assert worker["role"] == "both" and worker["device"] == "cpu"
    assert set(worker["parts"]) == {"prior", "sampler", "decoder"}
    assert worker["parts"]["prior"]["parameters"] > 100_000 and worker["parts"]["prior"]["dtypes"] == ["float32"]
    assert set(worker["load_seconds"]) >= {"prior", "sampler", "target", "decoder"}
    assert all(v > 0 for v in worker["stage_seconds"].values()) and worker["peak_memory_mb"] > 0
    step = report["step"]
    assert step["y_shape"] == [2, 8, 2] and len(step["grad_x_norm"]) == 2 and min(step["grad_x0_norm"]) > 0
    estimate = report["estimate"]
    assert (estimate["micro_batches"], estimate["guided_steps"]) == (2, 10) and estimate["campaign_seconds"] > 0
    printed = capsys.readouterr().out
    assert "one guided step" in printed and "estimate:" in printed
    assert not (tmp_path / "out").exists()  # a check writes no campaign


def _fails(tmp_path, problem, capsys, message, **extra):
    assert main(["check", str(_config(tmp_path, problem, **extra))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert message in err[0], err[0]


def test_a_sampler_that_ignores_x_is_caught(tmp_path, latent, capsys):
    """A freshly built ControlNet-style module (zero-initialised output layer) passes exactly zero gradient."""
    _fails(tmp_path, _latent_problem(latent, zero_output=True), capsys, "the matching loss has exactly zero gradient")


def test_shapes_that_do_not_chain_up_are_caught(tmp_path, latent, capsys):
    problem = _latent_problem(latent) | {
        "prior": {"factory": "cdm_dist.problems.builtins:gmm_prior", "args": {"name": "gmm2d"}}
    }
    _fails(tmp_path, problem, capsys, "the prior's x has shape [1] but the sampler takes x of shape [3, 16, 16]")
    problem = _latent_problem(latent) | {
        "target": {"factory": "cdm_dist.models.tiny:gaussian_target", "args": {"y_dim": 3}}
    }
    _fails(tmp_path, problem, capsys, "target samples have dimension 3; the sampler of problem parts produces d_y = 2")


@pytest.mark.parametrize(
    ("part", "factory", "message"),
    [
        ("prior", "nan_prior", "problem.prior: the noise prediction ε̂ is not finite"),
        ("sampler", "nan_sampler", "problem.sampler: the conditional samples y at x̂0 are not finite"),
        ("sampler", "picky_sampler", "problem.sampler: cannot take x of shape [1] from the prior (IndexError"),
    ],
)
def test_non_finite_models_are_caught(tmp_path, monkeypatch, capsys, part, factory, message):
    (tmp_path / "broken_models.py").write_text(BROKEN)
    monkeypatch.syspath_prepend(str(tmp_path))
    problem = {
        "prior": {"factory": "cdm_dist.problems.builtins:gmm_prior", "args": {"name": "gmm2d"}},
        "sampler": {"factory": "cdm_dist.problems.builtins:gmm_fast_sampler", "args": {"name": "gmm2d"}},
        "target": {"factory": "cdm_dist.problems.builtins:gmm_target", "args": {"name": "gmm2d"}},
    } | {part: {"factory": f"broken_models:{factory}"}}
    _fails(tmp_path, problem, capsys, message)


def test_a_factory_that_raises_is_caught(tmp_path, latent, capsys):
    problem = _latent_problem(latent, y_dim="two")
    _fails(tmp_path, problem, capsys, "problem.sampler.args.y_dim: Input should be a valid integer")


def test_check_on_split_actors_reports_each_role(ray_cluster, tmp_path, capsys):
    problem = {"name": "gmm2d"}
    resources = {"executor": "ray", "placement": "split", "num_cpus": 0.5, "replicas": 2}
    out = tmp_path / "check.json"
    assert main(["check", str(_config(tmp_path, problem, resources=resources)), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [w["role"] for w in report["workers"]] == ["prior", "sampler"]  # one replica is enough to check
    prior, sampler = report["workers"]
    assert set(prior["stage_seconds"]) == {"denoise", "advance"} and set(sampler["stage_seconds"]) == {"matching_grad"}
    assert prior["pid"] != sampler["pid"] and prior["load_seconds"].keys() == {"prior"}
    assert report["estimate"]["replicas"] == 2
