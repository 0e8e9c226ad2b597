import torch

from cdm_dist.chains.profiling import track_peak_memory


def test_cpu_peak_counts_saved_tensors_once_and_releases_them():
    x = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    with track_peak_memory("cpu") as peak:
        y = (x * x).exp()  # mul saves x (twice, same storage), exp saves its output
        y.sum().backward()
    assert peak.bytes == 2 * 1000 * 8
    with track_peak_memory("cpu") as bigger:
        z = x
        for _ in range(10):
            z = z.exp()  # every output is saved: ten buffers alive at once
        z.sum().backward()
    assert bigger.bytes == 10 * 1000 * 8
