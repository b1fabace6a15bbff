"""Run a function on N gloo ranks in fresh processes: the shared helper for distributed tests.

Each rank gets a loopback rendezvous on a free port, its output tagged with its rank, and the
process group is always torn down. Return values come back to the caller in rank order, and
an exception on any rank is re-raised with that rank's traceback.
"""
from __future__ import annotations

import os
import pickle
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from parallel.dist import free_port


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      DS_ACCELERATOR="cpu")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                init_method=f"tcp://127.0.0.1:{port}")
        result = fn(rank, world, *args)
        # Plain pickle bytes: torch's queue pickler would pass tensors as shared-memory handles
        # that die with this process.
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:
        queue.put((rank, False, f"[rank {rank}] " + traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args, timeout_s: float = 300) -> list[Any]:
    """Call `fn(rank, world_size, *args)` on `world_size` gloo ranks; return results by rank.

    `fn` must be picklable (a module-level function) and so must its results.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            r, ok, payload = queue.get(timeout=timeout_s)
            if ok:
                results[r] = pickle.loads(payload)
            else:
                errors.append(payload)
                break  # other ranks may now hang on a collective; stop them
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("a distributed rank failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
