"""Text tables of simulation results: one configuration, or a sweep over GPU counts."""
from __future__ import annotations

from parallel.simulator.config import moe_spacing
from system.model_config import ModelConfig


def _describe(res: dict) -> str:
    d, c = res["derived"], res["config"]
    m, ld, fs = c["model"], c["load"], c["fssdp"]
    L = moe_spacing(ModelConfig(**m))[0]
    src = (f"trace {ld['trace']}" if ld["kind"] == "trace" else
           f"zipf s={ld['zipf_s']} drift={ld['drift']}" if ld["kind"] == "zipf" else "uniform")
    return (f"{L} MoE layers x {m['num_experts']} experts top-{m['top_k']}, H={m['d_model']} "
            f"F={m['d_expert']} ({c['cost_model']['matrices']} matrices, {d['expert_mib']:.1f} MiB/expert), "
            f"{ld['tokens_per_gpu']} tokens/GPU, {src}; {d['iterations']} iterations; "
            f"{c['cluster']['gpus_per_node']} GPUs/node; spAG {fs['spag']}, m={d['m']}, "
            f"non-MoE forward {d['non_moe_fwd_ms']:.3f} ms/layer")


def format_result(res: dict) -> str:
    d = res["derived"]
    head = (f"{d['gpus']} GPUs"
            + (f" ({d['replicas']} expert groups of {d['expert_group']})" if d["replicas"] > 1 else "")
            + f": {_describe(res)}\n"
            f"overlap budget t={d['t']} (bandwidth {d['overlap_bandwidth'] / 1e9:.0f} GB/s), "
            f"ownership moves {d['ownership_moves']}")
    cols = ("policy", "time ms", "x EP", "a2a ms", "comp ms", "comm exp/tot ms", "reshard ms", "straggler",
            "mem GiB", "GB/GPU", "e2e ms", "e2e x")
    rows = []
    for p, r in res["policies"].items():
        rows.append((p, f"{r['time_ms']:.1f}", f"{r.get('speedup_vs_ep', float('nan')):.2f}",
                     f"{r['a2a_ms']:.1f}", f"{r['compute_ms']:.1f}",
                     f"{r['comm_exposed_ms']:.1f}/{r['comm_total_ms']:.1f}", f"{r['reshard_ms']:.1f}",
                     f"{r['straggler']:.2f}",
                     f"{r['memory_gib']:.2f}", f"{r['gb_moved_per_gpu']:.2f}", f"{r['e2e_ms']:.1f}",
                     f"{r.get('e2e_speedup_vs_ep', float('nan')):.2f}"))
    return head + "\n" + _table(cols, rows)


def format_sweep(results: list[dict]) -> str:
    """One row per GPU count: MoE-layer time per iteration (speedup over EP), end-to-end speedups."""
    pols = list(results[0]["policies"])
    cols = ["gpus", "t"] + [f"{p} ms (x)" for p in pols] + ["e2e x " + p for p in pols if p != "ep"] + \
        ["straggler ep/fssdp"]
    rows = []
    for res in results:
        P = res["policies"]
        row = [str(res["derived"]["gpus"]), str(res["derived"]["t"])]
        row += [f"{P[p]['time_ms']:.1f} ({P[p].get('speedup_vs_ep', float('nan')):.2f})" for p in pols]
        row += [f"{P[p].get('e2e_speedup_vs_ep', float('nan')):.2f}" for p in pols if p != "ep"]
        fs = P.get("fssdp", P.get("fssdp_remat"))
        row.append(f"{P['ep']['straggler']:.2f}/{fs['straggler']:.2f}" if "ep" in P and fs else "-")
        rows.append(row)
    return _describe(results[0]) + "\n" + _table(cols, rows)


def _table(cols, rows) -> str:
    w = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    line = lambda r: "  ".join(str(x).rjust(n) if i else str(x).ljust(n) for i, (x, n) in enumerate(zip(r, w)))
    return "\n".join([line(cols), line(["-" * n for n in w])] + [line(r) for r in rows])
