"""Run one stage of a job on the current rank: build data, model, engine; resume; train.

Called by every Ray Train worker (see `jobs.orchestrate`), and directly by tests on gloo ranks.
torch.distributed must already be initialised when the world has more than one rank.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from jobs.configtree import to_dict
from jobs.layout import RunLayout
from jobs.spec import JobSpec, parse_spec
from parallel import dist as pdist
from system.checkpoint import (CheckpointManager, atomic_write_text, latest_checkpoint,
                               read_manifest, resolve_checkpoint)
from system.hf_import import is_hf_model_dir
from system.upcycle import init_model_from
from system.data import DataStream, MixtureSampler, PackedCorpus, holdout_batches
from system.metrics import JsonlSink, MetricSink
from system.model import Transformer
from system.trainer import Trainer, TrainerHooks


def build_model(spec: JobSpec, vocab_size: int, stage_index: int = 0) -> Transformer:
    """Stage `stage_index`'s model (top-level model/experts with the stage's overrides)."""
    from dataclasses import replace
    model_cfg = spec.stage_model(stage_index)
    mcfg = model_cfg if model_cfg.vocab_size is not None else replace(model_cfg, vocab_size=vocab_size)
    if mcfg.vocab_size < vocab_size:
        raise ValueError(f"model.vocab_size={mcfg.vocab_size} is smaller than the tokenizer's "
                         f"vocabulary ({vocab_size})")
    ds_moe = None
    par = spec.stage_parallel(stage_index)
    if par.expert_strategy == "deepspeed_moe":
        from dataclasses import asdict
        ds_moe = {"ep_size": spec.stage_ep_size(stage_index), **asdict(par.deepspeed_moe)}
    return Transformer(mcfg, spec.stage_experts(stage_index), ds_moe=ds_moe)


def fssdp_plan_config(sec):
    from parallel.placement import FSSDPPlanConfig
    return FSSDPPlanConfig(window=sec.window, overlap_budget=sec.overlap_budget, memory_cap=sec.memory_cap,
                           reshard_every=sec.reshard_every, rematerialize=sec.rematerialize,
                           ranks_per_node=sec.ranks_per_node, link_gbps=sec.link_gbps,
                           tolerance=sec.tolerance)


def load_stage_init_state(engine, store, ckpt: Path, strategy: str) -> None:
    """Optimizer state from the checkpoint a stage starts from (weights are already in).

    Same layout family (replicated -> replicated, ep/fssdp -> ep/fssdp at any world size):
    DeepSpeed restores the dense state and the store every expert's moments. Across families the
    optimizer groups differ, so the moments start at zero (the weights still carry over) and we
    say so.
    """
    sharded_ckpt = (ckpt / "experts").is_dir()
    if sharded_ckpt == (store is not None):
        engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                               load_lr_scheduler_states=False)
        if store is not None:
            store.load(ckpt)
    elif pdist.rank() == 0:
        print(f"[moeforge] {ckpt} was written with a different expert layout than expert_strategy "
              f"{strategy!r}: weights carried over, optimizer moments start fresh", flush=True)


def final_checkpoint(layout: RunLayout, stage: str, where: str) -> Path:
    """The final checkpoint of a finished stage of this run; `where` names the referring field."""
    ckpt = latest_checkpoint(layout.checkpoints(stage))
    if ckpt is None or not read_manifest(ckpt).get("final"):
        raise ValueError(f"{where}: stage {stage!r} has not finished "
                         f"(no final checkpoint under {layout.checkpoints(stage)})")
    return ckpt


def resolve_init_from(spec: JobSpec, stage_index: int, layout: RunLayout) -> Optional[Path]:
    """The checkpoint a stage starts from: an earlier stage's final one, or a user path."""
    ref = spec.stages[stage_index].init_from
    if ref is None:
        return None
    names = [s.name for s in spec.stages[:stage_index]]
    if ref in names:
        return final_checkpoint(layout, ref, f"stages[{stage_index}].init_from")
    if is_hf_model_dir(ref):
        return Path(ref)
    return resolve_checkpoint(ref)


def stage_mixture(spec: JobSpec, stage_index: int, layout: RunLayout, corpus: PackedCorpus):
    """(chunk arrays per sampler domain, mixture weights) of a stage: its own sources, plus one
    replay pool per source the replayed stages consumed (see `system.data.replay`)."""
    from system.data.replay import replay_pools, replay_weights

    data_cfg = spec.stage_data(stage_index)
    train = {s.name: corpus.train[s.name] for s in data_cfg.sources}
    weights = {s.name: s.weight for s in data_cfg.sources}
    names = spec.replay_stages(stage_index)
    if not names:
        return train, weights
    records = []
    for name in names:
        path = layout.consumed_samples_file(name)
        if not path.is_file():
            raise ValueError(f"stages[{stage_index}].data.replay: stage {name!r} has no record of the samples "
                             f"it consumed ({path}); it must finish before it can be replayed")
        records.append((name, path))
    pools = replay_pools(records, corpus.train, corpus.tokenizer.fingerprint, corpus.seq_len)
    train.update(pools)
    return train, replay_weights(weights, {k: len(v) for k, v in pools.items()},
                                 spec.stages[stage_index].data.replay.fraction)


def run_stage(spec_dict: dict[str, Any], stage_index: int, *, extra_sinks: tuple[MetricSink, ...] = (),
              on_step: Optional[Callable[[dict], None]] = None) -> dict[str, Any]:
    """Train stage `stage_index` of the spec on this rank; return the last step's metrics."""
    spec = parse_spec(spec_dict)
    stage = spec.stages[stage_index]
    par = spec.stage_parallel(stage_index)
    rank, world = pdist.rank(), pdist.world_size()
    pdist.configure_accelerator(par.use_gpu)
    import deepspeed  # after DS_ACCELERATOR is set

    if not pdist.is_dist():
        pdist.init_single_process_group(par.backend, par.use_gpu)
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    if par.threads_per_worker:
        torch.set_num_threads(par.threads_per_worker)
    layout = RunLayout(spec.run_dir())

    data_cfg = spec.stage_data(stage_index)
    # The job's whole corpus (every stage's sources, one tokenizer): this stage trains on its own
    # sources (plus replay pools) and evaluates on any of them.
    corpus = PackedCorpus.build(spec.job_data())
    # Same seed on every rank: the replicated (dense) parameters must start identical.
    torch.manual_seed(spec.run.seed + 1000 * stage_index)
    model = build_model(spec, corpus.tokenizer.vocab_size, stage_index)
    if par.use_gpu and torch.cuda.is_available():
        model = model.cuda(int(os.environ.get("LOCAL_RANK", 0)))
    init_ckpt = resolve_init_from(spec, stage_index, layout)
    init_report = None
    if init_ckpt is not None:
        # Same shapes load as they are; a dense FFN or 1-expert source spawns this stage's experts
        # (sparse upcycling / EvoMoE diversify); a Hugging Face Llama/Qwen2 directory is converted.
        init_report = init_model_from(model, init_ckpt, stage.upcycle, seed=spec.run.seed + stage_index)
        if rank == 0:
            up = init_report.get("upcycled_layers") or {}
            print(f"[moeforge] stage {stage.name}: initialised from {init_report.get('kind')} {init_ckpt}: "
                  f"{len(init_report.get('loaded', []))} tensors loaded, {len(up)} MoE layers upcycled"
                  + (f" ({stage.upcycle.diversify})" if up else ""), flush=True)

    store = None
    if par.expert_strategy in ("ep", "fssdp"):
        # Every rank built (and initialised) the same full model; each keeps the experts it owns.
        from parallel.expert_store import shard_model
        store = shard_model(model, par.expert_strategy, fssdp_plan_config(par.fssdp))

    from parallel.engine import build_engine
    engine = build_engine(model, stage, par, spec.deepspeed, world, store=store)
    if init_ckpt is not None and not stage.init_weights_only and not is_hf_model_dir(init_ckpt):
        # Full state: optimizer moments too (the LR schedule restarts with this stage).
        load_stage_init_state(engine, store, init_ckpt, par.expert_strategy)

    train, weights = stage_mixture(spec, stage_index, layout, corpus)
    group = stage.micro_batch_size if data_cfg.microbatch_domains == "single" else 1
    sampler = MixtureSampler({d: len(v) for d, v in train.items()}, weights,
                             seed=spec.run.seed + stage_index, group_size=group)
    stream = DataStream(train, sampler, rank, world, stage.micro_batch_size)
    eval_domains = spec.stage_eval_domains(stage_index)
    new_domains = [s.name for s in data_cfg.sources if s.weight > 0]

    def eval_batches():
        return {d: list(holdout_batches(corpus.holdout, d, stage.micro_batch_size, stage.eval_batches))
                for d in eval_domains}

    teacher = None
    if stage.kind == "distill":
        from jobs.teacher import build_teacher_source
        teacher = build_teacher_source(spec, stage_index, layout, corpus, train, sampler, model,
                                       eval_domains)

    sinks: list[MetricSink] = list(extra_sinks)
    if rank == 0:
        sinks.insert(0, JsonlSink(layout.metrics_file))
    ckpt = CheckpointManager(layout.checkpoints(stage.name), rank, pdist.barrier,
                             spec.ray.checkpoint_config.num_to_keep)
    manifest_base = {"run": spec.run.name, "spec": to_dict(spec), "tokenizer": corpus.tokenizer.fingerprint,
                     "init_from": str(init_ckpt) if init_ckpt else None,
                     "init_report": init_report}
    trainer = Trainer(engine=engine, model=model, stream=stream, holdout_batches=eval_batches, stage=stage,
                      balancing=spec.stage_experts(stage_index).balancing, stage_name=stage.name, sinks=sinks, ckpt=ckpt,
                      manifest_base=manifest_base, log_every=spec.metrics.log_every,
                      hooks=TrainerHooks(on_step=on_step), teacher=teacher,
                      # Forgetting / adaptation only mean something for a stage that starts from a
                      # trained model: "old" is what it knew, "new" what this stage trains on.
                      domain_groups=None if stage.init_from is None else
                      {"new": new_domains, "old": [d for d in eval_domains if d not in new_domains]})
    resume_from = latest_checkpoint(ckpt.root)
    if resume_from is not None:
        trainer.resume(resume_from)
        if rank == 0:
            print(f"[moeforge] stage {stage.name}: resumed from {resume_from} at step {trainer.state.step}",
                  flush=True)
    try:
        last = trainer.fit()
    finally:
        for s in sinks:
            s.close()
    if rank == 0:
        final = latest_checkpoint(ckpt.root)
        consumed = {"sampler": {"seed": sampler.seed, "weights": weights, "group_size": sampler.group_size,
                                "sizes": {d: len(v) for d, v in train.items()}},
                    "positions": [trainer.state.data_start, stream.position],
                    "data": to_dict(data_cfg), "tokenizer": corpus.tokenizer.fingerprint}
        atomic_write_text(layout.consumed_file(stage.name), json.dumps(consumed, indent=1))
        # The samples themselves, as base-corpus chunk ids per source: what later stages replay.
        from system.data.replay import base_chunks, save_consumed
        doms, idxs = sampler.lookup_range(trainer.state.data_start, stream.position)
        save_consumed(layout.consumed_samples_file(stage.name), base_chunks(sampler.domains, train, doms, idxs),
                      {"stage": stage.name, "tokenizer": corpus.tokenizer.fingerprint, "seq_len": corpus.seq_len,
                       "sizes": {d: len(corpus.train[d]) for d in corpus.domains},
                       "positions": [trainer.state.data_start, stream.position]})
        atomic_write_text(layout.done_file(stage.name), json.dumps(
            {"step": trainer.state.step, "tokens": trainer.state.tokens, "checkpoint": str(final),
             "last": {k: v for k, v in last.items() if not k.startswith("moe/")}}, indent=1))
    pdist.barrier()
    return last
