"""Training runs of the GPU suite and the multi-GPU script: their job specs, their launch with
torch's launcher (`bench/train_probe.py`, i.e. `jobs.torchrun` with counters; no Ray) and what
is read back from the run (tokens/s, MFU, host syncs and host collectives per step, the
expert-parallel straggler ratio, the skipped-step check).

Sizes: on a GPU the measured stage is d_model 1024, 4 layers, 16 experts top-4 of d_expert 512,
seq_len 1024, micro-batch 8 (8192 tokens a step), ZeRO 1, bf16, 16 steps; on CPU (`dry_run`) a
2-layer d_model 64 model for 5 steps. Each strategy's measured stage is followed by a small
guard stage at ZeRO 0 (checkpoint every step) that the injected non-finite step 3 checks.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
BAD_STEP = 3  # MOEFORGE_FAULT_NONFINITE: the step whose loss is made Inf (every stage of the launch)


def _model(dry_run: bool) -> dict[str, Any]:
    if dry_run:
        return {"d_model": 64, "n_layers": 2, "n_heads": 2, "num_experts": 4, "top_k": 2, "d_expert": 64}
    return {"d_model": 1024, "n_layers": 4, "n_heads": 16, "num_experts": 16, "top_k": 4, "d_expert": 512}


GUARD_MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 2, "num_experts": 4, "top_k": 2, "d_expert": 64}


def train_spec(out_dir: Path, strategies: list[str], *, dry_run: bool, world_size: int = 1, guard: bool = True,
               steps: Optional[int] = None, name: str = "gpu_suite") -> dict[str, Any]:
    """A job with, per strategy, a measured stage `train_<s>` (ZeRO 1) and (with `guard`) a small
    `guard_<s>` stage (ZeRO 0, a checkpoint every step), all bf16, on GPUs unless `dry_run`."""
    seq, micro = (64, 4) if dry_run else (1024, 8)
    steps = steps or (5 if dry_run else 16)
    docs = 40 if dry_run else 1500
    par = {"world_size": world_size, "zero_stage": 1, "use_gpu": not dry_run}
    if dry_run:
        par["threads_per_worker"] = 1
    stages = []
    for s in strategies:
        stages.append({"name": f"train_{s}", "steps": steps, "micro_batch_size": micro,
                       "checkpoint_every": 10 * steps, "parallel": {"expert_strategy": s},
                       "optimizer": {"lr": 1e-3}, "lr_schedule": {"kind": "cosine", "warmup_steps": 2}})
        if guard:
            stages.append({"name": f"guard_{s}", "steps": BAD_STEP + 1, "micro_batch_size": 2, "checkpoint_every": 1,
                           "parallel": {"expert_strategy": s, "zero_stage": 0}, "model": dict(GUARD_MODEL),
                           "optimizer": {"lr": 1e-3}, "lr_schedule": {"kind": "constant"}})
    return {
        "run": {"name": name, "output_dir": str(out_dir), "seed": 1234},
        "model": {**_model(dry_run), "moe_layers": "all", "tie_embeddings": True},
        "experts": {},  # the default backend (auto): what a user's run gets
        "parallel": par,
        "data": {"seq_len": seq, "tokenizer": {"kind": "byte"}, "sources": [
            {"name": "english_docs", "kind": "embedded", "max_documents": docs},
            {"name": "python_code", "kind": "embedded", "max_documents": docs}]},
        "stages": stages,
        # bf16 everywhere: on CPU DeepSpeed's CPU accelerator runs the same bf16 config and optimizer
        "deepspeed": {"bf16": {"enabled": True}},
        "metrics": {"progress_bar": False, "ray_metrics": False, "log_every": 1},
    }


def model_flops_per_token(spec: dict[str, Any], stage_index: int = 0, vocab_size: int = 257) -> dict[str, float]:
    """Training FLOPs per token: 6 x active parameters (experts counted top_k / num_experts; the
    tied embedding once, as the output head) + attention's 12 x layers x d_model x seq_len
    (QK^T and AV, forward and backward, the PaLM convention: the causal mask is not discounted)."""
    from dataclasses import replace

    import torch

    from jobs.plan import plan_job
    from jobs.spec import parse_spec
    from system.model import Transformer

    st = plan_job(parse_spec(spec, preflight=False)).stages[stage_index]
    cfg = st.model if st.model.vocab_size is not None else replace(st.model, vocab_size=vocab_size)
    with torch.device("meta"):
        model = Transformer(cfg, st.experts)
    active = 0.0
    for name, p in model.named_parameters():
        if getattr(p, "moeforge_expert", False):
            active += p.numel() * cfg.top_k / cfg.num_experts
        elif not (name.startswith("embed.") and not cfg.tie_embeddings):  # an untied lookup costs nothing
            active += p.numel()
    attn = 12.0 * cfg.n_layers * cfg.d_model * spec["data"]["seq_len"]
    return {"active_params": active, "total_params": float(sum(p.numel() for p in model.parameters())),
            "flops_per_token": 6 * active + attn}


def launch(spec: dict[str, Any], work: Path, nproc: int, timeout_s: float, env: dict, *,
           stages: Optional[list[str]] = None, guard: list[str] = (), syncs: str = "auto",
           nonfinite_step: Optional[int] = BAD_STEP) -> dict[str, Any]:
    """torch's launcher running bench/train_probe.py on `nproc` ranks of this node (an Inf loss
    injected at `nonfinite_step` of every stage); the process's return code, wall time and
    output tails, and the probe's JSON (rank 0)."""
    import yaml

    work.mkdir(parents=True, exist_ok=True)
    spec_path = work / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    probe = work / f"probe_{int(time.time() * 1000)}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(ROOT / "bench" / "train_probe.py"), "--out", str(probe), "--syncs", syncs,
           *(["--guard", ",".join(guard)] if guard else []), "--", str(spec_path),
           *(["--stage", ",".join(stages)] if stages else [])]
    t0 = time.perf_counter()
    try:
        run_env = {k: v for k, v in env.items() if k != "MOEFORGE_FAULT_NONFINITE"}
        if nonfinite_step:
            run_env["MOEFORGE_FAULT_NONFINITE"] = str(nonfinite_step)
        p = subprocess.run(cmd, cwd=ROOT, env=run_env,
                           capture_output=True, text=True, timeout=max(1.0, timeout_s))
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc = None
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    try:
        data = json.loads(probe.read_text())
    except (OSError, ValueError):
        data = None
    return {"cmd": " ".join(cmd), "rc": rc, "timed_out": rc is None, "wall_s": round(time.perf_counter() - t0, 1),
            "stdout_tail": out[-1500:], "stderr_tail": err[-3000:], "probe": data}


def stage_records(run_dir: Path, stage: str) -> list[dict]:
    from system.metrics import read_jsonl

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in read_jsonl(path) if r.get("stage") == stage and "loss" in r]


def _median(xs: list[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def summarize_stage(run_dir: Path, stage: str, probe: Optional[dict], flops: Optional[dict] = None,
                    peak_tflops: Optional[float] = None, tokens_per_step: Optional[int] = None) -> dict[str, Any]:
    """tokens/s (median of `tokens_per_s` past the first quarter of the steps, the warm-up),
    step time, loss, MFU, the straggler ratio (ep/fssdp), and from the probe host syncs and
    host-tensor collectives per step (median and max over the same steps)."""
    recs = stage_records(run_dir, stage)
    if not recs:
        return {"steps": 0}
    warm = recs[min(len(recs) - 1, max(1, len(recs) // 4)):]
    res: dict[str, Any] = {
        "steps": len(recs), "steps_measured": len(warm),
        "tokens_per_s": _median([r["tokens_per_s"] for r in warm]),
        "step_time_s": _median([r["step_time_s"] for r in warm]),
        "loss_first": recs[0]["loss"], "loss_last": recs[-1]["loss"],
        "skipped_steps": recs[-1].get("skipped_steps"), "tokens_per_step": tokens_per_step,
    }
    if "ep/expert_bytes_rank" in warm[-1]:  # the expert pool's weights and optimizer state, rank 0
        res["expert_state_bytes_rank"] = warm[-1]["ep/expert_bytes_rank"]
    if "ep/straggler" in warm[-1]:
        res["straggler_ratio"] = _median([r["ep/straggler"] for r in warm if "ep/straggler" in r])
        res["straggler_ratio_max"] = max(r["ep/straggler"] for r in warm if "ep/straggler" in r)
    if flops:
        achieved = res["tokens_per_s"] * flops["flops_per_token"]
        res.update(flops)
        res.update(achieved_tflops=achieved / 1e12, peak_bf16_tflops=peak_tflops,
                   mfu=achieved / (peak_tflops * 1e12) if peak_tflops else None)
    if probe is not None:
        res["ray_imports"] = probe.get("ray_imports")  # tried and refused (no Ray on the GPU machines)
    steps = (probe or {}).get("steps", {}).get(stage)
    if steps:
        wanted = {r["step"] for r in warm}
        ss = [s for s in steps if s["step"] in wanted] or steps
        res["host_syncs_per_step"] = _median([s["syncs"] for s in ss])
        res["host_syncs_per_step_max"] = max(s["syncs"] for s in ss)
        res["host_sync_kinds_last_step"] = ss[-1]["sync_kinds"]
        res["host_syncs_counted_by"] = probe.get("syncs_mode")
        peaks = [s["cuda_peak_bytes"] for s in ss if s.get("cuda_peak_bytes")]
        res["cuda_peak_bytes"] = max(peaks) if peaks else None  # max_memory_allocated, per step, worst
        res["host_collectives_per_step"] = _median([s["host_collectives"] for s in ss])
        res["object_collectives_per_step"] = _median([s["object_collectives"] for s in ss])
    else:
        res["host_syncs_per_step"] = None
        res["host_syncs_note"] = (probe or {}).get("syncs_note", "the probe wrote no per-step counts")
    return res


def estimate_stage(spec: dict[str, Any], stage_index: int, measured: Optional[int]) -> dict[str, Any]:
    """`moeforge estimate` of one stage of the suite's spec (jobs.estimate, the per-rank total
    and its parts), beside the measured `torch.cuda.max_memory_allocated` peak when there is one."""
    try:
        from jobs.estimate import stage_layout
        from jobs.memory_model import estimate
        from jobs.spec import parse_spec

        est = estimate(stage_layout(parse_spec(spec, "gpu suite spec", preflight=False), stage_index))
    except Exception as e:  # the suite records why and goes on
        return {"estimate_error": f"{type(e).__name__}: {e}"}
    out: dict[str, Any] = {"estimate_bytes": int(est.total), "estimate_parts": dict(est.parts),
                           "cuda_peak_bytes": measured}
    if measured:
        out["estimate_over_measured"] = est.total / measured
    return out


def env_with_root(env: Optional[dict] = None, extra_paths: tuple[str, ...] = ()) -> dict:
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), *extra_paths, env.get("PYTHONPATH")]))
    return env
