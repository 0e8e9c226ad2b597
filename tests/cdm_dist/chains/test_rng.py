import torch

from cdm_dist.chains.rng import ChainStreams, chain_normal, chain_uniform

MASK = (1 << 64) - 1
GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _finalize(z: int) -> int:
    z = ((z ^ (z >> 30)) * MIX1) & MASK
    z = ((z ^ (z >> 27)) * MIX2) & MASK
    return z ^ (z >> 31)


def _reference_uniforms(seed: int, stream: int, step: int, n: int) -> list[float]:
    """A second implementation with Python's unbounded integers."""
    key = _finalize((seed + GOLDEN) & MASK)
    key = _finalize(key ^ (((stream + 1) * GOLDEN) & MASK))
    key = _finalize(key ^ (((step + 1) * MIX1) & MASK))
    words = [_finalize((key + (i + 1) * GOLDEN) & MASK) for i in range(n)]
    return [((w >> 11) + 0.5) / 2**53 for w in words]


def test_uniforms_equal_a_python_integer_reference():
    seeds = torch.tensor([0, 1, 12345, 2**40 + 7])
    got = chain_uniform(seeds, stream=3, step=17, shape=(50,))
    for row, seed in zip(got, seeds.tolist(), strict=True):
        assert row.tolist() == _reference_uniforms(seed, 3, 17, 50)


def test_a_chains_stream_does_not_depend_on_its_batch():
    alone = chain_normal(torch.tensor([5]), 2, 9, (4, 3))
    batched = chain_normal(torch.tensor([1, 5, 8]), 2, 9, (4, 3))
    assert torch.equal(alone[0], batched[1])


def test_streams_steps_and_seeds_differ():
    base = chain_uniform(torch.tensor([1]), 0, 0, (8,))
    for other in (
        chain_uniform(torch.tensor([2]), 0, 0, (8,)),
        chain_uniform(torch.tensor([1]), 1, 0, (8,)),
        chain_uniform(torch.tensor([1]), 0, 1, (8,)),
    ):
        assert not torch.equal(base, other)


def test_normals_have_standard_moments():
    z = chain_normal(torch.arange(4), 0, 0, (50_000,)).flatten()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.var().item() - 1) < 5 * (2 / n) ** 0.5
    # a normal's fourth moment is 3
    assert abs((z**4).mean().item() - 3) < 0.1


def test_cached_streams_give_the_reference_numbers_inside_and_past_their_table():
    seeds = torch.tensor([0, 3, 2**40 + 7])
    streams = ChainStreams(seeds)
    streams.precompute(stream=2, steps=5)
    for stream, step in [(2, 0), (2, 4), (2, 5), (2, 90), (7, 3)]:  # in the table, past it, another stream
        uniform = streams.uniform(stream, step, (6,), torch.float64)
        for row, seed in zip(uniform, seeds.tolist(), strict=True):
            assert row.tolist() == _reference_uniforms(seed, stream, step, 6)
        normal = streams.normal(stream, step, (2, 3), torch.float32)
        assert torch.equal(normal, chain_normal(seeds, stream, step, (2, 3), torch.float32))
