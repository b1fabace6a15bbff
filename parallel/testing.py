"""Run a function on N gloo ranks: the shared helper for distributed tests and benchmarks.

`run_distributed(fn, N, *args)` calls `fn(rank, N, *args)` on N ranks, each with a gloo process
group on a loopback rendezvous, and returns the results in rank order; an exception on any rank
is re-raised with that rank's traceback.

By default every call starts N fresh processes (about 2 s each on a small CPU machine, most of it
importing torch and DeepSpeed). With `reuse=True`, or MOEFORGE_REUSE_RANKS=1 in the environment
(the test suite sets it), the N processes are kept between calls (`RankPool`) and each call gets
what a fresh process would have: the caller's environment, a new process group (torn down after
the call, sub-groups included), torch's default RNG seed, one intra-op thread, float32 default
dtype and DeepSpeed's communication and group state reset. A pool whose call failed or timed out
is stopped (its ranks may be stuck in a collective) and the next call starts a new one.
"""
from __future__ import annotations

import atexit
import os
import pickle
import traceback
from typing import Any, Callable, Optional

import torch.multiprocessing as mp

from parallel.dist import free_port

REUSE_ENV = "MOEFORGE_REUSE_RANKS"
# torch's default CPU generator seed in a new process (`torch.initial_seed()` before any seeding)
_TORCH_DEFAULT_SEED = 67280421310721
# kept ranks over all pools; the least recently used pools are stopped beyond it
MAX_POOLED_RANKS = 15


def _rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    return dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")


def _call(rank: int, world: int, port: int, fn: Callable, args: tuple) -> tuple[bool, Any]:
    """One call on this rank inside a new process group; (ok, pickled result or traceback)."""
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
        # Plain pickle bytes: torch's queue pickler would pass tensors as shared-memory handles
        # that die with this process (or are reused by its next call).
        return True, pickle.dumps(fn(rank, world, *args))
    except BaseException:
        return False, f"[rank {rank}] " + traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()  # every group, sub-groups included


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, queue) -> None:
    """A one-call rank process."""
    os.environ.update(_rank_env(rank, world, port))
    import torch

    torch.set_num_threads(1)
    ok, payload = _call(rank, world, port, fn, args)
    queue.put((rank, ok, payload))


def _reset_process_state() -> None:
    """What a new process would start with, for the state our tests and DeepSpeed touch."""
    import sys

    import torch

    torch.manual_seed(_TORCH_DEFAULT_SEED)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    torch.set_grad_enabled(True)
    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is not None:
        comm.cdb = None  # its backend object wraps the process group just destroyed
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:  # cached expert/data groups belong to the destroyed process group
        for name, value in vars(groups).items():
            if name.startswith("_") and name.isupper() and isinstance(value, dict):
                value.clear()
        for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_ALL_TO_ALL_GROUP",
                     "_TENSOR_MODEL_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP"):
            if hasattr(groups, name):
                setattr(groups, name, None)


def _serve(rank: int, world: int, tasks, results) -> None:
    """A kept rank process: run each call sent on `tasks` until None arrives."""
    import torch

    torch.set_num_threads(1)
    while True:
        msg = tasks.get()
        if msg is None:
            return
        call_id, port, env, payload = msg
        os.environ.clear()
        os.environ.update(env)
        os.environ.update(_rank_env(rank, world, port))
        _reset_process_state()
        try:
            fn, args = pickle.loads(payload)
        except BaseException:
            results.put((call_id, rank, False, f"[rank {rank}] " + traceback.format_exc()))
            continue
        ok, out = _call(rank, world, port, fn, args)
        results.put((call_id, rank, ok, out))


class RankPool:
    """`world` kept rank processes that run one `run_distributed` call after another."""

    def __init__(self, world: int):
        ctx = mp.get_context("spawn")
        self.world = world
        self.results = ctx.Queue()
        self.tasks = [ctx.SimpleQueue() for _ in range(world)]
        self.procs = [ctx.Process(target=_serve, args=(r, world, self.tasks[r], self.results), daemon=True,
                                  name=f"moeforge-rank{r}of{world}") for r in range(world)]
        for p in self.procs:
            p.start()
        self.calls = 0

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def run(self, fn: Callable, args: tuple, timeout_s: float) -> list[Any]:
        self.calls += 1
        call_id, port = self.calls, free_port()
        payload = pickle.dumps((fn, args))  # fails here, in the caller, if fn is not picklable
        env = dict(os.environ)
        for q in self.tasks:
            q.put((call_id, port, env, payload))
        return _collect(self.results, self.world, timeout_s, call_id)

    def stop(self, graceful: bool = True) -> None:
        if graceful and self.alive():
            for q in self.tasks:
                q.put(None)
        for p in self.procs:
            p.join(timeout=5 if graceful else 0)
            if p.is_alive():
                p.kill()
                p.join()


def _collect(queue, world: int, timeout_s: float, call_id: Optional[int] = None) -> list[Any]:
    """Every rank's result, in rank order; the first failure or a timeout raises."""
    import queue as queue_mod

    results: dict[int, Any] = {}
    while len(results) < world:
        try:
            msg = queue.get(timeout=timeout_s)
        except queue_mod.Empty:
            raise TimeoutError(f"a distributed call did not finish within {timeout_s:.0f} s "
                               f"({len(results)} of {world} ranks answered)") from None
        if call_id is not None:
            got_id, *msg = msg
            if got_id != call_id:
                continue  # a late answer to an earlier, abandoned call
        r, ok, payload = msg
        if not ok:
            raise RuntimeError("a distributed rank failed:\n" + payload)
        results[r] = pickle.loads(payload)
    return [results[r] for r in range(world)]


_POOLS: dict[int, RankPool] = {}


def _pool(world: int) -> RankPool:
    pool = _POOLS.pop(world, None)
    if pool is not None and not pool.alive():
        pool.stop(graceful=False)
        pool = None
    while pool is None and _POOLS and sum(p.world for p in _POOLS.values()) + world > MAX_POOLED_RANKS:
        _POOLS.pop(next(iter(_POOLS))).stop()  # least recently used first
    _POOLS[world] = pool or RankPool(world)  # (re)inserted last: most recently used
    return _POOLS[world]


def stop_pools() -> None:
    """Stop every kept rank process (also done at exit)."""
    while _POOLS:
        _POOLS.popitem()[1].stop()


atexit.register(stop_pools)


def run_distributed(fn: Callable[..., Any], world_size: int, *args, timeout_s: float = 300,
                    reuse: Optional[bool] = None) -> list[Any]:
    """Call `fn(rank, world_size, *args)` on `world_size` gloo ranks; return results by rank.

    `fn` must be picklable (a module-level function) and so must its results. `reuse` (default:
    MOEFORGE_REUSE_RANKS) runs it on kept processes instead of new ones (module docstring).
    """
    if reuse is None:
        reuse = os.environ.get(REUSE_ENV, "") not in ("", "0")
    if reuse:
        pool = _pool(world_size)
        try:
            return pool.run(fn, args, timeout_s)
        except BaseException:
            # Other ranks may be stuck in a collective or hold a half-finished call: start over.
            _POOLS.pop(world_size, None)
            pool.stop(graceful=False)
            raise
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    failed = False
    try:
        return _collect(queue, world_size, timeout_s)
    except BaseException:
        failed = True  # other ranks may now hang on a collective; stop them
        raise
    finally:
        for p in procs:
            p.join(timeout=5 if failed else 30)
            if p.is_alive():
                p.kill()
                p.join()
