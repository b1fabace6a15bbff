"""Thin helpers over torch.distributed that also work in a single, non-distributed process."""
from __future__ import annotations

import os
import socket
import sys
import time

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (returns a new tensor; the input is left unchanged)."""
    out = t.detach().clone()
    if is_dist():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    out = t.detach().clone()
    if is_dist():
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (itself without a process group)."""
    if not is_dist():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def resolve_backend(requested: str, use_gpu: bool) -> str:
    if requested != "auto":
        return requested
    return "nccl" if use_gpu and torch.cuda.is_available() else "gloo"


STARTUP_TRACE_ENV = "MOEFORGE_STARTUP_TRACE"
TRACE_PREFIX = "[startup-trace]"


def startup_trace(label: str, at: float | None = None) -> None:
    """With MOEFORGE_STARTUP_TRACE set, one line `[startup-trace] LABEL EPOCH_SECONDS` on stdout
    (a worker's goes to its log file): `bench/startup.py` reads rank 0's to say where the time to
    the first step goes. Nothing otherwise."""
    if os.environ.get(STARTUP_TRACE_ENV):
        print(f"{TRACE_PREFIX} {label} {time.time() if at is None else at:.3f}", flush=True)


def prebuilt_ops_dir() -> str:
    """Where `scripts/bootstrap.sh` builds DeepSpeed's JIT ops for this venv."""
    return os.path.join(sys.prefix, "torch_extensions")


def configure_accelerator(use_gpu: bool) -> None:
    """DeepSpeed picks its accelerator from DS_ACCELERATOR at import time: set it first. The
    JIT-built ops (on CPU, the shm communication op DeepSpeed loads in `init_distributed`) come
    from the venv's own folder when set-up built them there (`prebuilt_ops_dir`), not from the
    per-user cache other venvs share; an explicit TORCH_EXTENSIONS_DIR wins."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    if os.path.isdir(prebuilt_ops_dir()):
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", prebuilt_ops_dir())


def init_single_process_group(requested_backend: str, use_gpu: bool,
                              device: torch.device | None = None) -> None:
    """A 1-rank process group on loopback, for running the distributed code path alone. With a
    CUDA `device` and NCCL the group is bound to it (`device_id`: eager communicator, see
    `eager_connect`)."""
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on it
    backend = resolve_backend(requested_backend, use_gpu)
    extra = {"device_id": device} if backend == "nccl" and device is not None and device.type == "cuda" else {}
    dist.init_process_group(backend, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}", **extra)


def bind_device(device: torch.device) -> None:
    """Make `device` this process's current CUDA device (nothing on CPU). Must come before NCCL
    creates a communicator and before DeepSpeed's accelerator asks for the current device:
    without it every rank of a node works on cuda:0."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def eager_connect(device: torch.device) -> bool:
    """Bind the default NCCL process group to `device` and create its communicator now, as
    `init_process_group(device_id=device)` does (Ray Train initialises the group without a
    device_id). Collective: every rank calls it, before any other operation on the group.

    Then sub-groups made later by `new_group` are split from it (ncclCommSplit, eagerly), and
    point-to-point operations reuse the group's communicator instead of lazily creating one per
    pair of ranks, which would also need every rank of the group in the first batched
    send/recv (docs/gpu.md, "NCCL point-to-point"). Returns whether it connected; False on CPU,
    for a non-NCCL group, or when the group is bound already."""
    if device.type != "cuda" or not is_dist() or "nccl" not in str(dist.get_backend()):
        return False
    pg = dist.distributed_c10d._get_default_group()
    if getattr(pg, "bound_device_id", None) is not None:
        return False
    pg.bound_device_id = device
    backend = pg._get_backend(device)
    if hasattr(backend, "eager_connect_single_device"):
        backend.eager_connect_single_device(device)
    return True


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a loopback rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
