"""Cross-field rules of a job spec: pure checks over the parsed sections (no file is read).

Each rule yields `(dotted path, message)`. The rules run one by one under
`configtree.unless_invalid`: a rule that reads a value which already failed its own check
(INVALID in the built spec: a wrong type, a range, a field a misspelled key meant) is skipped,
so one mistake gives one error. The checks that need files (data paths, init and teacher
directories, Hugging Face configs, checkpoint manifests) are in `jobs.preflight`.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

from experts.config import ExpertsConfig
from jobs import plan as P
from jobs.schema import OWNED_DS_KEYS, STAGE_OVERRIDES, JobSpec
from system.configtree import InvalidValueUsed, SpecError, build_dataclass, deep_merge, to_dict, unless_invalid
from system.data.config import SourceConfig
from system.model_config import ModelConfig

Problems = Iterator[tuple[str, str]]
SHAPE_KEYS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "qkv_bias", "vocab_size", "tie_embeddings",
              "head_dim", "qk_norm", "d_shared", "shared_expert_gate")


def check_job(spec: JobSpec) -> Problems:
    """Every cross-field rule's problems: each stage's rules, then the job-wide ones."""
    yield from unless_invalid(_stages_present(spec))
    yield from unless_invalid(_each_stage(spec))
    for rule in JOB_RULES:
        yield from unless_invalid(rule(spec))


def _each_stage(spec: JobSpec) -> Problems:
    for i in range(len(spec.stages)):
        for rule in STAGE_RULES:
            yield from unless_invalid(rule(spec, i))


def _stages_present(spec: JobSpec) -> Problems:
    if not spec.stages:
        yield "stages", "at least one stage is required"


def _earlier(spec: JobSpec, i: int) -> dict[str, int]:
    """The names of the stages before stage i, each with the index that first uses it."""
    seen: dict[str, int] = {}
    for j, st in enumerate(spec.stages[:i]):
        seen.setdefault(st.name, j)
    return seen


def _stage_name(spec: JobSpec, i: int) -> Problems:
    seen, name = _earlier(spec, i), spec.stages[i].name
    if name in seen:
        yield f"stages[{i}].name", f"{name!r} is already the name of stages[{seen[name]}]"


def _stage_batch(spec: JobSpec, i: int) -> Problems:
    st = spec.stages[i]
    valid_stage_parallel(spec, i)  # a bad parallel override: its own error, not a batch-size one
    dp = P.stage_world_size(spec, i)  # dense parameters are data-parallel over every rank
    implied = st.micro_batch_size * st.grad_accum_steps * dp
    if st.global_batch_size is not None and st.global_batch_size != implied:
        yield f"stages[{i}].global_batch_size", (
            f"{st.global_batch_size} != micro_batch_size {st.micro_batch_size} x grad_accum_steps "
            f"{st.grad_accum_steps} x data-parallel size {dp} = {implied}")


def _stage_world_size(spec: JobSpec, i: int) -> Problems:
    ws = P.stage_world_size(spec, i)
    if spec.stages[i].world_size is not None and ws % stage_ep_size(spec, i):
        yield f"stages[{i}].world_size", (f"{ws} is not divisible by parallel.expert_parallel_size="
                                          f"{stage_ep_size(spec, i)}")


def _stage_elastic(spec: JobSpec, i: int) -> Problems:
    """Every size of an elastic stage must take its global batch and an expert-parallel size."""
    from jobs.elastic import size_problems

    try:
        stage = P.plan_stage(spec, i)
    except (SpecError, InvalidValueUsed):  # a bad override: reported by its own rule
        return
    yield from size_problems(stage, spec.ray.failure_config.max_failures)


def _stage_init_from(spec: JobSpec, i: int) -> Problems:
    st, seen = spec.stages[i], _earlier(spec, i)
    if st.init_from is not None and st.init_from not in seen and st.init_from in _names(spec):
        yield f"stages[{i}].init_from", (f"{st.init_from!r} names a later stage (or this one); "
                                         "a stage can only start from an earlier stage")


def _stage_overrides(spec: JobSpec, i: int) -> Problems:
    st = spec.stages[i]
    for key, cls in STAGE_OVERRIDES.items():
        yield from unless_invalid(override_problems(cls, getattr(spec, key), getattr(st, key),
                                                    f"stages[{i}].{key}"))


def _names(spec: JobSpec) -> list[str]:
    return [s.name for s in spec.stages]


def _num_experts(spec: JobSpec) -> Problems:
    if spec.model.num_experts % stage_ep_size(spec, None):
        yield "model.num_experts", (f"{spec.model.num_experts} is not divisible by "
                                    f"the {stage_ep_size(spec, None)} expert-parallel ranks "
                                    f"(parallel.expert_parallel_size / expert_strategy "
                                    f"{spec.parallel.expert_strategy!r})")


def _scaling(spec: JobSpec) -> Problems:
    sc = spec.ray.scaling_config
    if sc.num_workers is not None and sc.num_workers != spec.parallel.world_size:
        yield "ray.scaling_config.num_workers", (f"{sc.num_workers} != parallel.world_size="
                                                 f"{spec.parallel.world_size}; set one of them")


def _scaling_gpu(spec: JobSpec) -> Problems:
    sc = spec.ray.scaling_config
    if sc.use_gpu is not None and sc.use_gpu != spec.parallel.use_gpu:
        yield "ray.scaling_config.use_gpu", f"{sc.use_gpu} != parallel.use_gpu={spec.parallel.use_gpu}"


def _resources(spec: JobSpec) -> Problems:
    for k, v in spec.ray.scaling_config.resources_per_worker.items():
        yield from unless_invalid(_non_negative(v, f"ray.scaling_config.resources_per_worker.{k}"))


def _non_negative(v: float, path: str) -> Problems:
    if v < 0:
        yield path, f"{v} must be >= 0"


def _deepspeed_keys(spec: JobSpec) -> Problems:
    for key, owner in OWNED_DS_KEYS.items():
        if key in spec.deepspeed:
            yield f"deepspeed.{key}", f"is set by the spec; use {owner} instead"
    if "zero_optimization" in spec.deepspeed and "stage" in (spec.deepspeed["zero_optimization"] or {}):
        yield "deepspeed.zero_optimization.stage", "is set by the spec; use parallel.zero_stage instead"


def valid_stage_parallel(spec: JobSpec, i: int):
    """Stage i's parallel section; a bad override (which `override_problems` reports) skips the
    rule that asked, rather than let it use the top-level section in its place."""
    try:
        return P.stage_parallel(spec, i)
    except SpecError:
        raise InvalidValueUsed from None


def stage_ep_size(spec: JobSpec, i: Optional[int]) -> int:
    """Expert-parallel ranks of stage i (None: the top level)."""
    if i is None:
        return P.ep_size(spec.parallel, spec.parallel.world_size)
    return P.ep_size(valid_stage_parallel(spec, i), P.stage_world_size(spec, i))


def stage_cfgs(spec: JobSpec, i: int) -> tuple[Optional[ModelConfig], Optional[ExpertsConfig]]:
    try:
        return P.stage_model(spec, i), P.stage_experts(spec, i)
    except SpecError:
        return None, None  # reported by override_problems


def tokenizer_vocab_size(spec: JobSpec) -> Optional[int]:
    """The vocabulary the job's tokenizer will have, when known before building it."""
    tok = spec.data.tokenizer
    if tok.kind == "byte":
        return 257
    if tok.kind == "bpe":
        return tok.vocab_size
    return None


def stage_vocab_size(spec: JobSpec, i: int) -> Optional[int]:
    m, _ = stage_cfgs(spec, i)
    if m is None:
        return None
    return m.vocab_size if m.vocab_size is not None else tokenizer_vocab_size(spec)


def earlier_stage_problem(name: str, key: str, what: str, seen: dict[str, int],
                          all_names: list[str]) -> Problems:
    if name in seen:
        return
    if name in all_names:
        yield key, (f"{name!r} names a later stage (or this one); {what} can only come "
                    "from an earlier stage")
    else:
        yield key, f"{name!r} is not a stage of this job (earlier stages: {list(seen) or 'none'})"


def _stage_replay(spec: JobSpec, i: int) -> Problems:
    """Replay needs something to replay: earlier stages, or sources of the job's corpus."""
    p, st = f"stages[{i}]", spec.stages[i]
    if not st.data.replay.fraction > 0:
        return
    seen, all_names = _earlier(spec, i), _names(spec)
    names = P.replay_stages(spec, i)
    srcs = st.data.replay.sources or []
    if not names and not srcs:
        yield f"{p}.data.replay", ("replay needs an earlier stage that consumed data (this is the first "
                                   "stage) or replay.sources naming data the model saw before")
    for j, name in enumerate(names):
        yield from earlier_stage_problem(name, f"{p}.data.replay.stages[{j}]", "replay", seen, all_names)
    corpus = [s.name for s in P.job_corpus(spec).sources]
    own = [s.name for s in P.stage_data(spec, i).sources]
    for j, name in enumerate(srcs):
        if name not in corpus:
            yield f"{p}.data.replay.sources[{j}]", f"{name!r} is not a source of this job's data ({corpus})"
        elif name in own:
            yield f"{p}.data.replay.sources[{j}]", (f"{name!r} is one of this stage's own training sources; "
                                                    f"replay sources are data the stage does not train on")


def _stage_sources(spec: JobSpec, i: int) -> Problems:
    """A source name means one corpus: a stage may only change its weight."""
    first = {s.name: s for s in P.job_corpus(spec).sources}
    for j, src in enumerate(spec.stages[i].data.sources or []):
        a, b = _source_body(src), _source_body(first[src.name])
        if a != b:
            diff = sorted(k for k in a if a[k] != b[k])
            yield f"stages[{i}].data.sources[{j}]", (
                f"source {src.name!r} is defined differently from its first definition in this job "
                f"({', '.join(f'{k}: {a[k]!r} vs {b[k]!r}' for k in diff)}); a source name means one "
                "corpus across stages (only its weight may change): give it another name")


def _stage_eval_domains(spec: JobSpec, i: int) -> Problems:
    first = {s.name for s in P.job_corpus(spec).sources}
    for j, d in enumerate(spec.stages[i].eval_domains or []):
        if d not in first:
            yield f"stages[{i}].eval_domains[{j}]", f"{d!r} is not a data source of this job ({sorted(first)})"


def _stage_teacher(spec: JobSpec, i: int) -> Problems:
    """A teacher that is a stage: an earlier one, with the student's vocabulary."""
    st, seen, all_names = spec.stages[i], _earlier(spec, i), _names(spec)
    t = st.distill.teacher if st.kind == "distill" else None
    if t and t in all_names:
        yield from earlier_stage_problem(t, f"stages[{i}].distill.teacher", "a teacher", seen, all_names)
        if t in seen:
            teacher = stage_vocab_size(spec, seen[t])
            yield from vocab_problem(spec, i, teacher, f"stage {t!r}")


def vocab_problem(spec: JobSpec, i: int, teacher: Optional[int], where: str) -> Problems:
    """A student must predict over its teacher's vocabulary (the KD term compares them id by id)."""
    student = stage_vocab_size(spec, i)
    if teacher is not None and student is not None and teacher != student:
        yield f"stages[{i}].model.vocab_size", (f"the student's vocabulary ({student}) differs from its teacher's "
                                                f"({teacher}, {where}); distillation compares them token by token")


def _stage_router(spec: JobSpec, i: int) -> Problems:
    """Router rules of a stage that changes the model, experts or strategy of the top level."""
    p, st = f"stages[{i}]", spec.stages[i]
    mcfg, ecfg = stage_cfgs(spec, i)
    if mcfg is None:
        return
    if (st.model or st.experts) and ecfg.router.kind == "dts" and ecfg.balancing.aux_free:
        yield f"{p}.experts.balancing.aux_free", "the aux-loss-free bias is for the top-k router, not the DTS gate"
    if (st.model or st.experts) and ecfg.router.kind == "dts":
        hk = ecfg.router.dts.hard_top_k or mcfg.top_k
        if hk > mcfg.num_experts:
            yield f"{p}.experts.router.dts.hard_top_k", f"{hk} exceeds num_experts={mcfg.num_experts}"
    if st.model or st.experts or st.parallel:
        yield from group_routing_problems(mcfg, ecfg, stage_strategy(spec, i), f"{p}.")


def _stage_num_experts(spec: JobSpec, i: int) -> Problems:
    mcfg, _ = stage_cfgs(spec, i)
    if mcfg is not None and mcfg.num_experts % stage_ep_size(spec, i):
        yield f"stages[{i}].model.num_experts", (f"{mcfg.num_experts} is not divisible by the "
                                                 f"{stage_ep_size(spec, i)} expert-parallel ranks of this stage")


def _stage_init_shape(spec: JobSpec, i: int) -> Problems:
    """A stage that starts from an earlier stage keeps its shape (and its experts, to carry the
    optimizer state)."""
    p, st = f"stages[{i}]", spec.stages[i]
    names = _names(spec)[:i]
    if st.init_from is None or st.init_from not in names:
        return  # a directory: see jobs.preflight
    mcfg, _ = stage_cfgs(spec, i)
    src, _ = stage_cfgs(spec, names.index(st.init_from))
    if src is None or mcfg is None:
        return
    same_shape = (src.num_experts == mcfg.num_experts and src.moe_layer_ids() == mcfg.moe_layer_ids()
                  and src.d_expert == mcfg.d_expert)
    if not same_shape and not st.init_weights_only:
        yield f"{p}.init_weights_only", (
            f"false needs the same experts as stage {st.init_from!r}; this stage changes the MoE layers "
            f"or expert count ({src.num_experts} -> {mcfg.num_experts}), so the optimizer state "
            "cannot carry over: set init_weights_only: true")
    for k in SHAPE_KEYS:
        yield from unless_invalid(_same_shape_key(src, mcfg, k, f"{p}.model.{k}", st.init_from))


def _same_shape_key(src: ModelConfig, mcfg: ModelConfig, k: str, path: str, init_from: str) -> Problems:
    if getattr(src, k) != getattr(mcfg, k):
        yield path, (f"{getattr(mcfg, k)} differs from stage {init_from!r}'s {getattr(src, k)}; "
                     "init_from needs the same shape")


def stage_strategy(spec: JobSpec, i: Optional[int]) -> str:
    if i is not None and spec.stages[i].parallel.get("expert_strategy"):
        return spec.stages[i].parallel["expert_strategy"]
    return spec.parallel.expert_strategy


def group_routing_problems(mcfg, ecfg, strategy: str, prefix: str = "") -> Problems:
    """Group-limited routing must fit the experts; DeepSpeed's MoE layer has its own gate."""
    r = ecfg.router
    if r.n_group > 1:
        if mcfg.num_experts % r.n_group:
            yield f"{prefix}experts.router.n_group", (f"{r.n_group} does not divide model.num_experts="
                                                      f"{mcfg.num_experts}")
        elif mcfg.top_k > r.topk_group * (mcfg.num_experts // r.n_group):
            yield f"{prefix}experts.router.topk_group", (
                f"{r.topk_group} groups of {mcfg.num_experts // r.n_group} experts hold fewer than "
                f"model.top_k={mcfg.top_k} experts")
    if strategy == "deepspeed_moe":
        if r.n_group > 1 or r.routed_scaling_factor != 1.0:
            yield f"{prefix}experts.router", ("deepspeed_moe uses DeepSpeed's own top-k gate: n_group and "
                                              "routed_scaling_factor are not available there")


def _check_routing(spec: JobSpec) -> Problems:
    yield from group_routing_problems(spec.model, spec.experts, spec.parallel.expert_strategy)


def _check_dts(spec: JobSpec) -> Problems:
    ecfg = spec.experts
    if ecfg.router.kind == "dts":
        hk = ecfg.router.dts.hard_top_k or spec.model.top_k
        if hk > spec.model.num_experts:
            yield "experts.router.dts.hard_top_k", f"{hk} exceeds model.num_experts={spec.model.num_experts}"
    if ecfg.balancing.aux_free and ecfg.router.kind == "dts":
        yield "experts.balancing.aux_free", "the aux-loss-free bias is for the top-k router, not the DTS gate"


def override_problems(cls: type, base: Any, override: dict[str, Any], path: str) -> Problems:
    """Problems of a stage's merged section that the top-level section does not already have."""
    if not override:
        return
    if not isinstance(override, dict):
        yield path, f"{override!r} is not a mapping"
        return
    merged: list[tuple[str, str]] = []
    build_dataclass(cls, deep_merge(to_dict(base), override), path, merged)
    top: list[tuple[str, str]] = []
    build_dataclass(cls, to_dict(base), path, top)
    yield from (pm for pm in merged if pm not in top)


def _source_body(src: SourceConfig) -> dict[str, Any]:
    d = to_dict(src)
    d.pop("weight", None)
    return d


STAGE_RULES = (_stage_name, _stage_batch, _stage_world_size, _stage_elastic, _stage_init_from, _stage_replay, _stage_sources,
               _stage_eval_domains, _stage_teacher, _stage_overrides, _stage_router, _stage_num_experts,
               _stage_init_shape)
JOB_RULES = (_num_experts, _scaling, _scaling_gpu, _resources, _deepspeed_keys, _check_routing, _check_dts)
