"""The cases of bench/gpu_suite.py. Each takes (args, work dir, timeout, env) and returns its
section of the suite's JSON: `status` ok / failed (with `error` and the process's output tails) /
skipped (with `reason`), and its figures. docs/gpu.md says what each measures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

import gpu_train

ROOT = gpu_train.ROOT
STRATEGIES = ("replicated", "ep", "fssdp", "deepspeed_moe")
# Dense bf16 peak (TFLOP/s, no sparsity) by a substring of torch.cuda.get_device_name; the first match wins.
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 SXM", 989.0), ("H100 80GB HBM3", 989.0), ("H100 NVL", 835.0),
                    ("H100 PCIe", 756.0), ("A100", 312.0)]
# FlexAttention (bf16 on the GPU) against the fp32 references: the largest difference allowed,
# relative to the reference's largest magnitude (bf16 keeps 8 bits of mantissa: ~4e-3 a rounding).
FLEX_MAX_REL = {"bfloat16": 5e-2, "float16": 1e-2, "float32": 1e-4}


def peak_tflops(device_name: str) -> Optional[float]:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


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
    return {"status": "failed", "error": error, "proc": {k: v for k, v in proc.items() if k != "probe"}}


def read_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# -- CUDA tests of tests/experts -------------------------------------------------------------------
def case_experts_tests(a, work: Path, timeout_s: float, env: dict) -> dict[str, Any]:
    xml = work / "experts_cuda_tests.xml"
    select = "cuda"
    where = "tests/experts/test_backends.py" if a.dry_run else "tests/experts"  # dry run: one file to collect
    proc = run_cmd([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", where, "-k", select,
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
    res = {"selected": f"{where} -k {select}", "passed": counts["tests"] - counts["failures"]
           - counts["errors"] - counts["skipped"], "failed": counts["failures"], "errors": counts["errors"],
           "skipped": counts["skipped"], "skip_reasons": sorted(reasons), "wall_s": proc["wall_s"]}
    if res["failed"] or res["errors"] or proc["rc"] not in (0, 5):
        return {**failed(proc, f"{res['failed']} failed, {res['errors']} errors"), **res}
    if res["passed"] == 0:
        return {"status": "skipped", "reason": "; ".join(sorted(reasons)) or "no CUDA test selected", **res}
    return {"status": "ok", **res}


# -- the MoE layer ---------------------------------------------------------------------------------
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
    data = read_json(out)
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


# -- FSSDP overhead --------------------------------------------------------------------------------
def case_fssdp(a, work: Path, timeout_s: float, env: dict) -> dict[str, Any]:
    out = work / "fssdp_overhead.json"
    if a.dry_run:
        args = ["--device", "cpu", "--d-model", "64", "--d-expert", "64", "--dtype", "bf16", "--experts", "8",
                "--layers", "2", "--tokens", "256", "--ranks", "1,8", "--reps", "3", "--warmup", "1", "--iters", "2"]
    else:  # the planner at 1-64 simulated ranks (few repetitions) and one rank's layer step
        args = ["--device", "cuda", "--d-model", "2048", "--d-expert", "1408", "--dtype", "bf16", "--reps", "5",
                "--warmup", "2", "--iters", "5"]
    proc = run_cmd([sys.executable, "bench/fssdp_overhead.py", *args, "--json", str(out)], timeout_s, env)
    data = read_json(out)
    if proc["rc"] != 0 or data is None:
        return failed(proc, f"fssdp_overhead.py exited {proc['rc']}")
    return {"status": "ok", "args": data["args"], "planner": data["planner"], "layer": data["layer"],
            "wall_s": proc["wall_s"]}


# -- Hugging Face round trip -----------------------------------------------------------------------
def case_hf(a, work: Path, timeout_s: float, env: dict) -> dict[str, Any]:
    out = work / "hf_cuda_check.json"
    proc = run_cmd([sys.executable, "bench/hf_cuda_check.py", *(["--dry-run"] if a.dry_run else []),
                    "--json", str(out)], timeout_s, env)
    data = read_json(out)
    if data is None:
        return failed(proc, f"hf_cuda_check.py exited {proc['rc']} without a result")
    if not data.get("ok"):
        return {**failed(proc, "logits or argmax out of bf16 tolerance, or the loss did not fall"), "result": data}
    return {"status": "ok", "result": data, "wall_s": proc["wall_s"]}


# -- training: every strategy, world size 1, bf16, torch's launcher ---------------------------------
def case_train(a, work: Path, timeout_s: float, env: dict, peak: Optional[float]) -> dict[str, Any]:
    """One launch (`python -m torch.distributed.run --nproc-per-node 1 bench/train_probe.py`, i.e.
    jobs.torchrun: NCCL on the GPU, gloo on CPU) trains every strategy's measured and guard
    stages; a stage that fails is recorded and the launch goes on with the stages after it.
    Returns {"group": {train_<s>: ..., bf16_skipped_step: ...}}."""
    root = work / "train"
    strategies = [s for s in STRATEGIES if f"train_{s}" in a.cases]
    spec = gpu_train.train_spec(root / "runs", strategies, dry_run=a.dry_run,
                                guard="bf16_skipped_step" in a.cases)
    run_dir = root / "runs" / spec["run"]["name"]
    names = [st["name"] for st in spec["stages"]]
    deadline = time.perf_counter() + timeout_s
    launches, failures, probes = [], {}, {}
    todo = names
    while todo:
        left = deadline - time.perf_counter()
        if left < 10:
            for n in todo:
                failures.setdefault(n, {"error": f"no time left of the case's {timeout_s:.0f}s"})
            break
        guards = [n for n in todo if n.startswith("guard_")]
        proc = gpu_train.launch(spec, root, 1, left, env, stages=todo, guard=guards)
        launches.append({k: v for k, v in proc.items() if k not in ("probe", "stdout_tail", "stderr_tail")})
        probe = proc["probe"] or {}
        for n in todo:
            probes[n] = probe
        done = [n for n in todo if (run_dir / "stages" / n / "DONE.json").is_file()]
        if proc["rc"] == 0 and len(done) == len(todo):
            break
        bad = next((n for n in todo if n not in done), todo[-1])
        failures[bad] = failed(proc, f"stage {bad} did not finish (exit {proc['rc']})")
        todo = todo[todo.index(bad) + 1:]
        if proc["timed_out"]:
            for n in todo:
                failures.setdefault(n, {"error": "not run: the launch timed out"})
            break
    out: dict[str, Any] = {}
    for s in strategies:
        name = f"train_{s}"
        idx = names.index(name)
        flops = gpu_train.model_flops_per_token(spec, idx)
        tokens = spec["stages"][idx]["micro_batch_size"] * spec["data"]["seq_len"]
        res = gpu_train.summarize_stage(run_dir, name, probes.get(name), flops, peak, tokens)
        res["memory"] = gpu_train.estimate_stage(spec, idx, res.get("cuda_peak_bytes"))
        res.update(strategy=s, world_size=1, zero_stage=1, dtype="bf16", model=spec["model"], launches=launches,
                   seq_len=spec["data"]["seq_len"], micro_batch_size=spec["stages"][idx]["micro_batch_size"],
                   launcher="torch.distributed.run --nproc-per-node 1 (jobs.torchrun)",
                   injected_nonfinite_step=gpu_train.BAD_STEP)
        if name in failures:
            out[name] = {**failures[name], **res, "status": "failed"}
        elif res["steps"] == 0:
            out[name] = {"status": "failed", "error": "no metric lines", **res}
        else:
            out[name] = {"status": "ok", **res}
    if "bf16_skipped_step" in a.cases:
        out["bf16_skipped_step"] = _guard_case(strategies, probes, failures)
    return {"group": out}


def _guard_case(strategies: list[str], probes: dict, failures: dict) -> dict[str, Any]:
    per: dict[str, Any] = {}
    for s in strategies:
        name = f"guard_{s}"
        if name in failures:
            per[s] = {"ok": False, **failures[name]}
        else:
            per[s] = (probes.get(name) or {}).get("guard", {}).get(name) or {"ok": False, "error": "no verdict"}
    bad = [s for s, v in per.items() if not v.get("ok")]
    res = {"what": f"an Inf loss injected at step {gpu_train.BAD_STEP} (MOEFORGE_FAULT_NONFINITE) of a bf16 "
                   f"ZeRO-0 stage at world size 1: every checkpointed tensor (weights, optimizer state) "
                   f"unchanged by it, most changed by the next step", "strategies": per}
    if bad:
        return {"status": "failed", "error": f"the skipped step changed tensors or did not run: {bad}", **res}
    return {"status": "ok", **res}


# -- the collectives choice --------------------------------------------------------------------------
def case_collectives(a, work: Path, timeout_s: float, env: dict) -> dict[str, Any]:
    out = work / "collectives_cost.json"
    proc = run_cmd([sys.executable, "bench/collectives_cost.py", "--device", "cpu" if a.dry_run else "cuda",
                    "--iters", "20" if a.dry_run else "200", "--json", str(out)], timeout_s, env)
    data = read_json(out)
    if proc["rc"] != 0 or data is None:
        return failed(proc, f"collectives_cost.py exited {proc['rc']}")
    return {"status": "ok", **data, "wall_s": proc["wall_s"],
            "per_step": "staging_extra_us x host_collectives_per_step of each train_<strategy> case"}


# -- FlexAttention -----------------------------------------------------------------------------------
# The module whose compare_flex_with_reference checks FlexAttention against the CPU paths; the
# test suite names a stub (the real comparison compiles for 20-50 s on CPU).
FLEX_MODULE = os.environ.get("GPU_SUITE_FLEX_MODULE", "system.attention_check")
FLEX_SNIPPET = f"""
import json, sys, torch
from {FLEX_MODULE} import compare_flex_with_reference
r = compare_flex_with_reference(device="cuda", dtype=torch.bfloat16, dry_run=sys.argv[2] == "1")
open(sys.argv[1], "w").write(json.dumps(r))
"""


def flex_verdict(data: dict[str, Any]) -> tuple[bool, float]:
    """(within tolerance, the tolerance) of compare_flex_with_reference's result."""
    tol = FLEX_MAX_REL.get(data.get("dtype", ""), 1e-2)
    return data["max_rel"] <= tol, tol


def case_flex(a, work: Path, timeout_s: float, env: dict) -> dict[str, Any]:
    import importlib.util

    if importlib.util.find_spec(FLEX_MODULE) is None:
        return {"status": "skipped", "reason": f"{FLEX_MODULE} (FlexAttention's comparison) is not in this checkout"}
    out = work / "flex_attention.json"
    proc = run_cmd([sys.executable, "-c", FLEX_SNIPPET, str(out), "1" if a.dry_run else "0"], timeout_s, env)
    data = read_json(out)
    if proc["rc"] != 0 or data is None:
        if "ImportError" in proc["stderr_tail"] and "compare_flex_with_reference" in proc["stderr_tail"]:
            return {"status": "skipped", "reason": f"{FLEX_MODULE} has no compare_flex_with_reference"}
        return failed(proc, f"the FlexAttention comparison exited {proc['rc']}")
    ok, tol = flex_verdict(data)
    res = {**data, "max_rel_allowed": tol, "wall_s": proc["wall_s"],
           "what": "forward and q/k/v gradients of FlexAttention (compiled, block mask) against the split "
                   "CPU path and the old masked SDPA in fp32" + (" (dry run: CPU, forward only)" if a.dry_run else "")}
    return {"status": "ok", **res} if ok else {**failed(proc, f"max_rel {data['max_rel']:.3g} > {tol}"), **res}


# -- several GPUs ------------------------------------------------------------------------------------
def case_multi_gpu(a, work: Path, timeout_s: float, env: dict, gpus: int) -> dict[str, Any]:
    if not a.dry_run and gpus < 2:
        return {"status": "skipped", "reason": f"{gpus} GPU on this machine: bench/multi_gpu.py needs 2 or more"}
    out = work / "multi_gpu.json"
    extra = ["--dry-run"] if a.dry_run else ["--nproc", str(min(gpus, 8))]
    proc = run_cmd([sys.executable, "bench/multi_gpu.py", *extra, "--json", str(out),
                    "--work-dir", str(work / "multi_gpu")], timeout_s, env)
    data = read_json(out)
    if data is None:
        return failed(proc, f"multi_gpu.py exited {proc['rc']} without a result")
    bad = [s for s, r in data["strategies"].items() if r.get("status") != "ok"]
    if proc["rc"] != 0 or bad:
        return {**failed(proc, f"strategies that failed: {bad}"), **data}
    return {"status": "ok", **data, "wall_s": proc["wall_s"]}


# -- megablocks ----------------------------------------------------------------------------------------
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
