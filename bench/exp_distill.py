"""Experiment 2 of the continual-pretraining issue: distil the continual model (pretrain on A, then
B with 25% replay and re-warming; bench/exp_continual.py) into a student with half its blocks.

Arms, all with the same student init, data (A and B, 0.5 / 0.5), steps and LR schedule:
  ce_only     alpha = 0: next-token cross-entropy only (the teacher only measures agreement)
  kd_fkl      alpha = 0.5, forward KL(p_teacher || q_student), full teacher logits, online
  kd_rkl      alpha = 0.5, reverse KL(q || p) (MiniLLM), full logits, online
  kd_jsd      alpha = 0.5, generalized JSD (beta 0.5, GKD), full logits, online
  kd_fkl_top32_offline  forward KL on the teacher's top-32 log-probs + missing mass, cached once
Reported: held-out loss per domain and its mean, top-1 agreement with the teacher on the held-out
sets, against the teacher's own held-out loss; plus the time per step.

    python bench/exp_continual.py ...                       # first: writes the teacher
    python bench/exp_distill.py --json docs/results/exp_distill.json   # ~12 min, 2 cores
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import ROOT, run_job, write_json  # noqa: E402

from exp_continual import BASE, STAGE  # noqa: E402

ARMS = {
    "ce_only": {"alpha": 0.0},
    "kd_fkl": {"alpha": 0.5, "divergence": "forward_kl"},
    "kd_rkl": {"alpha": 0.5, "divergence": "reverse_kl"},
    "kd_jsd": {"alpha": 0.5, "divergence": "jsd", "beta": 0.5},
    "kd_fkl_top32_offline": {"alpha": 0.5, "divergence": "forward_kl", "top_k": 32, "mode": "offline"},
}
DOMAINS = ("english_docs", "python_code")


def arm_spec(arm: str, teacher: Path, steps: int, eval_every: int, n_layers: int, out: Path) -> dict:
    spec = copy.deepcopy(BASE)
    spec["run"].update(name=arm, output_dir=str(out))
    spec["model"]["n_layers"] = n_layers
    spec["stages"] = [{"name": "distill", "kind": "distill", **STAGE, "steps": steps, "eval_every": eval_every,
                       "data": {"sources": [{"name": d, "weight": 0.5} for d in DOMAINS]},
                       "lr_schedule": {"kind": "cosine", "warmup_steps": max(1, steps // 50), "min_lr_ratio": 0.1},
                       "distill": {"teacher": str(teacher), **ARMS[arm]}}]
    return spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=str(ROOT / "runs" / "exp_continual" / "r25_rewarm" / "stages"
                                             / "continual" / "checkpoints"))
    ap.add_argument("--teacher-results", default=str(ROOT / "docs" / "results" / "exp_continual.json"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--student-layers", type=int, default=2, help="the teacher has 4")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--out", default=str(ROOT / "runs" / "exp_distill"))
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    arms = args.arms.split(",")
    with ThreadPoolExecutor(args.parallel) as pool:
        futs = {a: pool.submit(run_job, arm_spec(a, Path(args.teacher), args.steps, args.eval_every,
                                                 args.student_layers, out)) for a in arms}
        recs = {a: f.result() for a, f in futs.items()}
    teacher = {}
    tr = Path(args.teacher_results)
    if tr.is_file():
        r = json.loads(tr.read_text())["results"].get("r25_rewarm", {})
        teacher = {"english_docs": r.get("A_final"), "python_code": r.get("B_final")}
    results = {}
    for a in arms:
        ev = [r for r in recs[a] if "eval/english_docs/loss" in r]
        last = ev[-1]
        res = {f"loss/{d}": last[f"eval/{d}/loss"] for d in DOMAINS}
        res.update({f"agreement/{d}": last[f"eval/{d}/teacher_agreement"] for d in DOMAINS})
        res["loss_mean"] = sum(res[f"loss/{d}"] for d in DOMAINS) / len(DOMAINS)
        res["agreement_mean"] = sum(res[f"agreement/{d}"] for d in DOMAINS) / len(DOMAINS)
        steps = [r for r in recs[a] if "step_time_s" in r]
        res["step_time_s"] = sum(r["step_time_s"] for r in steps) / len(steps)
        res["curve"] = [[r["step"], *(r[f"eval/{d}/loss"] for d in DOMAINS),
                         *(r[f"eval/{d}/teacher_agreement"] for d in DOMAINS)] for r in ev]
        results[a] = res
    print(f"\nteacher (4 blocks): held-out A {teacher.get('english_docs')}, B {teacher.get('python_code')}")
    print(f"{'arm':<24}{'loss A':>9}{'loss B':>9}{'mean':>9}{'agree A':>9}{'agree B':>9}{'s/step':>8}")
    for a in arms:
        r = results[a]
        print(f"{a:<24}{r['loss/english_docs']:>9.4f}{r['loss/python_code']:>9.4f}{r['loss_mean']:>9.4f}"
              f"{r['agreement/english_docs']:>9.3f}{r['agreement/python_code']:>9.3f}{r['step_time_s']:>8.3f}")
    print(f"total {time.time() - t0:.0f}s")
    if args.json:
        write_json(Path(args.json), {"args": vars(args), "teacher": teacher, "results": results})


if __name__ == "__main__":
    main()
