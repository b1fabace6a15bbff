#!/usr/bin/env python
"""Where the time to the first step goes: `moeforge run` of a short quickstart-sized stage, in a
subprocess, with the moment each milestone appears (the console's lines and the first line of
metrics.jsonl), over several runs in a row (the first may pay one-off costs).

    python bench/startup.py [--runs 2] [--workers 2] [--steps 3]

Milestones: Ray started (embedded Ray up, dashboard address printed), stage banner (spec parsed,
plan made, Ray Train about to start), rendezvous (rank 0's train function running:
torch.distributed is up), first step (the first metrics line written: corpus built, model,
DeepSpeed engine, first forward/backward), done (process exit).
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


def one_run(spec_path: Path, metrics: Path) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
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
    return seen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args(argv)
    spec = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    spec["parallel"]["world_size"] = a.workers
    spec["stages"] = [{**spec["stages"][0], "steps": a.steps, "checkpoint_every": a.steps, "eval_every": 0}]
    spec["metrics"] = {**spec.get("metrics", {}), "progress_bar": False}
    keys = ("ray", "banner", "rendezvous", "first_step", "done")
    print(f"moeforge run, quickstart model, {a.workers} workers, {a.steps} steps; seconds since the command started")
    print(f"{'run':>4} " + " ".join(f"{k:>11}" for k in keys))
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.runs):
            out = Path(tmp) / f"r{i}"
            spec["run"] = {**spec["run"], "name": "startup", "output_dir": str(out)}
            path = Path(tmp) / f"startup{i}.yaml"
            path.write_text(yaml.safe_dump(spec, sort_keys=False))
            got = one_run(path, out / "startup" / "metrics.jsonl")
            print(f"{i + 1:>4} " + " ".join(f"{got.get(k, float('nan')):>11.1f}" for k in keys), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
