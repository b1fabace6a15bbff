"""Loading checkpoint files without running code from them.

A `.pt` file is a pickle: unpickled with `weights_only=False` it may call any function (a
checkpoint directory from someone else can run code). Every file the project reads itself goes
through `load_tensors` (PyTorch's restricted unpickler: tensors, containers, numbers, strings).
DeepSpeed's own engine files are loaded by DeepSpeed, which unpickles them fully; before a
checkpoint reaches `engine.load_checkpoint`, `screen_checkpoint` loads each of its `.pt` files
with the restricted unpickler (memory-mapped, so no tensor data is read), allowing only the few
plain DeepSpeed classes those files hold. A file naming any other global is refused with its
path and the global, and nothing of it is executed.
"""
from __future__ import annotations

import importlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch

# The classes DeepSpeed 0.19 pickles into its checkpoint files besides tensors and containers:
# plain data holders whose unpickling runs no code of the file's choosing.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UnsafeCheckpoint(ValueError):
    """A checkpoint file names a global the restricted unpickler does not allow (or is not a
    loadable torch file at all); a restart cannot fix it."""


def _resolve(names) -> list:
    out = []
    for full in names:
        mod, _, attr = full.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(mod), attr))
        except (ImportError, AttributeError):
            continue  # the package is absent: its classes cannot be in a file we must accept
    return out


def _refusal(path: Path, err: Exception) -> UnsafeCheckpoint:
    m = re.search(r"GLOBAL ([\w.]+)", str(err))
    what = f"it names {m.group(1)}, which is not an allowed type" if m else str(err).splitlines()[0]
    return UnsafeCheckpoint(f"{path}: refused to load ({what}); moeforge loads checkpoint files with "
                            f"PyTorch's restricted unpickler and never runs code from them")


def load_tensors(path: Path, *, mmap: bool = False, allow_deepspeed: bool = False) -> Any:
    """`torch.load` of a file with the restricted unpickler (on CPU); UnsafeCheckpoint when the
    file names a global outside the allowed set."""
    path = Path(path)
    allowed = _resolve(DEEPSPEED_GLOBALS) if allow_deepspeed else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None
    except RuntimeError as e:  # not a torch zip file (truncated, or another format)
        raise UnsafeCheckpoint(f"{path}: not a loadable checkpoint file ({str(e).splitlines()[0]})") from None


def screen_checkpoint(ckpt_dir: Path) -> None:
    """Load every `.pt` file of a checkpoint with the restricted unpickler (DeepSpeed's plain
    classes allowed, tensors memory-mapped); raise UnsafeCheckpoint naming the first refused file.
    Run before DeepSpeed's full unpickling of its engine files."""
    for f in sorted(Path(ckpt_dir).rglob("*.pt")):
        load_tensors(f, mmap=True, allow_deepspeed=True)


def _flat_tensors(obj, prefix: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out: dict = {}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        out.update(_flat_tensors(v, f"{prefix}/{k}"))
    return out


def checkpoint_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (weights and optimizer state of every rank; the RNG
    files aside), on the host, keyed "file/key/...": what "this step changed nothing" compares."""
    out: dict = {}
    for f in sorted(Path(ckpt_dir).rglob("*.pt")):
        if not f.name.startswith("rng_"):
            tensors = _flat_tensors(load_tensors(f, allow_deepspeed=True), str(f.relative_to(ckpt_dir)))
            out.update({k: v.cpu() for k, v in tensors.items()})
    return out
