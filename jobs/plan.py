"""The resolved plan of a job: every stage's settings worked out once, from a validated spec.

`plan_job(spec)` is a pure function (it reads no file and starts nothing): each `StagePlan`
holds the stage's model, experts, parallel layout, data mixture, replay pools, evaluation
domains, init source, teacher, schedule and batch sizes, with the stage's overrides applied.
Everything downstream (the stage runner, the engine, the trainer, the Ray orchestration) reads
the plan and never goes back to the spec.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Optional

from experts.config import ExpertsConfig
from jobs.schema import (DistillSection, JobSpec, MetricsSection, OptimizerSection, ParallelSection,
                         RaySection, RunSection)
from system.configtree import SpecError, build_dataclass, deep_merge, to_dict
from system.data.config import DataConfig
from system.model_config import ModelConfig
from system.schedules import ScheduleConfig
from system.upcycle_config import UpcycleConfig


@dataclass(frozen=True)
class SourceRef:
    """Where a stage's initial weights or its teacher come from: an earlier stage of this job
    (`kind: stage`, its final checkpoint) or a directory (a checkpoint or a Hugging Face model)."""

    kind: Literal["stage", "path"]
    ref: str  # the stage name or the directory


@dataclass(frozen=True)
class StagePlan:
    index: int
    name: str
    kind: str  # pretrain | continual | distill
    # the model and its experts, with the stage's overrides
    model: ModelConfig
    experts: ExpertsConfig
    # the parallel layout: world size, expert strategy and its knobs, ZeRO stage, device
    parallel: ParallelSection
    world_size: int
    ep_size: int  # ranks one expert layer is sharded over (1: replicated)
    # the optimisation
    steps: int
    micro_batch_size: int
    grad_accum_steps: int
    global_batch_size: int  # micro x accum x data-parallel size
    optimizer: OptimizerSection
    lr_schedule: ScheduleConfig
    grad_clip: float
    # cadence
    checkpoint_every: int
    max_bad_steps: int
    eval_every: int
    eval_batches: int
    # data: the stage's sources and mixture weights; replay pools; evaluation
    data: DataConfig
    weights: dict[str, float]
    replay_stages: tuple[str, ...]
    replay_fraction: float
    replay_sources: tuple[str, ...]  # corpus sources replayed whole (pre-job data proxies)
    eval_domains: tuple[str, ...]
    new_domains: tuple[str, ...]  # the sources this stage trains on (weight > 0)
    # where the weights start from, and how experts are spawned from fewer
    init: Optional[SourceRef]
    init_weights_only: bool
    upcycle: UpcycleConfig
    # distill stages: the teacher and the objective
    teacher: Optional[SourceRef]
    distill: DistillSection
    # seeds: the model's initialisation, the data order (and upcycling noise)
    model_seed: int
    data_seed: int
    deepspeed: dict[str, Any]  # the spec's passthrough DeepSpeed keys

    @property
    def expert_strategy(self) -> str:
        return self.parallel.expert_strategy

    @property
    def starts_trained(self) -> bool:
        """Whether the stage starts from a trained model (the cl/ metrics then mean something)."""
        return self.init is not None

    def domain_groups(self) -> Optional[dict[str, list[str]]]:
        """{"new": trained-on domains, "old": the other evaluated ones} for continual metrics."""
        if not self.starts_trained:
            return None
        return {"new": list(self.new_domains), "old": [d for d in self.eval_domains if d not in self.new_domains]}


@dataclass(frozen=True)
class JobPlan:
    spec: JobSpec  # what the checkpoint manifests record (a teacher can be rebuilt from it)
    run: RunSection
    run_dir: Path
    corpus: DataConfig  # every stage's sources, one tokenizer: the job's whole corpus
    stages: tuple[StagePlan, ...]
    ray: RaySection
    metrics: MetricsSection

    def stage(self, name: str) -> StagePlan:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r} in this job ({[s.name for s in self.stages]})")

    def max_world_size(self) -> int:
        return max(s.world_size for s in self.stages)


# -- resolution of one section ----------------------------------------------------------------
def merged_section(cls: type, base: Any, override: dict[str, Any], path: str) -> Any:
    """`base` with a stage's partial `override` laid over it, rebuilt and checked as `cls`."""
    if not override:
        return base
    problems: list[tuple[str, str]] = []
    out = build_dataclass(cls, deep_merge(to_dict(base), override), path, problems)
    if problems:
        raise SpecError(problems)
    return out


def stage_world_size(spec: JobSpec, i: int) -> int:
    st = spec.stages[i]
    ov = st.parallel.get("world_size") if isinstance(st.parallel, dict) else None
    return st.world_size or (ov if isinstance(ov, int) else None) or spec.parallel.world_size


def stage_parallel(spec: JobSpec, i: int) -> ParallelSection:
    """The top-level `parallel` with stage i's overrides; world_size is the stage's."""
    st = spec.stages[i]
    par = merged_section(ParallelSection, spec.parallel, st.parallel, f"stages[{i}].parallel")
    if st.world_size is not None and st.world_size != par.world_size:
        par = replace(par, world_size=st.world_size)
    return par


def ep_size(par: ParallelSection, world_size: int) -> int:
    """Ranks one copy of the experts is sharded over: 1 when replicated, otherwise
    parallel.expert_parallel_size (at most the world; default: the world; an elastic stage's
    default follows `parallel.elastic.expert_parallel`: within a node, or the world)."""
    if par.expert_strategy == "replicated":
        return 1
    if par.expert_parallel_size is None and par.elastic.sizes and par.elastic.expert_parallel == "node":
        return math.gcd(world_size, par.fssdp.ranks_per_node)
    return min(par.expert_parallel_size or world_size, world_size)


def stage_model(spec: JobSpec, i: int) -> ModelConfig:
    return merged_section(ModelConfig, spec.model, spec.stages[i].model, f"stages[{i}].model")


def stage_experts(spec: JobSpec, i: int) -> ExpertsConfig:
    return merged_section(ExpertsConfig, spec.experts, spec.stages[i].experts, f"stages[{i}].experts")


def job_corpus(spec: JobSpec) -> DataConfig:
    """The top-level sources, then each stage's new ones by name (first definition wins)."""
    sources = list(spec.data.sources)
    names = {s.name for s in sources}
    for st in spec.stages:
        for src in st.data.sources or []:
            if src.name not in names:
                sources.append(src)
                names.add(src.name)
    return replace(spec.data, sources=sources)


def stage_data(spec: JobSpec, i: int) -> DataConfig:
    ov = spec.stages[i].data
    return replace(spec.data, sources=ov.sources) if ov.sources is not None else spec.data


def replay_stages(spec: JobSpec, i: int) -> list[str]:
    rp = spec.stages[i].data.replay
    if rp.fraction <= 0:
        return []
    if rp.stages is not None:
        return list(rp.stages)
    if rp.sources:
        return []
    return [s.name for s in spec.stages[:i]]


def stage_eval_domains(spec: JobSpec, i: int) -> list[str]:
    st = spec.stages[i]
    if st.eval_domains is not None:
        return list(st.eval_domains)
    return [s.name for s in job_corpus(spec).sources]


def source_ref(spec: JobSpec, i: int, ref: Optional[str]) -> Optional[SourceRef]:
    if ref is None:
        return None
    earlier = {s.name for s in spec.stages[:i]}
    return SourceRef("stage" if ref in earlier else "path", ref)


# -- the plan ------------------------------------------------------------------------------
def plan_stage(spec: JobSpec, i: int) -> StagePlan:
    st = spec.stages[i]
    ws = stage_world_size(spec, i)
    par = stage_parallel(spec, i)
    data = stage_data(spec, i)
    return StagePlan(
        index=i, name=st.name, kind=st.kind,
        model=stage_model(spec, i), experts=stage_experts(spec, i),
        parallel=par, world_size=ws, ep_size=ep_size(par, ws),
        steps=st.steps, micro_batch_size=st.micro_batch_size, grad_accum_steps=st.grad_accum_steps,
        global_batch_size=st.micro_batch_size * st.grad_accum_steps * ws,
        optimizer=st.optimizer, lr_schedule=st.lr_schedule, grad_clip=st.grad_clip,
        checkpoint_every=st.checkpoint_every, max_bad_steps=st.max_bad_steps,
        eval_every=st.eval_every, eval_batches=st.eval_batches,
        data=data, weights={s.name: s.weight for s in data.sources},
        replay_stages=tuple(replay_stages(spec, i)), replay_fraction=st.data.replay.fraction,
        replay_sources=tuple(st.data.replay.sources or ()) if st.data.replay.fraction > 0 else (),
        eval_domains=tuple(stage_eval_domains(spec, i)),
        new_domains=tuple(s.name for s in data.sources if s.weight > 0),
        init=source_ref(spec, i, st.init_from), init_weights_only=st.init_weights_only, upcycle=st.upcycle,
        teacher=source_ref(spec, i, st.distill.teacher) if st.kind == "distill" else None,
        distill=st.distill,
        model_seed=spec.run.seed + 1000 * i, data_seed=spec.run.seed + i,
        deepspeed=spec.deepspeed,
    )


def plan_job(spec: JobSpec) -> JobPlan:
    """The resolved plan of a validated spec (pure: no file is read)."""
    return JobPlan(spec=spec, run=spec.run, run_dir=Path(spec.run.output_dir).absolute() / spec.run.name,
                   corpus=job_corpus(spec), stages=tuple(plan_stage(spec, i) for i in range(len(spec.stages))),
                   ray=spec.ray, metrics=spec.metrics)
