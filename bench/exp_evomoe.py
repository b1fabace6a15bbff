"""Experiment 2 of the routing issue: EvoMoE (one expert, diversify, DTS gate) vs a top-k MoE
trained from scratch vs sparse upcycling of a dense model, at equal training tokens.

All arms train the same 8-expert top-1 MoE (MoE in every other layer) for the same total number
of optimizer steps and tokens (same global batch):
  topk_scratch  one stage: top-1 router from random init, micro-batch LBL;
  evomoe        stage 1: one expert per MoE layer for `--phase1` steps; stage 2: spawn 8 experts
                (mask diversification, half of each copy's hidden units re-initialised) and train
                with the DTS gate (T 2.0 -> 0.5 linearly, hard top-1 at 60% of stage 2);
  upcycle       stage 1: the dense model (d_ff = d_expert) for `--phase1` steps; stage 2: copy the
                dense FFN into 8 experts (new router), top-1, micro-batch LBL.
Equal tokens is not equal compute: EvoMoE's dense phase runs many experts per token.
Reported: held-out loss per domain along the run (evaluations every `eval_every` steps, stage 2
steps offset by phase 1), the final loss, and EvoMoE's active experts per token over time.

    python bench/exp_evomoe.py                   # ~5 min on 2 idle CPU cores
"""
from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import ROOT, run_job, write_json  # noqa: E402

DOMAINS = ["english_docs", "python_code", "legal", "c_headers"]

BASE = {
    "run": {"name": "x", "output_dir": "runs/exp_evomoe", "seed": 21},
    "model": {"d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 256, "moe_layers": "every_2",
              "num_experts": 8, "top_k": 1, "d_expert": 256},
    "experts": {"balancing": {"lbl": "micro_batch", "lbl_coeff": 0.01, "z_loss_coeff": 0.001}},
    "parallel": {"world_size": 2, "zero_stage": 0},
    "data": {"seq_len": 128, "sources": [{"name": d} for d in DOMAINS]},
    "metrics": {"progress_bar": False, "ray_metrics": False, "log_every": 1},
}
STAGE = {"micro_batch_size": 8, "checkpoint_every": 100000, "eval_batches": 6,
         "optimizer": {"lr": 3e-3}}


def arm_spec(arm: str, total: int, phase1: int, eval_every: int, out_root: Path) -> dict:
    spec = copy.deepcopy(BASE)
    spec["run"]["name"] = f"{arm}_t{total}_p{phase1}"
    spec["run"]["output_dir"] = str(out_root)
    p2 = total - phase1
    # One cosine schedule per stage; the second stage re-warms briefly, as a recipe would.
    sched = lambda n: {"kind": "cosine", "warmup_steps": min(20, n // 10)}  # noqa: E731
    if arm == "topk_scratch":
        spec["stages"] = [{"name": "moe", **STAGE, "steps": total, "eval_every": eval_every,
                           "lr_schedule": sched(total)}]
    elif arm == "evomoe":
        spec["experts"]["router"] = {"kind": "dts", "dts": {
            "t_max": 2.0, "t_min": 0.5, "decay_steps": int(p2 * 0.5), "schedule": "linear",
            "threshold": 0.001, "hard_at_step": int(p2 * 0.6)}}
        spec["stages"] = [
            {"name": "one_expert", **STAGE, "steps": phase1, "eval_every": eval_every, "lr_schedule": sched(phase1),
             "model": {"num_experts": 1}, "experts": {"router": {"kind": "topk"}, "balancing": {"lbl": "none"}}},
            {"name": "moe", **STAGE, "steps": p2, "eval_every": eval_every, "lr_schedule": sched(p2),
             "init_from": "one_expert", "upcycle": {"diversify": "mask", "fraction": 0.5}}]
    elif arm == "upcycle":
        spec["stages"] = [
            {"name": "dense", **STAGE, "steps": phase1, "eval_every": eval_every, "lr_schedule": sched(phase1),
             "model": {"moe_layers": "none"}},
            {"name": "moe", **STAGE, "steps": p2, "eval_every": eval_every, "lr_schedule": sched(p2),
             "init_from": "dense", "upcycle": {"diversify": "copy"}}]
    else:
        raise ValueError(arm)
    return spec


def summarise(records: list[dict], phase1: int, arm: str) -> dict:
    first_stage = records[0]["stage"] if records else None
    curve = []
    for r in records:
        if not any(k.startswith("eval/") and k.endswith("/loss") for k in r):
            continue
        offset = phase1 if (r["stage"] == "moe" and arm != "topk_scratch") else 0
        curve.append({"step": r["step"] + offset, "stage": r["stage"],
                      **{d: r[f"eval/{d}/loss"] for d in DOMAINS},
                      "mean": statistics.mean(r[f"eval/{d}/loss"] for d in DOMAINS)})
    moe = [r for r in records if r["stage"] == "moe"]
    active = [(r["step"], r.get("moe/0/active_per_token"), r.get("moe/0/temperature")) for r in moe][::10]
    return {"first_stage": first_stage, "curve": curve, "final_mean": curve[-1]["mean"] if curve else None,
            "final": curve[-1] if curve else None, "tokens": records[-1]["tokens"] if records else 0,
            "active_per_token": active,
            "moe_step_time_s": statistics.median(r["step_time_s"] for r in moe) if moe else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--total", type=int, default=400, help="optimizer steps per arm (all stages)")
    ap.add_argument("--phase1", type=int, default=150, help="steps of the 1-expert / dense stage")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--arms", nargs="*", default=["topk_scratch", "evomoe", "upcycle"])
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "exp_evomoe.json"))
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    out_root = ROOT / "runs" / "exp_evomoe"
    if args.fresh and out_root.exists():
        shutil.rmtree(out_root)
    results = {}
    for arm in args.arms:
        print(f"arm {arm}", flush=True)
        recs = run_job(arm_spec(arm, args.total, args.phase1, args.eval_every, out_root), world=2)
        results[arm] = summarise(recs, args.phase1, arm)
        print("  " + "  ".join(f"{c['step']}:{c['mean']:.3f}" for c in results[arm]["curve"]), flush=True)
    write_json(Path(args.out), {"base": BASE, "total": args.total, "phase1": args.phase1, "results": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
