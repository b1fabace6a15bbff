"""Expert strategies under skewed routing: ep, fssdp and deepspeed_moe in the same run.

A small MoE network on N gloo ranks: `--layers` blocks, each a dense sub-layer (the compute
FSSDP's SparseAllGather overlaps with, standing in for attention) followed by an MoE layer whose
router draws experts from a Zipf law (exponent s) over a ranking of the experts, with Gumbel
noise per token, so the global load of expert of rank i is proportional to 1 / i^s. With
`--drift` the ranking rotates by one expert every `--drift-every` iterations (the hot experts
change and the load predictor must follow).

All strategies are built in the same processes from the same weights and take turns
iteration by iteration, so a noisy shared machine affects them alike. Per iteration we record:
* time: wall time of forward + backward + optimizer step, max over ranks (a barrier before);
* straggler: the busiest rank's expert rows / the mean over ranks (per MoE layer, averaged);
* bytes: bytes that left their rank in the token all-to-alls, in spAG, in spRS (summed over ranks);
* expert memory per rank: expert parameters + Adam moments (+ the peak resident copies for
  fssdp), on the fullest rank.

    python bench/ep_fssdp.py                       # 2 and 4 ranks, s in {0, 1.0, 1.5} + drift
    python bench/ep_fssdp.py --world 2 --zipf 1.5 --iters 20
    python bench/ep_fssdp.py --json docs/results/ep_fssdp.json
    python bench/ep_fssdp.py --strategies fssdp,fssdp_overlap   # spRS after vs inside the backward
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


class ZipfRouter(nn.Module):
    """Router logits = log p_zipf[ranking] + Gumbel noise: the top-1 choice of a token is expert j
    with probability p_j (Gumbel-max), top-k follows Plackett-Luce."""

    def __init__(self, num_experts: int, s: float, seed: int):
        super().__init__()
        self.E, self.s, self.seed = num_experts, s, seed
        self.weight = nn.Parameter(torch.zeros(num_experts, 1))  # so the layer's init code finds one
        self.iteration, self.shift = 0, 0
        p = 1.0 / np.arange(1, num_experts + 1) ** s
        self.logp = torch.tensor(np.log(p / p.sum()), dtype=torch.float32)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.iteration)
        gumbel = -torch.log(-torch.log(torch.rand(x_TD.shape[0], self.E, generator=g).clamp_min(1e-20)))
        base = torch.roll(self.logp, self.shift)
        # + 0 * x keeps the router in the graph (its gradient is zero; the layer stays ordinary)
        return (base + gumbel).to(x_TD.dtype) + 0.0 * x_TD[:, :1]


class Block(nn.Module):
    def __init__(self, d: int, moe: nn.Module):
        super().__init__()
        self.dense = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.moe = moe

    def forward(self, x: torch.Tensor):
        experts = getattr(self.moe, "experts", None)
        if hasattr(experts, "prefetch"):
            experts.prefetch()  # spAG posted before the dense compute, as in the model
        x = x + self.dense(x)
        y, aux = self.moe(x)
        return x + y, aux


class Net(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def moe_layers(self):
        return [b.moe for b in self.blocks]

    def forward(self, x):
        auxes = []
        for b in self.blocks:
            x, a = b(x)
            auxes.append(a)
        return x, auxes


def _zipf_gate(layer, zipf: ZipfRouter) -> None:
    """Make DeepSpeed's gate route by the Zipf logits: its own gating functions, our logits."""
    from deepspeed.moe import sharded_moe as sm

    gate = layer.moe.deepspeed_moe.gate

    def forward(input, used_token=None, sparse_routes=False, use_tutel=False):
        logits = zipf(input.float())
        cf = gate.capacity_factor if gate.training else gate.eval_capacity_factor
        if gate.k == 1:
            return sm.top1gating(logits, cf, gate.min_capacity, used_token, None, gate.drop_tokens, gate.use_rts,
                                 gate.ep_group, sparse_routes, use_tutel)
        if gate.k == 2:
            return sm.top2gating(logits, cf, gate.min_capacity, gate.drop_tokens, gate.ep_group,
                                 gate.top2_2nd_expert_sampling, sparse_routes)
        return sm.topkgating(logits, gate.k, cf, gate.min_capacity, gate.drop_tokens, gate.ep_group,
                             sparse_routes=sparse_routes)

    gate.forward = forward


def build(strategy: str, cfg: dict, rank: int, world: int):
    from experts.layer import MoELayer

    torch.manual_seed(cfg["seed"])
    blocks = []
    for l in range(cfg["layers"]):
        if strategy == "deepspeed_moe":
            from parallel.ds_moe import DeepSpeedMoELayer
            moe = DeepSpeedMoELayer(cfg["d_model"], cfg["experts"], cfg["top_k"], cfg["d_expert"], ep_size=world,
                                    drop_tokens=False)  # dropless, like ep/fssdp: capacity = largest load
            moe.ds_router = ZipfRouter(cfg["experts"], cfg["zipf"], 1 + rank + 100 * l)
            _zipf_gate(moe, moe.ds_router)
        else:
            moe = MoELayer(cfg["d_model"], cfg["experts"], cfg["top_k"], cfg["d_expert"], backend=cfg["backend"])
            moe.reset_parameters(0.02, 0.02)
            moe.router = ZipfRouter(cfg["experts"], cfg["zipf"], 1 + rank + 100 * l)
        blocks.append(Block(cfg["d_model"], moe))
    net = Net(blocks)
    store = None
    if strategy in ("ep", "fssdp", "fssdp_overlap"):
        from parallel.sharded_experts import shard_model
        from parallel.placement import FSSDPPlanConfig
        # fssdp_overlap: fssdp whose spRS starts in the backward pass (parallel.fssdp.sprs_overlap)
        plan_cfg = FSSDPPlanConfig(window=cfg["window"], memory_cap=cfg["memory_cap"],
                                   overlap_budget=cfg["overlap_budget"], reshard_every=cfg["reshard_every"],
                                   rematerialize=cfg["remat"], sprs_overlap=strategy == "fssdp_overlap")
        store = shard_model(net, strategy.removesuffix("_overlap"), plan_cfg)
        store.build_optimizer(1e-4, (0.9, 0.95), 1e-8, 0.0)
    dense = [p for n, p in net.named_parameters() if "router" not in n and not getattr(p, "allreduce", True) is False
             and not getattr(p, "moeforge_expert", False)]
    expert_ds = [p for p in net.parameters() if getattr(p, "allreduce", True) is False]
    opt = torch.optim.AdamW(dense + expert_ds, lr=1e-4, weight_decay=0.0)
    return net, store, opt, dense, expert_ds


def _worker(rank: int, world: int, cfg: dict) -> dict:
    import torch.distributed as dist

    from parallel.collectives import CommStats

    torch.set_num_threads(cfg["threads"])
    models = {s: build(s, cfg, rank, world) for s in cfg["strategies"]}
    g = torch.Generator().manual_seed(7 + rank)
    res = {s: {"time": [], "straggler": [], "a2a": [], "spag": [], "sprs": [], "copies": [], "mem": 0,
               "dropped": []} for s in cfg["strategies"]}
    total = cfg["warmup"] + cfg["iters"]
    for it in range(total):
        x = torch.randn(cfg["tokens"] // cfg["seq"], cfg["seq"], cfg["d_model"], generator=g)
        shift = (it // cfg["drift_every"]) if cfg["drift"] else 0
        for s in cfg["strategies"]:
            net, store, opt, dense, expert_ds = models[s]
            for m in net.moe_layers():
                r = m.ds_router if s == "deepspeed_moe" else m.router
                r.iteration, r.shift = it, shift
            if store is not None:
                store.begin_iteration(it)
            comm = store.comm if store is not None else CommStats()
            comm.reset()
            ds_bytes = 0
            dist.barrier()
            t0 = time.perf_counter()
            y, auxes = net(x)
            if store is not None:
                store.arm_reduce(True)  # one micro-batch: this backward is the step's last
            y.float().pow(2).mean().backward()
            if store is not None:
                store.reduce_grads()
            for p in dense:
                if p.grad is not None:  # (DeepSpeed's unused gate weight has none, on every rank)
                    dist.all_reduce(p.grad)
                    p.grad.div_(world)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if store is not None:
                store.step(1e-4)
            dt = time.perf_counter() - t0
            counts = torch.stack([a.counts_E for a in auxes]).to(torch.int64)
            dist.all_reduce(counts)
            if store is not None:
                store.observe(counts)
                strag = store.straggler_ratio()
                mem = store.memory()
                res[s]["mem"] = max(res[s]["mem"], mem["param_bytes"] + mem["optimizer_bytes"]
                                    + mem["peak_copy_bytes"])
                res[s]["copies"].append(len(store.plan.copies()))
            else:  # DeepSpeed: expert e on rank e // (E/N); dropless = every expert padded to the largest load
                from parallel.ds_moe import tokens_dropped
                per = cfg["experts"] // world
                loads = counts.reshape(len(auxes), world, per).sum(-1).double()
                strag = float((loads.max(1).values / loads.mean(1)).mean())
                cap = torch.stack([a.counts_E.max() for a in auxes]).to(torch.int64)
                dist.all_reduce(cap, op=dist.ReduceOp.MAX)
                # 2 all-to-alls forward + 2 backward of an (E, capacity, d) buffer; (N-1)/N leaves
                ds_bytes = int(sum(4 * cfg["experts"] * int(c) * cfg["d_model"] * 4 * (world - 1) / world
                                   for c in cap))
                res[s]["dropped"].append(float(sum(tokens_dropped(a) for a in auxes)))
                res[s]["padded"] = res[s].get("padded", []) + [float(cap.sum() * cfg["experts"]) /
                                                              float(counts.sum() / 1)]
                res[s]["mem"] = sum(p.numel() * 4 * 3 for p in expert_ds)
            vec = torch.tensor([dt, float(comm.all_to_all + ds_bytes), float(comm.spag),
                                float(comm.sprs)], dtype=torch.float64)
            tmax = vec[:1].clone()
            dist.all_reduce(tmax, op=dist.ReduceOp.MAX)
            dist.all_reduce(vec)
            if it >= cfg["warmup"]:
                res[s]["time"].append(float(tmax))
                res[s]["straggler"].append(strag)
                res[s]["a2a"].append(float(vec[1]))
                res[s]["spag"].append(float(vec[2]))
                res[s]["sprs"].append(float(vec[3]))
    for s in cfg["strategies"]:  # memory: the fullest rank (copies land on the non-owners)
        m = torch.tensor([float(res[s]["mem"])], dtype=torch.float64)
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        res[s]["mem"] = float(m)
    return res if rank == 0 else {}


def summarize(res: dict) -> dict:
    out = {}
    for s, r in res.items():
        out[s] = {"time_ms": 1e3 * statistics.median(r["time"]), "straggler": statistics.mean(r["straggler"]),
                  "a2a_MB": statistics.mean(r["a2a"]) / 1e6, "spag_MB": statistics.mean(r["spag"]) / 1e6,
                  "sprs_MB": statistics.mean(r["sprs"]) / 1e6, "expert_mem_MB_rank": r["mem"] / 1e6,
                  "copies": statistics.mean(r["copies"]) if r["copies"] else 0.0,
                  "dropped": statistics.mean(r["dropped"]) if r["dropped"] else 0.0,
                  "padded_rows_over_real": statistics.mean(r["padded"]) if r.get("padded") else 1.0}
    base = out.get("ep", {}).get("time_ms")
    for s in out:
        out[s]["vs_ep"] = out[s]["time_ms"] / base if base else float("nan")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--zipf", type=float, nargs="+", default=[0.0, 1.0, 1.5])
    ap.add_argument("--drift", action="store_true", help="only the drifting runs (default: both fixed and s=1.5 drift)")
    ap.add_argument("--drift-every", type=int, default=8)
    ap.add_argument("--strategies", default="ep,fssdp,deepspeed_moe")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--d-expert", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per rank per iteration")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=12)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--memory-cap", type=int, default=2)
    ap.add_argument("--overlap-budget", type=int, default=None)
    ap.add_argument("--reshard-every", type=int, default=10)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--backend", default="reference")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from parallel.testing import run_distributed

    loads = [(s, False) for s in a.zipf] + ([(1.5, True)] if not a.drift else [])
    if a.drift:
        loads = [(s, True) for s in a.zipf]
    rows = []
    print(f"{'N':>2} {'zipf':>5} {'drift':>5} {'strategy':>13} {'ms/iter':>8} {'vs ep':>6} {'straggler':>9} "
          f"{'a2a MB':>7} {'spAG MB':>7} {'spRS MB':>7} {'copies':>6} {'mem MB/rank':>11}")
    for world in a.world:
        for s, drift in loads:
            cfg = dict(vars(a), world=None, zipf=s, drift=drift, strategies=a.strategies.split(","),
                       d_model=a.d_model, d_expert=a.d_expert, top_k=a.top_k, memory_cap=a.memory_cap,
                       overlap_budget=a.overlap_budget, reshard_every=a.reshard_every, remat=a.remat)
            t0 = time.time()
            res = run_distributed(_worker, world, cfg, timeout_s=1800)[0]
            summ = summarize(res)
            for strat, r in summ.items():
                print(f"{world:>2} {s:>5} {str(drift):>5} {strat:>13} {r['time_ms']:>8.1f} {r['vs_ep']:>6.2f} "
                      f"{r['straggler']:>9.2f} {r['a2a_MB']:>7.2f} {r['spag_MB']:>7.2f} {r['sprs_MB']:>7.2f} "
                      f"{r['copies']:>6.1f} {r['expert_mem_MB_rank']:>11.2f}", flush=True)
                rows.append({"world": world, "zipf": s, "drift": drift, "strategy": strat, **r})
            print(f"   ({time.time() - t0:.0f}s)", flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"args": vars(a), "machine": platform.platform(),
                                            "cpus": os.cpu_count(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
