#!/usr/bin/env python
"""How long a checkpoint stalls training: synchronous against asynchronous, in the same run.

One gloo run of `--ranks` ranks (default 2; replicated experts, ZeRO 1: every rank writes its
optimizer partition, rank 0 also the model file) of a model large enough for >= 200 MB of
checkpoint per rank. `--ranks 1` leaves the second core of a 2-core machine to the writer, as a
GPU node's idle cores would be; with 2 ranks on 2 cores the writer competes with training. It
checkpoints asynchronously after step `--warm-at` (the first one allocates the host buffers
every later one reuses), synchronously after `--sync-at`, asynchronously after `--async-at` and
at the end. The stall of a checkpoint at step c is the wall time of the K steps after it,
time[c + K] - time[c] (each step's metric `time`), minus K x the median step time of the steps
outside every window: what the checkpoint added to training, including the slower steps while
a background write competes for the CPU. Also printed: the time each rank spent inside `save`.

    python bench/checkpoint_stall.py [--ranks 2] [--d-expert 1280] [--steps 26] [--k 4]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _spec(out: Path, a) -> dict:
    from tests.helpers import tiny_spec

    return tiny_spec(out, run={"name": "stall"},
                     model={"d_model": a.d_model, "n_layers": a.layers, "n_heads": 8, "d_ff": 4 * a.d_model,
                            "num_experts": 4, "top_k": 2, "d_expert": a.d_expert},
                     parallel={"world_size": a.ranks, "expert_strategy": a.strategy, "zero_stage": 1},
                     stages=[{"name": "pretrain", "steps": a.steps, "micro_batch_size": 1,
                              "checkpoint_every": 1, "optimizer": {"lr": 1e-4},
                              "lr_schedule": {"kind": "constant"}}])


def _rank(rank, world, spec, chosen, sync_at):
    """The stage, checkpointing only after the steps in `chosen` (synchronously after `sync_at`,
    else asynchronously); returns this rank's seconds inside `save` per step."""
    import jobs.stage_runner as sr
    from system.checkpoint import CheckpointManager

    inside: dict[int, float] = {}

    class Chosen(CheckpointManager):
        def save(self, engine, step, *args, **kwargs):
            if step not in chosen:
                return self.root / f"step_{step:08d}"
            self.async_save, self.world = step != sync_at, world
            t0 = time.perf_counter()
            out = super().save(engine, step, *args, **kwargs)
            inside[step] = time.perf_counter() - t0
            return out

    keep = sr.CheckpointManager
    sr.CheckpointManager = Chosen
    try:
        sr.run_stage(spec, 0)
    finally:
        sr.CheckpointManager = keep
    return inside


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2, help="gloo ranks (1: a core left free for the writer)")
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--d-expert", type=int, default=1280)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--strategy", default="replicated", choices=("replicated", "ep"))
    ap.add_argument("--steps", type=int, default=26)
    ap.add_argument("--warm-at", type=int, default=3)
    ap.add_argument("--sync-at", type=int, default=8)
    ap.add_argument("--async-at", type=int, default=14)
    ap.add_argument("--k", type=int, default=4, help="steps after a checkpoint counted in its window")
    ap.add_argument("--dir", default=None, help="where the run writes (default: a new temporary directory)")
    a = ap.parse_args(argv)
    from parallel.testing import run_distributed
    from system.metrics import read_jsonl

    out = Path(a.dir or tempfile.mkdtemp(prefix="moeforge-stall-"))
    spec = _spec(out, a)
    import os

    load0 = os.getloadavg()[0]
    chosen = (a.warm_at, a.sync_at, a.async_at, a.steps)
    inside = run_distributed(_rank, a.ranks, spec, chosen, a.sync_at, timeout_s=900, reuse=False)
    ranks = range(a.ranks)
    run = out / "runs" / "stall"
    t = {r["step"]: r["time"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}
    windows = {"async (first: allocates its buffers)": a.warm_at, "sync": a.sync_at, "async": a.async_at}
    in_window = {s for c in windows.values() for s in range(c + 1, c + a.k + 1)}
    steady = [t[s] - t[s - 1] for s in range(3, a.steps + 1) if s not in in_window and s - 1 in t]
    med = statistics.median(steady)
    ck = run / "stages" / "pretrain" / "checkpoints"
    per_rank = {r: sum(f.stat().st_size for f in (ck / f"step_{a.async_at:08d}").rglob("*")
                       if f.is_file() and (f"rank_{r}_" in f.name or f"rank{r}" in f.name
                                           or (r == 0 and f.name.startswith("mp_rank_"))))
                for r in ranks}
    print(f"state per rank (files of one checkpoint): " + ", ".join(f"rank {r} {b / 2**20:.0f} MiB"
                                                                    for r, b in per_rank.items()))
    print(f"median step {med:.3f} s over {len(steady)} steps outside the windows; K = {a.k}")
    stall = {}
    for name, c in windows.items():
        stall[name] = (t[c + a.k] - t[c]) - a.k * med
        steps = " ".join(f"{t[s] - t[s - 1]:.2f}" for s in range(c + 1, c + a.k + 1))
        print(f"{name} checkpoint after step {c}: {a.k} steps took {t[c + a.k] - t[c]:.3f} s ({steps}), stall "
              f"{stall[name]:.3f} s; inside save(): " + ", ".join(f"rank {r} {inside[r][c]:.3f} s" for r in ranks))
    print(f"async stall / sync stall = {stall['async'] / stall['sync']:.3f}; inside save(), async / sync = "
          f"{max(inside[r][a.async_at] for r in ranks) / max(inside[r][a.sync_at] for r in ranks):.3f}")
    print(f"load average (1 min) before {load0:.2f}, after {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
