"""Peak memory of a piece of work: CUDA's allocator peak, or on CPU the peak bytes held by autograd graphs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class PeakMemory:
    """Peak bytes and how they were measured."""

    bytes: int = 0
    method: str = ""

    @property
    def mb(self) -> float:
        return self.bytes / 2**20


@contextmanager
def track_peak_memory(device: torch.device | str) -> Iterator[PeakMemory]:
    """On CUDA: torch.cuda.max_memory_allocated above the start. On CPU: the peak total size of tensors saved
    for backward (deduplicated by storage), the memory that separates backprop through a full chain from a one-step
    sampler; temporaries outside autograd graphs are not counted there."""
    result = PeakMemory()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        result.method = "cuda_max_memory_allocated"
        yield result
        torch.cuda.synchronize(device)
        result.bytes = torch.cuda.max_memory_allocated(device) - start
        return

    live: dict[int, list[int]] = {}  # storage pointer -> [refcount, bytes]
    total = [0]

    class Saved:
        def __init__(self, tensor: torch.Tensor) -> None:
            self.tensor = tensor
            storage = tensor.untyped_storage()
            self.key = storage.data_ptr()
            entry = live.setdefault(self.key, [0, storage.nbytes()])
            if entry[0] == 0:
                total[0] += entry[1]
                result.bytes = max(result.bytes, total[0])
            entry[0] += 1

        def __del__(self) -> None:
            entry = live.get(self.key)
            if entry is None:
                return
            entry[0] -= 1
            if entry[0] == 0:
                total[0] -= entry[1]
                del live[self.key]

    result.method = "cpu_autograd_saved_tensors"
    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda saved: saved.tensor):
        yield result


@dataclass
class ModuleProfile:
    """One module's share of a piece of work: forward calls and seconds (checkpointed recomputation included), the
    activations its forwards left for backward, and on CUDA the allocator's peak above the start of a forward."""

    parameters: int = 0
    dtype: str = ""
    calls: int = 0
    seconds: float = 0.0
    saved_bytes: int = 0
    peak_bytes: int | None = None

    def to_json(self) -> dict[str, object]:
        mb = None if self.peak_bytes is None else self.peak_bytes / 2**20
        return {"parameters": self.parameters, "dtype": self.dtype, "calls": self.calls,
                "forward_seconds": self.seconds, "saved_mb": self.saved_bytes / 2**20, "peak_mb": mb}  # fmt: skip


@contextmanager
def profile_modules(
    modules: dict[str, torch.nn.Module], device: torch.device | str
) -> Iterator[dict[str, ModuleProfile]]:
    """Per named module (e.g. a generator's unet, controlnet, vae, embed): time, calls and memory of the work inside
    (forward hooks; saved-tensor hooks attribute activations kept for backward to the module running)."""
    import time

    device = torch.device(device)
    cuda = device.type == "cuda"
    profiles = {}
    for name, module in modules.items():
        params = list(module.parameters())
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
        profiles[name] = ModuleProfile(sum(p.numel() for p in params), "/".join(dtypes), peak_bytes=0 if cuda else None)
    running: list[tuple[str, float, int]] = []  # (name, start time, allocated at start)
    # storages counted once; weights are not activations
    seen = {p.untyped_storage().data_ptr() for module in modules.values() for p in module.parameters()}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def before(name: str) -> object:
        def hook(module: torch.nn.Module, args: object) -> None:
            sync()
            base = 0
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            running.append((name, time.perf_counter(), base))

        return hook

    def after(name: str) -> object:
        def hook(module: torch.nn.Module, args: object, output: object) -> None:
            sync()
            started, base = next((t, b) for n, t, b in reversed(running) if n == name)
            profile = profiles[name]
            profile.calls += 1
            profile.seconds += time.perf_counter() - started
            if cuda:
                profile.peak_bytes = max(profile.peak_bytes or 0, torch.cuda.max_memory_allocated(device) - base)
            index = max(i for i, (n, _, _) in enumerate(running) if n == name)
            running.pop(index)

        return hook

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if running:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                profiles[running[-1][0]].saved_bytes += storage.nbytes()
        return tensor

    handles = []
    for name, module in modules.items():
        # an autoencoder is used through decode(): time its decoder (the part a sampler runs)
        decoder = getattr(module, "decoder", None) if hasattr(module, "decode") else None
        hooked = decoder if isinstance(decoder, torch.nn.Module) else module
        handles.append(hooked.register_forward_pre_hook(before(name)))
        handles.append(hooked.register_forward_hook(after(name)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield profiles
    finally:
        for handle in handles:
            handle.remove()


def named_modules(obj: object, depth: int = 3, prefix: str = "") -> dict[str, torch.nn.Module]:
    """The torch modules an object holds in its attributes (nested objects up to `depth`), by attribute path, the
    outermost only: e.g. a decoded generator sampler's {'decoder.vae', 'inner.unet', 'inner.controlnet', ...}."""
    if isinstance(obj, torch.nn.Module):
        return {prefix or type(obj).__name__: obj}
    found: dict[str, torch.nn.Module] = {}
    if depth == 0 or not hasattr(obj, "__dict__"):
        return found
    for key, value in vars(obj).items():
        if key.startswith("_") or not (isinstance(value, torch.nn.Module) or hasattr(value, "__dict__")):
            continue
        if isinstance(value, type | torch.Tensor):
            continue
        for name, module in named_modules(value, depth - 1, f"{prefix}.{key}" if prefix else key).items():
            if all(module is not m for m in found.values()):
                found[name] = module
    return found
