"""The deploy kit offline: the shipped manifests pass `python -m deploy.check`, each rule catches its breakage in
one line, and the RayJob's entrypoint, exactly as the manifest has it, runs a study on a local Ray."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from deploy.check import ManifestError, check
from deploy.entrypoint import cdm_arguments
from tuning.study import counted

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_manifests_pass():
    done = subprocess.run([sys.executable, "-m", "deploy.check"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["ok RayCluster raycluster.yaml", "ok RayJob rayjob.yaml"]


@pytest.fixture
def kit(tmp_path):
    """A copy of the deploy kit (and the folders the image copies) to break; returns (root, edit)."""
    for folder in ("deploy", "examples"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "models"))

    def edit(name, change):
        path = tmp_path / "deploy" / "kuberay" / name
        doc = yaml.safe_load(path.read_text())
        change(doc)
        path.write_text(yaml.safe_dump(doc))

    return tmp_path, edit


def _cluster(doc):
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


BREAKAGES = {
    "no rayVersion": ("raycluster.yaml", lambda d: _cluster(d).pop("rayVersion"), "spec: rayVersion: required"),
    "old rayVersion": ("rayjob.yaml", lambda d: _cluster(d).update(rayVersion="2.9.0"), "differs from the image"),
    "auth off": ("raycluster.yaml", lambda d: _cluster(d).pop("authOptions"), "authOptions.mode: must be token"),
    "typo": ("raycluster.yaml", lambda d: _cluster(d).update(workerGroupSpec=[]), "unknown fields ['workerGroupSpec']"),
    "bounds": ("rayjob.yaml", lambda d: _cluster(d)["workerGroupSpecs"][0].update(minReplicas=9), "minReplicas <= "),
    "no gpus": (
        "raycluster.yaml",
        lambda d: [c["resources"]["limits"].pop("nvidia.com/gpu") for c in _containers(d)],
        "no group with nvidia.com/gpu limits",
    ),
    "literal credential": (
        "rayjob.yaml",
        lambda d: _cluster(d)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
            {"name": "CDM_OPTUNA_STORAGE", "value": "postgresql://u:pw@db/optuna"}
        ),
        "env CDM_OPTUNA_STORAGE: a credential must come from a Secret",
    ),
    "missing config": (
        "rayjob.yaml",
        lambda d: d["spec"].update(entrypoint="python -m deploy.entrypoint tune deploy/nope.yaml --trials 2"),
        "config deploy/nope.yaml is not in the image",
    ),
    "config outside the image": (
        "rayjob.yaml",
        lambda d: d["spec"].update(entrypoint="python -m deploy.entrypoint run tests/x.yaml"),
        "config tests/x.yaml is not in the image",
    ),
    "bad flag": (
        "rayjob.yaml",
        lambda d: d["spec"].update(entrypoint="python -m deploy.entrypoint tune deploy/study.yaml --trails 2"),
        "cdm does not accept",
    ),
    "not the entrypoint": (
        "rayjob.yaml",
        lambda d: d["spec"].update(entrypoint="python train.py"),
        "must start with `python -m deploy.entrypoint`",
    ),
}


def _containers(doc):
    return [c for g in _cluster(doc)["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_each_rule_names_the_file_and_field(kit, name):
    root, edit = kit
    manifest, change, message = BREAKAGES[name]
    edit(manifest, change)
    with pytest.raises(ManifestError) as caught:
        check(root)
    assert message in str(caught.value) and manifest in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_image_and_the_installed_ray_must_agree(kit):
    root, _ = kit
    with pytest.raises(ManifestError, match=r"differs from the installed Ray 1\.0\.0"):
        check(root, installed_ray="1.0.0")
    done = subprocess.run([sys.executable, "-m", "deploy.check", "--root", str(root / "nowhere")],
                          capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1


def test_the_entrypoint_takes_credentials_from_the_environment():
    env = {"CDM_TRACKING_URI": "http://mlflow:5000", "CDM_OPTUNA_STORAGE": "postgresql://u:p@db/o",
           "CDM_OVERRIDES": "chains.count=2 'name=a b'"}  # fmt: skip
    assert cdm_arguments(["tune", "c.yaml", "--trials", "3"], env) == [
        "tune", "c.yaml", "--trials", "3", "--set=chains.count=2", "--set=name=a b",
        "--set=tracking.uri=http://mlflow:5000", "--storage", "postgresql://u:p@db/o",
    ]  # fmt: skip
    explicit = ["c.yaml", "--set", "tracking.uri=sqlite:///x.db"]  # run is the default; explicit settings win
    assert cdm_arguments(explicit, env) == ["run", "--quiet", *explicit, "--set=chains.count=2", "--set=name=a b"]


def test_the_rayjob_entrypoint_runs_a_study_on_a_local_ray(ray_cluster, postgres_server, tmp_path):
    """The manifest's entrypoint verbatim (python = this interpreter), the image's environment emulated: CDM_HOME
    is this checkout, credentials come as environment variables, CDM_OVERRIDES shrinks the study."""
    manifest = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayjob.yaml").read_text())
    words = shlex.split(manifest["spec"]["entrypoint"])
    assert words[0] == "python"
    storage = postgres_server("rayjob")
    small = ["method.num_steps=4", "chains.count=2", "resources.micro_batch=2", "tune.prior_fit_limit=off",
             "method.n_c=16", "method.target_batch=16", f"output={tmp_path / 'out'}", "tune.heartbeat_seconds=2",
             f"tracking.artifact_location={tmp_path / 'art'}",
             "tune.grace_seconds=6"]  # fmt: skip
    env = os.environ | {
        "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
        "CDM_HOME": str(ROOT),
        "CDM_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "CDM_OPTUNA_STORAGE": storage,
        "CDM_OVERRIDES": shlex.join(small),
    }
    done = subprocess.run([sys.executable, *words[1:]], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    trials = int(words[words.index("--trials") + 1])
    study = optuna.load_study(study_name="cluster-study", storage=storage)
    assert len([t for t in study.get_trials() if counted(t)]) == trials  # complete or pruned
    from cdm_dist.driver.tracking import client_for

    client = client_for(env["CDM_TRACKING_URI"])
    experiment = client.get_experiment_by_name("cluster-study").experiment_id
    assert len(client.search_runs([experiment], "tags.`cdm.kind` = 'study'")) == 1


def test_the_image_copies_every_package_the_project_installs():
    """pip install . inside the image finds every package pyproject.toml names (a moved package is not left out)."""
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in include}
    copied = {
        line.split()[-1].removeprefix("./")
        for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY") and line.split()[-1].startswith("./") and line.split()[-1] != "./"
    }
    assert packages <= copied, f"the Dockerfile does not copy {sorted(packages - copied)}"
    assert all((ROOT / name / "__init__.py").is_file() for name in packages)
