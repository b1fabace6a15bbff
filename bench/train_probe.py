#!/usr/bin/env python
"""`jobs.torchrun` with counters, for bench/gpu_suite.py and bench/multi_gpu.py.

    python -m torch.distributed.run --standalone --nproc-per-node N bench/train_probe.py \\
        --out PROBE.json [--syncs auto|cuda|dispatch|off] [--guard STAGE,...] -- SPEC.yaml [jobs.torchrun args]

Every rank trains the spec's stages exactly as `-m jobs.torchrun` does, with Ray refused at import
(the GPU machines have none). Rank 0 also records, at every logged step, what happened since the
previous one:

* host syncs: on CUDA what `torch.cuda.set_sync_debug_mode("warn")` reports (real waits; little
  overhead); on CPU `system.host_syncs.HostSyncCounter` (a TorchDispatchMode: what would sync on
  a GPU, at a cost in speed, so CPU tokens/s are not meaningful with it);
* collectives given host tensors: the calls of parallel/dist.py that stage a host tensor on the
  GPU under NCCL (flags, counts, logged scalars), and its object collectives (pickled through the
  device on NCCL). Their per-call cost is `bench/collectives_cost.py`'s.

With `--guard`, after training it compares every tensor of those stages' checkpoints before
and after the step that MOEFORGE_FAULT_NONFINITE made non-finite (the skipped step must change
nothing; the next one must change most tensors), as tests/parallel/test_numerics_guard.py does
on CPU. PROBE.json (rank 0) holds the exit code, the per-step counts of every stage and the
guard's verdicts.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class _NoRay:
    """An import hook that refuses Ray, as on the GPU machines, which have none: the launch must
    not need it (the attempts are recorded in the probe's JSON)."""

    def __init__(self):
        self.attempts: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            self.attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (bench/train_probe.py: no Ray here)", name=name)
        return None


class _Counts:
    """Cumulative counters read at every step by rank 0."""

    def __init__(self):
        self.host_collectives = 0
        self.object_collectives = 0
        self.sync_kinds: Counter = Counter()

    def snapshot(self) -> dict[str, Any]:
        return {"host_collectives": self.host_collectives, "object_collectives": self.object_collectives,
                "syncs": dict(self.sync_kinds)}


def _count_collectives(counts: _Counts) -> None:
    """Wrap parallel/dist.py's staging step and object collectives (every library call site goes
    through `pdist.<name>`, so the wrappers see them all)."""
    from parallel import dist as pdist

    staged, gather_obj, bcast_obj = pdist._staged, pdist.all_gather_object, pdist.broadcast_object

    def counted_staged(t, group):
        if t.device.type == "cpu":
            counts.host_collectives += 1
        return staged(t, group)

    def counted_gather(obj):
        counts.object_collectives += 1
        return gather_obj(obj)

    def counted_bcast(obj, src=0):
        counts.object_collectives += 1
        return bcast_obj(obj, src)

    pdist._staged, pdist.all_gather_object, pdist.broadcast_object = counted_staged, counted_gather, counted_bcast


SYNC_WARNING = r".*called a synchronizing CUDA operation"  # what the sync debug mode's warnings say


class _CudaSyncs:
    """Live counts of what torch.cuda's sync debug mode ("warn") reports, by the message's first words."""

    def __init__(self, counts: _Counts):
        self.counts = counts
        self._show = None

    def __enter__(self):
        import torch

        self._prev_mode = torch.cuda.get_sync_debug_mode()
        self._show = warnings.showwarning
        self._filters = warnings.filters[:]
        self.refresh()
        counts = self.counts
        show = self._show

        def on_warning(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            if re.match(SYNC_WARNING, text):
                counts.sync_kinds["cuda_sync"] += 1
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = on_warning
        torch.cuda.set_sync_debug_mode("warn")
        return self

    @staticmethod
    def refresh() -> None:
        """Every sync warning shown (not once per place), whatever filters an import has set since."""
        warnings.filterwarnings("always", message=SYNC_WARNING)

    def __exit__(self, *exc):
        import torch

        torch.cuda.set_sync_debug_mode(self._prev_mode)
        warnings.showwarning = self._show
        warnings.filters[:] = self._filters
        return False


class _DispatchSyncs:
    """system.host_syncs.HostSyncCounter, its running totals by kind copied at each step."""

    def __init__(self, counts: _Counts):
        from system.host_syncs import HostSyncCounter

        self.counts = counts
        self.counter = HostSyncCounter()

    def __enter__(self):
        self.counter.__enter__()
        return self

    def refresh(self) -> None:
        self.counts.sync_kinds = Counter(self.counter.by_kind)

    def __exit__(self, *exc):
        return self.counter.__exit__(*exc)


def sync_counter(mode: str, counts: _Counts):
    """(context manager or None, mode used, note)."""
    import torch

    if mode == "auto":
        mode = "cuda" if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES") != "" else "dispatch"
    if mode == "off":
        return None, "off", "not counted (--syncs off)"
    if mode == "cuda":
        return _CudaSyncs(counts), "cuda", "torch.cuda.set_sync_debug_mode('warn'): the real waits"
    try:
        return _DispatchSyncs(counts), "dispatch", ("system.host_syncs.HostSyncCounter: what would sync on a GPU "
                                                    "(CPU figures of speed are slowed by it)")
    except ImportError as e:
        return None, "off", f"system.host_syncs is not available here ({e})"


# -- the guard check ------------------------------------------------------------------------------
def guard_verdict(ck: Path, bad_step: int, records: dict[int, dict]) -> dict[str, Any]:
    """Did the non-finite step `bad_step` change nothing, and the next one most tensors? `ck`:
    the stage's checkpoints folder."""
    import torch

    from system.safe_load import checkpoint_tensors

    try:
        before, after, nxt = (checkpoint_tensors(ck / f"step_{s:08d}") for s in (bad_step - 1, bad_step,
                                                                                   bad_step + 1))
    except (OSError, ValueError) as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    same = [k for k in before if k in after and torch.equal(before[k], after[k])]
    changed = [k for k in before if k in nxt and not torch.equal(before[k], nxt[k])]
    skipped = [records.get(s, {}).get("step_skipped") for s in (bad_step - 1, bad_step, bad_step + 1)]
    ok = (len(before) > 0 and len(same) == len(before) and len(changed) > len(before) // 2
          and skipped == [0, 1, 0])
    return {"ok": ok, "tensors": len(before), "unchanged_by_skipped_step": len(same),
            "changed_by_next_step": len(changed), "step_skipped": skipped,
            "changed_by_skipped_step": sorted(set(before) - set(same))[:5]}


def cuda_peak() -> Optional[int]:
    """The most bytes of CUDA memory allocated since the last call (per step: the peak is reset)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    peak = int(torch.cuda.max_memory_allocated())
    torch.cuda.reset_peak_memory_stats()
    return peak


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="rank 0's JSON")
    ap.add_argument("--syncs", default="auto", choices=("auto", "cuda", "dispatch", "off"))
    ap.add_argument("--guard", default="", help="stages whose checkpoints around the injected step are compared")
    ap.add_argument("torchrun_args", nargs=argparse.REMAINDER, help="-- SPEC.yaml [jobs.torchrun options]")
    a = ap.parse_args(argv)
    rest = a.torchrun_args[1:] if a.torchrun_args[:1] == ["--"] else a.torchrun_args

    no_ray = _NoRay()
    sys.meta_path.insert(0, no_ray)
    from jobs import torchrun

    rank = torchrun.launch_env()["rank"]
    counts = _Counts()
    _count_collectives(counts)
    ctx, mode, note = sync_counter(a.syncs, counts) if rank == 0 else (None, "off", "rank 0 counts")
    steps: dict[str, list] = {}
    last = [counts.snapshot()]

    def on_step(rec: dict) -> None:
        if "loss" not in rec:
            return
        if ctx is not None:
            ctx.refresh()
        now = counts.snapshot()
        prev = last[0]
        last[0] = now
        syncs = {k: v - prev["syncs"].get(k, 0) for k, v in now["syncs"].items() if v - prev["syncs"].get(k, 0)}
        steps.setdefault(rec.get("stage", "?"), []).append(
            {"step": rec["step"], "host_collectives": now["host_collectives"] - prev["host_collectives"],
             "object_collectives": now["object_collectives"] - prev["object_collectives"],
             "syncs": sum(syncs.values()), "sync_kinds": syncs, "cuda_peak_bytes": cuda_peak()})

    result: dict[str, Any] = {"syncs_mode": mode, "syncs_note": note}
    try:
        if ctx is not None:
            with ctx:
                code = torchrun.main(rest, on_step=on_step)
        else:
            code = torchrun.main(rest, on_step=on_step)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    result.update(exit_code=code, steps=steps, ray_imports=sorted(set(no_ray.attempts)))
    if rank == 0:
        if a.guard and code == 0:
            result["guard"] = _guards(rest, a.guard.split(","))
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return code


def _guards(rest: list[str], stages: list[str]) -> dict[str, Any]:
    from jobs.layout import RunLayout
    from jobs.plan import plan_job
    from jobs.spec import with_absolute_paths
    from jobs.spec_source import load_job_spec
    from jobs.torchrun import parser
    from system.metrics import read_jsonl

    args = parser().parse_args(rest)
    layout = RunLayout(plan_job(with_absolute_paths(load_job_spec(args.spec, args.output_dir))).run_dir)
    bad = int(os.environ.get("MOEFORGE_FAULT_NONFINITE", "0").split(",")[0] or 0)
    out = {}
    for name in stages:
        if bad < 2:
            out[name] = {"ok": False, "error": "MOEFORGE_FAULT_NONFINITE names no step >= 2"}
            continue
        recs = {r["step"]: r for r in read_jsonl(layout.metrics_file) if r.get("stage") == name and "loss" in r}
        out[name] = guard_verdict(layout.checkpoints(name), bad, recs)
    return out


if __name__ == "__main__":
    sys.exit(main())
