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
