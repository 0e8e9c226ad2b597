"""examples/own_models, as its README runs it: train the user's prior, `cdm check`, `cdm run` on Ray (the session's;
the package reaches the actors through runtime_env only), `cdm tune` and `cdm topk`; small settings.

The copy's package goes by a name of its own (PACKAGE), so a user who followed the README (and pip-installed
own_models) gets the same results: no installed copy can stand in for the one under test."""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "own_models"
PACKAGE = f"own_models_{uuid.uuid4().hex[:12]}"  # the copy's package: importable only where this test puts it
SMALL = ["--set", "chains.count=4", "--set", "method.num_steps=20", "--set", "resources.micro_batch=2"]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """A copy of the example, its package renamed PACKAGE (in its code, campaigns and pyproject.toml), with a briefly
    trained prior (not on this process's sys.path)."""
    folder = tmp_path_factory.mktemp("example") / "own_models"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("out", "models", "*.egg-info", "__pycache__"))
    (folder / "own_models").rename(folder / PACKAGE)
    for path in [*(folder / PACKAGE).glob("*.py"), *folder.glob("*.yaml"), folder / "pyproject.toml"]:
        path.write_text(re.sub(r"\bown_models\b", PACKAGE, path.read_text()))
    train = [sys.executable, "-m", f"{PACKAGE}.train", "--steps", "300"]
    subprocess.run(train, cwd=folder, check=True, capture_output=True, timeout=300)
    assert (folder / "models" / "prior" / "config.json").is_file() and (folder / "models" / "target.npy").is_file()
    return folder


def _cdm(folder, *args, timeout=300, env=None):
    return subprocess.run(["cdm", *args], cwd=folder, capture_output=True, text=True, timeout=timeout, env=env)


def test_check_then_run_on_ray_with_the_package_shipped_by_runtime_env(example, ray_cluster):
    check = _cdm(example, "check", "campaign.yaml", "--executor", "local", "--json", "check.json", *SMALL,
                 "--set", "resources.runtime_env=null")  # fmt: skip
    assert check.returncode == 2 and f"No module named '{PACKAGE}'" in check.stderr  # not importable here
    # on Ray: the session's, joined as a user joins a cluster (a local Ray that cdm starts: test_preconditions)
    ray = os.environ | {"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    check = _cdm(example, "check", "campaign.yaml", "--json", "check.json", *SMALL, env=ray)
    assert check.returncode == 0, check.stderr[-2000:]
    report = json.loads((example / "check.json").read_text())
    assert report["workers"][0]["parts"]["prior"]["parameters"] > 10_000  # the user's PointDenoiser
    run = _cdm(example, "run", "campaign.yaml", "--json", "run.json", "--quiet", *SMALL, env=ray)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((example / "run.json").read_text())
    assert summary["chains_ok"] == 4 and summary["executor"] == "ray_colocated"
    assert np.load(example / summary["topk"][0]["x_path"]).shape == (2,)
    topk = _cdm(example, "topk", "--experiment", "projectile", "-k", "2", "--json", "topk.json")
    assert topk.returncode == 0, topk.stderr[-2000:]
    rows = json.loads((example / "topk.json").read_text())["rows"]
    assert [r["final_loss"] for r in rows] == [r["final_loss"] for r in summary["topk"][:2]]


def test_tune_on_the_users_problem_in_process(example):
    env = os.environ | {"PYTHONPATH": str(example)}  # in-process, the package must be importable here
    tune = _cdm(example, "tune", "campaign.yaml", "--trials", "2", "--json", "tune.json", "--executor", "local",
                *SMALL, "--set", "tune.prior_fit_limit='off'", env=env)  # fmt: skip
    assert tune.returncode == 0, tune.stderr[-2000:]
    result = json.loads((example / "tune.json").read_text())
    assert result["trials_complete"] + result["trials_pruned"] == 2


def test_the_package_registers_its_problem_name(example, monkeypatch):
    entry = tomllib.loads((example / "pyproject.toml").read_text())["project"]["entry-points"]["cdm_dist.problems"]
    assert entry == {"projectile": f"{PACKAGE}.problem:projectile"}
    monkeypatch.syspath_prepend(str(example))
    monkeypatch.chdir(example)
    from cdm_dist.models.factories import load_object
    from cdm_dist.models.spec import ProblemConfig

    parts = ProblemConfig.model_validate(load_object(entry["projectile"], "entry point")())
    assert parts.kind == "parts" and Path(parts.target.file) == example / "models" / "target.npy"
