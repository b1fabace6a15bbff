"""The peak of live tensor storage while a function runs, on any device (CPU included).

It reads the allocation timeline of PyTorch's profiler (`profile_memory=True`): each storage's
creation and destruction with its size, so the peak is of bytes held by tensors (autograd's
saved tensors included), not of the process's memory. Storages alive before the call are not
counted; the figure is the largest extra the call held at once. Meant for benchmarks and tests
(the profiler slows the call down), e.g. `bench/loss_memory.py`.
"""
from __future__ import annotations

from typing import Callable


def peak_live_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action  # the timeline's event kinds (no public name yet)

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak
