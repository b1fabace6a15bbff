"""The job spec: one YAML file describing a run, typed and validated before anything launches."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import yaml

from experts.config import ExpertsConfig
from jobs.configtree import SpecError, build_dataclass, deep_merge, to_dict
from system.data.config import DataConfig, SourceConfig
from system.model import ModelConfig
from system.upcycle import UpcycleConfig
from system.schedules import ScheduleConfig


@dataclass
class RunSection:
    name: str = "run"
    output_dir: str = "runs"  # the run directory is output_dir/name; shared storage on a cluster
    seed: int = 1234

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.name or any(c in self.name for c in "/\\ ") or self.name.startswith("."):
            yield "name", f"{self.name!r} must be a non-empty name without '/', '\\\\', spaces or a leading '.'"
        if not 0 <= self.seed < 2**63:
            yield "seed", f"{self.seed} must be in [0, 2**63)"


@dataclass
class FSSDPSection:
    """The FSSDP planner (Hecate): `parallel.fssdp` in the spec."""

    window: int = 5  # iterations of global expert counts the load prediction averages
    overlap_budget: Optional[int] = None  # t: experts a rank may gather per layer; null: derived
    link_gbps: float = 400.0  # bandwidth between ranks (Gbit/s) used to derive t from attention time
    memory_cap: int = 2  # m: extra (copied) experts a rank may hold per layer
    reshard_every: int = 100  # heterogeneous sharding (Algorithm 2) period in steps; 0: never
    rematerialize: bool = False  # free copies after the forward pass, gather again for backward
    ranks_per_node: int = 8  # ranks sharing a fast link (token dispatch prefers them)
    tolerance: float = 0.05  # no copies while every rank's predicted load is within this of the mean

    def check(self) -> Iterator[tuple[str, str]]:
        if self.window < 1:
            yield "window", f"{self.window} must be >= 1"
        if self.overlap_budget is not None and self.overlap_budget < 0:
            yield "overlap_budget", f"{self.overlap_budget} must be >= 0 (or null to derive it)"
        if not self.link_gbps > 0:
            yield "link_gbps", f"{self.link_gbps} must be > 0"
        if self.memory_cap < 0:
            yield "memory_cap", f"{self.memory_cap} must be >= 0"
        if self.reshard_every < 0:
            yield "reshard_every", f"{self.reshard_every} must be >= 0 (0: never)"
        if self.ranks_per_node < 1:
            yield "ranks_per_node", f"{self.ranks_per_node} must be >= 1"
        if not 0 <= self.tolerance < 10:
            yield "tolerance", f"{self.tolerance} must be in [0, 10)"


@dataclass
class DeepSpeedMoESection:
    """DeepSpeed's MoE layer knobs (`parallel.deepspeed_moe`), as deepspeed.moe.layer.MoE names them."""

    capacity_factor: float = 1.0  # expert capacity during training, x tokens*k/E
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = True  # false: capacity = the largest expert load (dropless, padded)
    use_rts: bool = True  # random token selection when over capacity (top-1)

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.capacity_factor > 0:
            yield "capacity_factor", f"{self.capacity_factor} must be > 0"
        if not self.eval_capacity_factor > 0:
            yield "eval_capacity_factor", f"{self.eval_capacity_factor} must be > 0"
        if self.min_capacity < 0:
            yield "min_capacity", f"{self.min_capacity} must be >= 0"


EXPERT_STRATEGIES = ("replicated", "ep", "fssdp", "deepspeed_moe")


@dataclass
class ParallelSection:
    world_size: int = 1  # number of training workers (ranks)
    # replicated: every rank holds every expert (data parallel); ep: experts partitioned over the
    # ranks, tokens by all-to-all; fssdp: ep + load-aware copies (Hecate); deepspeed_moe: DeepSpeed's
    # own MoE layer (baseline)
    expert_strategy: Literal["replicated", "ep", "fssdp", "deepspeed_moe"] = "replicated"
    expert_parallel_size: Optional[int] = None  # default: 1 for replicated, world_size otherwise
    fssdp: FSSDPSection = field(default_factory=FSSDPSection)
    deepspeed_moe: DeepSpeedMoESection = field(default_factory=DeepSpeedMoESection)
    zero_stage: Literal[0, 1, 2] = 0
    use_gpu: bool = False
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on GPU, gloo on CPU
    threads_per_worker: Optional[int] = None  # torch intra-op threads; default: CPUs per worker

    def check(self) -> Iterator[tuple[str, str]]:
        if not 1 <= self.world_size <= 65536:
            yield "world_size", f"{self.world_size} must be in [1, 65536]"
        ep = self.expert_parallel_size
        if ep is None:  # derived: 1 when replicated, every rank otherwise
            ep = 1 if self.expert_strategy == "replicated" else self.world_size
        if ep < 1:
            yield "expert_parallel_size", f"{ep} must be >= 1"
        elif self.world_size % ep:
            yield "expert_parallel_size", f"{ep} does not divide world_size={self.world_size}"
        if self.expert_strategy == "replicated" and ep != 1:
            yield "expert_parallel_size", ("must be 1 with expert_strategy 'replicated' "
                                           "(every rank holds every expert)")
        if self.expert_strategy in ("ep", "fssdp") and ep != self.world_size:
            yield "expert_parallel_size", (f"{ep}: expert_strategy {self.expert_strategy!r} shards "
                                           f"experts over all world_size={self.world_size} ranks (set "
                                           f"it to {self.world_size} or leave it out)")
        for k, msg in self.fssdp.check():
            yield f"fssdp.{k}", msg
        for k, msg in self.deepspeed_moe.check():
            yield f"deepspeed_moe.{k}", msg
        if self.backend == "nccl" and not self.use_gpu:
            yield "backend", "nccl needs use_gpu: true"
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            yield "threads_per_worker", f"{self.threads_per_worker} must be >= 1"


@dataclass
class OptimizerSection:
    name: Literal["adamw"] = "adamw"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1

    def check(self) -> Iterator[tuple[str, str]]:
        if not 0 < self.lr <= 10:
            yield "lr", f"{self.lr} must be in (0, 10]"
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            yield "betas", f"{self.betas} must be two numbers in [0, 1)"
        if not 0 < self.eps < 1:
            yield "eps", f"{self.eps} must be in (0, 1)"
        if self.weight_decay < 0:
            yield "weight_decay", f"{self.weight_decay} must be >= 0"


@dataclass
class ReplaySection:
    """Replay of earlier data in a (continual) stage: `stages[*].data.replay`."""

    fraction: float = 0.0  # r: share of every batch drawn from samples earlier stages consumed
    # Earlier stages whose consumed samples are replayed; null: every earlier stage.
    stages: Optional[list[str]] = None

    def check(self) -> Iterator[tuple[str, str]]:
        if not 0.0 <= self.fraction < 1.0:
            yield "fraction", f"{self.fraction} must be in [0, 1)"
        if self.stages is not None and self.fraction > 0 and not self.stages:
            yield "stages", "an empty list replays nothing; name earlier stages or leave it null"


@dataclass
class StageDataSection:
    """Per-stage data overrides; unset fields take the top-level `data` section's values."""

    sources: Optional[list[SourceConfig]] = None
    replay: ReplaySection = field(default_factory=ReplaySection)


@dataclass
class DistillSection:
    """A `distill` stage's teacher and objective: (1-alpha)*CE + alpha*T^2*D(teacher_T, student_T)."""

    teacher: Optional[str] = None  # an earlier stage's name, a checkpoint directory or a HF model dir
    alpha: float = 0.5  # weight of the distillation term
    temperature: float = 1.0  # T: both logits divided by T; the KD term is scaled by T^2
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = 0.5  # jsd only: M = beta*p_teacher + (1-beta)*q_student
    top_k: Optional[int] = None  # keep the teacher's top-k log-probs (+ the missing mass); null: full
    mode: Literal["online", "offline"] = "online"  # offline: cache the teacher's top-k to disk once

    def check(self) -> Iterator[tuple[str, str]]:
        if not 0.0 <= self.alpha <= 1.0:
            yield "alpha", f"{self.alpha} must be in [0, 1]"
        if not self.temperature > 0:
            yield "temperature", f"{self.temperature} must be > 0"
        if not 0.0 < self.beta < 1.0:
            yield "beta", f"{self.beta} must be in (0, 1)"
        if self.top_k is not None and self.top_k < 1:
            yield "top_k", f"{self.top_k} must be >= 1 (or null for the full distribution)"
        if self.mode == "offline" and self.top_k is None:
            yield "top_k", "offline mode caches the teacher's top-k log-probs: set top_k (e.g. 64)"


@dataclass
class StageSection:
    name: str
    kind: Literal["pretrain", "continual", "distill"] = "pretrain"
    steps: int = 100  # optimizer updates in this stage
    micro_batch_size: int = 8  # sequences per rank per forward/backward
    grad_accum_steps: int = 1
    global_batch_size: Optional[int] = None  # if set, must equal micro x accum x data-parallel
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    lr_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    checkpoint_every: int = 50  # steps between checkpoints (and one at the end)
    eval_every: int = 0  # steps between held-out evaluations; 0 disables
    eval_batches: int = 4  # held-out micro-batches per domain per evaluation
    data: StageDataSection = field(default_factory=StageDataSection)
    init_from: Optional[str] = None  # an earlier stage's name, a checkpoint directory or a HF model dir
    init_weights_only: bool = True  # load only weights from init_from (not optimizer/data state)
    world_size: Optional[int] = None  # overrides parallel.world_size for this stage
    # Partial override of the top-level `parallel` section (e.g. another expert_strategy).
    parallel: dict[str, Any] = field(default_factory=dict)
    # Held-out domains evaluated every eval_every steps; null: every source of every stage.
    eval_domains: Optional[list[str]] = None
    distill: DistillSection = field(default_factory=DistillSection)  # kind distill only
    # Partial overrides of the top-level `model` / `experts` sections for this stage (e.g. EvoMoE:
    # a 1-expert stage, then an 8-expert stage with the DTS gate). Keys as in those sections.
    model: dict[str, Any] = field(default_factory=dict)
    experts: dict[str, Any] = field(default_factory=dict)
    # How experts are spawned when init_from has fewer experts (dense FFN or one expert) than
    # this stage's model: sparse upcycling / EvoMoE expert-diversify.
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.name or any(c in self.name for c in "/\\ ") or self.name.startswith("."):
            yield "name", f"{self.name!r} must be a non-empty name without '/', '\\\\', spaces or a leading '.'"
        for key in ("steps", "micro_batch_size", "grad_accum_steps", "checkpoint_every", "eval_batches"):
            if getattr(self, key) < 1:
                yield key, f"{getattr(self, key)} must be >= 1"
        if self.eval_every < 0:
            yield "eval_every", f"{self.eval_every} must be >= 0"
        if self.grad_clip < 0:
            yield "grad_clip", f"{self.grad_clip} must be >= 0"
        if self.world_size is not None and self.world_size < 1:
            yield "world_size", f"{self.world_size} must be >= 1"
        if self.kind == "distill" and not self.distill.teacher:
            yield "distill.teacher", ("a distill stage needs a teacher: an earlier stage's name, a "
                                      "checkpoint directory or a Hugging Face model directory")
        if self.kind != "distill" and self.distill.teacher:
            yield "distill.teacher", f"is only used by kind 'distill' stages (this one is {self.kind!r})"


@dataclass
class ScalingSection:
    num_workers: Optional[int] = None  # if set, must equal parallel.world_size
    use_gpu: Optional[bool] = None  # if set, must equal parallel.use_gpu
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1})


@dataclass
class RunConfigSection:
    name: Optional[str] = None  # Ray's experiment name; default: run.name + stage name
    storage_path: Optional[str] = None  # where Ray Train keeps its state; default: run dir/ray


@dataclass
class FailureSection:
    max_failures: int = 0  # worker-group restarts; restarted workers resume from the latest checkpoint

    def check(self) -> Iterator[tuple[str, str]]:
        if self.max_failures < -1:
            yield "max_failures", f"{self.max_failures} must be >= -1 (-1: retry forever)"


@dataclass
class CheckpointSection:
    num_to_keep: Optional[int] = None  # newest checkpoints kept per stage; null keeps all

    def check(self) -> Iterator[tuple[str, str]]:
        if self.num_to_keep is not None and self.num_to_keep < 1:
            yield "num_to_keep", f"{self.num_to_keep} must be >= 1"


@dataclass
class RaySection:
    scaling_config: ScalingSection = field(default_factory=ScalingSection)
    run_config: RunConfigSection = field(default_factory=RunConfigSection)
    failure_config: FailureSection = field(default_factory=FailureSection)
    checkpoint_config: CheckpointSection = field(default_factory=CheckpointSection)


@dataclass
class MetricsSection:
    log_every: int = 1  # steps between JSON metric lines
    ray_metrics: bool = True  # export gauges through ray.util.metrics
    progress_bar: bool = True

    def check(self) -> Iterator[tuple[str, str]]:
        if self.log_every < 1:
            yield "log_every", f"{self.log_every} must be >= 1"


# DeepSpeed keys the spec sets from its own typed fields; passing them through would let the
# two disagree.
_OWNED_DS_KEYS = {
    "train_batch_size": "stages[*].global_batch_size",
    "train_micro_batch_size_per_gpu": "stages[*].micro_batch_size",
    "gradient_accumulation_steps": "stages[*].grad_accum_steps",
    "gradient_clipping": "stages[*].grad_clip",
    "optimizer": "stages[*].optimizer",
    "scheduler": "stages[*].lr_schedule",
}


@dataclass
class JobSpec:
    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageSection] = field(default_factory=list)
    deepspeed: dict[str, Any] = field(default_factory=dict)
    ray: RaySection = field(default_factory=RaySection)
    metrics: MetricsSection = field(default_factory=MetricsSection)

    # -- derived values -------------------------------------------------------------
    def stage_world_size(self, i: int) -> int:
        st = self.stages[i]
        ov = st.parallel.get("world_size") if isinstance(st.parallel, dict) else None
        return st.world_size or (ov if isinstance(ov, int) else None) or self.parallel.world_size

    def stage_parallel(self, i: Optional[int]) -> ParallelSection:
        """The parallel section in force for stage i (None: the top level): the top-level section
        with the stage's `parallel` overrides, world_size = the stage's world size."""
        if i is None:
            return self.parallel
        st = self.stages[i]
        par = _overridden(ParallelSection, self.parallel, st.parallel, f"stages[{i}].parallel")
        if st.world_size is not None and st.world_size != par.world_size:
            from dataclasses import replace
            par = replace(par, world_size=st.world_size)
        return par

    def stage_ep_size(self, i: Optional[int]) -> int:
        """Expert-parallel ranks of stage i (None: the top-level world): 1 when replicated, the
        stage's whole world for ep/fssdp, parallel.expert_parallel_size for deepspeed_moe."""
        try:
            par = self.stage_parallel(i)
        except SpecError:
            par = self.parallel  # the stage's override is reported by check()
        strat = par.expert_strategy
        if strat == "replicated":
            return 1
        ws = par.world_size if i is None else self.stage_world_size(i)
        if strat in ("ep", "fssdp"):
            return ws
        return min(par.expert_parallel_size or ws, ws)

    def job_data(self) -> DataConfig:
        """The job's whole corpus: the top-level sources, then each stage's new ones by name.

        Every stage tokenizes with the tokenizer trained on (or chosen for) this corpus, so that
        weights, replayed samples and teacher logits mean the same ids in every stage; the
        held-out sets of all these domains are what evaluation compares across stages.
        """
        from dataclasses import replace
        sources = list(self.data.sources)
        names = {s.name for s in sources}
        for st in self.stages:
            for src in st.data.sources or []:
                if src.name not in names:
                    sources.append(src)
                    names.add(src.name)
        return replace(self.data, sources=sources)

    def replay_stages(self, i: int) -> list[str]:
        """The earlier stages whose consumed samples stage i replays (empty without replay)."""
        rp = self.stages[i].data.replay
        if rp.fraction <= 0:
            return []
        if rp.stages is not None:
            return list(rp.stages)
        return [s.name for s in self.stages[:i]]

    def stage_eval_domains(self, i: int) -> list[str]:
        st = self.stages[i]
        if st.eval_domains is not None:
            return list(st.eval_domains)
        return [s.name for s in self.job_data().sources]

    def stage_model(self, i: int) -> ModelConfig:
        """The model config of stage i: the top-level `model` with the stage's overrides."""
        return _overridden(ModelConfig, self.model, self.stages[i].model, f"stages[{i}].model")

    def stage_experts(self, i: int) -> ExpertsConfig:
        """The experts config of stage i: the top-level `experts` with the stage's overrides."""
        return _overridden(ExpertsConfig, self.experts, self.stages[i].experts, f"stages[{i}].experts")

    def stage_data(self, i: int) -> DataConfig:
        """The data config in force for stage i (top-level data with the stage's overrides)."""
        from dataclasses import replace
        ov = self.stages[i].data
        return replace(self.data, sources=ov.sources) if ov.sources is not None else self.data

    def run_dir(self) -> Path:
        return Path(self.run.output_dir).absolute() / self.run.name

    def to_dict(self) -> dict:
        return to_dict(self)

    def with_absolute_paths(self, base: Optional[Path] = None) -> "JobSpec":
        """A copy whose relative paths are resolved against `base` (default: the cwd).

        Workers run in directories of Ray's choosing, so the driver resolves every path once;
        on a multi-node cluster these must name shared storage.
        """
        import copy

        base = Path(base or Path.cwd())
        out = copy.deepcopy(self)

        def fix(p: Optional[str]) -> Optional[str]:
            return p if p is None or Path(p).is_absolute() else str(base / p)

        out.run.output_dir = fix(out.run.output_dir)
        out.data.cache_dir = fix(out.data.cache_dir)
        out.data.tokenizer.path = fix(out.data.tokenizer.path)
        out.ray.run_config.storage_path = fix(out.ray.run_config.storage_path)
        for srcs in [out.data.sources] + [st.data.sources for st in out.stages if st.data.sources]:
            for src in srcs:
                src.paths = [fix(p) for p in src.paths]
        names = {st.name for st in out.stages}
        for st in out.stages:
            if st.init_from is not None and st.init_from not in names:
                st.init_from = fix(st.init_from)
        return out

    # -- cross-field validation -----------------------------------------------------
    def check(self) -> Iterator[tuple[str, str]]:
        if not self.stages:
            yield "stages", "at least one stage is required"
        seen: dict[str, int] = {}
        all_names = [s.name for s in self.stages]
        for i, st in enumerate(self.stages):
            p = f"stages[{i}]"
            if st.name in seen:
                yield f"{p}.name", f"{st.name!r} is already the name of stages[{seen[st.name]}]"
            ws = self.stage_world_size(i)
            dp = ws  # dense parameters are data-parallel over every rank
            implied = st.micro_batch_size * st.grad_accum_steps * dp
            if st.global_batch_size is not None and st.global_batch_size != implied:
                yield f"{p}.global_batch_size", (
                    f"{st.global_batch_size} != micro_batch_size {st.micro_batch_size} x grad_accum_steps "
                    f"{st.grad_accum_steps} x data-parallel size {dp} = {implied}")
            if st.world_size is not None and ws % self.stage_ep_size(i):
                yield f"{p}.world_size", (f"{ws} is not divisible by parallel.expert_parallel_size="
                                          f"{self.stage_ep_size(i)}")
            if st.init_from is not None:
                if st.init_from in seen:
                    pass
                elif st.init_from in all_names:
                    yield f"{p}.init_from", (f"{st.init_from!r} names a later stage (or this one); "
                                             "a stage can only start from an earlier stage")
                elif not Path(st.init_from).is_dir():
                    yield f"{p}.init_from", (f"{st.init_from!r} is neither an earlier stage "
                                             f"({list(seen) or 'none'}) nor an existing checkpoint directory")
            if st.data.sources is not None:
                yield from _check_sources(st.data.sources, f"{p}.data.sources")
            yield from self._check_stage_refs(i, seen, all_names)
            yield from _override_problems(ParallelSection, self.parallel, st.parallel, f"{p}.parallel")
            yield from _override_problems(ModelConfig, self.model, st.model, f"{p}.model")
            yield from _override_problems(ExpertsConfig, self.experts, st.experts, f"{p}.experts")
            yield from self._check_stage_model(i)
            seen.setdefault(st.name, i)
        yield from _check_sources(self.data.sources, "data.sources")
        if self.data.tokenizer.kind == "hf" and self.data.tokenizer.path and not Path(
                self.data.tokenizer.path).is_dir():
            yield "data.tokenizer.path", f"{self.data.tokenizer.path!r} is not a directory"
        if self.model.num_experts % self.stage_ep_size(None):
            yield "model.num_experts", (f"{self.model.num_experts} is not divisible by "
                                        f"the {self.stage_ep_size(None)} expert-parallel ranks "
                                        f"(parallel.expert_parallel_size / expert_strategy "
                                        f"{self.parallel.expert_strategy!r})")
        sc = self.ray.scaling_config
        if sc.num_workers is not None and sc.num_workers != self.parallel.world_size:
            yield "ray.scaling_config.num_workers", (f"{sc.num_workers} != parallel.world_size="
                                                     f"{self.parallel.world_size}; set one of them")
        if sc.use_gpu is not None and sc.use_gpu != self.parallel.use_gpu:
            yield "ray.scaling_config.use_gpu", f"{sc.use_gpu} != parallel.use_gpu={self.parallel.use_gpu}"
        for k, v in sc.resources_per_worker.items():
            if v < 0:
                yield f"ray.scaling_config.resources_per_worker.{k}", f"{v} must be >= 0"
        for key, owner in _OWNED_DS_KEYS.items():
            if key in self.deepspeed:
                yield f"deepspeed.{key}", f"is set by the spec; use {owner} instead"
        yield from self._check_routing()
        if "zero_optimization" in self.deepspeed and "stage" in (self.deepspeed["zero_optimization"] or {}):
            yield "deepspeed.zero_optimization.stage", "is set by the spec; use parallel.zero_stage instead"


    def _check_stage_refs(self, i: int, seen: dict[str, int], all_names: list[str]) -> Iterator[tuple[str, str]]:
        """Replay sources, evaluation domains and the teacher of stage i."""
        p = f"stages[{i}]"
        st = self.stages[i]

        def earlier(name: str, key: str, what: str) -> Iterator[tuple[str, str]]:
            if name in seen:
                return
            if name in all_names:
                yield key, (f"{name!r} names a later stage (or this one); {what} can only come "
                            "from an earlier stage")
            else:
                yield key, f"{name!r} is not a stage of this job (earlier stages: {list(seen) or 'none'})"

        rp = st.data.replay
        if rp.fraction > 0:
            names = self.replay_stages(i)
            if not names:
                yield f"{p}.data.replay", ("replay needs an earlier stage that consumed data; this is "
                                           "the first stage")
            for j, name in enumerate(names):
                yield from earlier(name, f"{p}.data.replay.stages[{j}]", "replay")
        first = {s.name: s for s in self.job_data().sources}
        for j, src in enumerate(st.data.sources or []):
            a, b = _source_body(src), _source_body(first[src.name])
            if a != b:
                diff = sorted(k for k in a if a[k] != b[k])
                yield f"{p}.data.sources[{j}]", (
                    f"source {src.name!r} is defined differently from its first definition in this job "
                    f"({', '.join(f'{k}: {a[k]!r} vs {b[k]!r}' for k in diff)}); a source name means one "
                    "corpus across stages (only its weight may change): give it another name")
        known = set(first)
        for j, d in enumerate(st.eval_domains or []):
            if d not in known:
                yield f"{p}.eval_domains[{j}]", f"{d!r} is not a data source of this job ({sorted(known)})"
        if st.kind == "distill" and st.distill.teacher:
            t = st.distill.teacher
            if t in all_names:
                yield from earlier(t, f"{p}.distill.teacher", "a teacher")
                if t in seen:
                    yield from self._check_teacher_vocab(i)
            elif not Path(t).is_dir():
                yield f"{p}.distill.teacher", (f"{t!r} is neither an earlier stage ({list(seen) or 'none'}) "
                                               "nor an existing checkpoint or Hugging Face model directory")
            else:
                yield from self._check_teacher_vocab(i)

    def tokenizer_vocab_size(self) -> Optional[int]:
        """The vocabulary the job's tokenizer will have, when known before building it."""
        tok = self.data.tokenizer
        if tok.kind == "byte":
            return 257
        if tok.kind == "bpe":
            return tok.vocab_size
        return None

    def stage_vocab_size(self, i: int) -> Optional[int]:
        try:
            m = self.stage_model(i)
        except SpecError:
            return None
        return m.vocab_size if m.vocab_size is not None else self.tokenizer_vocab_size()

    def _check_teacher_vocab(self, i: int) -> Iterator[tuple[str, str]]:
        """A student must predict over its teacher's vocabulary (the KD term compares them id by id)."""
        p = f"stages[{i}]"
        t = self.stages[i].distill.teacher
        student = self.stage_vocab_size(i)
        names = [s.name for s in self.stages[:i]]
        teacher: Optional[int] = None
        where = ""
        if t in names:
            teacher, where = self.stage_vocab_size(names.index(t)), f"stage {t!r}"
        else:
            from system.hf_import import hf_model_config_fields, is_hf_model_dir
            try:
                if is_hf_model_dir(t):
                    teacher, where = hf_model_config_fields(t).get("vocab_size"), f"{t}/config.json"
                else:
                    from system.checkpoint import read_manifest, resolve_checkpoint
                    ck = resolve_checkpoint(t)
                    man = read_manifest(ck)
                    tspec = parse_spec(man["spec"], f"{ck}/manifest spec")
                    tnames = [s.name for s in tspec.stages]
                    if man.get("stage") in tnames:
                        teacher = tspec.stage_vocab_size(tnames.index(man["stage"]))
                        where = f"checkpoint {ck}"
            except (ValueError, KeyError, OSError, SpecError) as e:
                yield f"{p}.distill.teacher", f"{t!r} cannot be read as a teacher: {e}"
                return
        if teacher is not None and student is not None and teacher != student:
            yield f"{p}.model.vocab_size", (f"the student's vocabulary ({student}) differs from its teacher's "
                                            f"({teacher}, {where}); distillation compares them token by token")

    def _stage_cfgs(self, i: int):
        try:
            return self.stage_model(i), self.stage_experts(i)
        except SpecError:
            return None, None  # reported by _override_problems

    def _check_stage_model(self, i: int) -> Iterator[tuple[str, str]]:
        """Checks that need a stage's merged model/experts config and its init source."""
        p = f"stages[{i}]"
        st = self.stages[i]
        mcfg, ecfg = self._stage_cfgs(i)
        if mcfg is None:
            return
        if (st.model or st.experts) and ecfg.router.kind == "dts" and ecfg.balancing.aux_free:
            yield f"{p}.experts.balancing.aux_free", "the aux-loss-free bias is for the top-k router, not the DTS gate"
        if (st.model or st.experts) and ecfg.router.kind == "dts":
            hk = ecfg.router.dts.hard_top_k or mcfg.top_k
            if hk > mcfg.num_experts:
                yield f"{p}.experts.router.dts.hard_top_k", f"{hk} exceeds num_experts={mcfg.num_experts}"
        if mcfg.num_experts % self.stage_ep_size(i):
            yield f"{p}.model.num_experts", (f"{mcfg.num_experts} is not divisible by the "
                                             f"{self.stage_ep_size(i)} expert-parallel ranks of this stage")
        if st.init_from is None:
            return
        names = [s.name for s in self.stages[:i]]
        if st.init_from in names:
            j = names.index(st.init_from)
            src, _ = self._stage_cfgs(j)
            if src is None:
                return
            same_shape = (src.num_experts == mcfg.num_experts and src.moe_layer_ids() == mcfg.moe_layer_ids()
                          and src.d_expert == mcfg.d_expert)
            if not same_shape and not st.init_weights_only:
                yield f"{p}.init_weights_only", (
                    f"false needs the same experts as stage {st.init_from!r}; this stage changes the MoE layers "
                    f"or expert count ({src.num_experts} -> {mcfg.num_experts}), so the optimizer state "
                    "cannot carry over: set init_weights_only: true")
            for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "qkv_bias", "vocab_size", "tie_embeddings"):
                if getattr(src, k) != getattr(mcfg, k):
                    yield f"{p}.model.{k}", (f"{getattr(mcfg, k)} differs from stage {st.init_from!r}'s "
                                             f"{getattr(src, k)}; init_from needs the same shape")
        else:
            from system.hf_import import check_hf_compat, is_hf_model_dir
            if Path(st.init_from).is_dir() and is_hf_model_dir(st.init_from):
                try:
                    hf_problems = check_hf_compat(st.init_from, mcfg)
                except ValueError as e:
                    hf_problems = [("", str(e))]
                for _key, msg in hf_problems:
                    yield f"{p}.init_from", msg

    def _check_routing(self) -> Iterator[tuple[str, str]]:
        ecfg = self.experts
        if ecfg.router.kind == "dts":
            hk = ecfg.router.dts.hard_top_k or self.model.top_k
            if hk > self.model.num_experts:
                yield "experts.router.dts.hard_top_k", f"{hk} exceeds model.num_experts={self.model.num_experts}"
        if ecfg.balancing.aux_free and ecfg.router.kind == "dts":
            yield "experts.balancing.aux_free", "the aux-loss-free bias is for the top-k router, not the DTS gate"


def _merged(base: Any, override: dict[str, Any]) -> dict[str, Any]:
    return deep_merge(to_dict(base), override or {})


def _overridden(cls: type, base: Any, override: dict[str, Any], path: str) -> Any:
    if not override:
        return base
    problems: list[tuple[str, str]] = []
    out = build_dataclass(cls, _merged(base, override), path, problems)
    if problems:
        raise SpecError(problems)
    return out


def _override_problems(cls: type, base: Any, override: dict[str, Any], path: str) -> Iterator[tuple[str, str]]:
    """Problems of a stage's merged section that the top-level section does not already have."""
    if not override:
        return
    if not isinstance(override, dict):
        yield path, f"{override!r} is not a mapping"
        return
    merged: list[tuple[str, str]] = []
    build_dataclass(cls, _merged(base, override), path, merged)
    top: list[tuple[str, str]] = []
    build_dataclass(cls, to_dict(base), path, top)
    yield from (pm for pm in merged if pm not in top)


def _source_body(src: SourceConfig) -> dict[str, Any]:
    d = to_dict(src)
    d.pop("weight", None)
    return d


def _check_sources(sources: list[SourceConfig], path: str) -> Iterator[tuple[str, str]]:
    for j, src in enumerate(sources):
        for k, f in enumerate(src.paths):
            if not Path(f).exists():
                yield f"{path}[{j}].paths[{k}]", f"{f!r} does not exist"


def parse_spec(data: Any, source: str = "spec") -> JobSpec:
    """Build and validate a JobSpec from plain data; raises SpecError listing every problem."""
    problems: list[tuple[str, str]] = []
    if not isinstance(data, dict):
        raise SpecError([("", f"the top level must be a mapping, got {type(data).__name__}")], source)
    spec = build_dataclass(JobSpec, data, "", problems)
    if problems:
        raise SpecError(problems, source)
    return spec


def load_spec(path: str | os.PathLike) -> JobSpec:
    """Read a YAML job spec from disk and validate it (nothing is launched or written)."""
    p = Path(path)
    if not p.is_file():
        raise SpecError([("", f"spec file {str(p)!r} does not exist")], str(p))
    return parse_spec_text(p.read_text(), str(p))


def parse_spec_text(text: str, source: str = "spec") -> JobSpec:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError([("", f"YAML syntax error: {e}")], source) from None
    return parse_spec(data, source)


def dump_spec(spec: JobSpec) -> str:
    return yaml.safe_dump(spec.to_dict(), sort_keys=False)
