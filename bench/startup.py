#!/usr/bin/env python
"""Where the time to the first step goes: `moeforge run` of a short quickstart-sized stage, in a
subprocess, with the moment each milestone appears (the console's lines and the first line of
metrics.jsonl), over several runs in a row (the first may pay one-off costs).

    python bench/startup.py [--runs 2] [--workers 2] [--steps 3] [--first-run] [--no-prebuilt-ops]

--first-run: every run as the first one after set-up (an empty corpus cache, MOEFORGE_CACHE);
--no-prebuilt-ops: an empty TORCH_EXTENSIONS_DIR, as before set-up built DeepSpeed's shm op
(the run builds it).

Milestones: Ray started (embedded Ray up, dashboard address printed), stage banner (spec parsed,
plan made, Ray Train about to start), rendezvous (rank 0's train function running:
torch.distributed is up), first step (the first metrics line written: corpus built, model,
DeepSpeed engine, first forward/backward), done (process exit).

Then, per run, where rank 0's time went (from the `[startup-trace]` lines that
MOEFORGE_STARTUP_TRACE makes the workers write into RUN/logs/STAGE/rank0.log; seconds since the
command started): worker process started, train function entered, deepspeed imported, DeepSpeed's
communication set up (op probes, shm op load), corpus built, model built, engine built, training
loop entered.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MILESTONES = (("ray", "embedded Ray started"), ("banner", "] stage "), ("rendezvous", "rendezvous at"))
TRACE_PREFIX = "[startup-trace]"
TRACE_KEYS = ("worker_process", "train_fn", "deepspeed_imported", "deepspeed_comm", "corpus", "model", "engine",
              "fit")
TRACE_HEADS = ("process", "train_fn", "ds_import", "ds_comm", "corpus", "model", "engine", "fit")


def read_trace(log: Path, t0_epoch: float) -> dict[str, float]:
    """{label: seconds since the command started} from a rank's log's `[startup-trace]` lines."""
    out: dict[str, float] = {}
    if not log.is_file():
        return out
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(TRACE_PREFIX):
            parts = line.split()
            if len(parts) == 3:
                out.setdefault(parts[1], float(parts[2]) - t0_epoch)
    return out


def one_run(spec_path: Path, metrics: Path, extra_env: dict[str, str]) -> tuple[dict[str, float], dict[str, float]]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", MOEFORGE_STARTUP_TRACE="1", **extra_env)
    t0_epoch = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(spec_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[str, float] = {}

    def watch_metrics():
        while proc.poll() is None and "first_step" not in seen:
            if metrics.is_file() and metrics.stat().st_size > 0:
                seen["first_step"] = time.perf_counter() - t0
                return
            time.sleep(0.05)

    th = threading.Thread(target=watch_metrics, daemon=True)
    th.start()
    for line in proc.stdout:
        for key, needle in MILESTONES:
            if key not in seen and needle in line:
                seen[key] = time.perf_counter() - t0
    proc.wait()
    seen["done"] = time.perf_counter() - t0
    th.join(timeout=1)
    if proc.returncode != 0:
        raise SystemExit(f"moeforge run failed (exit {proc.returncode})")
    logs = metrics.parent / "logs"
    rank0 = next(iter(sorted(logs.glob("*/rank0.log"))), None) if logs.is_dir() else None
    return seen, (read_trace(rank0, t0_epoch) if rank0 else {})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--first-run", action="store_true", help="an empty corpus cache for every run")
    ap.add_argument("--no-prebuilt-ops", action="store_true", help="an empty TORCH_EXTENSIONS_DIR for every run")
    a = ap.parse_args(argv)
    spec = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    spec["parallel"]["world_size"] = a.workers
    spec["stages"] = [{**spec["stages"][0], "steps": a.steps, "checkpoint_every": a.steps, "eval_every": 0}]
    spec["metrics"] = {**spec.get("metrics", {}), "progress_bar": False}
    keys = ("ray", "banner", "rendezvous", "first_step", "done")
    print(f"moeforge run, quickstart model, {a.workers} workers, {a.steps} steps; seconds since the command started")
    print(f"{'run':>4} " + " ".join(f"{k:>11}" for k in keys))
    traces = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.runs):
            out = Path(tmp) / f"r{i}"
            spec["run"] = {**spec["run"], "name": "startup", "output_dir": str(out)}
            path = Path(tmp) / f"startup{i}.yaml"
            path.write_text(yaml.safe_dump(spec, sort_keys=False))
            extra = {}
            if a.first_run:
                extra["MOEFORGE_CACHE"] = str(Path(tmp) / f"cache{i}")
            if a.no_prebuilt_ops:
                extra["TORCH_EXTENSIONS_DIR"] = str(Path(tmp) / f"torch_extensions{i}")
            got, trace = one_run(path, out / "startup" / "metrics.jsonl", extra)
            traces.append(trace)
            print(f"{i + 1:>4} " + " ".join(f"{got.get(k, float('nan')):>11.1f}" for k in keys), flush=True)
    print("\nrank 0, seconds since the command started (MOEFORGE_STARTUP_TRACE)")
    print(f"{'run':>4} " + " ".join(f"{h:>9}" for h in TRACE_HEADS))
    for i, trace in enumerate(traces):
        print(f"{i + 1:>4} " + " ".join(f"{trace.get(k, float('nan')):>9.1f}" for k in TRACE_KEYS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
