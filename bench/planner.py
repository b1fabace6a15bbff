"""The FSSDP planner at scale: the vectorised planner (`parallel.placement`) against the old one
(`tests/parallel/planner_reference.py`, the verbatim pre-vectorisation code), in the same run.

For N ranks and E experts (default E = 256 at every N, so 256 x 256 is the largest point; E must
be divisible by N) with L MoE layers (default 12, as bench/fssdp_overhead.py), 8192 tokens per
rank, top-2, Zipf(1.2) loads (the predictor's mean of 5 iterations, each layer's expert order
permuted, as bench/fssdp_overhead.py), t = 4, m = 2, 8 ranks per node, it reports:
* plan ms/layer: Hecate Algorithm 1 (`plan_materialization`), plan_iteration time / L;
* assign ms/layer: token assignment of one layer (new: `assign`, reference: `assign_tokens`)
  with every rank's own multinomial counts;
* reshard ms: `reshard_decision` (2 predicted stragglers over all L layers + Algorithm 2);
* assign peak MB: the tracemalloc peak of one assignment (the reference builds (N, E, N) int64).
Every point also checks that both planners give the same holders and sends.

    python bench/planner.py                      # 8..256 ranks, E = 256
    python bench/planner.py --ranks 256 --json docs/results/planner.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests" / "parallel"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402

import planner_reference as ref  # noqa: E402
from parallel import placement as new  # noqa: E402


def _median_ms(fn, reps: int) -> float:
    ts = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    out = fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del out
    return int(peak)


def point(N: int, E: int, L: int, tokens: int, top_k: int, t: int, m: int, rpn: int, zipf: float,
          reps: int, ref_reps: int, reference: bool) -> dict:
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, E + 1) ** zipf
    p = p / p.sum()
    own = new.Ownership.even(L, E, N)
    pred = new.LoadPredictor(5)
    for _ in range(5):
        pred.observe(np.stack([rng.multinomial(tokens * top_k * N, rng.permutation(p)) for _ in range(L)]))
    load = pred.predict()
    counts = np.stack([rng.multinomial(tokens * top_k, p) for _ in range(N)])
    plan = new.plan_iteration(own, load, t, m, rpn)
    hl = plan.holders_L[0]
    a = new.assign(counts, hl, rpn)
    row = {"ranks": N, "experts": E, "layers": L, "copies": len(plan.copies()),
           "replicated_experts_layer0": sum(len(h) > 1 for h in hl),
           "new": {"plan_ms_per_layer": _median_ms(lambda: new.plan_iteration(own, load, t, m, rpn), reps) / L,
                   "assign_ms_per_layer": _median_ms(lambda: new.assign(counts, hl, rpn), reps),
                   "reshard_decision_ms": _median_ms(lambda: new.reshard_decision(own, load, t, m, rpn),
                                                     max(1, reps // 5)),
                   "assign_peak_bytes": _peak_bytes(lambda: new.assign(counts, hl, rpn)),
                   "assign_result_bytes": a.nbytes}}
    row["new"]["plan_plus_assign_ms"] = row["new"]["plan_ms_per_layer"] + row["new"]["assign_ms_per_layer"]
    if reference:
        rplan = ref.plan_iteration(own, load, t, m, rpn)
        send = ref.assign_tokens(counts, rplan.holders_L[0], rpn)
        same = (rplan.holders_L == plan.holders_L and np.array_equal(send.sum(axis=1), a.token_matrix())
                and all(np.array_equal(send[s], a.from_rank(s)) for s in range(N)))
        r_own = ref.Ownership(own.owner_LE, own.slot_LE, N)
        ra, rb = new.reshard_decision(own, load, t, m, rpn), ref.reshard_decision(r_own, load, t, m, rpn)
        same = same and (ra is None) == (rb is None) and (ra is None or np.array_equal(ra.owner_LE, rb.owner_LE))
        del send
        row["reference"] = {
            "plan_ms_per_layer": _median_ms(lambda: ref.plan_iteration(r_own, load, t, m, rpn), ref_reps) / L,
            "assign_ms_per_layer": _median_ms(lambda: ref.assign_tokens(counts, rplan.holders_L[0], rpn), ref_reps),
            "reshard_decision_ms": _median_ms(lambda: ref.reshard_decision(r_own, load, t, m, rpn), 1),
            "assign_peak_bytes": _peak_bytes(lambda: ref.assign_tokens(counts, rplan.holders_L[0], rpn))}
        rr = row["reference"]
        rr["plan_plus_assign_ms"] = rr["plan_ms_per_layer"] + rr["assign_ms_per_layer"]
        row["speedup"] = {k: rr[k] / max(row["new"][k], 1e-9) for k in
                          ("plan_ms_per_layer", "assign_ms_per_layer", "plan_plus_assign_ms", "reshard_decision_ms",
                           "assign_peak_bytes")}
        row["same_results"] = bool(same)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="8,16,32,64,128,256")
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--layers", type=int, default=12, help="MoE layers (reshard_decision covers all of them)")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per rank")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--t", type=int, default=4, help="overlap budget t")
    ap.add_argument("--m", type=int, default=2, help="memory cap m")
    ap.add_argument("--ranks-per-node", type=int, default=8)
    ap.add_argument("--zipf", type=float, default=1.2)
    ap.add_argument("--reps", type=int, default=30, help="repetitions of the new planner (median)")
    ap.add_argument("--ref-reps", type=int, default=3, help="repetitions of the reference planner")
    ap.add_argument("--no-reference", action="store_true", help="time the new planner only")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = []
    for N in (int(x) for x in a.ranks.split(",")):
        if a.experts % N:
            print(f"skip {N} ranks: {a.experts} experts are not divisible by them")
            continue
        rows.append(point(N, a.experts, a.layers, a.tokens, a.top_k, a.t, a.m, a.ranks_per_node, a.zipf,
                          a.reps, a.ref_reps, not a.no_reference))
        print(f"  {N} ranks done", file=sys.stderr, flush=True)
    print(f"FSSDP planner, {a.experts} experts, {a.layers} MoE layers, {a.tokens} tokens/rank top-{a.top_k}, "
          f"Zipf({a.zipf}), t={a.t} m={a.m}, {a.ranks_per_node} ranks/node; new vs reference (ms, median):")
    hdr = (f"{'ranks':>5} | {'plan/layer':>19} | {'assign/layer':>20} | {'plan+assign':>20} | "
           f"{'reshard_decision':>24} | {'assign peak MB':>19} | same")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        n, f = r["new"], r.get("reference")

        def cell(k, w, fmt):
            if f is None:
                return f"{n[k]:{w}{fmt}}"
            return f"{n[k]:{w}{fmt}} {f[k]:{w}{fmt}} {r['speedup'][k]:5.0f}x"

        mb = {"new": n["assign_peak_bytes"] / 2**20, "ref": f["assign_peak_bytes"] / 2**20 if f else None}
        mem = f"{mb['new']:6.2f} {mb['ref']:7.1f} {r['speedup']['assign_peak_bytes']:4.0f}x" if f else f"{mb['new']:6.2f}"
        print(f"{r['ranks']:>5} | {cell('plan_ms_per_layer', 6, '.2f')} | {cell('assign_ms_per_layer', 6, '.2f')} | "
              f"{cell('plan_plus_assign_ms', 6, '.2f')} | {cell('reshard_decision_ms', 8, '.1f')} | {mem} | "
              f"{r.get('same_results', '-')}")
    print("(each cell: new, reference, reference/new)")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
