"""The job spec's schema: the typed sections of the YAML file and their field-local checks.

Cross-field rules live in `jobs.validate`, the checks that read files in `jobs.preflight`, the
resolution of stage overrides in `jobs.plan`; `jobs.spec` parses and runs them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Optional

from experts.config import ExpertsConfig
from system.configtree import INVALID, to_dict
from system.data.config import DataConfig, SourceConfig
from system.model_config import ModelConfig
from system.upcycle_config import UpcycleConfig
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
    sprs_overlap: bool = False  # start each layer's SparseReduceScatter in the backward pass, once final
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
class ElasticSection:
    """`parallel.elastic`: the world sizes a stage may run at when workers are lost or come back
    (`jobs.elastic`); `parallel.world_size` is the size asked for, the largest of them."""

    sizes: list[int] = field(default_factory=list)  # e.g. [2, 4, 8]; empty: not elastic
    # how often Ray Train looks for room to grow back (ScalingConfig.elastic_resize_monitor_interval_s)
    monitor_interval_s: float = 60.0
    # the expert-parallel size at each world size when parallel.expert_parallel_size is null:
    # node: within a node (gcd(size, fssdp.ranks_per_node)); world: every rank of the size
    expert_parallel: Literal["node", "world"] = "node"

    def check(self) -> Iterator[tuple[str, str]]:
        if any(s < 1 for s in self.sizes):
            yield "sizes", f"{self.sizes}: every size must be >= 1"
        elif self.sizes != sorted(set(self.sizes)):
            yield "sizes", f"{self.sizes} must be distinct and ascending"
        if self.monitor_interval_s < 0:
            yield "monitor_interval_s", f"{self.monitor_interval_s} must be >= 0"


@dataclass
class ParallelSection:
    world_size: int = 1  # number of training workers (ranks)
    # replicated: every rank holds every expert (data parallel); ep: experts partitioned over the
    # ranks, tokens by all-to-all; fssdp: ep + load-aware copies (Hecate); deepspeed_moe: DeepSpeed's
    # own MoE layer (baseline)
    expert_strategy: Literal["replicated", "ep", "fssdp", "deepspeed_moe"] = "replicated"
    # ranks one copy of the experts is sharded over (ep, fssdp, deepspeed_moe): world_size / P groups
    # of P consecutive ranks, data-parallel across groups; default: 1 for replicated, world_size otherwise
    expert_parallel_size: Optional[int] = None
    fssdp: FSSDPSection = field(default_factory=FSSDPSection)
    deepspeed_moe: DeepSpeedMoESection = field(default_factory=DeepSpeedMoESection)
    elastic: ElasticSection = field(default_factory=ElasticSection)
    zero_stage: Literal[0, 1, 2] = 0
    # ep/fssdp: expert fp32 masters and AdamW moments sharded over the expert-data-parallel group
    # (the world_size / P ranks at one place of the P-rank groups); 1: gradients reduce-scattered
    # once a step; 2: each layer's as its backward ends (no pool-sized gradient). 0: replicated
    expert_sharding: Literal[0, 1, 2] = 0
    use_gpu: bool = False
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on GPU, gloo on CPU
    threads_per_worker: Optional[int] = None  # torch intra-op threads; default: CPUs per worker

    def check(self) -> Iterator[tuple[str, str]]:
        # Single-field rules first: a rule that reads a value already refused stops this check
        # (configtree.INVALID), so those that need several fields come last. The nested fssdp
        # and deepspeed_moe sections run their own check() when configtree builds them.
        if not 1 <= self.world_size <= 65536:
            yield "world_size", f"{self.world_size} must be in [1, 65536]"
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            yield "threads_per_worker", f"{self.threads_per_worker} must be >= 1"
        if self.backend == "nccl" and not self.use_gpu:
            yield "backend", "nccl needs use_gpu: true"
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
        if self.expert_sharding and self.expert_strategy not in ("ep", "fssdp"):
            yield "expert_sharding", (f"{self.expert_sharding} needs expert_strategy ep or fssdp (it shards their "
                                      f"expert state over the expert-data-parallel group), not "
                                      f"{self.expert_strategy!r}")
        rpn = self.fssdp.ranks_per_node
        if (self.expert_strategy in ("ep", "fssdp") and ep >= 1 and not self.world_size % ep
                and ep < self.world_size and rpn < self.world_size and ep % rpn and rpn % ep):
            yield "expert_parallel_size", (f"{ep} and fssdp.ranks_per_node={rpn}: an expert-parallel group of "
                                           f"{ep} consecutive ranks must lie inside one node ({ep} divides "
                                           f"{rpn}) or be made of whole nodes ({rpn} divides {ep})")


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
    # Earlier stages whose consumed samples are replayed; null: every earlier stage (none when
    # `sources` is set).
    stages: Optional[list[str]] = None
    # Sources of the job's corpus replayed whole: data the model saw before it came to this job
    # (a proxy of an imported model's pretraining mix that you supply).
    sources: Optional[list[str]] = None

    def check(self) -> Iterator[tuple[str, str]]:
        if not 0.0 <= self.fraction < 1.0:
            yield "fraction", f"{self.fraction} must be in [0, 1)"
        if self.stages is not None and self.fraction > 0 and not self.stages and not self.sources:
            yield "stages", "an empty list replays nothing; name earlier stages or leave it null"
        if self.sources is not None and self.fraction > 0 and not self.sources:
            yield "sources", "an empty list replays nothing; name sources of the job's corpus or leave it null"


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
    # A step with a NaN/Inf loss or gradient on any rank skips its update; this many in a row
    # stop the stage (naming the steps and the last good checkpoint).
    max_bad_steps: int = 3
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
        for key in ("steps", "micro_batch_size", "grad_accum_steps", "checkpoint_every", "eval_batches",
                    "max_bad_steps"):
            value = getattr(self, key)
            if value is not INVALID and value < 1:  # INVALID: reported already (a misspelled key's field)
                yield key, f"{value} must be >= 1"
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
    # true: the step waits only for a copy of each rank's state in host memory; a background thread
    # per rank writes it, and `latest` moves once every rank's files are on disk (docs/reliability.md).
    # Same files, same training numbers. Off by default until measured on GPU nodes: on a CPU
    # node with no idle core the writer slows the next steps (docs/reliability.md, the stall bench)
    async_save: bool = False

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
class WandbSection:
    """Weights & Biases logging (`metrics.wandb`; needs `pip install wandb`)."""

    project: str = "moeforge"
    mode: Literal["offline", "online"] = "offline"  # offline: files under RUN/wandb, `wandb sync` later
    entity: Optional[str] = None


@dataclass
class MetricsSection:
    log_every: int = 1  # steps between JSON metric lines
    ray_metrics: bool = True  # export gauges through ray.util.metrics
    progress_bar: bool = True
    tensorboard: bool = False  # also write TensorBoard event files under RUN/tensorboard/STAGE
    wandb: Optional[WandbSection] = None  # also log to Weights & Biases (one W&B run per stage)

    def check(self) -> Iterator[tuple[str, str]]:
        if self.log_every < 1:
            yield "log_every", f"{self.log_every} must be >= 1"
        if self.wandb is not None:
            from system.wandb_sink import MISSING, wandb_available

            if not wandb_available():
                yield "wandb", MISSING


# DeepSpeed keys the spec sets from its own typed fields; passing them through would let the
# two disagree.
OWNED_DS_KEYS = {
    "train_batch_size": "stages[*].global_batch_size",
    "train_micro_batch_size_per_gpu": "stages[*].micro_batch_size",
    "gradient_accumulation_steps": "stages[*].grad_accum_steps",
    "gradient_clipping": "stages[*].grad_clip",
    "optimizer": "stages[*].optimizer",
    "scheduler": "stages[*].lr_schedule",
}


# The stage-level free mappings that are laid over a typed top-level section (`jobs.plan`):
# their keys and values are those of the section.
STAGE_OVERRIDES = {"parallel": ParallelSection, "model": ModelConfig, "experts": ExpertsConfig}


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


    def to_dict(self) -> dict:
        return to_dict(self)
