"""Every `cdm run` probes before it spends: one checked guided step on the campaign's own Ray workers, and any
failure is one line, exit 2, with no campaign folder and no MLflow run left (issue 22's three cases)."""

import json
import sqlite3

import pytest

from cdm_cli.main import main
from cdm_dist.models.tiny import save_tiny_latent_pipeline

USER_MODELS = '''
import torch
from cdm_dist.chains.samplers import ConditionalSampler
from cdm_dist.problems.builtins import gmm_fast_sampler


class Flat(ConditionalSampler):
    """Forgets the y_dim axis: (B, n_c) instead of (B, n_c, 1)."""
    y_dim, noise_shape = 1, (1,)

    def sample(self, x, eta):
        return (x[:, None, :1] + eta)[..., 0]


class ThroughNumpy(ConditionalSampler):
    """A simulator in numpy: right values, no gradient path to x."""
    y_dim, noise_shape = 1, (1,)

    def sample(self, x, eta):
        return torch.from_numpy(x.detach().numpy()[:, None, :1] + eta.numpy())


class Strict(ConditionalSampler):
    """Refuses x beyond a bound, as a user's simulator might, with the project's input error: after the probe."""
    y_dim, noise_shape = 1, (1,)
    calls = 0

    def sample(self, x, eta):
        Strict.calls += 1
        if Strict.calls > 4:
            from cdm_dist.errors import InputError
            raise InputError("problem.sampler: x is outside the simulator's domain")
        return x[:, None, :1] + eta


def strict():
    return Strict()


def angry_prior():
    from cdm_dist.problems.builtins import gmm_prior

    prior = gmm_prior("gmm2d")

    class Angry(type(prior)):
        def predict_noise(self, x_t, timestep):
            raise RuntimeError("out of memory on the user's GPU")

    prior.__class__ = Angry
    return prior


def flat():
    return Flat()


def through_numpy():
    return ThroughNumpy()
'''


def _user_problem(tmp_path, factory):
    (tmp_path / "user_models.py").write_text(USER_MODELS)
    problem = {
        "prior": {"factory": "cdm_dist.problems.builtins:gmm_prior", "args": {"name": "gmm2d"}},
        "sampler": {"factory": f"user_models:{factory}"},
        "target": {"factory": "cdm_dist.problems.builtins:gmm_target", "args": {"name": "gmm2d"}},
    }
    return problem, {"env_vars": {"PYTHONPATH": str(tmp_path)}}


def _run(tmp_path, capsys, problem, **resources):
    config = {
        "name": "probe",
        "problem": problem,
        "method": {"num_steps": 10, "n_c": 8, "target_batch": 8, "n_guess": 1},
        "chains": {"count": 4},
        "resources": {"executor": "ray", "replicas": 1, "num_cpus": 0.5, "micro_batch": 2} | resources,
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": str(tmp_path / "artifacts")},
        "output": str(tmp_path / "out"),
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    status = main(["run", str(path), "--quiet"])
    return status, capsys.readouterr().err.strip().splitlines()


def _runs(tmp_path):
    db = tmp_path / "mlflow.db"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as connection:
        return connection.execute("select count(*) from runs").fetchone()[0]


@pytest.mark.parametrize(
    ("factory", "placement", "message"),
    [
        ("flat", "colocated",
         "problem.sampler: sample(x, eta) gave y of shape [2, 8]; the contract is (B, n_c, y_dim) = [2, 8, 1]"),
        ("through_numpy", "split", "problem.sampler: sample(x, eta) gave y with no gradient path to x"),
    ],
)  # fmt: skip
def test_a_broken_sampler_stops_the_run_before_it_writes(ray_cluster, tmp_path, capsys, factory, message, placement):
    problem, env = _user_problem(tmp_path, factory)
    status, err = _run(tmp_path, capsys, problem, placement=placement, runtime_env=env)
    assert status == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists() and _runs(tmp_path) == 0


@pytest.mark.parametrize("placement", ["colocated", "split"])
def test_an_input_error_a_worker_meets_mid_campaign_is_one_line_and_never_retried(
    ray_cluster, tmp_path, capsys, placement
):
    problem, env = _user_problem(tmp_path, "strict")
    status, err = _run(tmp_path, capsys, problem, placement=placement, runtime_env=env, max_retries=3)
    assert status == 2 and err == ["cdm: error: problem.sampler: x is outside the simulator's domain"]
    with sqlite3.connect(tmp_path / "mlflow.db") as connection:  # the campaign had started: its run says it failed
        children = "select run_uuid from tags where key = 'mlflow.parentRunId'"
        statuses = connection.execute(f"select status from runs where run_uuid not in ({children})").fetchall()
    assert statuses == [("FAILED",)]


def test_a_prediction_type_against_the_schedulers_config_needs_confirming(tmp_path, capsys):
    folder = save_tiny_latent_pipeline(tmp_path / "pipe", prediction_type="epsilon")
    prior = {"diffusers": str(folder), "subfolder": "unet", "vae_subfolder": "vae", "prediction_type": "v_prediction",
             "conditioning": {"file": str(folder / "conditioning.safetensors")}}  # fmt: skip
    problem = {
        "prior": prior,
        "sampler": {"factory": "cdm_dist.models.tiny:ImageFeatureSampler"},
        "target": {"factory": "cdm_dist.models.tiny:gaussian_target"},
    }
    status, err = _run(tmp_path, capsys, problem)
    assert status == 2 and len(err) == 1, err
    assert "prediction_type: 'v_prediction', but the scheduler's config says 'epsilon'" in err[0]
    assert "prediction_type_overrides_scheduler: true" in err[0]
    assert not (tmp_path / "out").exists() and _runs(tmp_path) == 0

    prior["prediction_type_overrides_scheduler"] = True  # confirmed: it runs, and `cdm check` says how it read it
    path, report = tmp_path / "check.yaml", tmp_path / "check.json"
    path.write_text(json.dumps({"problem": problem, "method": {"num_steps": 4, "n_c": 4, "target_batch": 4},
                                "resources": {"executor": "local"}, "tracking": {"enabled": False}}))  # fmt: skip
    assert main(["check", str(path), "--json", str(report)]) == 0
    reading = json.loads(report.read_text())["prior_reading"]
    assert reading["scheduler"] == "DDIMScheduler" and reading["prediction_type"] == "v_prediction"
    assert "overriding the scheduler's config ('epsilon'" in reading["from"]
    assert "prior: DDIMScheduler, v_prediction from problem.prior.prediction_type" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("resources.replicas=50", "resources.num_cpus: 50 replica(s) x 1 actor(s) x 1 CPU = 50, but this machine has"),
        ("resources.num_gpus=1", "GPU = 1, but this machine has 0 GPU; use a machine or cluster with GPUs"),
        ("problem={prior: {factory: 'cdm_dist.problems.builtins:gmm_prior', args: {name: gmm2d}}, sampler: {factory: "
         "'cdm_dist.problems.builtins:gmm_fast_sampler', args: {name: gmm2d}}, target: {file: TARGET}}",
         "target samples contain NaN or Inf (1 rows)"),
    ],
)  # fmt: skip
def test_declarative_mistakes_are_refused_before_ray_starts(tmp_path, setting, message):
    import subprocess
    import sys

    import numpy as np
    import torch

    if "GPU" in message and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    target = np.ones((10, 1))
    target[3] = np.nan
    np.save(tmp_path / "nan.npy", target)
    command = [sys.executable, "-m", "cdm_cli.main", "run", "--quiet", "--set", "resources.executor=ray",
               "--set", setting.replace("TARGET", str(tmp_path / "nan.npy")), "--set", f"output={tmp_path / 'out'}",
               "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]  # fmt: skip
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [f"cdm: error: {done.stderr.split('cdm: error: ')[1].strip()}"]
    assert message in done.stderr and "Ray" not in done.stderr.replace("Ray cluster", "")  # no Ray line: none started
    assert not (tmp_path / "out").exists() and _runs(tmp_path) == 0


def test_refusals_leave_nothing_behind(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--resume", "0123456789abcdef0123456789abcdef"]) == 2  # the default store is not there
    assert "--tracking-uri: no MLflow database at" in capsys.readouterr().err
    assert main(["bench", "engine", "--quick", "--json", "/proc/cdm-nowhere/engine.json"]) == 2  # even as root
    assert "--json: cannot write in /proc" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

    from cdm_dist.driver.tracking import client_for

    (tmp_path / "out").mkdir()
    client_for(f"sqlite:///{tmp_path}/out/mlflow.db")  # a store that exists
    for lock in (tmp_path / "out").glob("*.lock"):
        lock.unlink()
    assert main(["run", "--resume", "0123456789abcdef0123456789abcdef"]) == 2
    assert "--resume: no run '0123456789abcdef0123456789abcdef'" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mlflow.db"]  # not even a lock file beside it


def test_any_error_a_worker_raises_in_the_probe_is_one_line(ray_cluster, tmp_path, capsys):
    problem, env = _user_problem(tmp_path, "flat")
    problem["prior"] = {"factory": "user_models:angry_prior"}
    problem["sampler"] = {"factory": "cdm_dist.problems.builtins:gmm_fast_sampler", "args": {"name": "gmm2d"}}
    status, err = _run(tmp_path, capsys, problem, runtime_env=env)
    assert status == 2 and err == [
        "cdm: error: problem.prior: Tweedie's x̂0 failed at the probe step (RuntimeError: out of memory on the user's "
        "GPU)"
    ]
    assert not (tmp_path / "out").exists() and _runs(tmp_path) == 0


def test_a_study_probes_before_it_makes_its_storage(tmp_path, capsys, monkeypatch):
    problem, _ = _user_problem(tmp_path, "through_numpy")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = {
        "name": "probe-study", "problem": problem,
        "method": {"num_steps": 6, "n_c": 8, "target_batch": 8, "n_guess": 1},
        "chains": {"count": 2}, "resources": {"executor": "local"},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}, "output": str(tmp_path / "out"),
        "tune": {"space": {"method.n_guess": {"type": "int", "low": 1, "high": 2}}},
    }  # fmt: skip
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(config))
    assert main(["tune", str(path), "--trials", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gave y with no gradient path to x" in err[0], err
    assert not (tmp_path / "out").exists() and _runs(tmp_path) == 0
