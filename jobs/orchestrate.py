"""Run a job's stages in order, each as a Ray Train TorchTrainer of DeepSpeed workers."""
from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path
from typing import Any, Optional

from jobs import run_record
from jobs.layout import RunLayout
from jobs.plan import JobPlan, StagePlan, plan_job
from jobs.interrupt import DriverInterrupt
from jobs.schema import JobSpec
from jobs.spec import dump_spec, with_absolute_paths

REPO_ROOT = Path(__file__).resolve().parent.parent
# Ray Train would also log every print of a worker through its logger (each line twice in the
# captured output, `jobs.console`); the worker's own streams are enough.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
UPLOAD_EXCLUDES = [".venv", "runs", ".git", ".pytest_cache", "**/__pycache__", "*.egg-info"]
# Diagnostics set on the driver's command line that the workers act on (fault injection,
# docs/reliability.md; the start-up trace, docs/observability.md). An embedded Ray's workers
# inherit the driver's environment; a cluster's do not, so they travel in the runtime_env.
FORWARDED_ENV_PREFIXES = ("MOEFORGE_FAULT_", "MOEFORGE_STARTUP_TRACE")


def worker_env() -> dict[str, str]:
    """WORKER_ENV plus the driver's diagnostic variables (FORWARDED_ENV_PREFIXES)."""
    return {**{k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}, **WORKER_ENV}


def _train_loop(config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker (runs inside the worker process). Unless the run is
    verbose, the worker's output goes to the run's log file and its `[moeforge]` lines to the
    driver's console (`jobs.console`)."""
    import contextlib

    import ray.train

    from jobs.console import capture_output
    from jobs.progress import message_forwarder

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    sync = None
    if config.get("quiet"):
        forward, sync = message_forwarder(config.get("progress_actor"), config.get("namespace"), rank)
        out = capture_output(Path(config["log_dir"]) / f"rank{rank}.log", forward)
    else:
        out = contextlib.nullcontext()
    try:
        with out:
            if os.environ.get("MOEFORGE_STARTUP_TRACE"):
                import psutil

                from parallel.dist import startup_trace
                startup_trace("worker_process", psutil.Process().create_time())
                startup_trace("train_fn")
            _train_worker(config, ctx)
    finally:
        if sync is not None:
            try:
                sync()  # every forwarded line has reached the driver's actor
            except Exception:
                pass


def _train_worker(config: dict[str, Any], ctx) -> None:
    import ray.train
    import torch

    from jobs.preemption import StagePreempted, record_preempted, stop_requested, training
    from jobs.progress import progress_reporter
    from jobs.stage_runner import run_stage

    rank = ctx.get_world_rank()
    if rank == 0:
        # A restarted group's outcome is its own: no earlier attempt's preempted/fatal record.
        for f in (config["preempted_file"], config["fatal_file"]):
            Path(f).unlink(missing_ok=True)
        print(f"[moeforge] rank 0 of {ctx.get_world_size()} (pid {os.getpid()}): rendezvous at "
              f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}", flush=True)
    threads = config.get("threads")
    if threads:
        torch.set_num_threads(threads)
    sinks = ()
    on_step = None
    if rank == 0:
        on_step = progress_reporter(config.get("progress_actor"), config.get("namespace"))
        if config.get("ray_metrics"):
            from jobs.ray_metrics import RayGaugeSink
            sinks = (RayGaugeSink(config["run_name"], config["stage_name"]),)
    if config.get("elastic_sizes") and not _join_elastic_world(config["elastic_sizes"], ctx):
        ray.train.report({})  # a surplus worker: its report matches the others' last one, at the end
        return
    whole = pdist_world_size() == ctx.get_world_size()  # no surplus worker waiting in a report
    stop = stop_requested
    if on_step is not None:  # rank 0 also reads the driver's Ctrl-C from its step reports
        stop = lambda: stop_requested() or on_step.stop_requested()  # noqa: E731
    save = after = None
    if config.get("elastic_sizes"):  # a drain notice (every rank) or a coming grow (rank 0's reports)
        from jobs.elastic_ray import DrainNotice

        # Ray Train's preemption notice is a barrier over every worker it started: polled only
        # when none sits out (a surplus worker waits in its final report)
        drained = DrainNotice() if whole else (lambda: False)
        grow = on_step.checkpoint_requested if on_step is not None else (lambda: False)
        save = lambda: drained() | grow()  # noqa: E731 (both polled every step: the notice is a barrier)
        if rank == 0:  # after the checkpoint either asked for: no step trained that would be lost
            holds = [h for h in (getattr(drained, "hold", None), getattr(on_step, "hold_if_growing", None)) if h]

            def after(step: int) -> None:
                for h in holds:
                    h(step)
    try:
        with training():
            last = run_stage(config["spec"], config["stage_index"], extra_sinks=sinks, on_step=on_step,
                             stop_requested=stop, checkpoint_requested=save, after_checkpoint=after)
    except StagePreempted as e:
        if rank == 0:
            record_preempted(Path(config["preempted_file"]), e.step, e.checkpoint)
        return
    except Exception as e:
        if not isinstance(e, non_retryable()):
            raise
        # A restart would hit the same error: record it and end this worker group normally, so
        # Ray Train does not spend max_failures restarts on it; the driver raises StageFailed.
        if rank == 0:
            record_fatal(Path(config["fatal_file"]), e)
        print(f"[moeforge] rank {rank}: {type(e).__name__}: {e}", flush=True)
        return
    # The stage's headline figures only (Ray logs the report); per-layer routing stats live in
    # metrics.jsonl and the Ray gauges.
    ray.train.report({k: v for k, v in last.items() if isinstance(v, (int, float))
                      and not k.startswith(("moe/", "eval/moe/"))})


def pdist_world_size() -> int:
    from parallel import dist as pdist

    return pdist.world_size()


def _join_elastic_world(sizes: list[int], ctx) -> bool:
    """An elastic stage runs at the largest allowed size not above the workers Ray started; the
    ranks past it leave the process group and wait (`parallel.dist.narrow_world`)."""
    from jobs.elastic import run_size
    from parallel import dist as pdist

    got = ctx.get_world_size()
    size = run_size(sizes, got)
    if size == got:
        return True
    if ctx.get_world_rank() == 0:
        print(f"[moeforge] {got} workers started; the stage runs at {size} (parallel.elastic.sizes {sizes})",
              flush=True)
    return pdist.narrow_world(size)


class StageFailed(RuntimeError):
    """A stage ended with an error no restart can fix; the message says which and why."""


class JobPreempted(RuntimeError):
    """A worker was asked to stop (SIGTERM); the stage checkpointed. Run the job again to resume."""


def non_retryable() -> tuple[type, ...]:
    """Errors a restart of the worker group cannot fix: bad input (a spec, a config, a file's
    contents: ValueError, which covers damaged and refused checkpoints), missing files, and a
    stage whose numerics diverged. Anything else (a lost worker, a network error) is retried."""
    from parallel.trainer import TrainingDiverged

    return (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError, NotImplementedError, TrainingDiverged)


def record_fatal(path: Path, err: BaseException) -> None:
    """FATAL.json: a non-retryable error of rank 0, which the driver raises as StageFailed."""
    from system.checkpoint import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"type": type(err).__name__, "message": str(err)}))


def wants_embedded_ray(address: Optional[str]) -> bool:
    """No cluster named (no `--address`, no RAY_ADDRESS): the driver starts a local Ray."""
    return not (address or os.environ.get("RAY_ADDRESS"))


def pin_loopback() -> None:
    """Keep an embedded Ray on 127.0.0.1. Must run before `ray` is first imported.

    Ray rewrites a loopback node address to the host's routable one unless its
    single-machine mode is on; Ray Train would then rendezvous torch.distributed there.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def init_ray(plan: JobPlan, address: Optional[str] = None, verbose: bool = False) -> None:
    """Connect to the cluster named by `address`/RAY_ADDRESS, or start an embedded local Ray.
    Quiet (the default): Ray's driver-side notices and the workers' streamed output stay out of
    the console (the workers write the run's log files, `jobs.console`)."""
    import logging

    import ray

    if ray.is_initialized():
        return
    quiet = {} if verbose else {"log_to_driver": False, "logging_level": logging.ERROR}
    env_vars = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                **worker_env()}
    if address or os.environ.get("RAY_ADDRESS"):
        # Inside a Ray job the code already travels as the job's working_dir; anywhere else,
        # ship this checkout so that workers on other nodes can import it.
        runtime_env = None if inside_ray_job() else {"working_dir": str(REPO_ROOT), "excludes": UPLOAD_EXCLUDES,
                                                      "env_vars": worker_env()}
        ray.init(address=address, runtime_env=runtime_env, **({"log_to_driver": True} | quiet))
        return
    cpus_needed = plan.max_world_size() * plan.ray.scaling_config.resources_per_worker.get("CPU", 1)
    ctx = ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(cpus_needed + 0.999)),
                   _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1",
                   runtime_env={"env_vars": env_vars}, **({"log_to_driver": True} | quiet))
    if not verbose and getattr(ctx, "dashboard_url", None):
        print(f"[moeforge] embedded Ray started; dashboard at http://{ctx.dashboard_url}", flush=True)


def inside_ray_job() -> bool:
    """This driver is a submitted Ray job: the job supervisor hands it the submitted runtime_env
    through this variable."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def run_job(spec: JobSpec, *, address: Optional[str] = None, verbose: bool = False,
            interrupt: Optional[DriverInterrupt] = None, retrain_from: Optional[str] = None) -> dict[str, Any]:
    """Run every stage that has not finished yet; return each stage's last metrics. `verbose`
    streams Ray's and every worker's output to the console; otherwise it goes to RUN/logs/.
    `interrupt` (the driver's Ctrl-C, `jobs.interrupt`) stops the running stage at a checkpoint.
    A trained stage's training settings may not change (`jobs.run_record`) unless `retrain_from`
    names it or an earlier stage."""
    import ray

    spec = with_absolute_paths(spec)
    plan = plan_job(spec)
    layout = RunLayout(plan.run_dir)
    record_spec(spec, plan, layout, retrain_from)
    verify_checkpoints(plan, layout)
    if all(layout.done_file(stage.name).is_file() for stage in plan.stages):
        for stage in plan.stages:  # a finished job run again: nothing to start Ray or prepare data for
            _say_skipped(stage.name)
        return {}
    from jobs.heartbeat import DriverHeartbeat

    # heartbeat.json tells a dashboard a running driver from a dead one; events.jsonl keeps the
    # stages' history (docs/observability.md)
    stop = interrupt.requested if interrupt is not None else None
    with DriverHeartbeat(layout.root) as hb:
        _start_ray_and_prepare(plan, address, verbose, interrupt)
        namespace = ray.get_runtime_context().namespace
        results: dict[str, Any] = {}
        for stage in plan.stages:
            if layout.done_file(stage.name).is_file():
                _say_skipped(stage.name)
                continue
            if stop is not None and stop.is_set():
                hb.state = "interrupted"
                raise JobPreempted(f"stopped (Ctrl-C) before stage {stage.name} started; run the same command "
                                   f"again to go on")
            results[stage.name] = _run_stage(spec, plan, layout, stage, namespace, verbose, stop, hb)
    return results


def record_spec(spec: JobSpec, plan: JobPlan, layout: RunLayout, retrain_from: Optional[str]) -> None:
    """Check the spec against the run's record (`--retrain-from` first forgets the stages it
    names), then write it as the run's spec.yaml, which only ever records what was trained."""
    from system.checkpoint import atomic_write_text

    layout.root.mkdir(parents=True, exist_ok=True)
    if retrain_from is not None:
        run_record.retrain_from(layout, plan, retrain_from, log=lambda m: print(m, flush=True))
    run_record.check_against_record(layout, plan)
    atomic_write_text(layout.spec_file, dump_spec(spec))


def verify_checkpoints(plan: JobPlan, layout: RunLayout) -> None:
    """Verify every unfinished stage's checkpoints before Ray starts: a damaged newest one is
    reported once (the workers fall back to the same previous one), and with none intact the
    run stops now instead of spending every max_failures restart on the same error."""
    from system.checkpoint import valid_checkpoint

    for stage in plan.stages:
        if not layout.done_file(stage.name).is_file():
            valid_checkpoint(layout.checkpoints(stage.name),
                             warn=lambda m, s=stage.name: print(f"[moeforge] stage {s}: warning: {m}", flush=True))


def _start_ray_and_prepare(plan: JobPlan, address: Optional[str], verbose: bool,
                           interrupt: Optional[DriverInterrupt]) -> None:
    """Ray up, the driver's Ctrl-C handler in, and the corpus tokenized: once, here, in parallel
    Ray Data tasks when it is missing or stale (`moeforge prepare`); the workers then only open
    the shards (checked by stat)."""
    init_ray(plan, address, verbose)
    if interrupt is not None:
        interrupt.install()  # after ray.init, which installs its own SIGTERM handler
    from jobs.prepare import prepare_corpus

    prepare_corpus(plan.corpus, progress=plan.metrics.progress_bar,
                   log=lambda m: print(m, flush=True) if "ready in" not in m or verbose else None)


def _run_stage(spec: JobSpec, plan: JobPlan, layout: RunLayout, stage: StagePlan, namespace: str, verbose: bool,
               stop: Optional[threading.Event], hb) -> dict[str, Any]:
    """One stage as a Ray Train run, its progress bar fed by a progress actor; returns its
    DONE.json, or raises what the workers recorded (`_raise_for_outcome`)."""
    import ray

    from jobs.heartbeat import record_event
    from jobs.progress import ProgressActor, ProgressBar

    actor_name = f"moeforge-progress-{uuid.uuid4().hex[:8]}"
    actor = ProgressActor.options(name=actor_name, namespace=namespace,
                                  scheduling_strategy=_on_head_node()).remote()
    trainer = _torch_trainer(spec, plan, layout, stage, actor_name, namespace, verbose)
    print(f"[moeforge] stage {stage.name} ({stage.kind}): {stage.steps} steps on {stage.world_size} workers, "
          f"experts {stage.parallel.expert_strategy}", flush=True)
    layout.fatal_file(stage.name).unlink(missing_ok=True)
    layout.preempted_file(stage.name).unlink(missing_ok=True)
    record_event(layout.root, "started", stage.name)
    try:
        with ProgressBar(actor, stage.name, stage.steps, enabled=plan.metrics.progress_bar, stop=stop):
            result = _fit_off_main_thread(trainer)
    finally:
        ray.kill(actor)
    _raise_for_outcome(layout, stage, result, stop, hb)
    done = json.loads(layout.done_file(stage.name).read_text())
    record_event(layout.root, "finished", stage.name, done["step"])
    print(f"[moeforge] stage {stage.name}: done at step {done['step']}; {loss_summary(layout, stage.name)}",
          flush=True)
    return done


def _torch_trainer(spec: JobSpec, plan: JobPlan, layout: RunLayout, stage: StagePlan, actor_name: str,
                   namespace: str, verbose: bool):
    """The stage's Ray Train TorchTrainer: `stage.world_size` workers running `_train_loop`."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.preemption import PreemptibleTorchConfig
    from parallel.dist import ray_train_backend

    par = stage.parallel
    res = dict(plan.ray.scaling_config.resources_per_worker)
    rc = plan.ray.run_config
    return TorchTrainer(
        _train_loop,
        train_loop_config={"spec": spec.to_dict(), "stage_index": stage.index, "stage_name": stage.name,
                           "run_name": plan.run.name, "progress_actor": actor_name, "namespace": namespace,
                           "ray_metrics": plan.metrics.ray_metrics,
                           "fatal_file": str(layout.fatal_file(stage.name)),
                           "preempted_file": str(layout.preempted_file(stage.name)),
                           "elastic_sizes": list(par.elastic.sizes),
                           "quiet": not verbose, "log_dir": str(layout.log_dir(stage.name)),
                           "threads": par.threads_per_worker or max(1, int(res.get("CPU", 1)))},
        torch_config=PreemptibleTorchConfig(backend=ray_train_backend(par.backend)),
        scaling_config=ScalingConfig(**_workers(stage), use_gpu=par.use_gpu, resources_per_worker=res),
        run_config=RunConfig(
            name=rc.name or f"{plan.run.name}-{stage.name}",
            storage_path=str(Path(rc.storage_path).absolute()) if rc.storage_path else str(layout.root / "ray"),
            failure_config=FailureConfig(max_failures=plan.ray.failure_config.max_failures),
            callbacks=_elastic_callbacks(stage, layout, actor_name, namespace)),
    )


def _elastic_callbacks(stage: StagePlan, layout: RunLayout, actor_name: str, namespace: str) -> list:
    """An elastic stage checkpoints before Ray Train restarts it at a larger size, and sizes it
    from a fresh view of the nodes (`jobs.elastic_ray`)."""
    el = stage.parallel.elastic
    if not el.sizes:
        return []
    from jobs.elastic_ray import CheckpointBeforeGrow, FreshClusterView

    return [FreshClusterView(el.monitor_interval_s),
            CheckpointBeforeGrow(actor_name, namespace, str(layout.checkpoints(stage.name)))]


def _on_head_node():
    """Where the progress actor lives: the head node (an actor on a worker node would die with
    it, and an elastic stage goes on without that node); wherever Ray likes if none is marked."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {})]
    return NodeAffinitySchedulingStrategy(head[0], soft=False) if head else "DEFAULT"


def _workers(stage: StagePlan) -> dict[str, Any]:
    """ScalingConfig's worker count: the stage's size, or (elastic) the range of its sizes, Ray
    Train looking for room to grow back every `monitor_interval_s`."""
    el = stage.parallel.elastic
    if not el.sizes:
        return {"num_workers": stage.world_size}
    return {"num_workers": (el.sizes[0], el.sizes[-1]), "elastic_resize_monitor_interval_s": el.monitor_interval_s}


def _raise_for_outcome(layout: RunLayout, stage: StagePlan, result, stop: Optional[threading.Event], hb) -> None:
    """A stage that did not finish: StageFailed for an error its rank 0 recorded as not
    retryable, JobPreempted for a checkpointed stop (SIGTERM or the driver's Ctrl-C), and
    RuntimeError for an error Ray Train gave up on."""
    from jobs.heartbeat import record_event

    fatal, preempted = layout.fatal_file(stage.name), layout.preempted_file(stage.name)
    if fatal.is_file():
        err = json.loads(fatal.read_text())
        record_event(layout.root, "failed", stage.name, error=f"{err['type']}: {err['message']}")
        raise StageFailed(f"stage {stage.name} stopped: {err['type']}: {err['message']} "
                          f"(not retried: a restart cannot fix it)")
    if preempted.is_file():
        p = json.loads(preempted.read_text())
        ctrl_c = stop is not None and stop.is_set()
        why = "stopped (Ctrl-C or SIGTERM at the driver)" if ctrl_c else "preempted (SIGTERM)"
        record_event(layout.root, "preempted", stage.name, p["step"], checkpoint=p["checkpoint"], cause=why)
        hb.state = "interrupted" if ctrl_c else "preempted"
        raise JobPreempted(f"stage {stage.name} {why}: checkpointed at step {p['step']} "
                           f"({p['checkpoint']}); run the same command again to resume from there")
    if result.error:
        record_event(layout.root, "failed", stage.name, error=str(result.error))
        raise RuntimeError(f"stage {stage.name} failed: {result.error}")


def _fit_off_main_thread(trainer):
    """trainer.fit() in a thread of its own: on the main thread Ray Train replaces the SIGINT
    handler with one that aborts the run without a checkpoint; the main thread keeps the
    driver's (`jobs.interrupt`) and waits here, where signal handlers run between joins."""
    box: dict[str, Any] = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # re-raised on the main thread
            box["error"] = e

    thread = threading.Thread(target=fit, name="moeforge-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in box:
        raise box["error"]
    return box["result"]


def _say_skipped(stage: str) -> None:
    print(f"[moeforge] stage {stage}: already finished, skipping", flush=True)


def loss_summary(layout: RunLayout, stage: str) -> str:
    """'loss A (step i) -> B (step j)' over this stage's metric lines, for the driver's log."""
    from system.metrics import read_jsonl

    recs = [r for r in read_jsonl(layout.metrics_file) if r.get("stage") == stage and "loss" in r]
    if not recs:
        return "no metrics"
    a, b = recs[0], recs[-1]
    return f"loss {a['loss']:.4f} (step {a['step']}) -> {b['loss']:.4f} (step {b['step']})"
