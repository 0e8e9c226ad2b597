import math

import pytest
import torch

from cdm_dist.errors import InputError
from cdm_dist.problems.digits import (
    QUARTER_TURNS,
    angle_of,
    base_digits,
    centre_of_mass,
    centre_of_mass_centred,
    from_model_space,
    readable_rotated_batch,
    readable_turns,
    rotate,
    rotated_batch,
    target_angles,
    target_samples,
)
from cdm_dist.problems.judge import readable_quarters


def test_splits_partition_the_mnist_subset():
    train, train_labels = base_digits("train")
    held, held_labels = base_digits("heldout")
    assert len(train) + len(held) == 5000 and len(held) == 500
    assert torch.equal(held_labels.bincount(), torch.full((10,), 50))  # every 10th of 500 per class
    assert train.shape[1:] == (1, 16, 16) and held.shape[1:] == (1, 16, 16)
    assert float(train.min()) >= 0 and float(train.max()) <= 1
    assert set(held_labels.tolist()) == set(range(10)) == set(train_labels.tolist())
    with pytest.raises(InputError, match="digits split"):
        base_digits("test")


def test_padding_keeps_almost_every_digit_inside_the_rotation_disc():
    """At most 5% of any digit's ink lies outside the disc a rotation keeps, so mass is preserved up to that."""
    images, _ = base_digits("all")
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    outside = ((rows - 7.5).square() + (cols - 7.5).square()).sqrt() > 7.5  # (16, 16)
    assert float((images[:, 0] * outside).sum((1, 2)).div(images.sum((1, 2, 3))).max()) < 0.05
    theta = torch.full((len(images),), 0.7)
    mass_before, mass_after = images.sum((1, 2, 3)), rotate(images, theta).sum((1, 2, 3))
    assert torch.allclose(mass_after, mass_before, rtol=0.05)


def test_every_digit_is_centred_on_the_rotation_centre():
    """A digit's ink centre of mass is the image centre (a float64 loop), so where the ink sits does not tell its
    angle; shifting an image moves its centre by the shift."""
    images, _ = base_digits("heldout")
    for image in images[:20, 0].double():
        mass = image.sum()
        y = sum(i * float(image[i].sum()) for i in range(16)) / mass
        x = sum(j * float(image[:, j].sum()) for j in range(16)) / mass
        assert abs(x - 7.5) < 1e-4 and abs(y - 7.5) < 1e-4
    shifted = torch.roll(images[:4], shifts=(1, -2), dims=(-2, -1))  # one row down, two columns left
    moved = centre_of_mass(images[:4]) + torch.tensor([-2.0, 1.0])
    torch.testing.assert_close(centre_of_mass(shifted), moved, atol=2e-3, rtol=0)  # roll wraps the faint edge ink
    torch.testing.assert_close(
        centre_of_mass(centre_of_mass_centred(shifted)), torch.full((4, 2), 7.5), atol=1e-3, rtol=0
    )


def test_rotation_matches_rot90_and_composes():
    images, _ = base_digits("heldout")
    x = images[:8]
    quarter = torch.full((8,), math.pi / 2)
    torch.testing.assert_close(rotate(x, quarter), torch.rot90(x, 1, dims=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate(x, 2 * quarter), torch.rot90(x, 2, dims=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate(x, 4 * quarter), x, atol=1e-5, rtol=0)


def test_rotated_batch_labels_are_the_rotation_angles():
    gen = torch.Generator().manual_seed(0)
    x, y = rotated_batch(64, gen)
    assert x.shape == (64, 1, 16, 16) and y.shape == (64, 2)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(64))
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    # Undo each rotation: the image must then be one of the upright digits (nearest neighbour at ~0 distance
    # up to the double interpolation, far below the distance between different digits).
    upright = rotate(from_model_space(x), -angle_of(y))
    images, _ = base_digits("train")
    distances = torch.cdist(upright.flatten(1), images.flatten(1)).min(dim=1).values
    typical = torch.cdist(images[:64].flatten(1), images[64:128].flatten(1)).mean()
    assert float(distances.max()) < 0.35 * float(typical)


class TopRightReader(torch.nn.Module):
    """Names digit 0 at probability ~1 when an image's ink sits in its top-right quadrant; else unsure (0.1 each)."""

    def forward(self, images):
        top_right = images[:, 0, :8, 8:].sum((1, 2)) > images[:, 0].sum((1, 2)) / 2
        logits = torch.zeros(len(images), 10)
        logits[:, 0] = torch.where(top_right, 20.0, 0.0)
        return logits


def test_a_turn_is_readable_when_the_digit_turned_back_by_it_reads_as_a_digit():
    """Ink in one quadrant; the reader reads ink top right. Turned back by a quarter turn (clockwise), top left
    goes top right; by a half turn bottom left does; by three quarters (a quarter anticlockwise) bottom right does."""
    images = torch.zeros(4, 1, 16, 16)
    images[0, 0, 2:6, 2:6] = 1  # top left
    images[1, 0, 2:6, 10:14] = 1  # top right
    images[2, 0, 10:14, 2:6] = 1  # bottom left
    images[3, 0, 10:14, 10:14] = 1  # bottom right
    expected = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(readable_turns(TopRightReader(), images), expected)  # column 0, its own angle, always


def test_readable_batch_labels_are_the_rotation_plus_a_readable_turn():
    """Undo each label's angle: the image is then a training digit turned back by one of its readable turns (not
    always by none), as the MLGD-F code's training pairs."""
    x, y = readable_rotated_batch(256, torch.Generator().manual_seed(0), readable_quarters("train"))
    assert x.shape == (256, 1, 16, 16) and y.shape == (256, 2)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(256))
    upright = rotate(from_model_space(x), -angle_of(y)).flatten(1)
    images, _ = base_digits("train")
    digit, quarter = readable_quarters("train").nonzero(as_tuple=True)
    bank = rotate(images[digit], -torch.tensor(QUARTER_TURNS)[quarter]).flatten(1)  # every readable (digit, turn)
    typical = torch.cdist(images[:64].flatten(1), images[64:128].flatten(1)).mean()
    assert float(torch.cdist(upright, bank).min(1).values.max()) < 0.35 * float(typical)
    to_own_angle = torch.cdist(upright, images.flatten(1)).min(1).values  # labelled with the rotation itself
    assert 0.1 < float((to_own_angle > 0.35 * typical).float().mean()) < 0.6


def test_readable_quarters_always_keep_the_digits_own_angle():
    readable = readable_quarters("heldout")
    assert readable.shape == (500, 4) and bool(readable[:, 0].all())


def test_targets_have_the_stated_shapes_on_the_circle():
    n = 20_000
    uniform = target_angles("uniform", n, 0)
    resultant = torch.stack([torch.cos(uniform), torch.sin(uniform)]).mean(1).norm()
    assert float(resultant) < 0.02  # no preferred direction
    unimodal = target_angles("unimodal", n, 0)
    wrapped = torch.remainder(unimodal + math.pi, 2 * math.pi) - math.pi
    assert abs(float(wrapped.mean())) < 0.01 and abs(float(wrapped.std()) - 0.15) < 0.01
    bimodal = target_angles("bimodal", n, 0)
    near_pi = (bimodal - math.pi).abs() < 1.0
    assert abs(float(near_pi.float().mean()) - 0.5) < 0.02
    samples = target_samples("bimodal", 10, 3)
    assert samples.shape == (10, 2) and torch.allclose(samples.norm(dim=1), torch.ones(10, dtype=torch.float64))
    assert torch.equal(target_samples("bimodal", 10, 3), samples)
    with pytest.raises(InputError, match="digits target"):
        target_angles("trimodal", 10, 0)
