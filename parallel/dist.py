"""The one module that calls torch.distributed: every collective, group and rank query of the
library goes through it (tests/test_architecture.py refuses any other call site).

Each collective puts its tensors where the group's backend takes them: NCCL carries CUDA tensors
only, so a host tensor (a flag, a count, a logged scalar) is staged on the current CUDA device and
its result copied back; gloo and mixed backends ("cpu:gloo,cuda:nccl") take host tensors as they
are. Every function also works in a single, non-distributed process.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    return dist.get_rank(group) if is_dist() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_dist() else 1


def backend(group=None) -> str:
    """The group's backend name ("gloo", "nccl", "cpu:gloo,cuda:nccl", ...)."""
    return str(dist.get_backend(group))


def new_group(ranks: Sequence[int]):
    """A sub-group of the default one (same backend); every rank of the world must call it."""
    return dist.new_group(list(ranks))


def barrier() -> None:
    if is_dist():
        dist.barrier()


def takes_host_tensors(backend_name: str) -> bool:
    """Whether a backend carries CPU tensors: every one but pure NCCL."""
    parts = [b.split(":")[-1] for b in backend_name.split(",")]
    return any(p != "nccl" for p in parts)


def _nccl_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _staged(t: torch.Tensor, group) -> torch.Tensor:
    """`t`, or a copy on the current CUDA device when the group's backend cannot carry host tensors."""
    if t.device.type != "cpu" or takes_host_tensors(backend(group)):
        return t
    return t.to(_nccl_device(), copy=True)


def all_reduce_(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """Reduce `t` in place over the group's ranks ("sum", "min" or "max"); returns `t`."""
    if not is_dist():
        return t
    work = _staged(t, group)
    dist.all_reduce(work, op=_OPS[op], group=group)
    if work is not t:
        t.copy_(work)
    return t


def all_reduce_start(t: torch.Tensor, op: str = "sum", group=None):
    """Post an in-place all-reduce of a device tensor and return its handle (`wait()`); None
    when there is nothing to reduce. Asynchronous: `t` is valid after the wait."""
    if not is_dist():
        return None
    _require_backend_device(t, group, "all_reduce_start")
    return dist.all_reduce(t, op=_OPS[op], group=group, async_op=True)


def stream_ordered(group=None) -> bool:
    """Whether the group's backend orders a rank's operations on device streams (NCCL): a
    `wait()` on its work then blocks no host thread, only the stream that waits."""
    return is_dist() and backend(group) == "nccl"


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over ranks (returns a new tensor; the input is left unchanged)."""
    return all_reduce_(t.detach().clone(), "sum", group)


def all_reduce_max(t: torch.Tensor, group=None) -> torch.Tensor:
    return all_reduce_(t.detach().clone(), "max", group)


def all_gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's `t` (same shape on every rank), in rank order."""
    if not is_dist():
        return [t.clone()]
    work = _staged(t.contiguous(), group)
    out = [torch.empty_like(work) for _ in range(world_size(group))]
    dist.all_gather(out, work, group=group)
    return out if work is t or work.device == t.device else [o.to(t.device) for o in out]


_NEWER = {"reduce_scatter_tensor": "reduce_scatter_single", "all_gather_into_tensor": "all_gather_single"}


def _collective(name: str):
    """torch's flat-tensor collective under its newer name where it has one (2.13: `*_single`)."""
    return getattr(dist, _NEWER[name], None) or getattr(dist, name)


def reduce_scatter_(out: torch.Tensor, x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum the flat `x` (G * n elements) over the group's G ranks; rank j receives elements
    [j*n, (j+1)*n) of the sum in the flat `out` (n elements). Returns `out`."""
    if not is_dist():
        return out.copy_(x)
    work_x, work_out = _staged(x.contiguous(), group), _staged(out, group)
    _collective("reduce_scatter_tensor")(work_out, work_x, op=_OPS["sum"], group=group)
    if work_out is not out:
        out.copy_(work_out)
    return out


def all_gather_into_(out: torch.Tensor, x: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's flat `x` (n elements), in rank order, into the flat `out` (G * n). Returns `out`."""
    if not is_dist():
        return out.copy_(x)
    work_x, work_out = _staged(x.contiguous(), group), _staged(out, group)
    _collective("all_gather_into_tensor")(work_out, work_x, group=group)
    if work_out is not out:
        out.copy_(work_out)
    return out


def all_gather_object(obj: Any) -> list:
    """Every rank's picklable `obj`, in rank order (the default group)."""
    if not is_dist():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (itself without a process group)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _require_backend_device(t: torch.Tensor, group, what: str) -> None:
    if t.device.type == "cpu" and not takes_host_tensors(backend(group)):
        raise ValueError(f"{what}: a host tensor on a {backend(group)} group; its buffers must live on the GPU")


def all_to_all_single(out: torch.Tensor, x: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int],
                      group=None) -> None:
    """Uneven all-to-all of rows: x's rows [sum(in_splits[:d]), ...) go to rank d; `out` receives."""
    _require_backend_device(x, group, "all_to_all_single")
    dist.all_to_all_single(out, x, list(out_splits), list(in_splits), group=group)


def p2p_op(kind: str, buf: torch.Tensor, peer: int, group=None, tag: int = 0):
    """A batched point-to-point operation ("send" or "recv") for `batch_isend_irecv`; `peer` is a
    rank of the world (not of the group), as torch.distributed expects."""
    _require_backend_device(buf, group, f"p2p {kind}")
    return dist.P2POp(dist.isend if kind == "send" else dist.irecv, buf, peer, group=group, tag=tag)


def batch_isend_irecv(ops: list) -> list:
    """Post the operations together; the works to wait on (none for no operation)."""
    return dist.batch_isend_irecv(ops) if ops else []


def narrow_world(size: int) -> bool:
    """Shrink the default process group to its first `size` ranks (an elastic stage that got
    more workers than an allowed size): they rendezvous again as a world of `size` on a port
    rank 0 picks, the others leave. Returns whether this rank is in the new world."""
    world, me = world_size(), rank()
    if not is_dist() or size >= world:
        return True
    name = backend()
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = broadcast_object(free_port() if me == 0 else None)
    dist.destroy_process_group()
    if me >= size:
        return False
    os.environ.update(WORLD_SIZE=str(size), MASTER_PORT=str(port))  # what DeepSpeed and torch read later
    dist.init_process_group(name, init_method=f"tcp://{addr}:{port}", rank=me, world_size=size)
    return True


def init_process_group(backend_name: str, rank_: int, world: int, init_method: str, **kwargs) -> None:
    dist.init_process_group(backend_name, rank=rank_, world_size=world, init_method=init_method, **kwargs)


def destroy_process_group() -> None:
    """Every group, sub-groups included (nothing when none is up)."""
    if is_dist():
        dist.destroy_process_group()


def resolve_backend(requested: str, use_gpu: bool) -> str:
    """The backend of a process group this process starts: "auto" is NCCL where this process sees
    a GPU it was asked to use, else gloo."""
    if requested != "auto":
        return requested
    return "nccl" if use_gpu and torch.cuda.is_available() else "gloo"


def ray_train_backend(requested: str) -> Optional[str]:
    """The backend a Ray Train job's driver passes to its TorchConfig: for "auto" none, so Ray
    Train decides from the workers' resources (NCCL for workers holding a GPU, else gloo) where
    they run, not from whether the driver's machine has a GPU."""
    return None if requested == "auto" else requested


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


def use_own_ninja() -> None:
    """Put this Python's bin folder first on PATH when it holds `ninja`: torch builds JIT ops
    with the first ninja on PATH, and two versions (the venv's pip wheel, the system's) rewrite
    each other's build log, so every process using the other one rebuilt the op (~35 s of both
    cores each time, found in the test suite: Ray workers and pytest's ranks alternating)."""
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.isfile(os.path.join(bin_dir, "ninja")) and path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + (os.pathsep + path if path else "")


def configure_accelerator(use_gpu: bool) -> None:
    """DeepSpeed picks its accelerator from DS_ACCELERATOR at import time: set it first. The
    JIT-built ops (on CPU, the shm communication op DeepSpeed loads in `init_distributed`) come
    from the venv's own folder when set-up built them there (`prebuilt_ops_dir`), not from the
    per-user cache other venvs share; an explicit TORCH_EXTENSIONS_DIR wins."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    use_own_ninja()
    if os.path.isdir(prebuilt_ops_dir()):
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", prebuilt_ops_dir())


def init_single_process_group(requested_backend: str, use_gpu: bool,
                              device: torch.device | None = None) -> None:
    """A 1-rank process group on loopback, for running the distributed code path alone. With a
    CUDA `device` and NCCL the group is bound to it (`device_id`: eager communicator, see
    `eager_connect`)."""
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on it
    name = resolve_backend(requested_backend, use_gpu)
    extra = {"device_id": device} if name == "nccl" and device is not None and device.type == "cuda" else {}
    init_process_group(name, 0, 1, f"tcp://127.0.0.1:{free_port()}", **extra)


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
    if device.type != "cuda" or not is_dist() or "nccl" not in backend():
        return False
    pg = dist.distributed_c10d._get_default_group()
    if getattr(pg, "bound_device_id", None) is not None:
        return False
    pg.bound_device_id = device
    device_backend = pg._get_backend(device)
    if hasattr(device_backend, "eager_connect_single_device"):
        device_backend.eager_connect_single_device(device)
    return True


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a loopback rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
