"""`cdm evaluate`: Wilson intervals, zero-shot probabilities, chunked sampling, and a tiny campaign end to end."""

import json
import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from cdm_cli.main import main
from cdm_dist.driver.campaign import load_config
from cdm_dist.driver.evaluation import (
    attribute_shares,
    draw_design,
    evaluate_campaign,
    evaluation_eta,
    matching_loss,
    wilson_interval,
    zero_shot_probs,
)
from cdm_dist.driver.runner import run_campaign
from cdm_dist.driver.store import CampaignStore
from cdm_dist.driver.tracking import client_for
from cdm_dist.driver.worker import LocalExecutor
from cdm_dist.errors import InputError
from cdm_dist.problems.registry import resolve_problem

CLASSIFIERS = """
import torch

def sign_classifier(sharpness: float = 3.0):
    def classify(y):  # (N, 1) -> (N, 2): P(y > 0), P(y <= 0)
        p = torch.sigmoid(sharpness * y[:, 0])
        return torch.stack([p, 1 - p], dim=1)
    return classify

def logits():
    return lambda y: torch.stack([y[:, 0], -y[:, 0]], dim=1)
"""
CLASSIFIER = "{factory: {factory: 'evalclf:sign_classifier', args: {sharpness: 3.0}}, classes: [up, down]}"
SOURCE = torch.tensor([[0.4]], dtype=torch.float64)  # (1, *event): the source x_src of the editing campaign


# -- the maths -------------------------------------------------------------------------------------------------


def _wilson_by_bisection(successes, n, confidence):
    """The two roots of |p̂ - p| = z sqrt(p (1 - p) / n) on either side of p̂, found by bisection in float64."""
    z, p_hat = NormalDist().inv_cdf(0.5 + confidence / 2), successes / n

    def outside(p):
        return abs(p_hat - p) - z * math.sqrt(p * (1 - p) / n)  # > 0 outside the interval

    def root(inside, far):
        if outside(far) <= 0:
            return far
        for _ in range(200):
            mid = (inside + far) / 2
            inside, far = (mid, far) if outside(mid) <= 0 else (inside, mid)
        return (inside + far) / 2

    return root(p_hat, 0.0), root(p_hat, 1.0)


CASES = [(948, 2000, 0.95), (3, 17, 0.9), (1, 5, 0.99), (0, 10, 0.95), (10, 10, 0.95), (1234, 1235, 0.8)]


@pytest.mark.parametrize(("successes", "n", "confidence"), CASES)
def test_wilson_interval_is_the_root_of_its_quadratic(successes, n, confidence):
    low, high = wilson_interval(successes, n, confidence)
    ref_low, ref_high = _wilson_by_bisection(successes, n, confidence)
    assert low == pytest.approx(ref_low, abs=1e-12) and high == pytest.approx(ref_high, abs=1e-12)
    assert low <= successes / n <= high


def test_wilson_interval_known_values():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))  # the "rule of three"-like upper bound
    with pytest.raises(ValueError):
        wilson_interval(3, 0)


def test_zero_shot_probs_equal_a_float64_loop():
    gen = torch.Generator().manual_seed(1)
    y, emb = torch.randn(7, 5, generator=gen, dtype=torch.float64), torch.randn(3, 5, generator=gen)
    probs = zero_shot_probs(y, emb, 50.0)
    for i in range(7):
        logits = [
            50.0 * float(y[i] @ emb[k].double()) / (float(y[i].norm()) * float(emb[k].double().norm()))
            for k in range(3)
        ]
        top = max(logits)
        weights = [math.exp(v - top) for v in logits]
        for k in range(3):
            assert float(probs[i, k]) == pytest.approx(weights[k] / sum(weights), rel=1e-12, abs=1e-15)


def test_shares_count_the_argmax_class():
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.8, 0.2], [0.51, 0.49]], dtype=torch.float64)
    shares = attribute_shares(probs, ["a", "b"], 0.95)
    assert shares["a"]["count"] == 3 and shares["a"]["share"] == 0.75 and shares["b"]["share"] == 0.25
    assert shares["a"]["mean_prob"] == pytest.approx(0.6525)
    assert (shares["a"]["low"], shares["a"]["high"]) == wilson_interval(3, 4, 0.95)


def test_chunked_sampling_and_loss_equal_one_call(gmm2d, small_campaign):
    loss_fn = small_campaign().method.loss.build()
    x, target = torch.tensor([[0.3]], dtype=torch.float64), gmm2d.target.heldout(150, 5)
    y_chunked, _ = draw_design(gmm2d.fast_sampler, x, 150, 7, seed=11)  # 22 calls, crossing eta blocks
    y_whole, _ = draw_design(gmm2d.fast_sampler, x, 150, 150, seed=11)
    assert torch.equal(y_chunked, y_whole) and y_whole.shape == (150, 1)
    one_call = gmm2d.fast_sampler.sample(x, evaluation_eta(11, 0, 150, (1,)).unsqueeze(0))[0]
    assert torch.equal(y_whole, one_call)
    assert matching_loss(loss_fn, y_chunked, target) == matching_loss(loss_fn, y_whole, target)
    assert evaluation_eta(11, 60, 70, (1,)).equal(evaluation_eta(11, 0, 150, (1,))[60:70])
    assert not evaluation_eta(12, 0, 9, (1,)).equal(evaluation_eta(11, 0, 9, (1,)))


class PictureSampler:
    """A stand-in for the generator: images (B, n, 1, 2, 2) = x + eta, y = their mean (its `images` and `embed`)."""

    y_dim, noise_shape, x_shape = 1, (1,), None

    def images(self, x, eta):
        return (x[:, None, :, None, None] + eta[..., None, None]).expand(*eta.shape[:2], 1, 2, 2)

    def embed(self, images):
        return images.mean((1, 2, 3))[:, None] * 2

    def sample(self, x, eta):
        return self.embed(self.images(x, eta).flatten(0, 1)).reshape(*eta.shape[:2], 1)


def test_an_image_classifier_sees_the_generated_images():
    from cdm_dist.driver.evaluation import Classifier, images_hook
    from cdm_dist.models.adapters import DecodedSampler

    seen = []

    def classify(images):  # (n, 1, 2, 2) -> (n, 2)
        seen.append(images)
        p = torch.sigmoid(images[:, 0, 0, 0])
        return torch.stack([p, 1 - p], 1)

    classifier = Classifier(["bright", "dark"], "image", classify, "test")
    x = torch.tensor([[0.25]], dtype=torch.float64)
    for sampler in (PictureSampler(), DecodedSampler(lambda z: z - 1, PictureSampler())):
        seen.clear()
        hook = images_hook(sampler, "test")
        y, probs = draw_design(sampler, x, 100, 30, 3, classifier, hook)
        assert torch.allclose(y, sampler.sample(x, evaluation_eta(3, 0, 100, (1,)).unsqueeze(0))[0], atol=1e-12)
        pictures = torch.cat(seen)  # (100, 1, 2, 2), the images behind y
        assert pictures.shape == (100, 1, 2, 2) and len(seen) == 4
        assert torch.allclose(pictures.mean((1, 2, 3))[:, None] * 2, y, atol=1e-12)
        assert torch.allclose(probs, classify(pictures).double(), rtol=0, atol=1e-15)
    with pytest.raises(InputError, match=r"image needs the generated images.*MixtureInverseCDFSampler"):
        images_hook(resolve_problem(load_config(None).problem).fast_sampler, "gmm2d")


# -- a campaign end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    """A tracked 6-chain editing campaign on gmm2d (its folder), and a module of classifiers beside it."""
    tmp = tmp_path_factory.mktemp("evaluation")
    (tmp / "evalclf.py").write_text(CLASSIFIERS)
    np.save(tmp / "source.npy", SOURCE[0].numpy())
    items = {
        "name": "edit",
        "method.num_steps": 12,
        "method.n_c": 16,
        "method.target_batch": 16,
        "method.guidance_start": 0.25,
        "method.dtype": "float64",  # compared below with a float64 computation
        "chains.count": 6,
        "chains.source": f"{{file: {tmp / 'source.npy'}, strengths: [0.5, 0.75]}}",
        "resources.micro_batch": 2,
        "resources.checkpoint_every": 6,
        "tracking.enabled": True,
        "tracking.uri": f"sqlite:///{tmp}/mlflow.db",
        "tracking.artifact_location": str(tmp / "artifacts"),
        "pictures": False,
        "topk": 3,
        "output": str(tmp / "campaigns"),
    }
    config = load_config(None, [f"{k}={v}" for k, v in items.items()])
    store = CampaignStore.create(config)
    run_campaign(config, LocalExecutor(config), store, progress=False)
    return tmp, store.root


@pytest.fixture
def with_source(campaign, monkeypatch):
    """The campaign's folder, with its classifiers importable."""
    monkeypatch.syspath_prepend(str(campaign[0]))
    return campaign[1]


def test_evaluation_equals_a_direct_computation_on_fresh_samples(with_source, tmp_path, capsys):
    folder, lines = with_source, []
    settings = [
        "evaluation.samples=600",
        "evaluation.chunk=64",
        "evaluation.seed=7",
        f"evaluation.classifier={CLASSIFIER}",
    ]
    report = evaluate_campaign(folder, settings, progress=lines.append)
    assert len(lines) == 4 and lines[0].startswith("evaluate [1/4] source: loss")  # one line per design

    # the top 3 chains by held-out loss, from the stored results
    store = CampaignStore.open(folder)
    losses = {}
    for index in range(3):
        result, _ = store.load_result(index)
        losses |= {2 * index + r: (float(result.final_loss[r]), result.x[r : r + 1]) for r in range(2)}
    best = sorted(losses, key=lambda c: losses[c][0])[:3]
    assert [r["chain"] for r in report["rows"]] == best
    assert [r["final_loss"] for r in report["rows"]] == [losses[c][0] for c in best]

    # the same figures from scratch: one sampler call per design with the evaluation's eta, a fresh target draw
    config = load_config(store.config_path)
    problem = resolve_problem(config.problem)
    sampler, loss_fn = problem.fast_sampler, config.method.loss.build()
    eta = evaluation_eta(7, 0, 600, sampler.noise_shape).unsqueeze(0)  # (1, 600, 1)
    target = problem.target.heldout(600, 7)
    classify = __import__("evalclf").sign_classifier(3.0)
    designs = [("source", SOURCE)] + [(f"chain {c}", losses[c][1]) for c in best]
    rows = [report["source"], *report["rows"]]
    source_loss = None
    for (name, x), row in zip(designs, rows, strict=True):
        y = sampler.sample(x, eta)[0]  # (600, 1)
        loss = float(loss_fn(y.unsqueeze(0), target)[0])
        assert row["design"] == name and row["mmd"] == pytest.approx(loss, rel=1e-10)
        source_loss = source_loss if source_loss is not None else loss
        if name != "source":
            assert row["improvement"] == pytest.approx((source_loss - loss) / source_loss, rel=1e-9)
        probs = classify(y)
        up = int((probs[:, 0] >= probs[:, 1]).sum())
        share = row["shares"]["up"]
        assert share["count"] == up and share["share"] == up / 600
        assert share["low"] <= share["share"] <= share["high"]
        assert row["shares"]["down"]["share"] == pytest.approx(1 - up / 600)
        assert share["mean_prob"] == pytest.approx(float(probs[:, 0].mean()), rel=1e-9)
    target_up = int((classify(target)[:, 0] >= 0.5).sum())
    assert report["target"]["shares"]["up"]["count"] == target_up and report["target"]["samples"] == 600

    # the files and MLflow
    assert json.loads((folder / "evaluation.json").read_text())["rows"] == json.loads(json.dumps(report["rows"]))
    table = (folder / "evaluation.md").read_text()
    assert "| design | final_loss | mmd | vs source | up % [95% CI] | down % [95% CI] |" in table
    assert table.count("\n| chain ") == 3 and "\n| target | - | - | - |" in table
    client, tracking = client_for(config.tracking.uri), store.load_tracking()
    chain_run = client.get_run(tracking["child_run_ids"][str(best[0])])
    assert chain_run.data.metrics["eval/mmd"] == pytest.approx(report["rows"][0]["mmd"])
    assert chain_run.data.metrics["eval/share/up"] == report["rows"][0]["shares"]["up"]["share"]
    parent = client.get_run(tracking["parent_run_id"])
    assert parent.data.metrics["eval/source/mmd"] == pytest.approx(report["source"]["mmd"])
    assert parent.data.metrics["eval/best/improvement"] == pytest.approx(report["rows"][0]["improvement"])
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id, "evaluation")]
    assert sorted(artifacts) == ["evaluation/evaluation.json", "evaluation/evaluation.md"]

    # `cdm topk` shows the evaluated chains' figures
    out = tmp_path / "topk.json"
    assert main(["topk", "-k", "3", "--tracking-uri", config.tracking.uri, "--json", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = lines[0].split()
    assert header[:2] == ["rank", "final_loss"] and {"eval/mmd", "eval/improvement"} <= set(header)
    topk = json.loads(out.read_text())["rows"]
    assert [r["eval/mmd"] for r in topk] == pytest.approx([r["mmd"] for r in report["rows"]])
    assert lines[1].split()[header.index("eval/improvement")] == f"{report['rows'][0]['improvement'] * 100:+.1f}%"


def test_cdm_evaluate_prints_the_table(with_source, tmp_path, capsys):
    out = tmp_path / "eval.json"
    settings = ["evaluation.samples=200", "evaluation.topk=2", "tracking.enabled=false"]
    args = ["evaluate", str(with_source), "--json", str(out), *(f"--set={s}" for s in settings)]
    assert main([*args, f"--set=evaluation.classifier={CLASSIFIER}"]) == 0
    printed = capsys.readouterr()
    lines = printed.out.strip().splitlines()
    assert lines[0].startswith("campaign edit: mmd on 200 fresh samples per design")
    assert lines[1].split()[:4] == ["design", "final_loss", "mmd", "vs"] and "up % [95% CI]" in lines[1]
    assert [line.split()[0] for line in lines[2:]] == ["source", "chain", "chain", "target"]
    assert printed.err.count("evaluate [") == 3
    report = json.loads(out.read_text())
    assert len(report["rows"]) == 2 and report["mlflow"] is None

    assert main(args) == 0  # no classifier: the losses only
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].split() == ["design", "final_loss", "mmd", "vs", "source"] and len(lines) == 5


def _one_error_line(args, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_input_is_one_line_naming_the_field_or_file(with_source, tmp_path, capsys, small_campaign):
    from safetensors.torch import save_file

    folder = str(with_source)
    assert "not a campaign folder (no config.yaml)" in _one_error_line(["evaluate", str(tmp_path)], capsys)

    unfinished = CampaignStore.create(small_campaign()).root
    assert "has no finished results yet" in _one_error_line(["evaluate", str(unfinished)], capsys)

    wide = tmp_path / "classes.safetensors"
    save_file({"embeddings": torch.randn(2, 3)}, str(wide))
    zero_shot = f"--set=evaluation.classifier={{zero_shot: {wide}, classes: [a, b]}}"
    line = _one_error_line(["evaluate", folder, zero_shot], capsys)
    assert f"{wide}: class embeddings have width 3 but the sampler's y has y_dim = 1" in line

    missing = f"--set=evaluation.classifier={{zero_shot: {tmp_path / 'nope.safetensors'}, classes: [a, b]}}"
    line = _one_error_line(["evaluate", folder, missing], capsys)
    assert "evaluation.classifier.zero_shot" in line and "nope.safetensors is not a file" in line

    line = _one_error_line(["evaluate", folder, "--set=method.n_c=4"], capsys)
    assert "--set method.n_c: evaluate reads the campaign as it ran" in line

    image = "--set=evaluation.classifier={factory: {factory: 'evalclf:sign_classifier'}, input: image, classes: [a, b]}"
    line = _one_error_line(["evaluate", folder, image], capsys)
    assert "evaluation.classifier.input: image needs the generated images" in line

    raw = "--set=evaluation.classifier={factory: {factory: 'evalclf:logits'}, classes: [a, b]}"
    line = _one_error_line(["evaluate", folder, raw, "--set=evaluation.samples=50"], capsys)
    assert "evaluation.classifier.factory: evalclf:logits (y) gave values that are not class probabilities" in line

    with pytest.raises(InputError, match="no finished results"):
        evaluate_campaign(unfinished)
