"""Run a job's stages on one node without Ray: torch's own launcher starts the ranks.

    python -m torch.distributed.run --standalone --nproc-per-node N -m jobs.torchrun SPEC.yaml [--stage NAME,...]
    python -m jobs.torchrun SPEC.yaml          # one process, no launcher (a 1-rank group of its own)

Every rank validates the spec as `moeforge run` does (schema, rules, the files it names). Rank 0
then does what `moeforge run`'s driver does before the stages (`jobs.orchestrate.run_job`): the
run's record and spec.yaml, the checkpoints' check, the corpus prepared (in this process: no Ray
Data), the heartbeat and the stage events; every rank then trains each unfinished stage with
`jobs.stage_runner.run_planned_stage` in one process group: torchrun's rendezvous (env://), NCCL
when the stages use GPUs and CUDA is there (else gloo), each rank on cuda:LOCAL_RANK. The run
directory is the one `moeforge run` writes, so either command resumes the other's run.

Nothing here imports Ray (a GPU machine without it runs this). Exit codes of each rank: 0; 2 for
a user's mistake (one line naming it) or a stage error no restart can fix; 3 when SIGTERM stopped
a stage at a checkpoint (the same command resumes it). torch's launcher, when SIGTERM reaches it,
forwards it to the ranks and exits with its own code.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional

EXIT_SPEC = 2
EXIT_PREEMPTED = 3


class TorchrunError(Exception):
    """A mistake in how the job was launched (world size, GPUs, stage name): one line, exit 2."""


def launch_env() -> dict[str, Any]:
    """What torch's launcher tells each rank (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
    MASTER_ADDR/PORT); without the launcher, one process of its own."""
    env = os.environ
    launched = "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env
    world = int(env.get("WORLD_SIZE", 1)) if launched else 1
    return {"launched": launched, "rank": int(env.get("RANK", 0)) if launched else 0, "world": world,
            "local_rank": int(env.get("LOCAL_RANK", 0)) if launched else 0,
            "local_world": int(env.get("LOCAL_WORLD_SIZE", world)) if launched else 1}


def world_size_field(spec, i: int) -> str:
    """The spec field that sets stage i's world size (the most specific one present)."""
    st = spec.stages[i]
    if st.world_size is not None:
        return f"stages[{i}].world_size"
    if isinstance(st.parallel, dict) and isinstance(st.parallel.get("world_size"), int):
        return f"stages[{i}].parallel.world_size"
    return "parallel.world_size"


def check_launch(spec, plan, stages: list, env: dict[str, Any]) -> str:
    """The process group's backend for `stages`; TorchrunError when the launch does not fit them
    (world size, GPUs on this node, stages wanting different backends)."""
    import torch

    from parallel import dist as pdist

    backends = {}
    for st in stages:
        if st.world_size != env["world"]:
            raise TorchrunError(
                f"stage {st.name}: {world_size_field(spec, st.index)} is {st.world_size} but torch's launcher "
                f"started {env['world']} process{'es' if env['world'] != 1 else ''}: pass --nproc-per-node "
                f"{st.world_size} (one node), or set {world_size_field(spec, st.index)}: {env['world']}")
        backends[st.name] = pdist.resolve_backend(st.parallel.backend, st.parallel.use_gpu)
    if len(set(backends.values())) > 1:
        raise TorchrunError(f"the stages want different process-group backends ({backends}): run them one at a "
                            f"time with --stage NAME")
    backend = next(iter(backends.values()))
    gpus = any(st.parallel.use_gpu for st in stages) and torch.cuda.is_available()
    if gpus and env["local_world"] > torch.cuda.device_count():
        raise TorchrunError(f"{env['local_world']} ranks on this node but {torch.cuda.device_count()} GPUs: "
                            f"--nproc-per-node at most {torch.cuda.device_count()}")
    return backend


def init_group(backend: str, use_gpu: bool, env: dict[str, Any]):
    """The job's process group (through parallel.dist), bound to this rank's device; returns it."""
    from jobs.stage_runner import worker_device
    from parallel import dist as pdist

    os.environ.setdefault("LOCAL_RANK", str(env["local_rank"]))  # DeepSpeed insists on it
    pdist.configure_accelerator(use_gpu)  # DeepSpeed reads DS_ACCELERATOR when first imported
    device = worker_device(use_gpu)  # cpu, or cuda:LOCAL_RANK
    pdist.bind_device(device)
    init = "env://" if env["launched"] else f"tcp://127.0.0.1:{pdist.free_port()}"
    extra = {"device_id": device} if backend == "nccl" and device.type == "cuda" else {}
    pdist.init_process_group(backend, env["rank"], env["world"], init, **extra)
    return device


class _Sigterm:
    """The first SIGTERM (torch's launcher forwards its own to every rank) asks for a checkpoint
    at the next step boundary; a second one exits through the previous handler."""

    def __init__(self):
        self.requested = threading.Event()
        self._previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        if self.requested.is_set():
            signal.signal(signal.SIGTERM, self._previous)
            if callable(self._previous):
                self._previous(signum, frame)
            else:
                raise SystemExit(128 + signum)
            return
        self.requested.set()

    def __call__(self) -> bool:
        return self.requested.is_set()


def _prepare_run(spec, plan, layout, retrain_from: Optional[str], verbose: bool) -> None:
    """Rank 0, before any stage: what `moeforge run`'s driver does (jobs.orchestrate.run_job),
    with the corpus prepared in this process instead of Ray Data tasks."""
    from jobs.orchestrate import record_spec, verify_checkpoints
    from jobs.prepare import prepare_corpus

    record_spec(spec, plan, layout, retrain_from)
    verify_checkpoints(plan, layout)
    prepare_corpus(plan.corpus, use_ray=False, progress=plan.metrics.progress_bar,
                   log=lambda m: print(m, flush=True) if "ready in" not in m or verbose else None)


def run(args: argparse.Namespace, on_step: Optional[Callable[[dict], None]] = None) -> int:
    """Train the spec's unfinished stages (or `--stage`) on this rank; the exit code. `on_step`
    (rank 0) sees every logged step's metrics, as `moeforge run`'s progress bar does."""
    from jobs.layout import RunLayout
    from jobs.plan import plan_job
    from jobs.spec import with_absolute_paths
    from jobs.spec_source import load_job_spec

    env = launch_env()
    rank = env["rank"]
    spec = with_absolute_paths(load_job_spec(args.spec, args.output_dir))  # validated with pre-flight
    from jobs.cli import check_output_dir

    check_output_dir(spec, args.spec)
    plan = plan_job(spec)
    layout = RunLayout(plan.run_dir)
    stages = list(plan.stages)
    if args.stage is not None:  # the named stages, in the spec's order
        names = args.stage.split(",")
        unknown = [n for n in names if n not in {s.name for s in stages}]
        if unknown:
            raise TorchrunError(f"--stage {args.stage}: no stage {unknown} (the spec has {[s.name for s in stages]})")
        stages = [s for s in stages if s.name in names]
    todo = [s for s in stages if not layout.done_file(s.name).is_file()]
    if not todo:  # a finished job run again: no process group, nothing prepared (as `moeforge run`)
        if rank == 0:
            for s in stages:
                print(f"[moeforge] stage {s.name}: already finished, skipping", flush=True)
        return 0
    backend = check_launch(spec, plan, todo, env)
    use_gpu = any(s.parallel.use_gpu for s in todo)
    from parallel import dist as pdist

    init_group(backend, use_gpu, env)
    try:
        return _run_stages(args, spec, plan, layout, stages, rank, on_step)
    finally:
        pdist.destroy_process_group()


def _run_stages(args, spec, plan, layout, stages: list, rank: int,
                on_step: Optional[Callable[[dict], None]]) -> int:
    from jobs.heartbeat import DriverHeartbeat
    from parallel import dist as pdist

    # Rank 0 prepares; every rank learns whether it worked (and stops with the same error).
    outcome = None
    if rank == 0:
        try:
            _prepare_run(spec, plan, layout, args.retrain_from, args.verbose)
            outcome = ("ok", "")
        except Exception as e:  # noqa: BLE001 - shared with every rank, then raised on rank 0
            outcome = ("error", f"{type(e).__name__}: {e}")
            pdist.broadcast_object(outcome)
            raise
    outcome = pdist.broadcast_object(outcome)
    if outcome[0] != "ok":
        return EXIT_SPEC
    sigterm = _Sigterm()
    t0 = time.time()
    with contextlib.ExitStack() as stack:
        hb = stack.enter_context(DriverHeartbeat(layout.root)) if rank == 0 else None
        for stage in stages:
            if layout.done_file(stage.name).is_file():
                if rank == 0:
                    print(f"[moeforge] stage {stage.name}: already finished, skipping", flush=True)
                continue
            code = _run_one(plan, layout, stage, rank, hb, sigterm, on_step)
            if code:
                return code
    if rank == 0:
        print(f"[moeforge] job {plan.run.name} finished in {time.time() - t0:.1f}s; run dir {layout.root}",
              flush=True)
    return 0


def _run_one(plan, layout, stage, rank: int, hb, sigterm: _Sigterm, on_step) -> int:
    """One stage on this rank, its events and summary on rank 0; 0, or the job's exit code."""
    from jobs.heartbeat import record_event
    from jobs.orchestrate import loss_summary, non_retryable
    from jobs.stage_runner import run_planned_stage
    from parallel.trainer import StagePreempted

    if rank == 0:
        print(f"[moeforge] stage {stage.name} ({stage.kind}): {stage.steps} steps on {stage.world_size} "
              f"ranks (torch's launcher), experts {stage.parallel.expert_strategy}", flush=True)
        record_event(layout.root, "started", stage.name)
    try:
        run_planned_stage(plan, stage, on_step=on_step if rank == 0 else None, stop_requested=sigterm)
    except StagePreempted as e:
        if rank == 0:
            record_event(layout.root, "preempted", stage.name, e.step, checkpoint=str(e.checkpoint),
                         cause="preempted (SIGTERM)")
            hb.state = "preempted"
            print(f"[moeforge] stage {stage.name} preempted (SIGTERM): checkpointed at step {e.step} "
                  f"({e.checkpoint}); run the same command again to resume from there", flush=True)
        return EXIT_PREEMPTED
    except Exception as e:
        if rank == 0:
            record_event(layout.root, "failed", stage.name, error=f"{type(e).__name__}: {e}")
        if not isinstance(e, non_retryable()):
            raise
        # As `moeforge run`'s StageFailed: an error no restart can fix, in one line.
        print(f"error: stage {stage.name} stopped on rank {rank}: {type(e).__name__}: {e}", file=sys.stderr,
              flush=True)
        if hb is not None:
            hb.state = "failed"
        return EXIT_SPEC
    if rank == 0:
        done = json.loads(layout.done_file(stage.name).read_text())
        record_event(layout.root, "finished", stage.name, done["step"])
        print(f"[moeforge] stage {stage.name}: done at step {done['step']}; {loss_summary(layout, stage.name)}",
              flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m torch.distributed.run --standalone --nproc-per-node N -m jobs.torchrun",
                                description="Train a job spec's stages on this node with torch's launcher (no Ray).")
    p.add_argument("spec", help="the job spec (YAML)")
    p.add_argument("--stage", metavar="NAME[,NAME...]",
                   help="train only these stages (default: every unfinished one, in the spec's order)")
    p.add_argument("--output-dir", help="override run.output_dir")
    p.add_argument("--retrain-from", metavar="STAGE", help="as `moeforge run --retrain-from`")
    p.add_argument("--verbose", action="store_true", help="also print the corpus preparation's summary")
    return p


def main(argv: Optional[list[str]] = None, on_step: Optional[Callable[[dict], None]] = None) -> int:
    args = parser().parse_args(argv)
    from jobs.user_errors import describe

    try:
        return run(args, on_step)
    except TorchrunError as e:
        if launch_env()["rank"] == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_SPEC
    except Exception as e:
        lines = describe(e)
        if lines is None:
            raise
        if launch_env()["rank"] == 0:
            for line in lines:
                print(f"error: {line}", file=sys.stderr, flush=True)
        return EXIT_SPEC


if __name__ == "__main__":
    sys.exit(main())
