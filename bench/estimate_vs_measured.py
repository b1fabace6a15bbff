#!/usr/bin/env python
"""`moeforge estimate` against measurement, part by part (issue 29).

    python bench/estimate_vs_measured.py [--json out.json] [--cases 6 7]

Eight small stages (replicated / ep / fssdp x ZeRO 0 / 2 x activation checkpointing x expert
sharding 0 / 1 / 2: the sharded ones with expert_parallel_size 1, so EDP = 2, at micro-batch 1
and a 200k-element reduce bucket, so the expert state and its reduce-scatter weigh in the
total), each a real `jobs.stage_runner.run_stage` on 2 gloo ranks on CPU (fp32). During the
second training step
every rank measures, without calling the estimator:
  dense weights     storages of the model's parameters outside the expert pool
  dense optimizer   tensors reachable from DeepSpeed's optimizer (its inner AdamW's moments, ZeRO's
                    fp32 partitions) that are neither parameters nor gradients
  dense gradients   `.grad` storages and ZeRO's gradient buffers alive at the optimizer step
  expert pool       weights: the pool's working weights and, sharded, the shards' fp32 masters;
                    optimizer: the AdamW moments (the pool's, or the shards'); gradients: the most
                    gradient storage alive at once among the pool's `.grad`, the shards' whole fp32
                    buffer (`full_grads`, level 1) and their sums (`grads`), read at the optimizer
                    step, after every `add_piece` (the sums' updates, weight by weight) and at the
                    expert step
  activations       bytes autograd saves during the forward (torch.autograd.graph.saved_tensors_hooks,
                    each storage once)
  logits            the loss's peak: live storage while lm_cross_entropy runs forward and backward on
                    logits of the step's shape (system.memory_tracker), plus the logits
  total             storage alive before the step + the step's peak of live storage (memory_tracker)
  scatter, gather   sharded: the live-storage peak of the expert sharding's reduce-scatter (level 1:
                    one weight of the whole pool, as `reduce_pool_grads` sends them; level 2: one
                    layer's owned rows, all three weights; zero rows) and of its all-gather of the
                    updated pieces into the pool, each run alone after the step on the store's own
                    tensors (`ExpertShards.scatter`, `gather_into`: idempotent)
  adam              ep/fssdp: the live-storage peak of one more step of the expert AdamW (the pool's
                    or the shards'), run alone after the training step with zero gradients
The estimate is `jobs.estimate.stage_layout` on the same spec, with the busiest rank's measured
load (global counts of step 2) as its imbalance. The driver prints the ratios estimate / measured.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BASE = {
    "run": {"name": "est", "seed": 7},
    "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128, "moe_layers": "all",
              "num_experts": 4, "top_k": 2, "d_expert": 128},
    "experts": {"balancing": {"lbl": "micro_batch", "lbl_coeff": 0.01}},
    "parallel": {"world_size": 2},
    "data": {"seq_len": 128, "sources": [{"name": "english_docs", "max_documents": 40}]},
    "stages": [{"name": "s", "steps": 2, "micro_batch_size": 8, "checkpoint_every": 100,
                "optimizer": {"lr": 1e-3}}],
    "metrics": {"progress_bar": False, "ray_metrics": False},
}
# (strategy, ZeRO stage, activation checkpointing, expert sharding); sharded: P = 1, EDP = 2
CASES = [("replicated", 0, "none", 0), ("replicated", 2, "full", 0), ("ep", 0, "moe", 0), ("ep", 2, "none", 0),
         ("fssdp", 0, "full", 0), ("fssdp", 2, "none", 0), ("ep", 0, "moe", 1), ("fssdp", 2, "none", 2)]


def case_spec(out: Path, strategy: str, zero: int, ckpt: str, sharding: int = 0) -> dict:
    spec = copy.deepcopy(BASE)
    spec["run"].update(name=f"{strategy}-z{zero}-{ckpt}-s{sharding}", output_dir=str(out))
    spec["model"]["activation_checkpointing"] = ckpt
    spec["parallel"].update(expert_strategy=strategy, zero_stage=zero)
    if strategy == "fssdp":
        spec["parallel"]["fssdp"] = {"memory_cap": 1, "window": 1, "tolerance": 0.0}
    if sharding:  # EDP 2; a smaller batch and reduce bucket, so the expert state weighs in the total
        spec["parallel"].update(expert_parallel_size=1, expert_sharding=sharding)
        spec["stages"][0]["micro_batch_size"] = 1
        if zero:
            spec["deepspeed"] = {"zero_optimization": {"reduce_bucket_size": 200_000}}
    return spec


def storages(obj, depth: int = 4, seen=None, out=None) -> dict[int, int]:
    """Storages (data_ptr -> bytes) of the tensors reachable from obj through attributes, lists,
    tuples and dicts, `depth` levels down."""
    import torch

    out = {} if out is None else out
    seen = set() if seen is None else seen
    if id(obj) in seen or depth < 0:
        return out
    seen.add(id(obj))
    if torch.is_tensor(obj):
        s = obj.untyped_storage()
        if s.nbytes():
            out[s.data_ptr()] = s.nbytes()
        return out
    if isinstance(obj, dict):
        items = list(obj.keys()) + list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("deepspeed", "torch"):
        items = list(vars(obj).values())
    else:
        return out
    for it in items:
        storages(it, depth - 1, seen, out)
    return out


def step_peak(fn) -> tuple[int, str]:
    """The peak of live tensor storage while fn runs, from one profiler trace: the allocation
    timeline as system.memory_tracker.peak_live_bytes reads it ("tracker"); where the
    profiler's data-flow analysis refuses the trace (it asserts on some non-reentrant
    checkpointing traces), the running sum of the same trace's raw allocation events
    ("allocations": frees of storages made before the step count too, so it can read low)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    try:
        for _, action, _, size in prof._memory_profile().timeline:
            live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
            peak = max(peak, live)
        return peak, "tracker"
    except AssertionError:
        pass
    from torch._C._profiler import _EventType

    allocs, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.typed[0] == _EventType.Allocation:
            allocs.append((node.start_time_ns, node.typed[1].alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(allocs, key=lambda x: x[0]):
        live += size
        peak = max(peak, live)
    return peak, "allocations"


def measure(rank: int, world: int, spec: dict) -> dict:
    import torch

    import parallel.trainer as T
    from jobs.stage_runner import run_stage
    from system.losses import lm_cross_entropy
    from system.memory_tracker import peak_live_bytes

    got: dict = {}
    step_fn, calls = T.Trainer.train_step, [0]

    def ptrs(ts):
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts if t is not None}

    def train_step(self):
        calls[0] += 1
        if calls[0] != 2:
            return step_fn(self)
        store = getattr(self.strategy, "store", None)
        pool = list(store.params()) if store is not None else []
        shards = getattr(store, "shards", None)
        masters = list(shards.masters) if shards is not None else []
        pool_ptrs = ptrs(pool)
        dense = {k: v for k, v in ptrs(self.model.parameters()).items() if k not in pool_ptrs}
        got["dense_weights"] = sum(dense.values())
        opt = storages(self.engine.optimizer)
        params = {**dense, **pool_ptrs}
        grads = ptrs(p.grad for p in self.model.parameters())
        got["dense_optimizer"] = sum(v for k, v in opt.items() if k not in params and k not in grads)
        expert_opt = shards.optimizer if shards is not None else getattr(store, "optimizer", None)
        if store is not None:
            moments = ptrs(v for p in pool + masters for v in expert_opt.state.get(p, {}).values()
                           if torch.is_tensor(v))
            got["expert_weights"] = sum(pool_ptrs.values()) + sum(ptrs(masters).values())
            got["expert_optimizer"] = sum(moments.values())
        before = opt.keys() | params.keys()
        at_step = {"expert_grads": 0}
        inner = self.strategy.optimizer_step
        whole = []  # weak references to level 1's whole fp32 gradient buffers, once handed to the scatter

        def expert_grads_live(extra=()) -> None:
            """The expert gradient storage alive now: max over the probes."""
            ts = [p.grad for p in pool] + list(extra)
            if shards is not None:
                ts += list(shards.grads) + list(shards.full_grads) + [r() for r in whole]
            at_step["expert_grads"] = max(at_step["expert_grads"], sum(ptrs(ts).values()))

        patched = {}
        if shards is not None:
            import weakref

            add_piece, reduce_pool, expert_step = shards.add_piece, shards.reduce_pool_grads, store.step

            def add_piece_probe(*a, **k):
                add_piece(*a, **k)
                expert_grads_live()

            def reduce_pool_probe():
                whole.extend(weakref.ref(t) for t in shards.full_grads if t is not None)
                reduce_pool()
                expert_grads_live()

            def step_probe(*a, **k):
                expert_grads_live()
                return expert_step(*a, **k)

            patched = {(shards, "add_piece"): add_piece_probe, (shards, "reduce_pool_grads"): reduce_pool_probe,
                       (store, "step"): step_probe}
            for (obj, name), fn in patched.items():
                setattr(obj, name, fn)

        def optimizer_step(engine, model, *a, **k):
            g = ptrs(p.grad for p in model.parameters())
            g.update({p_: n for p_, n in storages(engine.optimizer).items() if p_ not in before})
            at_step["dense_grads"] = sum(n for p_, n in g.items() if p_ not in params)
            expert_grads_live()
            it = getattr(store, "iteration", None)
            if it is not None and getattr(it, "copies", None):  # FSSDP: copies resident and their fp32 gradient sums
                ws = [t for _, ts in it.copies.values() for t in ts]
                at_step["fssdp_copies"] = sum(ptrs(ws).values()) + sum(ptrs(it.copy_grads.values()).values())
                at_step["copies_n"] = sum(len(ts) for _, ts in it.copies.values()) // 3
            return inner(engine, model, *a, **k)

        saved: dict[int, int] = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                saved[s.data_ptr()] = s.nbytes()
            return t

        counts, rows = [], []
        import parallel.sharded_experts as SE

        compute = SE.ShardedExperts.compute

        def counting(mod, r, local_counts):
            if torch.is_grad_enabled():
                rows.append(int(r.shape[0]))
            return compute(mod, r, local_counts)

        SE.ShardedExperts.compute = counting
        fwd = self.engine.forward

        def forward(*a, **k):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = fwd(*a, **k)
            counts.extend(x.counts_E.detach().clone() for x in out.moe_aux)
            return out

        self.strategy.optimizer_step, self.engine.forward = optimizer_step, forward
        live_before = sum(storages([self.model, self.engine.optimizer, expert_opt, pool, [p.grad for p in pool],
                                    masters], depth=6).values())
        res = {}
        got["step_peak_extra"], got["peak_by"] = step_peak(lambda: res.setdefault("r", step_fn(self)))
        got["live_before"] = live_before
        self.strategy.optimizer_step, self.engine.forward = inner, fwd
        SE.ShardedExperts.compute = compute
        for obj, name in patched:
            delattr(obj, name)  # the instance attribute: the class's method again
        got["rows"] = rows
        got.update(at_step)
        got["activations"] = sum(saved.values())
        got["counts_LE"] = [c.tolist() for c in counts]
        B, L = self.stage.micro_batch_size, self.stage.data.seq_len
        V = self.model.cfg.vocab_size

        def loss_path():
            logits = torch.randn(B, L, V, requires_grad=True)
            lm_cross_entropy(logits, torch.randint(0, V, (B, L))).backward()

        got["logits"] = peak_live_bytes(loss_path)
        if shards is not None:  # every rank calls them: collectives over the EDP group
            k = shards.S if shards.level == 1 else shards.S // store.L  # level 2: one layer's owned rows
            rows_k = [torch.zeros(k, n) for n in shards.n]
            if shards.level == 1:  # weight by weight (`reduce_pool_grads`): one weight's scatter
                got["scatter"] = step_peak(lambda: shards.scatter(rows_k[:1], only=0))[0]
            else:
                got["scatter"] = step_peak(lambda: shards.scatter(rows_k))[0]
            got["gather"] = step_peak(lambda: shards.gather_into(store.params()))[0]
        if store is not None:  # the expert AdamW's transients: one more step, zero gradients
            stepped = masters if shards is not None else pool
            for p in stepped:
                p.grad = torch.zeros_like(p)
            got["adam"] = step_peak(expert_opt.step)[0]
            for p in stepped:
                p.grad = None
        return res["r"]

    T.Trainer.train_step = train_step
    try:
        run_stage(spec, 0)
    finally:
        T.Trainer.train_step = step_fn
    return got


def measure_all(rank: int, world: int, specs: list) -> list:
    """Every case in the same rank processes (one start-up instead of six)."""
    return [measure(rank, world, spec) for spec in specs]


def estimated(spec: dict, imbalance: float) -> dict:
    from jobs import memory_model as M
    from jobs.estimate import stage_layout
    from jobs.spec_build import parse_offline

    lay = stage_layout(parse_offline(spec), imbalance=imbalance)
    est = M.estimate(lay)
    out = {**est.parts, "total": est.total, "load_factor": est.counts["load_factor"]}
    out["adam"], gather = M.expert_step_buffers(lay)
    if lay.sharding:  # level 1: one weight's reduce-scatter of the whole pool; 2: one layer's rows
        k = M.owned_experts(lay) // (1 if lay.sharding == 1 else lay.moe_layers)
        out["scatter"] = M.scatter_bytes(lay, k, 1 if lay.sharding == 1 else 3)
        out["gather"] = gather
    return out


def busiest_imbalance(counts_by_rank: list, strategy: str, world: int, E: int) -> float:
    """The busiest expert's global load of step 2 over the mean, worst MoE layer."""
    import numpy as np

    glob = np.sum([np.asarray(c, dtype=float) for c in counts_by_rank], axis=0)  # (L, E)
    return float((glob.max(axis=1) / glob.mean(axis=1)).max())


def imbalance_for(m: dict, spec: dict, counts_by_rank: list, layers=max) -> tuple[float, float]:
    """(measured load factor, the imbalance that gives it in the estimate's formula) for the
    measured rank: its expert rows over the mean N * k, in its most loaded MoE layer (`max`) or
    averaged over the layers (`mean`: what the activations, summed over layers, see)."""
    par, model = spec["parallel"], spec["model"]
    if par["expert_strategy"] == "replicated" or not m["rows"]:
        return 1.0, busiest_imbalance(counts_by_rank, par["expert_strategy"], 2, model["num_experts"])
    st = spec["stages"][0]
    lf = layers(m["rows"]) / (st["micro_batch_size"] * spec["data"]["seq_len"] * model["top_k"])
    P = par.get("expert_parallel_size") or par["world_size"]
    e = model["num_experts"] / P
    holders = min(P, 1 + par.get("fssdp", {}).get("memory_cap", 2)) \
        if par["expert_strategy"] == "fssdp" else 1
    return lf, max(1.0, holders * (lf * e - e + 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--cases", type=int, nargs="+", help="only these cases (indices into CASES)")
    args = ap.parse_args(argv)
    cases = [CASES[i] for i in args.cases] if args.cases else CASES
    from parallel.testing import run_distributed

    rows = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        specs = [case_spec(Path(tmp), *c) for c in cases]
        by_rank = run_distributed(measure_all, 2, specs, timeout_s=900)
        print(f"[{time.time() - t0:.0f}s] measured", flush=True)
        for i, ((strategy, zero, ckpt, sharding), spec) in enumerate(zip(cases, specs)):
            ranks = [r[i] for r in by_rank]
            m = max(ranks, key=lambda r: r["live_before"] + r["step_peak_extra"])  # the fuller rank
            lf, imb = imbalance_for(m, spec, [r["counts_LE"] for r in ranks])
            est = estimated(spec, imb)
            # activations sum over the layers: the estimate at the layers' mean load
            mean_lf, mean_imb = imbalance_for(m, spec, [r["counts_LE"] for r in ranks], lambda r: sum(r) / len(r))
            est["activations"] = estimated(spec, mean_imb)["activations"]
            if m.get("copies_n"):  # the estimate is at the cap (m copies per layer): scaled to the copies made
                cap = spec["parallel"]["fssdp"]["memory_cap"] * spec["model"]["n_layers"]
                per_copy = 3 * spec["model"]["d_model"] * spec["model"]["d_expert"]
                est["fssdp_copies"] = (est["fssdp_copies"] - per_copy * spec["parallel"]["fssdp"]["memory_cap"] * 4) \
                    * m["copies_n"] // cap
            m["total"] = m["live_before"] + m["step_peak_extra"]
            name = f"{strategy} ZeRO {zero} ckpt {ckpt}" + (f" sharding {sharding} (P 1, EDP 2)" if sharding else "")
            rows.append({"case": name, "imbalance": imb, "load_factor": lf,
                         "mean_load_factor": mean_lf,
                         "measured": m, "estimate": est})
    parts = ["dense_weights", "dense_grads", "dense_optimizer", "expert_weights", "expert_grads",
             "expert_optimizer", "fssdp_copies", "activations", "logits", "scatter", "gather", "adam", "total"]
    print("\n| case | load factor (max / mean layer) | " + " | ".join(parts) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in parts) + " |")
    for r in rows:
        cells = []
        for p in parts:
            me, es = r["measured"].get(p, 0), r["estimate"].get(p, 0)
            cells.append(f"{es / me:.2f} ({es / 1024:.0f}/{me / 1024:.0f} KiB)" if me else
                         ("-" if not es else f"est {es / 1024:.0f} KiB, measured 0"))
        print(f"| {r['case']} | {r['load_factor']:.2f} / {r['mean_load_factor']:.2f} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str) + "\n")
    print("peak measured by: " + ", ".join(f"{r['case']}: {r['measured']['peak_by']}" for r in rows))
    print(f"\n{time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
