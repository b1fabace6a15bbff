"""`moeforge`: validate, run, submit and follow MoE training jobs.

    moeforge validate SPEC           check a spec; exit 2 naming the bad field
    moeforge run SPEC                run on RAY_ADDRESS's cluster, or an embedded local Ray
    moeforge submit SPEC [--address] submit as a Ray job (working dir = this checkout)
    moeforge status ID | logs ID     follow a submitted job
    moeforge simulate [CONFIG]       cluster-scale EP/FSSDP/FasterMoE/ZeRO-3 MoE-layer simulator (no GPU)
    moeforge export RUN_DIR --to DIR a run's checkpoint as a Hugging Face model directory
    moeforge dashboard [RUN_DIR ...] a browser dashboard of runs (live while they write)
    moeforge prepare SPEC            tokenize the spec's corpus into token shards (Ray Data)
    moeforge estimate SPEC           per-rank memory by part before launch, whether it fits (docs/memory.md)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from jobs.jobs_api import add_commands as add_jobs_api_commands
from jobs.spec_source import load_job_spec

EXIT_SPEC = 2  # a user's mistake: one line on stderr names it and the fix (jobs.user_errors)
EXIT_PREEMPTED = 3  # SIGTERM to a worker or Ctrl-C stopped the job at a checkpoint; the same command resumes it
# What a job's driver imports; checked first, so that a cluster whose Python lacks them says so in
# one line (`moeforge submit` waits for it) instead of a traceback deep inside the job.
DRIVER_MODULES = ("yaml", "numpy", "torch", "ray", "deepspeed", "transformers", "pyarrow")


def require_driver_modules() -> None:
    """Find what a job's driver imports (without importing it: no start-up cost, no library's
    warnings); a missing one is a one-line error naming the fix."""
    import importlib.util

    from jobs.user_errors import UserError

    missing = [name for name in DRIVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"this Python ({sys.executable}) has no {', '.join(missing)}: run moeforge with the Python "
                        f"that has its dependencies (`make setup` makes .venv); on a cluster, start Ray from that "
                        f"environment or pass `moeforge submit --python PATH`")


def cmd_validate(args) -> int:
    spec = load_job_spec(args.spec)
    n = len(spec.stages)
    print(f"{args.spec}: ok ({n} stage{'s' if n != 1 else ''}: {', '.join(s.name for s in spec.stages)}; "
          f"run dir {Path(spec.run.output_dir).absolute() / spec.run.name})")
    return memory_preflight(spec, args.device_memory, args.strict)


def memory_preflight(spec, device_memory: Optional[str], strict: bool) -> int:
    """GPU specs: warn (stderr) when a stage's memory estimate exceeds the device's memory less
    the reserve (jobs.estimate); `strict` makes it an error (EXIT_SPEC)."""
    from jobs.estimate import DEFAULT_DEVICE, EstimateError, parse_device_memory, preflight_warning

    try:
        device = parse_device_memory(device_memory or DEFAULT_DEVICE)
    except EstimateError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_SPEC
    try:
        warning = preflight_warning(spec, device)
    except Exception as e:  # noqa: BLE001 - an estimator's bug must not stop a run; say it and go on
        print(f"warning: memory: no estimate ({type(e).__name__}: {e})", file=sys.stderr)
        return 0
    if warning is None:
        return 0
    for line in warning.splitlines():
        print(f"{'error' if strict else 'warning'}: memory: {line}", file=sys.stderr)
    return EXIT_SPEC if strict else 0


def cmd_estimate(args) -> int:

    from jobs.estimate import (DEFAULT_DEVICE, EstimateError, format_report, parse_device_memory, recommend, report,
                               simulated_step, smallest_fit, stage_layout)
    from jobs.memory_model import estimate

    spec = load_job_spec(args.spec)
    try:
        device = parse_device_memory(args.device_memory or DEFAULT_DEVICE)
        stage = next((i for i, s in enumerate(spec.stages) if s.name == args.stage), None) if args.stage else 0
        if stage is None:
            raise EstimateError("--stage", f"{args.stage!r} is not a stage of the spec "
                                           f"({', '.join(s.name for s in spec.stages)})")
        world = args.nodes * args.gpus_per_node if args.nodes else None
        gpu = True if args.gpu else None
        lay = stage_layout(spec, stage, world=world, ep_size=args.ep_size, zero=args.zero,
                           checkpointing=args.checkpointing, micro_batch=args.micro_batch,
                           imbalance=args.imbalance, expert_sharding=args.expert_sharding, gpu=gpu)
    except EstimateError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_SPEC
    rep = report(estimate(lay), device)
    out = {"estimate": rep}
    if args.recommend:
        levels = None if args.expert_sharding is None else (args.expert_sharding,)
        if args.nodes:
            out["recommend"] = recommend(lay, device, args.gpus_per_node, shardings=levels)
        else:
            n, rec = smallest_fit(lay, device, args.gpus_per_node, shardings=levels)
            out["recommend"] = rec
            out["smallest_gpu_count"] = n
    if args.time:
        out["time"] = simulated_step(lay, args.gpus_per_node)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(format_report(rep))
        if args.recommend:
            rec = out["recommend"]
            if rec is None:
                print("recommend: no layout of expert parallelism, ZeRO stage, expert sharding, activation "
                      "checkpointing and micro-batch fits this many ranks")
            else:
                where = f" (smallest count tried that fits: {out['smallest_gpu_count']} GPUs)" if "smallest_gpu_count" in out else ""
                print(f"recommend{where}:")
                print("  " + format_report(rec).replace("\n", "\n  "))
        if args.time:
            t = out["time"]
            print("simulated step (moeforge simulate's cost model): " +
                  (t["skipped"] if "skipped" in t else
                   f"{t['policy']}: MoE layers {t['moe_ms']:.1f} ms, step {t['step_ms']:.1f} ms, "
                   f"straggler {t['straggler']:.2f}"))
    if args.strict and not rep["fits"]:
        print(f"error: memory: the estimate per rank ({rep['total']:,d} B) exceeds the device's "
              f"{rep['device_memory'] - rep['reserve']:,d} B after the reserve", file=sys.stderr)
        return EXIT_SPEC
    return 0


def spec_schema() -> dict:
    """The job spec's JSON Schema, from the same typed sections the parser uses."""
    import copy

    from jobs.model_from import FROM
    from jobs.schema import JobSpec
    from system.config_schema import json_schema

    schema = json_schema(JobSpec, "moeforge job spec")
    # `model.from` is resolved before parsing (jobs.model_from): the top-level model section
    # accepts it besides ModelConfig's fields (stage-level model overrides are free mappings).
    section = copy.deepcopy(schema["$defs"]["ModelConfig"])
    section["properties"][FROM] = {
        "type": "string", "description": "take the shape from a Hugging Face config.json: 'init_from' "
                                          "(the first stage's init_from directory) or a directory path"}
    schema["$defs"]["ModelSection"] = section
    schema["properties"]["model"] = {**schema["properties"]["model"], "$ref": "#/$defs/ModelSection"}
    schema["$defs"] = dict(sorted(schema["$defs"].items()))
    return schema


def cmd_schema(args) -> int:
    text = json.dumps(spec_schema(), indent=1) + "\n"
    if args.out:
        from system.checkpoint import atomic_write_text

        atomic_write_text(Path(args.out), text)
        print(f"[moeforge] wrote the job spec's JSON Schema to {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_run(args) -> int:
    require_driver_modules()
    from jobs.jobs_api import READY
    from jobs.spec_source import SPEC_SOURCE_ENV
    from jobs.orchestrate import inside_ray_job
    from system.configtree import SpecError

    try:
        spec = load_job_spec(args.spec, args.output_dir)
    except SpecError as e:
        if inside_ray_job() and "does not exist" in str(e):
            raise SpecError([(path, msg + (" on this cluster node: a job's paths must name storage every node sees"
                                         if "does not exist" in msg else ""))
                           for path, msg in e.problems], e.source) from None
        raise
    source = os.environ.get(SPEC_SOURCE_ENV, args.spec) if args.spec.startswith("env:") else args.spec
    if memory_preflight(spec, getattr(args, "device_memory", None), getattr(args, "strict", False)):
        return EXIT_SPEC
    before_ray(args.address)
    check_output_dir(spec, source, relative_ok=not inside_ray_job())
    if inside_ray_job():  # `moeforge submit` waits for this line: the job did not fail on arrival
        import ray
        import torch

        print(f"{READY} {sys.executable} (torch {torch.__version__}, ray {ray.__version__})", flush=True)
    from jobs.interrupt import EXIT_INTERRUPTED, DriverInterrupt
    from jobs.orchestrate import JobPreempted, StageFailed, run_job
    from system.checkpoint import CheckpointCorrupt

    t0 = time.time()
    try:
        with DriverInterrupt() as ctrl_c:
            run_job(spec, address=args.address, verbose=args.verbose, interrupt=ctrl_c,
                    retrain_from=args.retrain_from)
    except (CheckpointCorrupt, StageFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_SPEC
    except JobPreempted as e:
        print(f"[moeforge] {e}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("[moeforge] stopped at once (second Ctrl-C); the same command resumes from the stage's latest "
              "checkpoint", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    print(f"[moeforge] job {spec.run.name} finished in {time.time() - t0:.1f}s; "
          f"run dir {Path(spec.run.output_dir).absolute() / spec.run.name}",
          flush=True)
    return 0


def before_ray(address: Optional[str]) -> None:
    """Keep an embedded Ray on loopback; for a cluster, fail in one line, fast, when it is down or
    wants a token this process lacks (Ray itself retries for minutes, then names neither)."""
    from jobs.orchestrate import pin_loopback, wants_embedded_ray
    from jobs.user_errors import check_gcs_auth, check_reachable

    if wants_embedded_ray(address):
        pin_loopback()
        return
    address = address or os.environ["RAY_ADDRESS"]
    check_reachable(address)
    check_gcs_auth(address)


def check_output_dir(spec, source: str, relative_ok: bool = True) -> None:
    """The run directory can be written here. Inside a Ray job a relative output_dir would land in
    the job's working-directory copy in Ray's temporary folder, deleted with the cluster."""
    from system.configtree import SpecError

    out = spec.run.output_dir
    if not relative_ok and not Path(out).is_absolute():
        raise SpecError([("run.output_dir", f"{out!r} is relative: inside a Ray job it would be under Ray's "
                                            f"temporary folder, which is deleted with the cluster; give an "
                                            f"absolute path on storage every node sees (--output-dir /shared/runs, "
                                            f"or `moeforge submit`, which resolves it where you run it)")], source)
    run_dir = Path(out).absolute() / spec.run.name
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())  # the run dir is made later
    probe = existing / f".moeforge-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SpecError([("run.output_dir", f"cannot write the run directory {run_dir} here "
                                            f"({e.strerror or e} at {existing}): give a directory this machine can "
                                            f"write; on a cluster, storage every node sees")], source) from None


# `moeforge simulate` flags -> dotted config fields of parallel.simulator.SimConfig (whose model section is
# the training ModelConfig: --layers sets the blocks, all of them MoE under the default moe_layers: all)
SIMULATE_FLAGS = (
    ("gpus", "cluster.gpus", int), ("gpus_per_node", "cluster.gpus_per_node", int),
    ("experts", "model.num_experts", int), ("top_k", "model.top_k", int), ("layers", "model.n_layers", int),
    ("d_model", "model.d_model", int), ("d_expert", "model.d_expert", int),
    ("tokens_per_gpu", "load.tokens_per_gpu", int), ("zipf_s", "load.zipf_s", float),
    ("drift", "load.drift", float), ("seed", "load.seed", int), ("iterations", "sim.iterations", int),
    ("spag", "fssdp.spag", str),
)


def cmd_simulate(args) -> int:
    import json

    from system.configtree import SpecError

    import yaml

    from parallel.simulator import format_result, format_sweep, load_config, simulate, sweep

    overrides = {path: getattr(args, name) for name, path, _ in SIMULATE_FLAGS if getattr(args, name) is not None}
    if args.trace:
        overrides["load.kind"], overrides["load.trace"] = "trace", args.trace
    elif args.zipf_s is not None:
        overrides["load.kind"] = "zipf"
    if args.policies:
        overrides["sim.policies"] = [p.strip() for p in args.policies.split(",") if p.strip()]
    for item in args.set or []:  # --set model.moe_layers=every_2: any config field, the value read as YAML
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError([("--set", f"{item!r} is not FIELD=VALUE (e.g. fssdp.memory_cap=4)")], "command line")
        overrides[key.strip()] = yaml.safe_load(value)
    cfg = load_config(args.config, overrides)
    if args.sweep_gpus:
        try:
            gpus = [int(x) for x in args.sweep_gpus.split(",") if x.strip()]
        except ValueError:
            raise SpecError([("--sweep-gpus", f"{args.sweep_gpus!r} is not a comma-separated list of integers")],
                            "command line") from None
        out = sweep(cfg, gpus)
        print(format_sweep(out))
    else:
        out = simulate(cfg)
        print(format_result(out))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"[moeforge] wrote {args.json}")
    return 0


def cmd_export(args) -> int:
    from jobs.export import export_run
    from system.hf.families import NotRepresentable

    try:
        rep = export_run(args.run_dir, args.to, stage=args.stage, step=args.step, dtype=args.dtype,
                         max_shard_bytes=int(args.max_shard_mb * 2 ** 20) if args.max_shard_mb else None,
                         overwrite=args.overwrite)
    except NotRepresentable as e:
        print(f"error: cannot export: {e} (nothing was written)", file=sys.stderr)
        return EXIT_SPEC
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_SPEC
    shards = sum(1 for f in rep["files"] if f.endswith(".safetensors"))
    print(f"[moeforge] exported stage {rep['stage']} step {rep['step']} ({rep['expert_strategy']}) as a Hugging Face "
          f"{rep['family']} model ({rep['dtype']}, {shards} shard{'s' if shards != 1 else ''}) to {args.to}")
    return 0


def cmd_prepare(args) -> int:
    spec = load_job_spec(args.spec)
    from jobs.orchestrate import init_ray
    from jobs.plan import plan_job
    from jobs.prepare import prepare_corpus
    from system.data.dataset import default_cache_dir, prepared_root
    from system.data.prepare import source_dir, verify

    plan = plan_job(spec)
    if not args.local:
        before_ray(args.address)
        init_ray(plan, args.address)
    try:
        corpus = prepare_corpus(plan.corpus, use_ray=not args.local, concurrency=args.workers)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_SPEC
    root = prepared_root(default_cache_dir(plan.corpus))
    for src in plan.corpus.sources:
        m = corpus.manifests[src.name]
        d = source_dir(root, src, corpus.tokenizer, plan.corpus.holdout_fraction)
        line = (f"[moeforge] {src.name}: {m['documents']} documents, {m['train_tokens']} train + "
                f"{m['holdout_tokens']} holdout tokens ({m['dtype']}), {len(m['units'])} shards, {d}")
        if args.verify:
            bad = verify(d, m)
            if bad:
                print(f"error: {src.name}: shard checksums differ from the manifest: {', '.join(bad)} "
                      f"(delete {d} and prepare again)", file=sys.stderr)
                return EXIT_SPEC
            line += "; checksums ok"
        print(line, flush=True)
    return 0


def cmd_dashboard(args) -> int:
    from jobs.dashboard.server import plotly_js, serve

    paths = [Path(p) for p in (args.run_dirs or ["runs"])]
    bad = [str(p) for p in paths if not p.is_dir()]
    if bad:
        print(f"error: not a directory: {', '.join(bad)} (give run directories or a directory of runs)",
              file=sys.stderr)
        return EXIT_SPEC
    try:
        plotly_js()
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_SPEC

    def ready(url, index):
        runs = index.refresh()
        print(f"[moeforge] dashboard at {url} ({len(runs)} run{'s' if len(runs) != 1 else ''} under "
              f"{', '.join(str(p) for p in index.paths)}); Ctrl-C stops it", flush=True)

    serve(paths, host=args.host, port=args.port, on_ready=ready)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moeforge", description="Train MoE language models: Ray + DeepSpeed.")
    sub = p.add_subparsers(dest="command", required=True)
    sc = sub.add_parser("schema", help="print the job spec's JSON Schema (for editors and CI checks)")
    sc.add_argument("--out", help="write it to this file instead (e.g. docs/moeforge.schema.json)")
    sc.set_defaults(fn=cmd_schema)
    v = sub.add_parser("validate", help="validate a job spec (nothing is launched or written)")
    v.add_argument("spec")
    v.add_argument("--device-memory", help="GPU specs: device memory for the memory check, e.g. 80GB or H100 "
                                           "(default H100)")
    v.add_argument("--strict", action="store_true", help="a memory estimate over the device's memory is an error")
    v.set_defaults(fn=cmd_validate)
    r = sub.add_parser("run", help="run a job spec on RAY_ADDRESS's cluster or an embedded local Ray")
    r.add_argument("spec")
    r.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else embedded local Ray)")
    r.add_argument("--output-dir", help="override run.output_dir")
    r.add_argument("--retrain-from", metavar="STAGE",
                   help="train STAGE and every later stage again although they finished (their files are kept "
                        "under RUN/superseded/); needed to change a finished stage's training settings")
    r.add_argument("--verbose", action="store_true",
                   help="stream Ray's and every worker's output (default: in RUN/logs/STAGE/rankR.log)")
    r.add_argument("--device-memory", help="GPU specs: device memory for the memory check (default H100)")
    r.add_argument("--strict", action="store_true", help="refuse to start when the memory estimate exceeds the device")
    r.set_defaults(fn=cmd_run)
    es = sub.add_parser("estimate", help="per-rank memory by part, whether it fits, the largest micro-batch")
    es.add_argument("spec")
    es.add_argument("--stage", help="stage name (default: the first)")
    es.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    es.add_argument("--nodes", type=int, help="nodes: world size = nodes x gpus-per-node (default: the spec's)")
    es.add_argument("--device-memory", help="80GB, 80GiB or a GPU name: H100, H200, A100-80GB... (default H100)")
    es.add_argument("--imbalance", type=float, help="busiest expert's load over the mean (default 1 + fssdp.memory_cap)")
    es.add_argument("--expert-sharding", type=int,
                    help="override: parallel.expert_sharding 0|1|2 (expert masters and moments, and with 2 "
                         "gradients, over the expert-data-parallel group); --recommend tries only this level")
    es.add_argument("--ep-size", type=int, help="override: parallel.expert_parallel_size")
    es.add_argument("--zero", type=int, choices=[0, 1, 2], help="override: parallel.zero_stage")
    es.add_argument("--checkpointing", choices=["none", "moe", "full"], help="override: model.activation_checkpointing")
    es.add_argument("--micro-batch", type=int, help="override: the stage's micro_batch_size")
    es.add_argument("--gpu", action="store_true", help="override: parallel.use_gpu true (bf16)")
    es.add_argument("--recommend", action="store_true",
                    help="search P, ZeRO stage, expert sharding, activation checkpointing and micro-batch for a "
                         "layout that fits (without --nodes: the smallest GPU count of 8, 16, 32, ... 1024 that fits)")
    es.add_argument("--time", action="store_true", help="also the simulator's predicted step time (moeforge simulate)")
    es.add_argument("--strict", action="store_true", help="exit 2 when the estimate exceeds the device's memory")
    es.add_argument("--json", action="store_true", help="print JSON")
    es.set_defaults(fn=cmd_estimate)
    add_jobs_api_commands(sub)
    m = sub.add_parser("simulate", help="simulate EP/FSSDP/FasterMoE/ZeRO-3 MoE layers at 8-256 GPUs (no GPU needed)")
    m.add_argument("config", nargs="?", help="YAML simulator config (e.g. examples/simulate.yaml); flags override it")
    for name, path, tp in SIMULATE_FLAGS:
        m.add_argument("--" + name.replace("_", "-"), type=tp, default=None, help=f"sets {path}")
    m.add_argument("--trace", help="metrics.jsonl (or run directory) whose moe/<i>/tokens_per_expert are the loads")
    m.add_argument("--policies", help="comma-separated subset of ep,fssdp,fssdp_remat,fastermoe,zero3")
    m.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override any config field, e.g. --set fssdp.memory_cap=4 or --set model.moe_layers=every_2 "
                        "(repeatable)")
    m.add_argument("--sweep-gpus", help="comma-separated GPU counts, e.g. 8,16,32,64,128,256")
    m.add_argument("--json", help="write the full results as JSON to this path")
    m.set_defaults(fn=cmd_simulate)
    x = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face model directory")
    x.add_argument("run_dir")
    x.add_argument("--to", required=True, help="output directory (must not exist or be empty)")
    x.add_argument("--stage", help="stage to export (default: the last stage with a checkpoint)")
    x.add_argument("--step", type=int, help="checkpoint step (default: the stage's latest)")
    x.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="tensor dtype (default: as trained)")
    x.add_argument("--max-shard-mb", type=float, help="largest safetensors shard in MiB (default 2048)")
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty --to directory")
    x.set_defaults(fn=cmd_export)
    pr = sub.add_parser("prepare", help="tokenize a spec's corpus once into token shards (parallel, Ray Data)")
    pr.add_argument("spec")
    pr.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else embedded local Ray)")
    pr.add_argument("--workers", type=int, help="parallel tasks at most (default: the cluster's CPUs)")
    pr.add_argument("--local", action="store_true", help="in this process, without Ray")
    pr.add_argument("--verify", action="store_true", help="also check every shard's CRC-32 (reads them all)")
    pr.set_defaults(fn=cmd_prepare)
    d = sub.add_parser("dashboard", help="serve a browser dashboard of runs (updates while they write)")
    d.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                   help="run directories, or directories of runs (default: ./runs)")
    d.add_argument("--port", type=int, default=8050, help="port (default 8050; 0 picks a free one)")
    d.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    d.set_defaults(fn=cmd_dashboard)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    from jobs.user_errors import describe

    try:
        return args.fn(args)
    except Exception as e:
        lines = describe(e, getattr(args, "address", None) or os.environ.get("RAY_ADDRESS"))
        if lines is None:
            raise
        for line in lines:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_SPEC


if __name__ == "__main__":
    sys.exit(main())
