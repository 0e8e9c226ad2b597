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


def test_module_profiles_count_calls_and_the_activations_each_module_keeps_for_backward():
    from cdm_dist.chains.profiling import named_modules, profile_modules

    class Holder:  # a sampler-like object holding modules in attributes, one of them nested
        def __init__(self):
            self.first = torch.nn.Linear(3, 5)
            self.inner = type("Inner", (), {})()
            self.inner.second = torch.nn.Sequential(torch.nn.Linear(5, 2), torch.nn.Tanh())

    holder = Holder()
    modules = named_modules(holder)
    assert list(modules) == ["first", "inner.second"]
    x = torch.randn(7, 3, requires_grad=True)
    with profile_modules(modules, "cpu") as profiles:
        for _ in range(2):
            holder.inner.second(holder.first(x)).sum().backward()
    first, second = profiles["first"], profiles["inner.second"]
    assert (first.calls, second.calls) == (2, 2)
    assert first.parameters == 3 * 5 + 5 and second.parameters == 5 * 2 + 2 and first.dtype == "float32"
    # Linear keeps its input for the weight gradient: x (7 x 3 floats) once (deduplicated by storage) for `first`;
    # `second` keeps each call's (7 x 5) input and its tanh output (7 x 2)
    assert first.saved_bytes == 7 * 3 * 4
    assert second.saved_bytes == 2 * (7 * 5 + 7 * 2) * 4
    assert first.seconds > 0 and first.peak_bytes is None  # no allocator peak on the CPU
    holder.first(x)  # the hooks are gone after the block
    assert first.calls == 2
