"""Run a function on N gloo ranks: the shared helper for distributed tests and benchmarks.

`run_distributed(fn, N, *args)` calls `fn(rank, N, *args)` on N ranks, each with a gloo process
group on a loopback rendezvous, and returns the results in rank order; an exception on any rank
is re-raised with that rank's traceback.

By default every call starts N fresh processes (about 2 s each on a small CPU machine, most of it
importing torch and DeepSpeed). With `reuse=True`, or MOEFORGE_REUSE_RANKS=1 in the environment
(the test suite sets it), the N processes are kept between calls (`RankPool`) and each call gets
what a fresh process would have: the caller's environment, a new process group (torn down after
the call, sub-groups included), torch's default RNG seed, one intra-op thread, float32 default
dtype and DeepSpeed's communication and group state reset. A call that failed on every rank and
left no thread running keeps the pool (an injected fault, an expected error); one that timed out,
failed on some ranks only or left a thread behind stops it, and the next call starts a new one.
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
    from parallel import dist as pdist

    try:
        pdist.init_process_group("gloo", rank, world, f"tcp://127.0.0.1:{port}")
        # Plain pickle bytes: torch's queue pickler would pass tensors as shared-memory handles
        # that die with this process (or are reused by its next call).
        return True, pickle.dumps(fn(rank, world, *args))
    except BaseException:
        return False, f"[rank {rank}] " + traceback.format_exc()
    finally:
        pdist.destroy_process_group()  # every group, sub-groups included


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, queue) -> None:
    """A one-call rank process."""
    os.environ.update(_rank_env(rank, world, port))
    import torch

    torch.set_num_threads(1)
    ok, payload = _call(rank, world, port, fn, args)
    queue.put((rank, ok, payload, True))


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


def _leftover_threads(before: set) -> list:
    """Threads a failed call left running (given a moment to end): a rank with any is not reused."""
    import threading

    extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    for t in extra:
        t.join(timeout=1.0)
    return [t for t in extra if t.is_alive()]


def _serve(rank: int, world: int, tasks, results) -> None:
    """A kept rank process: run each call sent on `tasks` until None arrives. Each answer says
    whether the rank is fit for another call (a failed call must leave no thread behind)."""
    import threading

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
        before = set(threading.enumerate())
        try:
            fn, args = pickle.loads(payload)
        except BaseException:
            results.put((call_id, rank, False, f"[rank {rank}] " + traceback.format_exc(), True))
            continue
        ok, out = _call(rank, world, port, fn, args)
        results.put((call_id, rank, ok, out, ok or not _leftover_threads(before)))


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
        self.fit = True  # whether the ranks can take another call

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def run(self, fn: Callable, args: tuple, timeout_s: float) -> list[Any]:
        """`fn` on every rank; raises as `run_distributed` does. `self.fit` says afterwards whether
        the ranks can take another call: every rank answered (a failure on one rank may leave the
        others stuck in a collective) and none left a thread running."""
        self.calls += 1
        call_id, port = self.calls, free_port()
        payload = pickle.dumps((fn, args))  # fails here, in the caller, if fn is not picklable
        env = dict(os.environ)
        self.fit = False
        for q in self.tasks:
            q.put((call_id, port, env, payload))
        answers = _collect(self.results, self.world, timeout_s, call_id)
        self.fit = all(a[2] for a in answers.values())
        return _results(answers, self.world)

    def stop(self, graceful: bool = True) -> None:
        if graceful and self.alive():
            for q in self.tasks:
                q.put(None)
        for p in self.procs:
            p.join(timeout=5 if graceful else 0)
            if p.is_alive():
                p.kill()
                p.join()


# after a rank's failure, how long the other ranks get to answer before the call is given up
FAILURE_GRACE_S = 20.0


def _collect(queue, world: int, timeout_s: float, call_id: Optional[int] = None) -> dict[int, tuple]:
    """rank -> (ok, payload, fit) for every rank that answered. Raises TimeoutError when no rank
    failed and one did not answer in time; after a failure, waits FAILURE_GRACE_S at most for the
    rest (they may be stuck in a collective with the failed rank)."""
    import queue as queue_mod
    import time

    answers: dict[int, tuple] = {}
    deadline = time.monotonic() + timeout_s
    while len(answers) < world:
        left = deadline - time.monotonic()
        if left <= 0:
            if any(not a[0] for a in answers.values()):
                break
            raise TimeoutError(f"a distributed call did not finish within {timeout_s:.0f} s "
                               f"({len(answers)} of {world} ranks answered)")
        try:
            msg = queue.get(timeout=left)
        except queue_mod.Empty:
            continue
        if call_id is not None:
            got_id, *msg = msg
            if got_id != call_id:
                continue  # a late answer to an earlier, abandoned call
        r, ok, payload, *fit = msg
        answers[r] = (ok, payload, fit[0] if fit else False)
        if not ok:
            deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
    return answers


def _results(answers: dict[int, tuple], world: int) -> list[Any]:
    """The results in rank order, or the first failed rank's traceback raised."""
    failed = [answers[r][1] for r in sorted(answers) if not answers[r][0]]
    if failed:
        raise RuntimeError("a distributed rank failed:\n" + failed[0])
    if len(answers) < world:
        raise RuntimeError(f"only {len(answers)} of {world} ranks answered")
    return [pickle.loads(answers[r][1]) for r in range(world)]


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
        finally:
            if not pool.fit:  # ranks stuck in a collective or a half-finished call: start over
                _POOLS.pop(world_size, None)
                pool.stop(graceful=False)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    failed = True  # until every rank answered: other ranks may hang on a collective; stop them
    try:
        answers = _collect(queue, world_size, timeout_s)
        failed = len(answers) < world_size or not all(a[0] for a in answers.values())
        return _results(answers, world_size)
    finally:
        for p in procs:
            p.join(timeout=5 if failed else 30)
            if p.is_alive():
                p.kill()
                p.join()
