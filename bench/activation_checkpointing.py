#!/usr/bin/env python
"""Memory saved by activation checkpointing (`model.activation_checkpointing`), same run.

    python bench/activation_checkpointing.py [--d-model 256] [--layers 4] [--seq 256] [--batch 8]

For none / moe / full it reports, for one forward + backward of the same model and batch:
  saved:   bytes of tensors autograd keeps for the backward pass (counted exactly with
           torch.autograd.graph.saved_tensors_hooks; the quantity checkpointing reduces),
  peak:    peak allocated bytes on CUDA when a GPU is present (torch.cuda.max_memory_allocated),
           else the peak RSS increase of a fresh process over its own baseline (ru_maxrss),
  time:    forward + backward wall time (the recomputation's cost), as a ratio to "none".
Each mode runs in its own process so peak RSS is not shared between them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def one(mode: str, a) -> dict:
    import resource

    import torch

    from system.model import ModelConfig, Transformer

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(max(1, a.threads))
    cfg = ModelConfig(d_model=a.d_model, n_layers=a.layers, n_heads=max(1, a.d_model // 64), d_ff=4 * a.d_model,
                      num_experts=a.experts, top_k=2, d_expert=2 * a.d_model, vocab_size=a.vocab,
                      activation_checkpointing=mode)
    torch.manual_seed(0)
    model = Transformer(cfg).to(dev)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=dev)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start_alloc = torch.cuda.memory_allocated()
    times = []
    for it in range(a.iters + 1):
        saved[0] = 0
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(ids)
            loss = out.logits_BTV.float().logsumexp(-1).mean()
        loss.backward()
        if dev == "cuda":
            torch.cuda.synchronize()
        if it:
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    peak = (torch.cuda.max_memory_allocated() - start_alloc) if dev == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"mode": mode, "saved_bytes": saved[0], "peak_bytes": peak, "peak_kind": "cuda_allocated" if dev == "cuda"
            else "rss_increase", "time_s": sorted(times)[len(times) // 2]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one, a)))
        return 0
    rows = []
    for mode in ("none", "moe", "full"):
        args = [sys.executable, __file__, "--one", mode] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                                                            if k not in ("one", "json") and v is not None]
        out = subprocess.run(args, capture_output=True, text=True, check=True, env={**os.environ})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref = rows[0]
    print(f"d_model {a.d_model}, {a.layers} layers, {a.experts} experts top-2, batch {a.batch} x {a.seq} tokens "
          f"({rows[0]['peak_kind']})")
    print(f"{'mode':6s} {'saved MiB':>10s} {'ratio':>6s} {'peak MiB':>9s} {'ratio':>6s} {'time':>6s}")
    for r in rows:
        print(f"{r['mode']:6s} {r['saved_bytes'] / 2**20:10.1f} {r['saved_bytes'] / ref['saved_bytes']:6.2f} "
              f"{r['peak_bytes'] / 2**20:9.1f} {r['peak_bytes'] / max(1, ref['peak_bytes']):6.2f} "
              f"{r['time_s'] / ref['time_s']:6.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
