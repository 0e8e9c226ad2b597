import json

import pytest
import torch

from cdm_cli.main import main
from cdm_dist.models.learned import load_prior, load_sampler
from cdm_dist.problems.training import flow_loss, new_model, prior_loss, sha256, train, training_data


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
                from cdm_dist.problems.training import new_scheduler

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
    assert "quarter turn" in manifest["data"] and "reader" in manifest["data"]  # the readable labels
    assert "quarter turn" not in json.loads((folder / "prior" / "manifest.json").read_text())["data"]


def test_only_the_digits_sampler_learns_readable_labels():
    """The digits sampler's pairs: some labels are the rotation plus a quarter turn; its prior and other problems
    keep the problem's own pairs."""
    from cdm_dist.problems.digits import readable_rotated_batch
    from cdm_dist.problems.judge import readable_quarters
    from cdm_dist.problems.training import sampler_data

    assert sampler_data("gmm5d").description == training_data("gmm5d").description
    readable, plain = sampler_data("digits"), training_data("digits")
    assert readable.description.startswith(plain.description) and readable.x_shape == plain.x_shape
    for draw, split in ((readable.draw, "train"), (readable.heldout, "heldout")):
        x, y = draw(64, torch.Generator().manual_seed(1))
        x_ref, y_ref = readable_rotated_batch(64, torch.Generator().manual_seed(1), readable_quarters(split), split)
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


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


@pytest.mark.parametrize(("role", "problem"), [("prior", "gmm2d"), ("judge", "digits"), ("reader", "digits")])
def test_cdm_train_refuses_a_non_empty_folder(tmp_path, capsys, role, problem):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["train", role, "--problem", problem, "--out", str(tmp_path), "--tiny", "--steps", "1"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_the_distillation_target_is_the_teachers_euler_map_and_a_copy_scores_its_one_step_error(tiny_checkpoints):
    """distill_loss against a loop written out here: a student equal to the teacher scores exactly the gap between
    the teacher's 1-step and 32-step Euler maps."""
    from cdm_dist.models.learned import load_flow_model
    from cdm_dist.problems.training import TEACHER_STEPS, distill_loss, teacher_pairs

    teacher = load_flow_model(tiny_checkpoints("gmm5d") / "sampler")
    x, z0, target = teacher_pairs(training_data("gmm5d"), teacher, 64, torch.Generator().manual_seed(0),
                                  TEACHER_STEPS, chunk=16)  # fmt: skip
    with torch.no_grad():
        z = z0.clone()
        for k in range(TEACHER_STEPS):  # Euler by hand: z += ds v(z, k ds | x), the model called on x directly
            z = z + teacher(z, torch.full((64,), k / TEACHER_STEPS), x) / TEACHER_STEPS
        assert torch.allclose(target, z, atol=1e-5)
        one_step = z0 + teacher(z0, torch.zeros(64), x)
        expected = (one_step - z).square().mean()
        assert float(distill_loss(teacher, x, z0, target)) == pytest.approx(float(expected), rel=1e-4)


def test_a_one_step_sampler_distils_its_teacher_and_records_it(tiny_checkpoints, tmp_path):
    teacher = tiny_checkpoints("gmm2d") / "sampler"
    out = tmp_path / "one_step"
    argv = ["train", "sampler", "--problem", "gmm2d", "--kind", "one_step", "--teacher", str(teacher), "--out",
            str(out), "--steps", "300", "--tiny"]  # fmt: skip
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "one_step" and manifest["objective"].startswith("one-step distillation")
    assert manifest["teacher"]["weights_sha256"] == sha256(teacher / "diffusion_pytorch_model.safetensors")
    assert set(manifest["quality"]) >= {"w1_mean_1_steps", "w1_at_x_star_1_steps"}
    # one step of the student is closer to the teacher's 32-step map than one step of the teacher itself
    from cdm_dist.models.learned import load_flow_model
    from cdm_dist.problems.training import TEACHER_STEPS, distill_loss, teacher_pairs

    pairs = teacher_pairs(training_data("gmm2d"), load_flow_model(teacher), 2048, torch.Generator().manual_seed(9),
                          TEACHER_STEPS)  # fmt: skip
    with torch.no_grad():
        student_gap = float(distill_loss(load_flow_model(out), *pairs))
        teacher_gap = float(distill_loss(load_flow_model(teacher), *pairs))
    assert student_gap < 0.5 * teacher_gap


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "prior", "--problem", "gmm2d", "--kind", "one_step"], "--kind: 'one_step' is not a prior kind"),
        (["train", "sampler", "--problem", "gmm2d", "--teacher", "x"], "--teacher: only for --kind one_step"),
        (["train", "sampler", "--problem", "gmm5d", "--kind", "one_step", "--teacher", "SHIPPED_GMM2D"],
         "maps x [1] to y_dim 1, not gmm5d's x and y"),
    ],
)  # fmt: skip
def test_one_step_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, argv, message):
    from cdm_dist.problems.builtins import SHIPPED_CHECKPOINTS

    argv = [str(SHIPPED_CHECKPOINTS / "gmm2d" / "sampler") if a == "SHIPPED_GMM2D" else a for a in argv]
    out = tmp_path / "model"
    assert main([*argv, "--out", str(out), "--tiny"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_an_oracle_that_knows_x0_scores_zero_prior_loss(prediction_type):
    """The v target is v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x0: an oracle that knows x0 and answers in the scheduler's
    parameterisation has zero loss, and answering in the other one does not."""
    from cdm_dist.problems.training import new_scheduler

    alphas = new_scheduler(prediction_type).alphas_cumprod.double()
    x0 = torch.randn(1, 1, 4, 4, dtype=torch.float64).expand(64, 1, 4, 4)

    def oracle(kind):
        def model(x_t, t):
            ab = alphas[t].view(-1, 1, 1, 1)
            eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
            return eps if kind == "epsilon" else ab.sqrt() * eps - (1 - ab).sqrt() * x0

        return model

    other = "epsilon" if prediction_type == "v_prediction" else "v_prediction"
    gen = torch.Generator().manual_seed(0)
    assert float(prior_loss(oracle(prediction_type), alphas, x0, gen, prediction_type)) < 1e-20
    assert float(prior_loss(oracle(other), alphas, x0, torch.Generator().manual_seed(0), prediction_type)) > 0.1


def test_the_scribbles_generator_refuses_other_training_data(tmp_path):
    from cdm_dist.errors import InputError

    with pytest.raises(InputError, match="data: the scribbles generator"):
        train("sampler", "scribbles", tmp_path / "s", data=training_data("digits"))
    assert not (tmp_path / "s").exists()
