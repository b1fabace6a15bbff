#!/usr/bin/env python
"""The GPU suite: every GPU check of the project in one command, one JSON, on a bare machine.

    bash scripts/gpu_wheels.sh                                   # where a package index is reachable
    python bench/gpu_suite.py --budget-s 300 --out runs/gpu_suite.json   # the GPU machine: < 5 minutes
    python bench/gpu_suite.py --dry-run --out /tmp/s.json        # the same code paths on CPU, tiny sizes

The GPU machine needs Python, torch, transformers and safetensors; no Ray, no network. What else
the cases import (DeepSpeed as a pure-Python wheel and its dependencies, pytest) comes from
`--wheels` (default wheels/gpu when present, gathered by scripts/gpu_wheels.sh): installed
offline into a temporary folder put first on the cases' PYTHONPATH; a wheel whose package is
already installed at that version or newer is left out, so the machine's torch is never touched.

Cases, each in subprocesses with its own timeout (a case that fails or times out is recorded with
its error and the others still run; the JSON is rewritten after every case):

* experts_cuda_tests: pytest on tests/experts -k cuda (megablocks against the reference on CUDA).
* moe_layer: bench/moe_layer.py (d_model 2048, 64 experts top-8, bf16, 16384 tokens) per backend.
* fssdp_overhead: bench/fssdp_overhead.py on the GPU (the planner's host cost; one rank's layer).
* hf_cuda_check: bench/hf_cuda_check.py (Hugging Face import -> bf16 training -> export -> logits).
* train_replicated, train_ep, train_fssdp, train_deepspeed_moe: one launch of torch's launcher
  (`bench/train_probe.py`: jobs.torchrun, NCCL, world size 1, bf16, ZeRO 1) trains each
  strategy; tokens/s, MFU, host syncs and host-tensor collectives per step.
* bf16_skipped_step: in the same launch, a small ZeRO-0 stage per strategy with an Inf loss at
  step 3: that step must change no tensor.
* collectives_cost: bench/collectives_cost.py, the cost of staging a host tensor for NCCL.
* flex_attention: system.attention_check.compare_flex_with_reference (gradients against the CPU path).
* multi_gpu: bench/multi_gpu.py (ep and fssdp on every GPU) where the machine has 2 or more.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import gpu_cases as C  # noqa: E402

CASE_NAMES = ("experts_cuda_tests", "moe_layer", "fssdp_overhead", "hf_cuda_check", "train_replicated", "train_ep",
              "train_fssdp", "train_deepspeed_moe", "bf16_skipped_step", "collectives_cost", "flex_attention",
              "multi_gpu")
TRAIN_CASES = {"train_replicated", "train_ep", "train_fssdp", "train_deepspeed_moe", "bf16_skipped_step"}
RESERVE_S = 10  # kept back for every later group of cases when a timeout is cut to the budget
# What the cases import beyond the standard library (module: the distribution that provides it).
NEEDED = {"torch": "torch", "numpy": "numpy", "yaml": "pyyaml", "safetensors": "safetensors",
          "transformers": "transformers", "deepspeed": "deepspeed", "pydantic": "pydantic", "hjson": "hjson",
          "cpuinfo": "py-cpuinfo", "psutil": "psutil", "msgpack": "msgpack", "einops": "einops", "pytest": "pytest"}


# -- the wheels --------------------------------------------------------------------------------------
def _wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return name.replace("_", "-").lower(), version


def _newer_or_same(have: str, want: str) -> bool:
    try:
        from packaging.version import Version

        return Version(have) >= Version(want)
    except Exception:  # noqa: BLE001 - no packaging, or an odd version string
        return have == want


def _compatible(path: Path) -> bool:
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename

        return bool(set(parse_wheel_filename(path.name)[3]) & set(sys_tags()))
    except Exception:  # noqa: BLE001 - without packaging, let pip decide
        return True


def install_wheels(wheels: Path, target: Path) -> dict[str, Any]:
    """Install offline, into `target`, every wheel of `wheels` whose package this Python lacks (or
    has older); pip with --no-index --no-deps, or, without pip, by unpacking the wheels."""
    res: dict[str, Any] = {"dir": str(wheels), "target": str(target), "installed": [], "present": [],
                           "incompatible": []}
    chosen = []
    for w in sorted(wheels.glob("*.whl")):
        name, version = _wheel_name_version(w)
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have is not None and _newer_or_same(have, version):
            res["present"].append(f"{name} {have} (wheel {version})")
        elif not _compatible(w):
            res["incompatible"].append(w.name)
        else:
            chosen.append(w)
    target.mkdir(parents=True, exist_ok=True)
    if not chosen:
        return res
    t0 = time.perf_counter()
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if has_pip:
        p = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                            "--disable-pip-version-check", "--no-compile", "--target", str(target), *map(str, chosen)],
                           capture_output=True, text=True)
        res["pip"] = {"rc": p.returncode, "stderr_tail": p.stderr[-1500:]}
    if not has_pip or p.returncode != 0:
        for w in chosen:  # a wheel is a zip of the files as installed
            with zipfile.ZipFile(w) as z:
                z.extractall(target)
        res["unpacked"] = True
    res["installed"] = [w.name for w in chosen]
    res["install_s"] = round(time.perf_counter() - t0, 1)
    return res


def missing_modules(env: dict) -> list[str]:
    """The modules of NEEDED that the cases' Python cannot find (with the wheels on its path)."""
    code = ("import importlib.util, json, sys; "
            "print(json.dumps([m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]))")
    p = subprocess.run([sys.executable, "-c", code, *NEEDED], cwd=ROOT, env=env, capture_output=True, text=True)
    try:
        return [f"{m} ({NEEDED[m]})" for m in json.loads(p.stdout.strip().splitlines()[-1])]
    except (ValueError, IndexError):
        return [f"the check failed: {p.stderr[-300:]}"]


# -- the suite -----------------------------------------------------------------------------------------
def machine_info(dry_run: bool) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
                            "device": "cpu", "gpus": 0}
    if not dry_run and torch.cuda.is_available():
        info.update(device=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    info["peak_bf16_tflops"] = C.peak_tflops(info["device"]) if info["device"] != "cpu" else None
    return info


def plan_groups(machine: dict[str, Any]) -> list[tuple[tuple[str, ...], float, Callable]]:
    """(cases, cap in seconds, function) in the order they run; the training launch covers several."""
    peak, gpus = machine["peak_bf16_tflops"], machine["gpus"]
    return [
        (("train_replicated", "train_ep", "train_fssdp", "train_deepspeed_moe", "bf16_skipped_step"), 150,
         lambda *x: C.case_train(*x, peak)),
        (("collectives_cost",), 40, C.case_collectives),
        (("moe_layer",), 60, C.case_moe_layer),
        (("hf_cuda_check",), 60, C.case_hf),
        (("flex_attention",), 90, C.case_flex),
        (("experts_cuda_tests",), 60, C.case_experts_tests),
        (("fssdp_overhead",), 60, C.case_fssdp),
        (("multi_gpu",), 150, lambda *x: C.case_multi_gpu(*x, gpus)),
    ]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", default="runs/gpu_suite.json", help="the JSON written (default runs/gpu_suite.json)")
    ap.add_argument("--dry-run", action="store_true", help="the same cases on CPU at tiny sizes")
    ap.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget of everything (default 300)")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(CASE_NAMES)}")
    ap.add_argument("--skip", help="comma-separated cases not to run")
    ap.add_argument("--wheels", help="folder of wheels to install offline first (default: wheels/gpu if present; "
                                     "'none': install nothing)")
    ap.add_argument("--install-megablocks", action="store_true",
                    help="first run scripts/install-megablocks.sh (GPU; needs a package index and nvcc)")
    ap.add_argument("--work-dir", help="scratch folder (default: a temporary one; kept with --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (its path goes into the JSON)")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    import torch

    if not a.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on CPU", file=sys.stderr)
        return 2
    only = set(a.only.split(",")) if a.only else set(CASE_NAMES)
    skip = set(a.skip.split(",")) if a.skip else set()
    if (only | skip) - set(CASE_NAMES):
        ap.error(f"unknown cases {sorted((only | skip) - set(CASE_NAMES))}")
    a.cases = only - skip
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info(a.dry_run)
    result: dict[str, Any] = {"suite": "bench/gpu_suite.py", "dry_run": a.dry_run, "budget_s": a.budget_s,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine,
                              "cases": {n: {"status": "skipped", "reason": "not selected (--only/--skip)"}
                                        for n in CASE_NAMES}}

    def left() -> float:
        return a.budget_s - (time.perf_counter() - t_start)

    def write() -> None:
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")

    wheels = Path(a.wheels) if a.wheels and a.wheels != "none" else (ROOT / "wheels" / "gpu")
    extra_paths: tuple[str, ...] = ()
    if a.wheels != "none" and wheels.is_dir():
        result["wheels"] = install_wheels(wheels, work / "site")
        extra_paths = (str(work / "site"),)
    elif a.wheels and a.wheels != "none":
        ap.error(f"--wheels {a.wheels}: no such folder")
    env = C.gpu_train.env_with_root(extra_paths=extra_paths)
    env.update(RAY_USAGE_STATS_ENABLED="0", TORCH_NCCL_ASYNC_ERROR_HANDLING="1")
    if a.dry_run:  # one intra-op thread per process: tiny sizes
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    result["missing"] = missing_modules(env)
    result["megablocks"] = C.megablocks_state(a.install_megablocks, a.dry_run, min(300.0, left() / 2), env)
    write()
    groups = [g for g in plan_groups(machine) if set(g[0]) & a.cases]

    def run_group(i: int, names: tuple[str, ...], cap: float, fn: Callable) -> None:
        timeout = min(cap, left() - RESERVE_S * (len(groups) - i - 1))
        selected = [n for n in names if n in a.cases]
        if timeout < 10:
            for n in selected:
                result["cases"][n] = {"status": "skipped", "reason": f"no time left in the {a.budget_s:.0f}s budget"}
            write()
            return
        print(f"[gpu_suite] {','.join(selected)} (timeout {timeout:.0f}s) ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            res = fn(a, work, timeout, env)
        except Exception as e:  # the suite's own parsing: recorded, and the next case runs
            res = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        wall = round(time.perf_counter() - t0, 1)
        many = res.pop("group") if "group" in res else {names[0]: res}  # a group case: one result per name
        if res.get("status") == "failed" and len(names) > 1:  # the group itself broke
            many = {n: dict(res) for n in names}
        for n in selected:
            r = many.get(n, {"status": "failed", "error": "the case returned no result"})
            r.setdefault("case_wall_s", wall)
            result["cases"][n] = r
            print(f"[gpu_suite] {n}: {r.get('status')}"
                  + (f" ({r.get('error') or r.get('reason')})" if r.get("status") != "ok" else ""),
                  file=sys.stderr, flush=True)
        write()

    for i, g in enumerate(groups):
        run_group(i, *g)
    if a.keep:
        result["work_dir"] = str(work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    write()
    print(json.dumps({n: c["status"] for n, c in result["cases"].items()}))
    return 1 if any(c.get("status") == "failed" for c in result["cases"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
