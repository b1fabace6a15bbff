"""Shared plumbing of the training experiments under bench/: run every stage of a job spec on N
gloo ranks in fresh processes (the same `run_stage` Ray Train workers call, without Ray's start-up
cost), then read the metrics back."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _stage_worker(rank: int, world: int, spec: dict, index: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from jobs.stage_runner import run_stage

    run_stage(spec, index)


def run_job(spec: dict[str, Any], world: int = 1, threads: int = 1) -> list[dict[str, Any]]:
    """Run all stages in order (skipping finished ones); return the run's metric records."""
    from jobs.layout import RunLayout
    from jobs.plan import plan_job
    from jobs.spec import parse_spec
    from parallel.testing import run_distributed
    from system.metrics import read_jsonl

    plan = plan_job(parse_spec(spec))
    layout = RunLayout(plan.run_dir)
    for st in plan.stages:
        if layout.done_file(st.name).exists():
            continue
        t0 = time.time()
        run_distributed(_stage_worker, st.world_size, spec, st.index, threads, timeout_s=6 * 3600)
        print(f"  [{plan.run.name}] stage {st.name}: {time.time() - t0:.0f}s", flush=True)
    return read_jsonl(layout.metrics_file)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
