import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cdm_dist.chains.targets import Target
from cdm_dist.errors import InputError


@pytest.fixture()
def samples():
    return np.random.default_rng(0).normal(size=(20, 2))


def test_loads_npy_csv_and_safetensors_alike(tmp_path, samples):
    np.save(tmp_path / "t.npy", samples)
    (tmp_path / "t.csv").write_text("y0,y1\n" + "\n".join(f"{float(a)!r},{float(b)!r}" for a, b in samples))
    save_file({"samples": torch.from_numpy(samples)}, str(tmp_path / "t.safetensors"))
    loaded = [Target.from_file(tmp_path / f"t.{ext}").samples for ext in ("npy", "csv", "safetensors")]
    for tensor in loaded:
        assert tensor.shape == (20, 2)
        torch.testing.assert_close(tensor, torch.from_numpy(samples))


def test_one_dimensional_arrays_become_columns(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(5.0))
    assert Target.from_file(tmp_path / "t.npy").samples.shape == (5, 1)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (np.array([[1.0, np.nan], [2.0, 3.0]]), "NaN or Inf"),
        (np.array([[1.0, np.inf], [2.0, 3.0]]), "NaN or Inf"),
        (np.zeros((2, 2, 2)), "must be \\(m, d_y\\)"),
        (np.zeros((1, 2)), "at least 2"),
    ],
)
def test_bad_samples_are_rejected_with_the_file_named(tmp_path, content, message):
    path = tmp_path / "bad.npy"
    np.save(path, content)
    with pytest.raises(InputError, match=message) as info:
        Target.from_file(path)
    assert "bad.npy" in str(info.value)


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(InputError, match="not found"):
        Target.from_file(tmp_path / "missing.npy")
    (tmp_path / "t.txt").write_text("1 2")
    with pytest.raises(InputError, match="unknown target format"):
        Target.from_file(tmp_path / "t.txt")
    (tmp_path / "t.csv").write_text("a,b\n1,2\n3,x\n")
    with pytest.raises(InputError, match="row 2"):
        Target.from_file(tmp_path / "t.csv")


def test_heldout_draws_fresh_samples_when_a_sampler_exists():
    def sampler(n, seed):
        return torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    target = Target.from_sampler(sampler, 10, seed=0)
    assert target.heldout(30, seed=1).shape == (30, 1)
    assert not torch.equal(target.heldout(10, seed=1), target.samples)
    assert torch.equal(Target(target.samples).heldout(30, seed=1), target.samples)


def test_a_sample_set_beyond_heldout_rows_is_subsampled_by_the_seed():
    """The held-out loss's within-target block grows as m², so a file's set is cut to HELDOUT_ROWS distinct rows."""
    from cdm_dist.chains.targets import HELDOUT_ROWS

    samples = torch.arange(2.0 * (HELDOUT_ROWS + 37)).reshape(-1, 2)  # rows tell apart by their values
    target = Target(samples)
    held = target.heldout(8, seed=3)
    assert held.shape == (HELDOUT_ROWS, 2)
    index = (held[:, 0] / 2).long()
    assert torch.equal(samples[index], held) and len(set(index.tolist())) == HELDOUT_ROWS  # distinct rows of the set
    assert index.tolist() == sorted(index.tolist())  # in their order in the set
    assert torch.equal(target.heldout(8, seed=3), held) and not torch.equal(target.heldout(8, seed=4), held)
    assert torch.equal(Target(samples[:HELDOUT_ROWS]).heldout(8, seed=3), samples[:HELDOUT_ROWS])  # all, as before
