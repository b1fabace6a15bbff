#!/usr/bin/env python
"""The GPU suite: every GPU check of the project in one command, one JSON.

    python bench/gpu_suite.py --out runs/gpu_suite.json     # one H100/H200, about 5 minutes (< 8)
    python bench/gpu_suite.py --dry-run --out /tmp/s.json    # the same code paths on CPU, tiny sizes
    python bench/gpu_suite.py --install-megablocks ...       # first try scripts/install-megablocks.sh

Cases, each in its own subprocess with its own timeout (a case that fails or times out is recorded
with its error and the others still run; the JSON is rewritten after every case):

1. experts_cuda_tests: pytest on tests/experts with the CUDA-only tests selected (`-k cuda`: the
   megablocks backend against the reference on CUDA; they skip, saying why, where megablocks
   or CUDA is missing); pass/fail/skip counts.
2. moe_layer: bench/moe_layer.py at d_model 2048, 64 experts, top-8, bf16, 16384 tokens, for the
   reference, grouped and (when it imports) megablocks backends: ms, tokens/s, TFLOP/s.
3. fssdp_overhead: bench/fssdp_overhead.py on the GPU (d_model 2048, d_expert 1408, bf16).
4. hf_cuda_check: bench/hf_cuda_check.py (Hugging Face import -> bf16 training -> export -> logits).
5. moeforge_run: a single-GPU bf16 `moeforge run` (d_model 1024, 8 layers, 16 experts top-4, ZeRO 1)
   on the embedded corpus: tokens/s from its metrics.jsonl and MFU.

Each case's status is ok, failed or skipped (with the reason). docs/gpu.md says what each
measures and how MFU is counted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Dense bf16 peak (TFLOP/s, no sparsity) by a substring of torch.cuda.get_device_name; the first match wins.
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 SXM", 989.0), ("H100 80GB HBM3", 989.0), ("H100 NVL", 835.0),
                    ("H100 PCIe", 756.0), ("A100", 312.0)]
CASE_NAMES = ("experts_cuda_tests", "moe_layer", "fssdp_overhead", "hf_cuda_check", "moeforge_run")
RESERVE_S = 20  # kept back for every later case when a case's timeout is cut to the budget


def peak_tflops(device_name: str) -> Optional[float]:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


# -- running a case -------------------------------------------------------------------------------
def run_cmd(cmd: list[str], timeout_s: float, env: Optional[dict] = None) -> dict[str, Any]:
    """Run a command; its return code, wall time and the tails of its output."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(1.0, timeout_s))
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc = None
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    return {"cmd": " ".join(cmd), "rc": rc, "wall_s": round(time.perf_counter() - t0, 1),
            "timed_out": rc is None, "stdout_tail": out[-1500:], "stderr_tail": err[-3000:]}


def failed(proc: dict, why: str) -> dict[str, Any]:
    error = f"timed out after {proc['wall_s']}s" if proc["timed_out"] else why
    return {"status": "failed", "error": error, "proc": proc}


def _read_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# -- 1. CUDA tests of tests/experts ----------------------------------------------------------------
def case_experts_tests(a, work: Path, timeout_s: float, env: dict) -> dict[str, Any]:
    xml = work / "experts_cuda_tests.xml"
    select = "cuda"
    proc = run_cmd([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/experts", "-k", select,
                    "-rs", f"--junitxml={xml}"], timeout_s, env)
    if proc["timed_out"] or not xml.is_file():
        return failed(proc, "pytest wrote no report")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    reasons: set[str] = set()
    for suite in ET.parse(xml).getroot().iter("testsuite"):
        for k in counts:
            counts[k] += int(suite.get(k, 0))
        for sk in suite.iter("skipped"):
            reasons.add((sk.get("message") or "")[:200])
    res = {"selected": f"tests/experts -k {select}", "passed": counts["tests"] - counts["failures"]
           - counts["errors"] - counts["skipped"], "failed": counts["failures"], "errors": counts["errors"],
           "skipped": counts["skipped"], "skip_reasons": sorted(reasons), "wall_s": proc["wall_s"]}
    if res["failed"] or res["errors"] or proc["rc"] not in (0, 5):
        return {**failed(proc, f"{res['failed']} failed, {res['errors']} errors"), **res}
    if res["passed"] == 0:
        return {"status": "skipped", "reason": "; ".join(sorted(reasons)) or "no CUDA test selected", **res}
    return {"status": "ok", **res}


# -- 2. the MoE layer -------------------------------------------------------------------------------
def case_moe_layer(a, work: Path, timeout_s: float, env: dict) -> dict[str, Any]:
    out = work / "moe_layer.json"
    if a.dry_run:
        shape = ["--grid", "64x8x2", "--device", "cpu", "--dtype", "bf16", "--tokens", "256", "--warmup", "1",
                 "--iters", "2", "--threads", "1"]
    else:
        shape = ["--grid", "2048x64x8", "--device", "cuda", "--dtype", "bf16", "--tokens", "16384",
                 "--warmup", "3", "--iters", "10"]
    proc = run_cmd([sys.executable, "bench/moe_layer.py", *shape, "--backends", "reference,grouped,megablocks",
                    "--json", str(out)], timeout_s, env)
    data = _read_json(out)
    if proc["rc"] != 0 or data is None:
        return failed(proc, f"moe_layer.py exited {proc['rc']}")
    rows = {r["backend"]: r for r in data["rows"]}
    backends: dict[str, Any] = {}
    for name in ("reference", "grouped", "megablocks"):
        if name in rows:
            r = rows[name]
            backends[name] = {"status": "ok", "ms_per_iter": r["ms_per_iter"], "tokens_per_s": r["tokens_per_s"],
                              "tflops": r["tflops"], "ratio_to_reference": r["ratio_to_reference"],
                              "path": r["path"], "max_over_mean_load": r["max_over_mean_load"]}
        else:
            backends[name] = {"status": "skipped",
                              "reason": data["machine"].get("skipped_backends", {}).get(name, "not run")}
    r0 = data["rows"][0]
    res = {"shape": {k: r0[k] for k in ("d_model", "num_experts", "top_k", "d_expert", "tokens")},
           "dtype": data["machine"]["dtype"], "device": data["machine"].get("gpu", data["machine"]["device"]),
           "dense": {"d_ff": r0["dense_d_ff"], "ms_per_iter": r0["dense_ms_per_iter"], "tflops": r0["dense_tflops"]},
           "backends": backends, "wall_s": proc["wall_s"],
           "flops": "expert matmuls only: 2*tokens*top_k*3*d_model*d_expert forward, x3 forward+backward"}
    if any(backends[b]["status"] != "ok" for b in ("reference", "grouped")):
        return {**failed(proc, "reference or grouped did not run"), **res}
    return {"status": "ok", **res}


# -- 3. FSSDP overhead ------------------------------------------------------------------------------
def case_fssdp(a, work: Path, timeout_s: float, env: dict) -> dict[str, Any]:
    out = work / "fssdp_overhead.json"
    if a.dry_run:
        args = ["--device", "cpu", "--d-model", "64", "--d-expert", "64", "--dtype", "bf16", "--experts", "8",
                "--layers", "2", "--tokens", "256", "--ranks", "1,8", "--reps", "3", "--warmup", "1", "--iters", "2"]
    else:
        args = ["--device", "cuda", "--d-model", "2048", "--d-expert", "1408", "--dtype", "bf16"]
    proc = run_cmd([sys.executable, "bench/fssdp_overhead.py", *args, "--json", str(out)], timeout_s, env)
    data = _read_json(out)
    if proc["rc"] != 0 or data is None:
        return failed(proc, f"fssdp_overhead.py exited {proc['rc']}")
    return {"status": "ok", "args": data["args"], "planner": data["planner"], "layer": data["layer"],
            "wall_s": proc["wall_s"]}


# -- 4. Hugging Face round trip ---------------------------------------------------------------------
def case_hf(a, work: Path, timeout_s: float, env: dict) -> dict[str, Any]:
    out = work / "hf_cuda_check.json"
    proc = run_cmd([sys.executable, "bench/hf_cuda_check.py", *(["--dry-run"] if a.dry_run else []),
                    "--json", str(out)], timeout_s, env)
    data = _read_json(out)
    if data is None:
        return failed(proc, f"hf_cuda_check.py exited {proc['rc']} without a result")
    if not data.get("ok"):
        return {**failed(proc, "logits or argmax out of bf16 tolerance, or the loss did not fall"), "result": data}
    return {"status": "ok", "result": data, "wall_s": proc["wall_s"]}


# -- 5. moeforge run ---------------------------------------------------------------------------------
def run_spec(dry_run: bool, out_dir: Path) -> dict[str, Any]:
    """The job spec of the run case: a scaled-up model on one GPU in bf16 (tiny on CPU)."""
    if dry_run:
        model = {"d_model": 64, "n_layers": 2, "n_heads": 2, "num_experts": 4, "top_k": 2, "d_expert": 64}
        seq, micro, steps, docs = 64, 4, 6, 40
        parallel = {"use_gpu": False, "threads_per_worker": 1}
        deepspeed = {"bf16": {"enabled": True}}  # the GPU's bf16 path, on DeepSpeed's CPU accelerator
    else:
        model = {"d_model": 1024, "n_layers": 8, "n_heads": 16, "num_experts": 16, "top_k": 4, "d_expert": 512}
        seq, micro, steps, docs = 1024, 16, 50, 3000
        parallel = {"use_gpu": True}  # bf16 is generated for a GPU
        deepspeed = {}
    return {
        "run": {"name": "gpu_suite", "output_dir": str(out_dir), "seed": 1234},
        "model": {**model, "moe_layers": "all", "tie_embeddings": True},
        "experts": {"backend": "grouped"},
        "parallel": {"world_size": 1, "expert_strategy": "replicated", "zero_stage": 1, **parallel},
        "data": {"seq_len": seq, "tokenizer": {"kind": "byte"}, "sources": [
            {"name": "english_docs", "kind": "embedded", "max_documents": docs},
            {"name": "python_code", "kind": "embedded", "max_documents": docs}]},
        "stages": [{"name": "pretrain", "steps": steps, "micro_batch_size": micro, "checkpoint_every": 10 * steps,
                    "optimizer": {"lr": 1e-3}, "lr_schedule": {"kind": "cosine", "warmup_steps": 5}}],
        "deepspeed": deepspeed,
        "metrics": {"progress_bar": False, "ray_metrics": False, "log_every": 1},
    }


def model_flops_per_token(spec: dict[str, Any], vocab_size: int = 257) -> dict[str, float]:
    """Training FLOPs per token: 6 x active parameters (experts counted top_k / num_experts; the
    tied embedding once, as the output head) + attention's 12 x layers x d_model x seq_len
    (QK^T and AV, forward and backward, the PaLM convention: the causal mask is not discounted)."""
    from dataclasses import replace

    import torch

    from jobs.plan import plan_job
    from jobs.spec import parse_spec
    from system.model import Transformer

    st = plan_job(parse_spec(spec, preflight=False)).stages[0]
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


def case_moeforge_run(a, work: Path, timeout_s: float, env: dict, peak: Optional[float]) -> dict[str, Any]:
    import yaml

    run_root = work / "moeforge_run"
    shutil.rmtree(run_root, ignore_errors=True)  # a finished stage would be skipped, not run
    run_root.mkdir(parents=True)
    spec = run_spec(a.dry_run, run_root / "runs")
    path = run_root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = run_cmd([sys.executable, "-m", "jobs.cli", "run", str(path)], timeout_s, env)
    metrics = run_root / "runs" / "gpu_suite" / "metrics.jsonl"
    recs = []
    if metrics.is_file():
        recs = [r for r in (json.loads(x) for x in metrics.read_text().splitlines() if x.strip()) if "loss" in r]
    if proc["rc"] != 0 or not recs:
        return failed(proc, f"moeforge run exited {proc['rc']} with {len(recs)} metric lines")
    warm = recs[min(len(recs) - 1, max(1, len(recs) // 5)):]  # the first steps include compilation/warm-up
    tps = statistics.median(r["tokens_per_s"] for r in warm)
    fl = model_flops_per_token(spec)
    achieved = tps * fl["flops_per_token"]
    return {"status": "ok", "steps": len(recs), "tokens_per_s": tps, "tokens_per_s_steps": len(warm),
            "step_time_s": statistics.median(r["step_time_s"] for r in warm),
            "loss_first": recs[0]["loss"], "loss_last": recs[-1]["loss"], **fl,
            "achieved_tflops": achieved / 1e12, "peak_bf16_tflops": peak,
            "mfu": achieved / (peak * 1e12) if peak else None,
            "model": spec["model"], "seq_len": spec["data"]["seq_len"],
            "micro_batch_size": spec["stages"][0]["micro_batch_size"], "zero_stage": 1, "dtype": "bf16",
            "wall_s": proc["wall_s"]}


# -- megablocks -------------------------------------------------------------------------------------
def megablocks_state(install: bool, dry_run: bool, timeout_s: float, env: dict) -> dict[str, Any]:
    """Whether the megablocks backend can run; with --install-megablocks (GPU only) first try
    scripts/install-megablocks.sh (it needs a package index and a CUDA compiler)."""
    probe = [sys.executable, "-c", "from experts.backends import unavailable_reason as u; "
                                   "import json; print(json.dumps(u('megablocks')))"]
    state: dict[str, Any] = {}
    if install and not dry_run:
        proc = run_cmd(["bash", "scripts/install-megablocks.sh"], timeout_s, env)
        state["install"] = {"status": "ok" if proc["rc"] == 0 else "failed", "proc": proc}
    p = run_cmd(probe, 120, env)
    try:
        reason = json.loads(p["stdout_tail"].strip().splitlines()[-1])
    except (ValueError, IndexError):
        reason = f"the probe failed: {p['stderr_tail'][-300:]}"
    state.update(available=reason is None, reason=reason)
    return state


# -- the suite --------------------------------------------------------------------------------------
def machine_info(dry_run: bool) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
                            "device": "cpu"}
    if not dry_run and torch.cuda.is_available():
        info.update(device=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    info["peak_bf16_tflops"] = peak_tflops(info["device"]) if info["device"] != "cpu" else None
    return info


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", default="runs/gpu_suite.json", help="the JSON written (default runs/gpu_suite.json)")
    ap.add_argument("--dry-run", action="store_true", help="the same cases on CPU at tiny sizes (2-3 minutes)")
    ap.add_argument("--budget-s", type=float, default=470.0, help="wall-clock budget of all cases (default 470)")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(CASE_NAMES)}")
    ap.add_argument("--install-megablocks", action="store_true",
                    help="first run scripts/install-megablocks.sh (GPU; needs a package index and nvcc)")
    ap.add_argument("--work-dir", help="scratch folder (default: a temporary one; kept with --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (its path goes into the JSON)")
    a = ap.parse_args(argv)
    import torch

    if not a.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on CPU", file=sys.stderr)
        return 2
    only = set(a.only.split(",")) if a.only else set(CASE_NAMES)
    if only - set(CASE_NAMES):
        ap.error(f"unknown cases {sorted(only - set(CASE_NAMES))}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    if a.dry_run:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    t_start = time.perf_counter()
    machine = machine_info(a.dry_run)
    result: dict[str, Any] = {"suite": "bench/gpu_suite.py", "dry_run": a.dry_run,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine,
                              "cases": {n: {"status": "skipped", "reason": "not run (--only)"} for n in CASE_NAMES}}

    def left() -> float:
        return a.budget_s - (time.perf_counter() - t_start)

    def write() -> None:
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")

    result["megablocks"] = megablocks_state(a.install_megablocks, a.dry_run, min(300.0, left() / 2), env)
    write()
    cases: list[tuple[str, float, Callable]] = [
        ("experts_cuda_tests", 90, case_experts_tests), ("moe_layer", 120, case_moe_layer),
        ("fssdp_overhead", 150, case_fssdp), ("hf_cuda_check", 120, case_hf),
        ("moeforge_run", 300, lambda *x: case_moeforge_run(*x, machine["peak_bf16_tflops"]))]
    todo = [c for c in cases if c[0] in only]
    for i, (name, cap, fn) in enumerate(todo):
        timeout = min(cap, left() - RESERVE_S * (len(todo) - i - 1))
        if timeout < 10:
            result["cases"][name] = {"status": "skipped", "reason": f"no time left in the {a.budget_s:.0f}s budget"}
            write()
            continue
        print(f"[gpu_suite] {name} (timeout {timeout:.0f}s) ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            res = fn(a, work, timeout, env)
        except Exception as e:  # the suite's own parsing: recorded, and the next case runs
            res = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        res.setdefault("case_wall_s", round(time.perf_counter() - t0, 1))
        result["cases"][name] = res
        print(f"[gpu_suite] {name}: {res['status']} in {res['case_wall_s']}s"
              + (f" ({res.get('error') or res.get('reason')})" if res["status"] != "ok" else ""),
              file=sys.stderr, flush=True)
        write()
    if a.keep:
        result["work_dir"] = str(work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    write()
    print(json.dumps({n: c["status"] for n, c in result["cases"].items()}))
    return 1 if any(c["status"] == "failed" for c in result["cases"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
