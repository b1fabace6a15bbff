"""Experiment 1 of the routing issue: global-batch LBL vs micro-batch LBL vs auxiliary-loss-free
balancing (plus sequence-level LBL and no balancing as references), same steps, seed and data.

Every micro-batch holds sequences of one domain (`data.microbatch_domains: single`), the setting
in which micro-batch balancing forces each domain's tokens across all experts. The global batch
(2 ranks x 2 micro-batches) mixes domains, so global-batch LBL only asks for balance across them.

Reported per variant (from the metrics JSON lines): held-out loss per domain (mean of the last two
evaluations), the mutual information I(domain; expert) per MoE layer and each domain's share on its
top expert (hard routing on held-out data), and the global-batch MaxVio during training.

    python bench/exp_balancing.py                # ~8 min on 2 idle CPU cores (5 variants)
    python bench/exp_balancing.py --steps 40     # a quick look
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
    "run": {"name": "x", "output_dir": "runs/exp_balancing", "seed": 11},
    "model": {"d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 512, "moe_layers": "all",
              "num_experts": 8, "top_k": 2, "d_expert": 128},
    "experts": {"balancing": {"lbl": "micro_batch", "lbl_coeff": 0.01, "z_loss_coeff": 0.001}},
    "parallel": {"world_size": 2, "zero_stage": 0},
    "data": {"seq_len": 128, "microbatch_domains": "single",
             "sources": [{"name": d} for d in DOMAINS]},
    "stages": [{"name": "pretrain", "steps": 300, "micro_batch_size": 4, "grad_accum_steps": 2,
                "checkpoint_every": 1000, "eval_every": 50, "eval_batches": 6,
                "optimizer": {"lr": 3e-3}, "lr_schedule": {"kind": "cosine", "warmup_steps": 20}}],
    "metrics": {"progress_bar": False, "ray_metrics": False, "log_every": 1},
}

VARIANTS = {
    "micro_batch_lbl": {"lbl": "micro_batch"},
    "global_batch_lbl": {"lbl": "global_batch", "global_accumulation": "exact"},
    "aux_loss_free": {"lbl": "none", "aux_free": True, "bias_update_rate": 0.001},
    "sequence_lbl": {"lbl": "sequence"},
    "no_balancing": {"lbl": "none"},
}


def summarise(records: list[dict], n_layers: int) -> dict:
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    last = evals[-2:]
    out: dict = {"steps": records[-1]["step"] if records else 0}
    for d in DOMAINS:
        out[f"loss/{d}"] = statistics.mean(r[f"eval/{d}/loss"] for r in last)
    out["loss/mean"] = statistics.mean(out[f"loss/{d}"] for d in DOMAINS)
    fin = evals[-1]
    out["mi_bits"] = [fin[f"eval/moe/{i}/mutual_information"] for i in range(n_layers)]
    out["normalized_mi"] = [fin[f"eval/moe/{i}/normalized_mi"] for i in range(n_layers)]
    out["top_share"] = {d: [fin[f"eval/moe/{i}/top_share/{d}"] for i in range(n_layers)] for d in DOMAINS}
    train = [r for r in records if "moe/0/maxvio_global" in r]
    tail = train[-50:]
    out["maxvio_global_last50"] = [statistics.mean(r[f"moe/{i}/maxvio_global"] for r in tail) for i in range(n_layers)]
    out["maxvio_micro_last50"] = [statistics.mean(r[f"moe/{i}/maxvio_micro"] for r in tail) for i in range(n_layers)]
    out["ce_last50"] = statistics.mean(r["ce"] for r in tail)
    out["curve"] = [{"step": r["step"], **{d: r[f"eval/{d}/loss"] for d in DOMAINS}} for r in evals]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "exp_balancing.json"))
    ap.add_argument("--seed", type=int, default=BASE["run"]["seed"], help="model-init and data-order seed")
    ap.add_argument("--fresh", action="store_true", help="delete earlier runs of this experiment first")
    args = ap.parse_args()
    out_root = ROOT / "runs" / "exp_balancing"
    if args.fresh and out_root.exists():
        shutil.rmtree(out_root)
    results = {}
    n_layers = BASE["model"]["n_layers"]
    for name in args.variants:
        spec = copy.deepcopy(BASE)
        spec["run"]["name"] = f"{name}_s{args.steps}" + (f"_seed{args.seed}" if args.seed != BASE["run"]["seed"] else "")
        spec["run"]["seed"] = args.seed
        spec["run"]["output_dir"] = str(out_root)
        spec["experts"]["balancing"].update(VARIANTS[name])
        spec["stages"][0]["steps"] = args.steps
        spec["stages"][0]["eval_every"] = max(args.steps // 6, 1)
        print(f"variant {name}", flush=True)
        results[name] = summarise(run_job(spec, world=2), n_layers)
        r = results[name]
        print(f"  loss mean {r['loss/mean']:.4f}  MI(bits) {['%.3f' % x for x in r['mi_bits']]}  "
              f"maxvio_global {['%.2f' % x for x in r['maxvio_global_last50']]}", flush=True)
    write_json(Path(args.out), {"config": BASE, "steps": args.steps, "seed": args.seed, "results": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
