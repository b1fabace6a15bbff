#!/usr/bin/env python
"""What safe loading costs on resume: screening a checkpoint file with the restricted unpickler
(memory-mapped, as `system.safe_load.screen_checkpoint` does before DeepSpeed loads it) against
the full load DeepSpeed then does, and against the CRC-32 verification, on one file holding a
model-sized state dict and a DeepSpeed LossScaler, same run.

    python bench/safe_load_cost.py [--mb 512] [--dir /tmp] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from system.checkpoint import file_checksum
    from system.safe_load import load_tensors

    n_tensors = 64
    per = a.mb * 2 ** 20 // 4 // n_tensors
    state = {"module": {f"blocks.{i}.w": torch.randn(per) for i in range(n_tensors)},
             "loss_scaler": LossScaler(1.0), "global_steps": 100}
    path = Path(a.dir) / "moeforge-safe-load-bench.pt"
    torch.save(state, path)
    del state
    try:
        size = path.stat().st_size / 2 ** 20
        full = _best(lambda: torch.load(path, map_location="cpu", weights_only=False), a.repeat)
        screen = _best(lambda: load_tensors(path, mmap=True, allow_deepspeed=True), a.repeat)
        safe_full = _best(lambda: load_tensors(path, allow_deepspeed=True), a.repeat)
        crc = _best(lambda: file_checksum(path), a.repeat)
    finally:
        path.unlink(missing_ok=True)
    print(f"file {size:.0f} MiB, best of {a.repeat} (page cache warm)")
    print(f"  full load, weights_only=False (what DeepSpeed does): {full:.3f} s")
    print(f"  screen, restricted + mmap (before DeepSpeed):        {screen:.3f} s  ({screen / full:.3f}x)")
    print(f"  full load, restricted (our own files):               {safe_full:.3f} s  ({safe_full / full:.2f}x)")
    print(f"  CRC-32 verification:                                 {crc:.3f} s  ({crc / full:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
