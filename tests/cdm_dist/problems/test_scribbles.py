"""The scribbles problem (MLGD-F paper, Exp. 2 at small scale): its shape maths against loops, the attributes read
back off the pixels, the energy score against a float64 loop, and the shipped models measured against the
probabilities their training data was drawn with."""

import math

import numpy as np
import pytest
import torch

from cdm_dist.problems import scribbles as S
from cdm_dist.problems.builtins import SHIPPED_CHECKPOINTS
from cdm_dist.problems.scribbles_training import energy_score

SHIPPED = SHIPPED_CHECKPOINTS / "scribbles"


def _features_by_loops(image: np.ndarray) -> tuple[float, float]:
    """Ink fraction and aspect of one scribble (H, W) in [-1, 1], pixel by pixel in float64."""
    h, w = image.shape
    ink = [[min(max((image[r, c] + 1) / 2, 0.0), 1.0) for c in range(w)] for r in range(h)]
    mass = sum(sum(row) for row in ink) + 1e-6
    mx = sum(ink[r][c] * (c + 0.5) for r in range(h) for c in range(w)) / mass
    my = sum(ink[r][c] * (r + 0.5) for r in range(h) for c in range(w)) / mass
    vx = sum(ink[r][c] * (c + 0.5 - mx) ** 2 for r in range(h) for c in range(w)) / mass
    vy = sum(ink[r][c] * (r + 0.5 - my) ** 2 for r in range(h) for c in range(w)) / mass
    return mass / (h * w), 0.5 * math.log((vx + 0.5) / (vy + 0.5))


def test_shape_features_equal_a_pixel_loop():
    x = S.draw_scribbles(4, torch.Generator().manual_seed(0)).double()
    features = S.shape_features(x)
    for i in range(4):
        ink, aspect = _features_by_loops(x[i, 0].numpy())
        assert features["ink"][i].item() == pytest.approx(ink, rel=1e-9)
        assert features["aspect"][i].item() == pytest.approx(aspect, rel=1e-9, abs=1e-12)


def test_a_wider_drawing_is_more_likely_red_and_more_ink_more_likely_dark():
    x = S.source_scribble()
    wide = x.transpose(-1, -2)  # the tall loop turned on its side
    assert S.attribute_probabilities(x)["red"] < 0.02 < 0.98 < S.attribute_probabilities(wide)["red"]
    assert S.attribute_probabilities(wide)["red"].item() == pytest.approx(
        1 - S.attribute_probabilities(x)["red"].item()
    )
    thick = torch.maximum(x, torch.roll(x, 1, dims=-1))  # the same loop drawn with a wider pen
    assert S.attribute_probabilities(thick)["dark"] > S.attribute_probabilities(x)["dark"]


def test_the_pixel_judge_reads_back_the_rendered_attributes():
    gen = torch.Generator().manual_seed(1)
    x = S.draw_scribbles(200, gen)
    red, dark = torch.rand(200, generator=gen) < 0.5, torch.rand(200, generator=gen) < 0.5
    seen = S.image_attributes(S.render(x, red, dark))
    assert torch.equal(seen["red"], red) and torch.equal(seen["dark"], dark)


def test_scribbles_are_drawn_with_spread_shapes():
    """The prior's data covers both colours and both backgrounds, so every target is in reach."""
    p = S.attribute_probabilities(S.draw_scribbles(2000, torch.Generator().manual_seed(2)))
    for name in ("red", "dark"):
        assert (p[name] < 0.1).float().mean() > 0.1 and (p[name] > 0.9).float().mean() > 0.1


def test_energy_score_equals_a_float64_loop():
    gen = torch.Generator().manual_seed(3)
    g, d = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64), torch.randn(2, 3, 5, generator=gen,
                                                                                 dtype=torch.float64)  # fmt: skip
    expected = 0.0
    for s in range(2):
        cross = sum(float((g[s, i] - d[s, j]).norm()) for i in range(4) for j in range(3)) / 12
        within = sum(float((g[s, i] - g[s, k]).norm()) for i in range(4) for k in range(4) if i != k) / 12
        expected += (cross - 0.5 * within) / 2
    assert energy_score(g, d).item() == pytest.approx(expected, rel=1e-6)


def test_energy_score_prefers_the_right_mixture_to_its_mean():
    """The score is proper: samples with the data's 25/75 mix score better than the mean image or a 50/50 mix."""
    a, b = torch.zeros(8), torch.ones(8) * 2
    data = torch.stack([a] * 250 + [b] * 750)[None]

    def mix(k):
        return torch.stack([a] * k + [b] * (1000 - k))[None]

    right = energy_score(mix(250), data)
    assert right < energy_score(mix(500), data)
    assert right < energy_score((0.25 * a + 0.75 * b).expand(1, 1000, 8), data)


def test_target_references_have_the_wanted_mix():
    gen = torch.Generator().manual_seed(4)
    colour = S.attribute_probabilities(S.reference_scribbles("colour_interpolation", 400, gen))
    counts = torch.histc(colour["red"], bins=10, min=0, max=1)
    assert torch.equal(counts, torch.full((10,), 40.0)) and (colour["dark"] < S.LIGHT_ONLY).all()
    background = S.attribute_probabilities(S.reference_scribbles("background_interpolation", 400, gen))
    assert torch.equal(torch.histc(background["dark"], bins=10, min=0, max=1), torch.full((10,), 40.0))
    assert (background["red"] < S.BLUE_ONLY).all()
    with pytest.raises(Exception, match="unknown 'bogus'"):
        S.check_target("bogus")


# -- the shipped models -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generator():
    return S.load_generator(SHIPPED)


@torch.no_grad()
def test_shipped_generator_draws_attributes_at_the_training_probabilities(generator):
    """Per held-out scribble, the share of red and of dark images (read off the pixels, not by the embedding) is
    the probability the training data drew them with."""
    gen = torch.Generator().manual_seed(5)
    x = S.draw_scribbles(24, gen).double()
    p = S.attribute_probabilities(x)
    eta = torch.randn(24, 128, *generator.noise_shape, generator=gen, dtype=torch.float64)
    _, images = generator.sample_with_images(x, eta)
    seen = S.image_attributes(images.flatten(0, 1).float())
    red, dark = (seen[k].double().view(24, 128).mean(1) for k in ("red", "dark"))
    assert (red - p["red"]).abs().mean() < 0.07 and (dark - p["dark"]).abs().mean() < 0.07
    # and the images are renders, not blends: close to the render of the attributes they show
    clean = S.render(x.repeat_interleave(128, 0).float(), seen["red"], seen["dark"])
    assert (images.flatten(0, 1).float() - clean).square().flatten(1).mean(1).sqrt().median() < 0.2


@torch.no_grad()
def test_shipped_embedding_classifies_generated_images_as_their_pixels_do(generator):
    from safetensors.torch import load_file

    from cdm_dist.driver.evaluation import zero_shot_probs

    gen = torch.Generator().manual_seed(6)
    x = S.draw_scribbles(32, gen).double()
    y, images = generator.sample_with_images(x, torch.randn(32, 16, *generator.noise_shape, generator=gen,
                                                            dtype=torch.float64))  # fmt: skip
    seen = S.image_attributes(images.flatten(0, 1).float())
    for attribute, first in (("colour", "red"), ("background", "dark")):
        classes = load_file(str(SHIPPED / "sampler" / f"classes_{attribute}.safetensors"))
        probs = zero_shot_probs(y.flatten(0, 1).float(), classes["embeddings"], float(classes["logit_scale"]))
        assert ((probs[:, 0] > 0.5) == seen[first]).float().mean() > 0.97


def test_skewed_target_is_a_quarter_red_and_balanced_half(generator):
    from safetensors.torch import load_file

    from cdm_dist.driver.evaluation import zero_shot_probs

    classes = load_file(str(SHIPPED / "sampler" / "classes_colour.safetensors"))
    for name, share in (("skewed", 0.25), ("balanced", 0.5)):
        y = S.target_embeddings(generator, name, 200, 9, classes["embeddings"])  # stratified by the classifier
        probs = zero_shot_probs(y.float(), classes["embeddings"], float(classes["logit_scale"]))
        assert (probs[:, 0] > 0.5).float().mean().item() == share
        y = S.target_embeddings(generator, name, 200, 9)  # stratified by the pixels: nearly the same shares
        probs = zero_shot_probs(y.float(), classes["embeddings"], float(classes["logit_scale"]))
        assert (probs[:, 0] > 0.5).float().mean().item() == pytest.approx(share, abs=0.04)


def test_the_source_comes_out_blue(generator):
    x = S.source_scribble().double()
    eta = torch.randn(1, 400, *generator.noise_shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    _, images = generator.sample_with_images(x, eta)
    assert S.image_attributes(images[0].float())["red"].float().mean() < 0.1


@torch.no_grad()
def test_shipped_prior_draws_scribbles_like_the_data():
    """DDIM samples of the prior against fresh procedural scribbles: ink fraction and the spread of aspects."""
    from cdm_dist.chains.diffusion import ddim_sample
    from cdm_dist.models.learned import load_prior

    prior = load_prior(SHIPPED / "prior")
    gen = torch.Generator().manual_seed(8)
    z = torch.randn(96, 1, S.SIZE, S.SIZE, generator=gen, dtype=torch.float64)
    samples = ddim_sample(prior.predict_noise, z, prior.schedule(25)).float()
    data = S.draw_scribbles(96, gen)
    ours, theirs = S.shape_features(samples), S.shape_features(data)
    assert float(ours["ink"].median()) == pytest.approx(float(theirs["ink"].median()), rel=0.3)
    assert float(ours["aspect"].std()) == pytest.approx(float(theirs["aspect"].std()), rel=0.35)
    assert (samples.abs() <= 1.2).float().mean() > 0.99  # pixels stay in the data's range


def test_a_pixel_generator_has_no_vae_and_its_samples_are_differentiable_in_x(generator):
    """The shipped generator works in pixels (no vae/); d y / d x matches a central finite difference (float64)."""
    assert generator.vae is None and generator.image_shape == (3, S.IMAGE_SIZE, S.IMAGE_SIZE)
    gen = torch.Generator().manual_seed(10)
    x = S.draw_scribbles(2, gen).double().requires_grad_(True)
    eta = torch.randn(2, 3, *generator.noise_shape, generator=gen, dtype=torch.float64)
    weights = torch.randn(2, 3, S.EMBED_DIM, generator=gen, dtype=torch.float64)
    generator.unet.double(), generator.controlnet.double(), generator.embed.function.double()
    try:
        (grad,) = torch.autograd.grad((generator.sample(x, eta) * weights).sum(), x)
        direction = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        h = 1e-5
        with torch.no_grad():
            plus = (generator.sample(x + h * direction, eta) * weights).sum()
            minus = (generator.sample(x - h * direction, eta) * weights).sum()
        assert (grad * direction).sum().item() == pytest.approx(((plus - minus) / (2 * h)).item(), rel=1e-5)
    finally:
        generator.unet.float(), generator.controlnet.float(), generator.embed.function.float()


def test_a_sampler_worker_of_the_named_problem_knows_x_shape():
    """Split placement: the sampler's actor has no prior, so x's shape comes from the recipe's prior spec."""
    from cdm_dist.driver.campaign import load_config
    from cdm_dist.driver.worker import ChainWorker

    config = load_config(None, ["problem.name=scribbles", "resources.executor=local", "tracking.enabled=false"])
    worker = ChainWorker(config, "sampler")
    assert worker.problem.part_spec("prior").diffusers == str(SHIPPED / "prior")
    assert worker.event_shape == (1, S.SIZE, S.SIZE) and worker.problem.built["prior"] == 0
