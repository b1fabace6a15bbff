"""Run one stage of a job on the current rank: build data, model, strategy, engine; resume; train.

Called by every Ray Train worker (see `jobs.orchestrate`), and directly by tests on gloo ranks.
torch.distributed must already be initialised when the world has more than one rank. The stage
comes from the job's resolved plan (`jobs.plan`); nothing here reads the spec.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from jobs.elastic import is_elastic, stage_at
from jobs.layout import RunLayout
from jobs.plan import JobPlan, StagePlan, plan_job
from jobs.ray_metrics import announce_stage, checkpoint_listener
from jobs.ray_nodes import rank_nodes
from jobs.sources import init_checkpoint, resolve_teacher
from jobs.spec import parse_spec
from parallel import dist as pdist
from parallel.engine import cast_like_engine, engine_param_dtype
from parallel.strategy import ExpertStrategy, build_strategy
from parallel.trainer import Trainer, TrainerHooks
from system.checkpoint import (CheckpointCorrupt, CheckpointManager, atomic_write_text, latest_checkpoint,
                               read_manifest)
from system.configtree import to_dict
from system.data import DataStream, MixtureSampler, PackedCorpus, holdout_batches
from system.hf_import import is_hf_model_dir
from system.metrics import JsonlSink, MetricSink, supersede_stage_records
from system.model import Transformer
from system.upcycle import init_model_from


def worker_device(use_gpu: bool) -> torch.device:
    """The device this rank trains on: cpu unless the stage uses GPUs and CUDA is there; in a Ray
    Train worker the GPU Ray assigned to it (`ray.train.torch.get_device()`, an index into the
    worker's CUDA_VISIBLE_DEVICES, which need not be LOCAL_RANK); elsewhere (a process started
    by hand or by a test) cuda:LOCAL_RANK."""
    if not (use_gpu and torch.cuda.is_available()):
        return torch.device("cpu")
    ray = sys.modules.get("ray")  # a Ray worker has imported it; nothing else needs to
    if ray is not None and ray.is_initialized():
        from ray.train.torch import get_device

        dev = get_device()
        if dev.type == "cuda":
            return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


def build_model(stage: StagePlan, vocab_size: int, strategy: Optional[ExpertStrategy] = None,
                document_sep_id: Optional[int] = None) -> Transformer:
    """The stage's model (top-level model/experts with the stage's overrides), with the MoE
    layers the strategy builds (DeepSpeed's for deepspeed_moe, ours otherwise); with
    `document_sep_id` (`data.document_mask`), attention stays within documents."""
    mcfg = stage.model if stage.model.vocab_size is not None else replace(stage.model, vocab_size=vocab_size)
    if mcfg.vocab_size < vocab_size:
        raise ValueError(f"model.vocab_size={mcfg.vocab_size} is smaller than the tokenizer's "
                         f"vocabulary ({vocab_size})")
    return Transformer(mcfg, stage.experts, moe_factory=strategy.moe_factory() if strategy else None,
                       document_sep_id=document_sep_id)


def stage_mixture(stage: StagePlan, layout: RunLayout, corpus: PackedCorpus):
    """(chunk arrays per sampler domain, mixture weights) of a stage: its own sources, plus one
    replay pool per source the replayed stages consumed (see `system.data.replay`)."""
    from system.data.replay import replay_pools, replay_weights, source_pools

    train = {s.name: corpus.train[s.name] for s in stage.data.sources}
    weights = dict(stage.weights)
    if not stage.replay_stages and not stage.replay_sources:
        return train, weights
    records = []
    for name in stage.replay_stages:
        path = layout.consumed_samples_file(name)
        if not path.is_file():
            raise ValueError(f"stages[{stage.index}].data.replay: stage {name!r} has no record of the samples "
                             f"it consumed ({path}); it must finish before it can be replayed")
        records.append((name, path))
    pools = replay_pools(records, corpus.train, corpus.tokenizer.fingerprint, corpus.seq_len) if records else {}
    pools.update(source_pools(stage.replay_sources, corpus.train))
    train.update(pools)
    return train, replay_weights(weights, {k: len(v) for k, v in pools.items()}, stage.replay_fraction)


def run_stage(spec_dict: dict[str, Any], stage_index: int, *, extra_sinks: tuple[MetricSink, ...] = (),
              on_step: Optional[Callable[[dict], None]] = None,
              stop_requested: Optional[Callable[[], bool]] = None,
              checkpoint_requested: Optional[Callable[[], bool]] = None,
              after_checkpoint: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    """Train stage `stage_index` of the job on this rank; return the last step's metrics.

    `spec_dict` is the driver's validated spec (plain data, as it travels to Ray workers); the
    worker resolves it into the job's plan without re-reading files. `stop_requested` (polled
    every step, e.g. a SIGTERM flag) makes the stage checkpoint and raise StagePreempted."""
    plan = plan_job(parse_spec(spec_dict, preflight=False))
    stage = plan.stages[stage_index]
    if is_elastic(stage):  # the size this run got (`jobs.elastic`): the same global batch
        stage = stage_at(stage, pdist.world_size())
    return run_planned_stage(plan, stage, extra_sinks=extra_sinks, on_step=on_step, stop_requested=stop_requested,
                             checkpoint_requested=checkpoint_requested, after_checkpoint=after_checkpoint)


def run_planned_stage(plan: JobPlan, stage: StagePlan, *, extra_sinks: tuple[MetricSink, ...] = (),
                      on_step: Optional[Callable[[dict], None]] = None,
                      stop_requested: Optional[Callable[[], bool]] = None,
                      checkpoint_requested: Optional[Callable[[], bool]] = None,
                      after_checkpoint: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    """Train `stage` of the job's `plan` on this rank; return the last step's metrics.

    The steps run in this order on every rank: device and process group, corpus, strategy,
    model (seeded, then initialised from `init_from`), engine, data stream, teacher, resume
    point and metric sinks, trainer, training, and (rank 0) the stage's records."""
    rank = pdist.rank()
    device = _start_rank(stage.parallel)
    layout = RunLayout(plan.run_dir)
    # The job's whole corpus (every stage's sources, one tokenizer): this stage trains on its own
    # sources (plus replay pools) and evaluates on any of them.
    corpus = PackedCorpus.build(plan.corpus)
    pdist.startup_trace("corpus")
    nodes = rank_nodes() if stage.parallel.expert_strategy in ("ep", "fssdp") else None
    strategy = build_strategy(stage.parallel, stage.ep_size, stage.grad_clip, nodes)
    model, init_ckpt, init_report = _build_initialised_model(plan, stage, layout, corpus, strategy, device)
    strategy.prepare(model)
    pdist.startup_trace("model")
    engine = _build_engine(stage, model, strategy, init_ckpt)
    if rank == 0:
        _say_expert_backend(stage, device)
    data = _stage_data(stage, layout, corpus)
    teacher = _build_teacher(plan, stage, layout, corpus, data, model)
    # Where the stage resumes, decided before the metrics file opens: the records past that step
    # are superseded.
    resume_from = _resume_point(layout.checkpoints(stage.name), rank)
    sinks = _stage_sinks(plan, stage, layout, resume_from, extra_sinks, rank)
    ckpt = CheckpointManager(layout.checkpoints(stage.name), rank, pdist.barrier,
                             plan.ray.checkpoint_config.num_to_keep,
                             async_save=plan.ray.checkpoint_config.async_save, world=pdist.world_size())
    manifest_base = {"run": plan.run.name, "spec": to_dict(plan.spec), "tokenizer": corpus.tokenizer.fingerprint,
                     "init_from": str(init_ckpt) if init_ckpt else None, "init_report": init_report}
    trainer = Trainer(engine=engine, model=model, strategy=strategy, stream=data.stream,
                      holdout_batches=data.eval_batches, stage=stage, balancing=stage.experts.balancing,
                      stage_name=stage.name, sinks=sinks, ckpt=ckpt, manifest_base=manifest_base,
                      log_every=plan.metrics.log_every,
                      hooks=TrainerHooks(on_step=on_step, stop_requested=stop_requested,
                                         checkpoint_requested=checkpoint_requested,
                                         on_checkpoint=_chain(checkpoint_listener(sinks), after_checkpoint)),
                      teacher=teacher,
                      # Forgetting / adaptation only mean something for a stage that starts from a
                      # trained model: "old" is what it knew, "new" what this stage trains on.
                      domain_groups=stage.domain_groups())
    if resume_from is not None:
        _resume(trainer, stage, layout, resume_from, rank, plan.stages[stage.index].world_size)
    # the Ray gauges' stage shape: the size asked for is the plan's (an elastic stage's largest)
    announce_stage(sinks, world_size=pdist.world_size(), requested_world_size=plan.stages[stage.index].world_size,
                   checkpoint_step=trainer.state.step, checkpoint_every=stage.checkpoint_every)
    last = _fit(trainer, data.stream, sinks)
    if rank == 0:
        _write_stage_records(layout, stage, trainer, data.sampler, data.stream, data.train, data.weights, corpus,
                             last, latest_checkpoint(ckpt.root))
    pdist.barrier()
    return last


def _say_expert_backend(stage: StagePlan, device: torch.device) -> None:
    """`experts.backend: auto` resolves per device, dtype and shape: say once what it runs."""
    m = stage.model
    if stage.experts.backend != "auto" or m.num_experts <= 1:
        return
    from experts.backends import resolve_auto
    from parallel.engine import engine_param_dtype

    dtype = engine_param_dtype(stage, pdist.world_size()) or torch.float32
    n = m.num_experts // max(1, stage.ep_size or 1)  # the owned experts one call runs (copies add)
    print(f"[moeforge] stage {stage.name}: experts.backend auto -> "
          f"{resolve_auto(device, dtype, m.d_model, m.d_expert, n)} ({device.type}, {str(dtype).replace('torch.', '')})",
          flush=True)


def _chain(*hooks: Optional[Callable[[int], None]]) -> Optional[Callable[[int], None]]:
    """One `on_checkpoint` hook calling each given one in order (None when none is given)."""
    live = [h for h in hooks if h is not None]
    if not live:
        return None

    def each(step: int) -> None:
        for h in live:
            h(step)
    return each


def _start_rank(par) -> torch.device:
    """This rank's device, its process group (its own when alone, else Ray Train's, connected
    now) and DeepSpeed's communication, in the order they need each other."""
    device = worker_device(par.use_gpu)
    pdist.configure_accelerator(par.use_gpu)
    pdist.bind_device(device)  # before NCCL's communicator and DeepSpeed's accelerator
    import deepspeed  # after DS_ACCELERATOR is set

    pdist.startup_trace("deepspeed_imported")
    if not pdist.is_dist():
        pdist.init_single_process_group(par.backend, par.use_gpu, device)
    else:
        pdist.eager_connect(device)  # Ray Train's group: bound to the device, communicator made now
    deepspeed.init_distributed(dist_backend=pdist.backend())
    pdist.startup_trace("deepspeed_comm")
    if par.threads_per_worker:
        torch.set_num_threads(par.threads_per_worker)
    return device


def _build_initialised_model(plan: JobPlan, stage: StagePlan, layout: RunLayout, corpus: PackedCorpus,
                             strategy: ExpertStrategy, device: torch.device):
    """(model, init checkpoint or None, init report or None): the stage's model from the model
    seed, then loaded from `init_from` when the stage has one."""
    # Same seed on every rank: the replicated (dense) parameters must start identical.
    torch.manual_seed(stage.model_seed)
    init_ckpt = init_checkpoint(stage, layout)
    # ep/fssdp ranks build only the experts they own: from the seed (the full model's values) or
    # filled by the init_from loader (moeforge checkpoint, upcycling, Hugging Face), which reads
    # the full source and keeps this rank's rows.
    strategy.build_owned_only = True
    model = build_model(stage, corpus.tokenizer.vocab_size, strategy,
                        corpus.tokenizer.eos_id if plan.corpus.document_mask else None)
    init_report = None
    if init_ckpt is not None:
        # Same shapes load as they are; a dense FFN or 1-expert source spawns this stage's experts
        # (sparse upcycling / EvoMoE diversify); a Hugging Face Llama/Qwen2 directory is converted.
        # On the host, in fp32, before any cast.
        init_report = init_model_from(model, init_ckpt, stage.upcycle, seed=stage.data_seed,
                                      want_expert=lambda l, e: strategy.owns_initially(l, e, stage.model.num_experts))
        if pdist.rank() == 0:
            up = init_report.get("upcycled_layers") or {}
            print(f"[moeforge] stage {stage.name}: initialised from {init_report.get('kind')} {init_ckpt}: "
                  f"{len(init_report.get('loaded', []))} tensors loaded, {len(up)} MoE layers upcycled"
                  + (f" ({stage.upcycle.diversify})" if up else ""), flush=True)
    if device.type == "cuda":
        # Cast as DeepSpeed will, then move: the fp32 model never occupies the GPU.
        cast_like_engine(model, engine_param_dtype(stage, pdist.world_size()),
                         keep_experts=not strategy.engine_holds_experts)
        model = model.to(device)
    return model, init_ckpt, init_report


def _build_engine(stage: StagePlan, model: Transformer, strategy: ExpertStrategy, init_ckpt):
    """The DeepSpeed engine; a full-state `init_from` (not `init_weights_only`) also brings the
    optimizer moments (the LR schedule restarts with this stage)."""
    from parallel.engine import build_engine

    engine = build_engine(model, stage, stage.deepspeed, pdist.world_size(), strategy)
    pdist.startup_trace("engine")
    if init_ckpt is not None and not stage.init_weights_only and not is_hf_model_dir(init_ckpt):
        strategy.load_init_state(engine, init_ckpt)
    return engine


@dataclass
class _StageData:
    """What the stage trains on (its mixture's chunks, weights, sampler and stream) and evaluates on."""

    train: dict  # chunk arrays per sampler domain: the stage's sources and replay pools
    weights: dict
    sampler: MixtureSampler
    stream: DataStream
    eval_domains: list
    eval_batches: Callable[[], dict]


def _stage_data(stage: StagePlan, layout: RunLayout, corpus: PackedCorpus) -> _StageData:
    train, weights = stage_mixture(stage, layout, corpus)
    group = stage.micro_batch_size if stage.data.microbatch_domains == "single" else 1
    sampler = MixtureSampler({d: len(v) for d, v in train.items()}, weights, seed=stage.data_seed, group_size=group)
    # The next micro-batch is gathered in a background thread (pinned on GPU for a non-blocking copy).
    stream = DataStream(train, sampler, pdist.rank(), pdist.world_size(), stage.micro_batch_size, prefetch=True,
                        pin_memory=stage.parallel.use_gpu and torch.cuda.is_available())
    eval_domains = list(stage.eval_domains)

    def eval_batches():
        return {d: list(holdout_batches(corpus.holdout, d, stage.micro_batch_size, stage.eval_batches))
                for d in eval_domains}

    return _StageData(train, weights, sampler, stream, eval_domains, eval_batches)


def _build_teacher(plan: JobPlan, stage: StagePlan, layout: RunLayout, corpus: PackedCorpus, data: _StageData,
                   model: Transformer):
    """A distillation stage's teacher source (`parallel.teacher`); None for other stages."""
    if stage.teacher is None:
        return None
    from parallel.teacher import build_teacher_source

    return build_teacher_source(stage, resolve_teacher(plan, stage, layout), layout.teacher_cache(stage.name),
                                corpus, data.train, data.sampler, model, data.eval_domains)


def _stage_sinks(plan: JobPlan, stage: StagePlan, layout: RunLayout, resume_from: Optional[Path],
                 extra_sinks: tuple[MetricSink, ...], rank: int) -> list[MetricSink]:
    """The metric sinks: on rank 0 metrics.jsonl and the optional ones (its records past the
    resumed step superseded first), then `extra_sinks`; on other ranks `extra_sinks` only."""
    sinks: list[MetricSink] = list(extra_sinks)
    if rank == 0:
        resumed_step = None if resume_from is None else read_manifest(resume_from)["step"]
        supersede_stage_records(layout.metrics_file, stage.name, resumed_step)
        sinks[:0] = [JsonlSink(layout.metrics_file), *_optional_sinks(plan, stage, layout, resumed_step)]
    return sinks


def _resume(trainer: Trainer, stage: StagePlan, layout: RunLayout, resume_from: Path, rank: int,
            requested_world_size: int) -> None:
    trainer.resume(resume_from)
    if rank == 0:
        print(f"[moeforge] stage {stage.name}: resumed from {resume_from} at step {trainer.state.step}",
              flush=True)
        from jobs.heartbeat import record_event  # the dashboard's timeline marks it

        record_event(layout.root, "resumed", stage.name, trainer.state.step, checkpoint=str(resume_from))
        saved_at = read_manifest(resume_from).get("world_size")
        if saved_at is not None and saved_at != pdist.world_size():  # an elastic stage changed size
            record_event(layout.root, "resized", stage.name, trainer.state.step, from_world_size=saved_at,
                         world_size=pdist.world_size(), requested_world_size=requested_world_size)


def _fit(trainer: Trainer, stream: DataStream, sinks: list[MetricSink]) -> dict[str, Any]:
    """Train; the stream's prefetch thread and the sinks are closed however it ends."""
    pdist.startup_trace("fit")
    try:
        return trainer.fit()
    finally:
        stream.close()
        for s in sinks:
            s.close()


def _optional_sinks(plan: JobPlan, stage: StagePlan, layout: RunLayout, resumed_step: Optional[int]) -> list:
    """TensorBoard and W&B sinks as `metrics` asks (rank 0). Their records past the resumed step
    are superseded too: TensorBoard purges its events from the next step on."""
    out: list[MetricSink] = []
    m = plan.metrics
    if m.tensorboard:
        from system.tensorboard_sink import TensorBoardSink

        out.append(TensorBoardSink(layout.tensorboard_dir(stage.name),
                                   purge_step=0 if resumed_step is None else resumed_step + 1))
    if m.wandb is not None:
        from system.wandb_sink import WandbSink

        out.append(WandbSink(layout.root / "wandb", plan.run.name, stage.name, m.wandb.project, m.wandb.mode,
                             m.wandb.entity))
    return out


def _resume_point(root, rank: int):
    """The newest intact checkpoint of the stage, chosen on rank 0 (which verifies sizes and
    checksums; a damaged newer one is reported in one line and skipped; then it loads every file
    of the chosen one with the restricted unpickler) and broadcast, so every rank resumes from the
    same one or fails with the same error. Raises (on every rank) when checkpoints exist but none
    is intact, or a file of the chosen one is refused."""
    from system.checkpoint import valid_checkpoint
    from system.safe_load import UnsafeCheckpoint, screen_checkpoint

    choice = None
    if rank == 0:
        try:
            found = valid_checkpoint(root, warn=lambda m: print(f"[moeforge] warning: {m}", flush=True))
            if found is not None:
                screen_checkpoint(found)
            choice = ("ok", str(found) if found else None)
        except UnsafeCheckpoint as e:
            choice = ("unsafe", str(e))
        except ValueError as e:
            choice = ("error", str(e))
    kind, value = pdist.broadcast_object(choice)
    if kind == "unsafe":
        raise UnsafeCheckpoint(value)
    if kind == "error":
        raise CheckpointCorrupt(value)
    return None if value is None else Path(value)


def _write_stage_records(layout: RunLayout, stage: StagePlan, trainer: Trainer, sampler, stream, train, weights,
                         corpus, last: dict[str, Any], final) -> None:
    """consumed.json / consumed.npz (what later stages replay) and DONE.json, on rank 0."""
    from system.data.replay import base_chunks, save_consumed

    consumed = {"sampler": {"seed": sampler.seed, "weights": weights, "group_size": sampler.group_size,
                            "sizes": {d: len(v) for d, v in train.items()}},
                "positions": [trainer.state.data_start, stream.position],
                "data": to_dict(stage.data), "tokenizer": corpus.tokenizer.fingerprint}
    atomic_write_text(layout.consumed_file(stage.name), json.dumps(consumed, indent=1))
    # The samples themselves, as base-corpus chunk ids per source: what later stages replay.
    doms, idxs = sampler.lookup_range(trainer.state.data_start, stream.position)
    save_consumed(layout.consumed_samples_file(stage.name), base_chunks(sampler.domains, train, doms, idxs),
                  {"stage": stage.name, "tokenizer": corpus.tokenizer.fingerprint, "seq_len": corpus.seq_len,
                   "sizes": {d: len(corpus.train[d]) for d in corpus.domains},
                   "positions": [trainer.state.data_start, stream.position]})
    atomic_write_text(layout.done_file(stage.name), json.dumps(
        {"step": trainer.state.step, "tokens": trainer.state.tokens, "checkpoint": str(final),
         "last": {k: v for k, v in last.items() if not k.startswith("moe/")}}, indent=1))
