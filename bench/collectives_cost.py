#!/usr/bin/env python
"""The cost of parallel/dist.py's choice for host tensors under NCCL: stage them on the GPU.

    python bench/collectives_cost.py --json OUT.json                 # one GPU: a 1-rank NCCL group
    python -m torch.distributed.run --standalone --nproc-per-node N bench/collectives_cost.py --json OUT.json
    python bench/collectives_cost.py --device cpu --json OUT.json    # gloo (nothing is staged)

Times `pdist.all_reduce_` of a flag-sized tensor (one float32, as `parallel.numerics.any_rank`
and the budget agreement use) three ways: a host tensor (staged: copied to the GPU, reduced,
copied back; the caller has the value on the host), a device tensor followed by reading it on
the host (what keeping the flag on the GPU would cost when its value is needed), and a device
tensor alone (the collective's launch; its value not read). The difference between the first
and the second is what the choice adds per host collective; bench/train_probe.py counts the
host collectives of a training step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _time_us(fn, iters: int, sync) -> float:
    """Median over 5 rounds of the mean microseconds per call."""
    rounds = []
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        rounds.append((time.perf_counter() - t0) / iters * 1e6)
    return statistics.median(rounds)


def measure(device_kind: str, iters: int) -> dict:
    import torch

    from parallel import dist as pdist

    use_gpu = device_kind == "cuda"
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if use_gpu else torch.device("cpu")
    pdist.bind_device(device)
    if launched:
        name = pdist.resolve_backend("auto", use_gpu)
        pdist.init_process_group(name, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://",
                                 **({"device_id": device} if name == "nccl" else {}))
    else:
        pdist.init_single_process_group("auto", use_gpu, device)
    try:
        sync = torch.cuda.synchronize if use_gpu else (lambda: None)
        host = torch.zeros(1)
        dev = torch.zeros(1, device=device)
        for _ in range(20):  # warm-up: communicator, kernels, allocator
            pdist.all_reduce_(host)
            pdist.all_reduce_(dev)
        sync()
        res = {
            "backend": pdist.backend(), "world_size": pdist.world_size(), "device": str(device),
            "staged": not pdist.takes_host_tensors(pdist.backend()),
            "host_tensor_us": _time_us(lambda: pdist.all_reduce_(host), iters, sync),
            "device_tensor_read_us": _time_us(lambda: pdist.all_reduce_(dev).tolist(), iters, sync),
            "device_tensor_us": _time_us(lambda: pdist.all_reduce_(dev), iters, sync),
            "iters": iters,
        }
        res["staging_extra_us"] = res["host_tensor_us"] - res["device_tensor_read_us"]
        return res
    finally:
        pdist.destroy_process_group()


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--json", help="write the result here (rank 0)")
    a = ap.parse_args(argv)
    import torch

    kind = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    res = measure(kind, a.iters)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(res, indent=1))
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
