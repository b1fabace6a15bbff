"""What the FSSDP machinery costs when there is nothing to balance.

1. Planner, per iteration, host side (the same on CPU and GPU machines, it is numpy): load
   prediction, Hecate Algorithm 1 for every MoE layer, the re-sharding decision (Algorithm 2 +
   predicted stragglers, run every `reshard_every` iterations), for E experts over N simulated
   ranks with Zipf(1.2) loads.
2. Dispatcher, per MoE layer forward: the token assignment (`placement.assign`: every rank
   computes the same sends from the all-gathered counts, O(N*E) memory) at N ranks.
   bench/planner.py times the planner alone at 8-256 ranks against the pre-vectorisation code.
3. One rank, one MoE layer, forward + backward + optimizer step: the plain layer (`replicated`)
   against the same layer under `ep` and `fssdp` (a 1-rank process group: every expert local, no
   copies), taking turns in the same process, so the ratio is the overhead of the machinery
   (count exchange, plan lookup, index building, the store's optimizer step).

    python bench/fssdp_overhead.py                          # CPU, 64 experts, 8192 tokens, d 512
    python bench/fssdp_overhead.py --device cuda --d-model 2048 --d-expert 1408 --dtype bf16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _median_ms(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def planner_costs(E: int, L: int, ranks: list[int], tokens: int, top_k: int, reps: int) -> list[dict]:
    from parallel.placement import LoadPredictor, Ownership, assign, plan_iteration, reshard_decision

    rows = []
    rng = np.random.default_rng(0)
    for N in ranks:
        if E % N:
            continue
        p = 1.0 / np.arange(1, E + 1) ** 1.2
        p = p / p.sum()
        own = Ownership.even(L, E, N)
        pred = LoadPredictor(5)
        for _ in range(5):
            pred.observe(np.stack([rng.multinomial(tokens * top_k * N, rng.permutation(p)) for _ in range(L)]))
        load = pred.predict()
        plan_ms = _median_ms(lambda: plan_iteration(own, pred.predict(), 4, 2, 8), reps)
        reshard_ms = _median_ms(lambda: reshard_decision(own, load, 4, 2, 8), max(1, reps // 5))
        plan = plan_iteration(own, load, 4, 2, 8)
        counts = np.stack([rng.multinomial(tokens * top_k, p) for _ in range(N)])
        assign_ms = _median_ms(lambda: assign(counts, plan.holders_L[0], 8), reps)
        rows.append({"ranks": N, "experts": E, "layers": L, "plan_ms_per_iter": plan_ms,
                     "reshard_decision_ms": reshard_ms, "assign_tokens_ms_per_layer": assign_ms,
                     "copies": len(plan.copies())})
    return rows


def layer_costs(a) -> dict:
    import torch.distributed as dist

    from experts.layer import MoELayer
    from parallel.dist import init_single_process_group
    from parallel.sharded_experts import shard_model

    if not dist.is_initialized():
        init_single_process_group("gloo" if a.device == "cpu" else "nccl", a.device != "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    dev = torch.device(a.device)

    class Holder(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.l = layer

        def moe_layers(self):
            return [self.l]

    variants = {}
    for name in ("replicated", "ep", "fssdp"):
        torch.manual_seed(0)
        layer = MoELayer(a.d_model, a.experts, a.top_k, a.d_expert, backend=a.backend).to(dev, dtype)
        layer.reset_parameters(0.02, 0.02)
        store = None
        if name == "replicated":
            opt = torch.optim.AdamW(layer.parameters(), lr=1e-4)
        else:
            store = shard_model(Holder(layer), name)
            store.build_optimizer(1e-4, (0.9, 0.95), 1e-8, 0.0)
            opt = torch.optim.AdamW(layer.router.parameters(), lr=1e-4)
        variants[name] = (layer, store, opt)
    x = torch.randn(1, a.tokens, a.d_model, device=dev, dtype=dtype)

    def step(name, it):
        layer, store, opt = variants[name]
        if store is not None:
            store.begin_iteration(it)
        y, aux = layer(x)
        y.float().pow(2).mean().backward()
        if store is not None:
            store.reduce_grads()
            store.observe(aux.counts_E[None])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if store is not None:
            store.step(1e-4)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times = {n: [] for n in variants}
    for it in range(a.warmup + a.iters):
        for n in variants:
            t0 = time.perf_counter()
            step(n, it)
            if it >= a.warmup:
                times[n].append(time.perf_counter() - t0)
    med = {n: 1e3 * statistics.median(v) for n, v in times.items()}
    return {"ms": med, "vs_replicated": {n: med[n] / med["replicated"] for n in med}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--layers", type=int, default=12, help="MoE layers the planner plans for")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--ranks", default="1,8,32,64")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-expert", type=int, default=256)
    ap.add_argument("--backend", default="grouped")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if a.device == "cpu" else "cuda")
    plan_rows = planner_costs(a.experts, a.layers, [int(r) for r in a.ranks.split(",")], a.tokens, a.top_k, a.reps)
    print(f"planner ({a.experts} experts, {a.layers} MoE layers, {a.tokens} tokens/rank, top-{a.top_k}):")
    print(f"{'ranks':>5} {'plan ms/iter':>12} {'reshard decision ms':>19} {'assign_tokens ms/layer':>22} {'copies':>6}")
    for r in plan_rows:
        print(f"{r['ranks']:>5} {r['plan_ms_per_iter']:>12.2f} {r['reshard_decision_ms']:>19.1f} "
              f"{r['assign_tokens_ms_per_layer']:>22.2f} {r['copies']:>6}")
    lay = layer_costs(a)
    print(f"one rank, one MoE layer fwd+bwd+step ({a.device}, {a.dtype}, d {a.d_model}, d_expert {a.d_expert}, "
          f"{a.experts} experts, top-{a.top_k}, {a.tokens} tokens, backend {a.backend}):")
    for n, ms in lay["ms"].items():
        print(f"  {n:>10}: {ms:8.1f} ms  ({lay['vs_replicated'][n]:.3f}x replicated)")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "planner": plan_rows, "layer": lay}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
