import json
import shutil

import pytest
import torch

from cdm_dist.errors import InputError
from cdm_dist.problems.judge import (
    NO_DIGIT,
    THRESHOLD,
    WEIGHTS,
    heldout_accuracy,
    judge_digits,
    load_judge,
    readable_quarters,
    reader_quality,
    shipped_judge,
    train_judge,
)

ACCURACY_FLOOR = 0.88  # held-out digits at 8 rotations, plain argmax (6 and 9 look alike turned by 180 degrees)
MERGED_FLOOR = 0.91  # the same with 6 and 9 one class
ZERO_RECALL_FLOOR = 0.95  # held-out 0s the judge calls 0, at every rotation
READER_UPRIGHT_FLOOR = 0.95  # held-out upright digits the reader names right (measured: its manifest)


@pytest.fixture(scope="module")
def judge():
    return load_judge()


def test_the_shipped_judge_names_rotated_held_out_digits_above_its_floors(judge):
    quality = heldout_accuracy(judge)
    assert quality["images"] == 500 * 8
    assert quality["accuracy"] >= ACCURACY_FLOOR and quality["accuracy_6_9_merged"] >= MERGED_FLOOR
    assert quality["zero_recall"] >= ZERO_RECALL_FLOOR
    recorded = json.loads((shipped_judge() / "manifest.json").read_text())["quality"]
    assert quality == pytest.approx(recorded, abs=1e-6)  # the manifest's numbers are this model's


def test_the_shipped_judge_is_small_and_recorded():
    folder = shipped_judge()
    assert sum(p.stat().st_size for p in folder.iterdir()) < 1_000_000
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["role"] == "judge" and manifest["threshold"] == THRESHOLD == 0.7
    assert manifest["command"].startswith("cdm train judge --problem digits")


def test_the_judge_is_blind_to_contrast_and_offset(judge):
    from cdm_dist.problems.digits import base_digits

    images = base_digits("heldout")[0][:16]
    torch.testing.assert_close(judge(0.5 * images + 0.2), judge(images), rtol=1e-4, atol=1e-4)


class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return self.logits


def test_below_the_threshold_the_judge_names_no_digit():
    p = torch.tensor([[0.75, 0.25], [0.6, 0.4], [0.1, 0.9]])  # softmax of log p is p
    logits = torch.full((3, 10), -float("inf"))
    logits[:, :2] = p.log()
    labels, confidence = judge_digits(FixedLogits(logits), torch.zeros(3, 1, 16, 16))
    assert labels == [0, NO_DIGIT, 1]
    assert confidence == pytest.approx([0.75, 0.6, 0.9])


def test_a_trained_judge_round_trips_through_its_folder(tmp_path):
    manifest = train_judge("digits", tmp_path / "judge", steps=2, progress=False)
    loaded = load_judge(tmp_path / "judge")
    assert manifest["steps"] == 2
    assert manifest["quality"] == pytest.approx(heldout_accuracy(loaded), abs=1e-6, nan_ok=True)  # no 0 said: NaN


def test_a_judge_whose_weights_changed_is_refused(tmp_path):
    folder = tmp_path / "judge"
    shutil.copytree(shipped_judge(), folder)
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[-1] ^= 1
    (folder / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"^judge: .* does not match the sha256"):
        load_judge(folder)


def test_a_judge_is_trained_for_digits_only(tmp_path):
    with pytest.raises(InputError, match=r"^--problem: a judge is trained for digits only; got 'gmm2d'"):
        train_judge("gmm2d", tmp_path / "judge", steps=1, progress=False)


def assert_reader_quality_equal(measured, recorded):
    """Reader quality dicts alike: floats to 1e-6, per-class shares to one held-out digit in 50 (a borderline
    confidence may fall either side of the line on another CPU)."""
    assert measured.keys() == recorded.keys()
    for key, value in measured.items():
        if isinstance(value, list):
            assert value == pytest.approx(recorded[key], abs=0.021), key
        else:
            assert value == pytest.approx(recorded[key], abs=1e-6, nan_ok=True), key


def test_the_shipped_reader_reads_upright_digits_and_only_0s_read_at_every_quarter_turn():
    """The digits that read as a digit at all four quarter turns, the ones a uniform angle target asks for, are
    nearly all 0s: that is what the sampler's readable labels teach it."""
    from cdm_dist.problems.digits import base_digits

    reader = load_judge(role="reader")
    quality = reader_quality(reader)
    assert quality["upright_accuracy"] >= READER_UPRIGHT_FLOOR
    manifest = json.loads((shipped_judge("reader") / "manifest.json").read_text())
    assert manifest["role"] == "reader" and manifest["command"].startswith("cdm train reader --problem digits")
    assert_reader_quality_equal(quality, manifest["quality"])
    _, labels = base_digits("train")
    every_turn = readable_quarters("train").all(1)
    assert int(every_turn.sum()) >= 20 and float((labels[every_turn] == 0).float().mean()) >= 0.75


def test_a_trained_reader_round_trips_and_is_not_taken_for_a_judge(tmp_path):
    manifest = train_judge("digits", tmp_path / "reader", steps=2, progress=False, role="reader")
    assert manifest["settings"]["rotation"] == 10.0 and manifest["threshold"] is None
    assert_reader_quality_equal(reader_quality(load_judge(tmp_path / "reader", role="reader")), manifest["quality"])
    with pytest.raises(InputError, match="not a judge checkpoint"):
        load_judge(tmp_path / "reader")
    with pytest.raises(InputError, match="role: unknown 'critic'"):
        train_judge("digits", tmp_path / "critic", steps=2, progress=False, role="critic")
