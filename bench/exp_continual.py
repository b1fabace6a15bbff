"""Experiment 1 of the continual-pretraining issue (Ibrahim et al., arXiv 2403.08763): pretrain on
domain A (English prose), continue on domain B (Python code) with replay 0 / 5 / 25 % of A and
with or without re-warming the LR; against joint A+B training at the same total compute.

  pretrain       A only, `--steps` updates, linear warmup (2%) + cosine to peak/10.
  continual arms init from pretrain's final weights (fresh optimizer), B (+ replay of the A
                 samples pretraining consumed), `--steps` updates:
                   rewarm:   warmup 1% back to the peak, cosine to peak/10 (the paper's recipe)
                   no_rewarm: constant at pretraining's final LR (peak/10): nothing re-warmed
  joint          A + B from scratch, 2 x `--steps` updates (the same total tokens and compute),
                 weights 0.5 / 0.5, warmup 2% + cosine.
Every run evaluates the held-out sets of both domains every `--eval-every` steps (8 micro-batches
of 8 sequences each). Reported per arm: A loss before/after (forgetting), B loss (adaptation),
the stability gap of A and B (depth, recovery), the delivered replay share, and the mean of the
final A and B losses against the joint baseline's.

The continual arms share one pretraining run: its stage directory (checkpoints, consumed
samples, DONE.json) is copied into each arm's run directory, where the pipeline skips a finished
stage exactly as a resubmitted job does.

    python bench/exp_continual.py --json docs/results/exp_continual.json     # ~25 min, 2 cores
"""
from __future__ import annotations

import argparse
import copy
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import ROOT, run_job, write_json  # noqa: E402

A = {"name": "english_docs"}
B = {"name": "python_code"}
PEAK = 3e-3

BASE = {
    "run": {"name": "x", "output_dir": "runs/exp_continual", "seed": 5},
    "model": {"d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 512, "moe_layers": "every_2",
              "num_experts": 8, "top_k": 2, "d_expert": 256},
    "experts": {"balancing": {"lbl": "micro_batch", "lbl_coeff": 0.01, "z_loss_coeff": 0.001}},
    "parallel": {"world_size": 1, "zero_stage": 0},
    "data": {"seq_len": 128, "sources": [A, B]},
    "metrics": {"progress_bar": False, "ray_metrics": False, "log_every": 1},
}
STAGE = {"micro_batch_size": 8, "checkpoint_every": 100000, "eval_batches": 8,
         "optimizer": {"lr": PEAK}}


def pretrain_stage(steps: int, eval_every: int) -> dict:
    return {"name": "pretrain", **STAGE, "steps": steps, "eval_every": eval_every,
            "data": {"sources": [A]},
            "lr_schedule": {"kind": "cosine", "warmup_steps": max(1, steps // 50), "min_lr_ratio": 0.1}}


def arm_spec(arm: str, steps: int, eval_every: int, out: Path) -> dict:
    spec = copy.deepcopy(BASE)
    spec["run"].update(name=arm, output_dir=str(out))
    if arm == "joint":
        spec["stages"] = [{"name": "joint", **STAGE, "steps": 2 * steps, "eval_every": eval_every,
                           "data": {"sources": [{**A, "weight": 0.5}, {**B, "weight": 0.5}]},
                           "lr_schedule": {"kind": "cosine", "warmup_steps": max(1, steps // 25),
                                           "min_lr_ratio": 0.1}}]
        return spec
    pre = pretrain_stage(steps, eval_every)
    if arm == "pretrain":
        spec["stages"] = [pre]
        return spec
    replay, mode = arm.split("_", 1)  # e.g. "r25_rewarm"
    r = int(replay[1:]) / 100
    if mode == "rewarm":
        sched = {"kind": "cosine", "warmup_steps": max(1, steps // 100), "min_lr_ratio": 0.1}
        lr = PEAK
    else:  # continue at the LR pretraining ended with
        sched = {"kind": "constant"}
        lr = PEAK * 0.1
    cont = {"name": "continual", "kind": "continual", "init_from": "pretrain", **STAGE, "steps": steps,
            "eval_every": eval_every, "optimizer": {"lr": lr}, "lr_schedule": sched,
            "data": {"sources": [B], "replay": {"fraction": r, "stages": ["pretrain"]}}}
    spec["stages"] = [pre, cont]
    return spec


def summarise(arm: str, recs: list[dict]) -> dict:
    stage = "joint" if arm == "joint" else "continual"
    ev = [r for r in recs if r.get("stage") == stage and "eval/english_docs/loss" in r]
    last = ev[-1]
    out = {"A_final": last["eval/english_docs/loss"], "B_final": last["eval/python_code/loss"],
           "A_start": ev[0]["eval/english_docs/loss"], "B_start": ev[0]["eval/python_code/loss"],
           "curve": [[r["step"], r["eval/english_docs/loss"], r["eval/python_code/loss"]] for r in ev]}
    out["mean_final"] = (out["A_final"] + out["B_final"]) / 2
    if stage == "continual":
        for k in ("cl/forgetting", "cl/adaptation", "cl/old/gap_depth", "cl/old/gap_step", "cl/old/recovery_step",
                  "cl/new/gap_depth", "cl/new/gap_step", "cl/new/recovery_step"):
            if k in last:
                out[k[3:]] = last[k]
        steps = [r for r in recs if r.get("stage") == "continual" and "data/replay_fraction_total" in r]
        out["replay_delivered"] = steps[-1]["data/replay_fraction_total"] if steps else 0.0
        out["time_s"] = sum(r["step_time_s"] for r in recs if r.get("stage") == "continual" and "step_time_s" in r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="updates of pretraining and of each continual arm")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--replay", default="0,5,25", help="replay percentages")
    ap.add_argument("--out", default=str(ROOT / "runs" / "exp_continual"))
    ap.add_argument("--parallel", type=int, default=2, help="runs at once (one thread each)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    pre_spec = arm_spec("pretrain", args.steps, args.eval_every, out)
    arms = [f"r{p}_{m}" for p in args.replay.split(",") for m in ("rewarm", "no_rewarm")]
    results: dict[str, dict] = {}
    with ThreadPoolExecutor(args.parallel) as pool:
        joint = pool.submit(run_job, arm_spec("joint", args.steps, args.eval_every, out))
        pre_recs = run_job(pre_spec)
        pre_dir = out / "pretrain" / "stages" / "pretrain"
        futs = {}
        for arm in arms:
            shutil.copytree(pre_dir, out / arm / "stages" / "pretrain")
            futs[arm] = pool.submit(run_job, arm_spec(arm, args.steps, args.eval_every, out))
        for arm, f in futs.items():
            results[arm] = summarise(arm, f.result())
        results["joint"] = summarise("joint", joint.result())
    pev = [r for r in pre_recs if "eval/english_docs/loss" in r]
    results["pretrain"] = {"A_final": pev[-1]["eval/english_docs/loss"], "B_final": pev[-1]["eval/python_code/loss"]}
    print(f"\npretrain on A ({args.steps} steps): A {results['pretrain']['A_final']:.4f}, "
          f"B {results['pretrain']['B_final']:.4f}")
    hdr = f"{'arm':<16}{'A final':>9}{'forget':>9}{'B final':>9}{'adapt':>9}{'A gap':>8}{'B gap':>8}" \
          f"{'mean':>8}{'vs joint':>9}{'replay':>8}"
    print(hdr)
    j = results["joint"]["mean_final"]
    for arm in arms + ["joint"]:
        r = results[arm]
        print(f"{arm:<16}{r['A_final']:>9.4f}{r.get('forgetting', float('nan')):>9.4f}{r['B_final']:>9.4f}"
              f"{r.get('adaptation', float('nan')):>9.4f}{r.get('old/gap_depth', float('nan')):>8.3f}"
              f"{r.get('new/gap_depth', float('nan')):>8.3f}{r['mean_final']:>8.4f}{r['mean_final'] - j:>+9.4f}"
              f"{r.get('replay_delivered', float('nan')):>8.3f}")
    print(f"total {time.time() - t0:.0f}s")
    if args.json:
        write_json(Path(args.json), {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
