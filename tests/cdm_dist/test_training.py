import json

import pytest
import torch

from cdm_dist.cli import main
from cdm_dist.models.learned import load_prior, load_sampler
from cdm_dist.training import flow_loss, new_model, prior_loss, sha256, train, training_data


def test_cdm_train_writes_weights_config_scheduler_and_manifest(tmp_path):
    out = tmp_path / "prior"
    argv = ["train", "prior", "--problem", "gmm2d", "--out", str(out), "--steps", "3", "--seed", "7", "--tiny"]
    assert main(argv) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json", "manifest.json"} <= names
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["role"] == "prior" and manifest["problem"] == "gmm2d"
    assert manifest["steps"] == 3 and manifest["seed"] == 7
    assert manifest["command"] == "cdm " + " ".join(argv)
    assert manifest["weights_sha256"] == sha256(out / "diffusion_pytorch_model.safetensors")
    assert manifest["final_training_loss"] > 0 and "prior_mmd2" in manifest["quality"]
    assert load_prior(out).event_shape == (1,)


def test_training_is_reproducible_from_the_seed(tmp_path):
    shas = [
        train("sampler", "gmm2d", tmp_path / name, steps=3, seed=seed, tiny=True, progress=False)["weights_sha256"]
        for name, seed in (("a", 1), ("b", 1), ("c", 2))
    ]
    assert shas[0] == shas[1] != shas[2]


@pytest.mark.parametrize("role", ["prior", "sampler"])
def test_training_lowers_the_held_out_objective(tmp_path, role):
    data = training_data("gmm5d")
    gen = torch.Generator().manual_seed(0)
    x, y = data.heldout(4096, gen)

    def objective(model):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            if role == "prior":
                from cdm_dist.training import new_scheduler

                return float(prior_loss(model, new_scheduler().alphas_cumprod, x, g))
            return float(flow_loss(model, x, y, g))

    torch.manual_seed(3)
    before = objective(new_model(data, role, torch.Generator().manual_seed(4), tiny=True))
    train(role, "gmm5d", tmp_path / role, steps=300, seed=3, tiny=True, progress=False)
    trained = load_prior(tmp_path / role).model if role == "prior" else load_sampler(tmp_path / role, 1).model
    after = objective(trained)
    assert after < 0.8 * before


def test_digits_models_train_and_load(tiny_checkpoints):
    folder = tiny_checkpoints("digits")
    prior = load_prior(folder / "prior")
    assert prior.event_shape == (1, 16, 16)
    sampler = load_sampler(folder / "sampler", 2)
    y = sampler.sample(torch.zeros(2, 1, 16, 16), torch.randn(2, 3, 2))
    assert y.shape == (2, 3, 2) and torch.isfinite(y).all()
    manifest = json.loads((folder / "sampler" / "manifest.json").read_text())
    assert "median_abs_angle_error_deg_4_steps" in manifest["quality"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "prior", "--problem", "gmm3d"], "--problem: unknown 'gmm3d'"),
        (["train", "sampler", "--problem", "gmm2d", "--steps", "0"], "--steps: must be >= 1"),
    ],
)
def test_cdm_train_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "model"
    assert main([*argv, "--out", str(out), "--tiny"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cdm_train_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["train", "prior", "--problem", "gmm2d", "--out", str(tmp_path), "--tiny", "--steps", "1"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
