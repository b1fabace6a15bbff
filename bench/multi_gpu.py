#!/usr/bin/env python
"""ep and fssdp on N GPUs of one node, started by torch's launcher (NCCL; no Ray).

    python bench/multi_gpu.py                       # every GPU of this node
    python bench/multi_gpu.py --nproc 4 --steps 30 --json runs/multi_gpu.json
    python bench/multi_gpu.py --dry-run             # 2 gloo ranks on CPU, tiny model (the test suite runs it)

One launch (`python -m torch.distributed.run --standalone --nproc-per-node N bench/train_probe.py`,
i.e. `jobs.torchrun` with counters) trains one stage per strategy: the GPU suite's model
(d_model 1024, 4 layers, 16 experts top-4 (rounded up to a multiple of N), d_expert 512,
seq_len 1024, micro-batch 8 per rank, ZeRO 1, bf16). Per strategy it reports tokens/s over all ranks and the step time (medians past
the first quarter of the steps), the straggler ratio (`ep/straggler`: the busiest rank's expert
rows over the mean, per step), the bytes the expert collectives moved per step, and rank 0's
host syncs and host-tensor collectives per step. Exit code 1 when a strategy failed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import gpu_train  # noqa: E402


def bytes_per_step(run_dir: Path, stage: str) -> dict[str, float]:
    """Median per step of each `ep/bytes_*` metric (all ranks' bytes of that collective)."""
    recs = gpu_train.stage_records(run_dir, stage)
    warm = recs[min(len(recs) - 1, max(1, len(recs) // 4)):] if recs else []
    keys = sorted({k for r in warm for k in r if k.startswith("ep/bytes_")})
    return {k[3:]: statistics.median(r[k] for r in warm if k in r) for k in keys}


def run(nproc: int, strategies: list[str], steps: Optional[int], dry_run: bool, work: Path,
        timeout_s: float) -> dict[str, Any]:
    import torch

    spec = gpu_train.train_spec(work / "runs", strategies, dry_run=dry_run, world_size=nproc, guard=False,
                                steps=steps, name="multi_gpu")
    e = spec["model"]["num_experts"]
    spec["model"]["num_experts"] = -(-e // nproc) * nproc  # a multiple of the ranks (ep/fssdp shard by expert)
    if "fssdp" in strategies and nproc >= 2:
        # fssdp again with P = N/2 and the expert state sharded over the 2-rank EDP groups
        # (`parallel.expert_sharding: 2`): NCCL reduce-scatter and all-gather of the pieces
        st = dict(spec["stages"][strategies.index("fssdp")])
        st["name"] = "train_fssdp_sharded"
        st["parallel"] = {**st["parallel"], "expert_parallel_size": nproc // 2, "expert_sharding": 2}
        spec["stages"].append(st)
        strategies = strategies + ["fssdp_sharded"]
    env = gpu_train.env_with_root()
    if dry_run:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    proc = gpu_train.launch(spec, work, nproc, timeout_s, env, nonfinite_step=None)
    run_dir = work / "runs" / spec["run"]["name"]
    out: dict[str, Any] = {
        "nproc": nproc, "backend": "gloo" if dry_run else "nccl",
        "device": "cpu" if dry_run else torch.cuda.get_device_name(0), "model": spec["model"],
        "seq_len": spec["data"]["seq_len"], "micro_batch_size_per_rank": spec["stages"][0]["micro_batch_size"],
        "launch": {k: v for k, v in proc.items() if k != "probe"}, "strategies": {}}
    for i, s in enumerate(strategies):
        name = f"train_{s}"
        flops = gpu_train.model_flops_per_token(spec, i)
        tokens = spec["stages"][i]["micro_batch_size"] * spec["data"]["seq_len"] * nproc
        res = gpu_train.summarize_stage(run_dir, name, proc["probe"], flops, None, tokens)
        res["bytes_per_step"] = bytes_per_step(run_dir, name)
        res["memory"] = gpu_train.estimate_stage(spec, i, res.get("cuda_peak_bytes"))
        done = (run_dir / "stages" / name / "DONE.json").is_file()
        res["status"] = "ok" if done and res["steps"] else "failed"
        if not done:
            res["error"] = f"stage {name} did not finish (launch exit {proc['rc']}; see launch.stderr_tail)"
        out["strategies"][s] = res
    return out


def table(res: dict[str, Any]) -> str:
    rows = [f"{res['nproc']} ranks ({res['backend']}, {res['device']})",
            "strategy       status  tokens/s    step s  straggler  syncs/step  host colls/step  "
            "expert MiB  peak GiB  estimate GiB"]
    for s, r in res["strategies"].items():
        mem = {**r, **r.get("memory", {})}

        def f(k, fmt, scale=1.0):
            v = mem.get(k)
            return format(v / scale, fmt) if isinstance(v, (int, float)) else "-"
        rows.append(f"{s:<14} {r['status']:<7} {f('tokens_per_s', '>9.0f')} {f('step_time_s', '>9.3f')} "
                    f"{f('straggler_ratio', '>10.2f')} {f('host_syncs_per_step', '>11.0f')} "
                    f"{f('host_collectives_per_step', '>16.0f')} {f('expert_state_bytes_rank', '>11.2f', 2**20)} "
                    f"{f('cuda_peak_bytes', '>9.2f', 2**30)} {f('estimate_bytes', '>13.2f', 2**30)}")
    return "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--nproc", type=int, help="ranks (GPUs) on this node (default: every GPU; 2 with --dry-run)")
    ap.add_argument("--strategies", default="ep,fssdp", help="comma-separated (default ep,fssdp)")
    ap.add_argument("--steps", type=int, help="steps per strategy (default 16; 5 with --dry-run)")
    ap.add_argument("--dry-run", action="store_true", help="gloo ranks on CPU, a tiny model")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--work-dir", help="scratch folder for the run (default: a temporary one)")
    ap.add_argument("--timeout-s", type=float, default=600.0)
    a = ap.parse_args(argv)
    import torch

    nproc = a.nproc or (2 if a.dry_run else torch.cuda.device_count())
    if not a.dry_run and (not torch.cuda.is_available() or nproc < 2 or nproc > torch.cuda.device_count()):
        print(f"needs 2 or more GPUs of this node (--nproc {nproc}, {torch.cuda.device_count()} visible); "
              f"--dry-run runs 2 gloo ranks on CPU", file=sys.stderr)
        return 2
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="multi_gpu_"))
    res = run(nproc, a.strategies.split(","), a.steps, a.dry_run, work, a.timeout_s)
    print(table(res))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1, default=str) + "\n")
    return 0 if all(r["status"] == "ok" for r in res["strategies"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
