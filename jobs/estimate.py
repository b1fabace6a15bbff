"""`moeforge estimate SPEC`: what each rank will hold, part by part, before launch, and whether
it fits the device; `--recommend` searches a layout that does. The formulas are
`jobs.memory_model`; this module turns a job spec's stage (with the command line's overrides)
into a `Layout`, formats the answer and gives pre-flight (`moeforge validate` / `run`) its warning.
No torch, no model build: everything comes from the config. docs/memory.md.
"""
from __future__ import annotations

import re
from dataclasses import asdict, replace
from typing import Optional

from jobs.memory_model import PARTS, Estimate, Layout, estimate, largest_micro_batch

# Usable device memory as torch.cuda reports it (total_memory), by name (case-insensitive).
GPUS = {"h100": 85_032_042_496, "h100-80gb": 85_032_042_496, "h200": 150_754_820_096,
        "a100-80gb": 85_089_435_648, "a100": 85_089_435_648, "a100-40gb": 42_505_273_344,
        "l40s": 47_697_362_944, "a10g": 23_827_972_096}
DEFAULT_DEVICE = "H100"
RESERVE_FRACTION = 0.10  # CUDA context, NCCL's own buffers, the allocator's fragmentation
RESERVE_MIN = 2 << 30
CKPT_ORDER = ("none", "moe", "full")  # cheapest recompute first
CKPT_SPEED = {"none": 1.0, "moe": 0.9, "full": 0.75}  # rough throughput factors for --recommend


class EstimateError(ValueError):
    """A bad estimate option (device name, sharding, sizes): one line naming the option."""

    def __init__(self, field: str, msg: str):
        super().__init__(f"{field}: {msg}")
        self.field = field


def parse_device_memory(text: str) -> int:
    """'80GB' (10^9), '80GiB' (2^30), a plain byte count, or a GPU name (H100, H200, A100-80GB...)."""
    t = text.strip()
    if t.lower() in GPUS:
        return GPUS[t.lower()]
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(gib|gb|mib|mb|tb|tib)?", t, re.IGNORECASE)
    if not m:
        raise EstimateError("--device-memory", f"{text!r} is not a size (80GB, 80GiB) or a GPU name "
                                               f"({', '.join(sorted(GPUS))})")
    unit = (m.group(2) or "").lower()
    scale = {"": 1, "gb": 10 ** 9, "gib": 2 ** 30, "mb": 10 ** 6, "mib": 2 ** 20, "tb": 10 ** 12, "tib": 2 ** 40}[unit]
    return int(float(m.group(1)) * scale)


def reserve_bytes(device: int) -> int:
    return max(RESERVE_MIN, int(device * RESERVE_FRACTION))


def human(n: float) -> str:
    for unit, s in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= s:
            return f"{n / s:.2f} {unit}"
    return f"{int(n)} B"


def stage_layout(spec, stage_index: int = 0, *, world: Optional[int] = None, **overrides) -> Layout:
    """The layout of one stage of a parsed job spec (its `parallel.expert_sharding` included);
    `world` and keyword overrides (ep_size, zero, checkpointing, micro_batch, imbalance,
    expert_sharding, gpu; None: the spec's) replace the spec's values."""
    from jobs.plan import plan_job
    from jobs.validate import tokenizer_vocab_size

    st = plan_job(spec).stages[stage_index]
    m, par = st.model, st.parallel
    vocab = m.vocab_size or tokenizer_vocab_size(spec) or 257
    ep = st.ep_size
    if world is not None and world != st.world_size and overrides.get("ep_size") is None:
        ep = 1 if par.expert_strategy == "replicated" else min(ep if ep < st.world_size else world, world)
    lay = Layout(d_model=m.d_model, n_layers=m.n_layers, moe_layers=len(m.moe_layer_ids()), n_heads=m.n_heads,
                 n_kv_heads=m.kv_heads(), head_dim=m.attn_head_dim(), d_ff=m.d_ff, num_experts=m.num_experts,
                 top_k=m.top_k, d_expert=m.d_expert, vocab=vocab, tie_embeddings=m.tie_embeddings,
                 qkv_bias=m.qkv_bias, qk_norm=m.qk_norm, d_shared=m.d_shared, shared_gate=m.shared_expert_gate,
                 micro_batch=st.micro_batch_size, seq_len=st.data.seq_len, world=world or st.world_size,
                 strategy=par.expert_strategy, ep_size=ep, zero=par.zero_stage, gpu=par.use_gpu,
                 checkpointing=m.activation_checkpointing, memory_cap=par.fssdp.memory_cap,
                 rematerialize=par.fssdp.rematerialize, sprs_overlap=par.fssdp.sprs_overlap,
                 tolerance=par.fssdp.tolerance, expert_sharding=par.expert_sharding)
    zero_cfg = (spec.deepspeed or {}).get("zero_optimization") or {}
    lay = replace(lay, reduce_bucket=int(zero_cfg.get("reduce_bucket_size", lay.reduce_bucket)),
                  grad_accum=st.grad_accum_steps)
    lay = replace(lay, **{k: v for k, v in overrides.items() if v is not None})
    check_layout(lay)
    return lay


def check_layout(lay: Layout) -> None:
    if lay.expert_sharding not in (0, 1, 2):
        raise EstimateError("--expert-sharding", f"{lay.expert_sharding} must be 0, 1 or 2")
    if lay.world < 1 or lay.world % lay.ep_size:
        raise EstimateError("parallel.expert_parallel_size", f"{lay.ep_size} does not divide the {lay.world} ranks")
    if lay.imbalance is not None and lay.imbalance < 1:
        raise EstimateError("--imbalance", f"{lay.imbalance} must be >= 1 (the busiest expert's load over the mean)")
    if lay.expert_sharding and lay.strategy not in ("ep", "fssdp"):
        raise EstimateError("--expert-sharding", f"applies to ep and fssdp, not {lay.strategy!r}")


def report(est: Estimate, device: int) -> dict:
    """The estimate as a plain dict (what `--json` prints)."""
    lay, res = est.layout, reserve_bytes(device)
    return {"layout": asdict(lay), "parts": dict(est.parts), "total": est.total, "device_memory": device,
            "reserve": res, "fits": est.total <= device - res,
            "sum_of_parts": est.sum_of_parts, "largest_micro_batch": largest_micro_batch(lay, device - res),
            "counts": est.counts, "moments": dict(est.moments),
            "peak_moment": max(est.moments, key=est.moments.get) if est.moments else None, "notes": list(est.notes)}


def describe_layout(lay: Layout) -> str:
    return (f"{lay.world} ranks, {lay.strategy} P={lay.ep_size} (EDP={lay.edp}), ZeRO {lay.zero}, "
            f"{'bf16 GPU' if lay.gpu else 'fp32 CPU'}, activation checkpointing {lay.checkpointing}, "
            f"micro-batch {lay.micro_batch} x {lay.seq_len} tokens, expert sharding {lay.expert_sharding}"
            f"{' (no effect: EDP 1)' if lay.expert_sharding and not lay.sharding else ''}")


def format_report(rep: dict) -> str:
    lay = Layout(**rep["layout"])
    lines = [f"per rank: {describe_layout(lay)}",
             f"imbalance {rep['counts']['imbalance']:.2f} (busiest expert / mean) -> busiest rank receives "
             f"{rep['counts']['load_factor']:.2f} x the mean expert rows"]
    width = max(len(p) for p in PARTS)
    for p in PARTS:
        lines.append(f"  {p:<{width}}  {rep['parts'][p]:>18,d} B  {human(rep['parts'][p]):>11}")
    lines.append(f"  {'peak (total)':<{width}}  {rep['total']:>18,d} B  {human(rep['total']):>11}   "
                 f"(at the {rep.get('peak_moment')} moment; the parts' sum {human(rep['sum_of_parts'])}: "
                 f"activations and logits are gone when the last gradients arrive)")
    dev, res = rep["device_memory"], rep["reserve"]
    verdict = "fits" if rep["fits"] else "DOES NOT FIT"
    lines.append(f"device {human(dev)}, reserve {human(res)} ({RESERVE_FRACTION:.0%}, at least {human(RESERVE_MIN)}): "
                 f"{verdict} ({human(dev - res - rep['total'])} {'left' if rep['fits'] else 'short'}); "
                 f"largest micro-batch that fits: {rep['largest_micro_batch']}")
    lines += [f"note: {n}" for n in rep["notes"]]
    return "\n".join(lines)


def ep_sizes(lay: Layout, gpus_per_node: int) -> list[int]:
    """Expert-parallel sizes the spec's rules allow for this world: P divides the world, P <= E
    (at least one expert per rank), and a group lies inside a node or is made of whole nodes."""
    if lay.strategy == "replicated":
        return [1]
    out = []
    for p in range(1, lay.world + 1):
        if lay.world % p or p > lay.num_experts or lay.num_experts % p:
            continue
        if p < lay.world and p % gpus_per_node and gpus_per_node % p:
            continue
        out.append(p)
    return out


def recommend(lay: Layout, device: int, gpus_per_node: int, strategies=("ep", "fssdp"),
              shardings: Optional[tuple] = None) -> Optional[dict]:
    """The layout (strategy, P, ZeRO stage, expert sharding, activation checkpointing,
    micro-batch) that fits with the reserve and gives the most tokens a step per second by a
    rough rule: micro-batch x the recompute factor, then fewer ranks per expert group (less
    all-to-all), then the lower ZeRO stage, then the lower expert sharding. `shardings`: the
    expert sharding levels to try (default 0, 1, 2; a level only where EDP > 1). None: nothing fits."""
    budget = device - reserve_bytes(device)
    best, best_key = None, None
    for strategy in strategies if lay.strategy != "replicated" else ("replicated",):
        base = replace(lay, strategy=strategy)
        levels = (0,) if strategy == "replicated" else tuple(shardings or (0, 1, 2))
        for p in ep_sizes(base, gpus_per_node):
            for zero in (0, 1, 2):
                for lvl in levels:
                    if lvl and p == base.world:
                        continue  # one expert-parallel group: nothing to shard over
                    for ck in CKPT_ORDER:
                        cand = replace(base, ep_size=p, zero=zero, expert_sharding=lvl, checkpointing=ck,
                                       micro_batch=1)
                        b = largest_micro_batch(cand, budget)
                        if b < 1:
                            continue
                        cand = replace(cand, micro_batch=b)
                        key = (b * CKPT_SPEED[ck], p <= gpus_per_node, -p, strategy == "ep", -zero, -lvl)
                        if best_key is None or key > best_key:
                            best, best_key = cand, key
    if best is None:
        return None
    return report(estimate(best), device)


def smallest_fit(lay: Layout, device: int, gpus_per_node: int, counts=(8, 16, 32, 64, 128, 256, 512, 1024),
                 shardings: Optional[tuple] = None):
    """The smallest GPU count (from `counts`) at which `recommend` finds a layout, and it."""
    for n in counts:
        rep = recommend(replace(lay, world=n, ep_size=min(lay.ep_size, n)), device, gpus_per_node,
                        shardings=shardings)
        if rep is not None:
            return n, rep
    return None, None


def simulated_step(lay: Layout, gpus_per_node: int) -> dict:
    """The simulator's MoE-layer time for this layout (`moeforge simulate`, its default cost
    model): the ep or fssdp policy at the spec's shape, tokens per GPU = micro-batch x seq_len."""
    from parallel.simulator import load_config, simulate

    if not 8 <= lay.world <= 256:
        return {"skipped": f"the simulator models 8..256 GPUs, not {lay.world}"}
    policy = "fssdp" if lay.strategy == "fssdp" else "ep"
    cfg = load_config(None, {"cluster.gpus": lay.world, "cluster.gpus_per_node": min(gpus_per_node, lay.world),
                             "cluster.expert_parallel_size": lay.ep_size if lay.strategy != "replicated" else None,
                             "model.d_model": lay.d_model, "model.n_layers": lay.n_layers,
                             "model.num_experts": lay.num_experts, "model.top_k": lay.top_k,
                             "model.d_expert": lay.d_expert, "model.d_ff": lay.d_ff,
                             "load.tokens_per_gpu": lay.tokens, "cost_model.seq_len": lay.seq_len,
                             "fssdp.memory_cap": lay.memory_cap, "sim.iterations": 20, "sim.policies": [policy]})
    row = simulate(cfg)["policies"][policy]
    return {"policy": policy, "moe_ms": row["time_ms"], "step_ms": row["e2e_ms"], "straggler": row["straggler"]}


def preflight_warning(spec, device: int) -> Optional[str]:
    """For a GPU spec, a warning with the numbers and concrete changes when a stage's estimate
    exceeds the device's memory less the reserve; None when every stage fits (or no GPU)."""
    from jobs.plan import plan_job

    out = []
    for i, st in enumerate(plan_job(spec).stages):
        if not st.parallel.use_gpu:
            continue
        lay = stage_layout(spec, i)
        rep = report(estimate(lay), device)
        if rep["fits"]:
            continue
        budget = device - rep["reserve"]
        tips = []
        if lay.checkpointing != "full":
            alt = largest_micro_batch(replace(lay, checkpointing="full"), budget)
            if alt >= 1:
                tips.append(f"model.activation_checkpointing: full (fits micro-batch {alt})")
        if rep["largest_micro_batch"] >= 1:
            tips.append(f"stages[{i}].micro_batch_size: {rep['largest_micro_batch']} (with grad_accum_steps to keep "
                        f"the global batch)")
        if lay.strategy in ("ep", "fssdp"):
            bigger = [p for p in ep_sizes(lay, 8) if p > lay.ep_size]
            for p in bigger:
                if report(estimate(replace(lay, ep_size=p)), device)["fits"]:
                    tips.append(f"parallel.expert_parallel_size: {p}")
                    break
            tip = sharding_tip(lay, device)
            if tip:
                tips.append(tip)
        if lay.zero < 2:
            tips.append("parallel.zero_stage: 2")
        out.append(f"stage {st.name!r}: the estimate per rank is {human(rep['total'])}, over the "
                   f"{human(budget)} a {human(device)} device leaves after the {human(rep['reserve'])} reserve "
                   f"(largest part: {max(rep['parts'], key=rep['parts'].get)} "
                   f"{human(max(rep['parts'].values()))}); try: {'; '.join(tips) or 'more ranks'} "
                   f"(`moeforge estimate SPEC --recommend`)")
    return "\n".join(out) or None


def sharding_tip(lay: Layout, device: int) -> Optional[str]:
    """The expert sharding change for an ep/fssdp layout over the device: the lowest level above
    the layout's that fits, else level 2 with what it saves. None with one expert-parallel group
    (EDP 1: nothing to shard over; a smaller P to make room for it never pays: each halving of P
    doubles the owned rows and at best cuts 16 B a parameter to 10)."""
    if lay.edp < 2 or lay.sharding >= 2:
        return None
    for lvl in (1, 2):
        if lvl > lay.sharding:
            est = estimate(replace(lay, expert_sharding=lvl))
            if report(est, device)["fits"]:
                return f"parallel.expert_sharding: {lvl} (fits: {human(est.total)})"
    saved = estimate(lay).total - estimate(replace(lay, expert_sharding=2)).total
    return f"parallel.expert_sharding: 2 ({human(saved)} less per rank; not enough alone)" if saved > 0 else None
