"""Cross-field rules of a job spec: pure checks over the parsed sections (no file is read).

Each rule yields `(dotted path, message)`. The checks that need files (data paths, init and
teacher directories, Hugging Face configs, checkpoint manifests) are in `jobs.preflight`.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

from experts.config import ExpertsConfig
from jobs import plan as P
from jobs.schema import OWNED_DS_KEYS, JobSpec, ParallelSection
from system.configtree import SpecError, build_dataclass, deep_merge, to_dict
from system.data.config import SourceConfig
from system.model import ModelConfig

Problems = Iterator[tuple[str, str]]
SHAPE_KEYS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "qkv_bias", "vocab_size", "tie_embeddings",
              "head_dim", "qk_norm", "d_shared", "shared_expert_gate")


def check_job(spec: JobSpec) -> Problems:
    if not spec.stages:
        yield "stages", "at least one stage is required"
    seen: dict[str, int] = {}
    all_names = [s.name for s in spec.stages]
    for i, st in enumerate(spec.stages):
        p = f"stages[{i}]"
        if st.name in seen:
            yield f"{p}.name", f"{st.name!r} is already the name of stages[{seen[st.name]}]"
        ws = P.stage_world_size(spec, i)
        dp = ws  # dense parameters are data-parallel over every rank
        implied = st.micro_batch_size * st.grad_accum_steps * dp
        if st.global_batch_size is not None and st.global_batch_size != implied:
            yield f"{p}.global_batch_size", (
                f"{st.global_batch_size} != micro_batch_size {st.micro_batch_size} x grad_accum_steps "
                f"{st.grad_accum_steps} x data-parallel size {dp} = {implied}")
        if st.world_size is not None and ws % stage_ep_size(spec, i):
            yield f"{p}.world_size", (f"{ws} is not divisible by parallel.expert_parallel_size="
                                      f"{stage_ep_size(spec, i)}")
        if st.init_from is not None and st.init_from not in seen and st.init_from in all_names:
            yield f"{p}.init_from", (f"{st.init_from!r} names a later stage (or this one); "
                                     "a stage can only start from an earlier stage")
        yield from _check_stage_refs(spec, i, seen, all_names)
        yield from override_problems(ParallelSection, spec.parallel, st.parallel, f"{p}.parallel")
        yield from override_problems(ModelConfig, spec.model, st.model, f"{p}.model")
        yield from override_problems(ExpertsConfig, spec.experts, st.experts, f"{p}.experts")
        yield from _check_stage_model(spec, i)
        seen.setdefault(st.name, i)
    if spec.model.num_experts % stage_ep_size(spec, None):
        yield "model.num_experts", (f"{spec.model.num_experts} is not divisible by "
                                    f"the {stage_ep_size(spec, None)} expert-parallel ranks "
                                    f"(parallel.expert_parallel_size / expert_strategy "
                                    f"{spec.parallel.expert_strategy!r})")
    sc = spec.ray.scaling_config
    if sc.num_workers is not None and sc.num_workers != spec.parallel.world_size:
        yield "ray.scaling_config.num_workers", (f"{sc.num_workers} != parallel.world_size="
                                                 f"{spec.parallel.world_size}; set one of them")
    if sc.use_gpu is not None and sc.use_gpu != spec.parallel.use_gpu:
        yield "ray.scaling_config.use_gpu", f"{sc.use_gpu} != parallel.use_gpu={spec.parallel.use_gpu}"
    for k, v in sc.resources_per_worker.items():
        if v < 0:
            yield f"ray.scaling_config.resources_per_worker.{k}", f"{v} must be >= 0"
    for key, owner in OWNED_DS_KEYS.items():
        if key in spec.deepspeed:
            yield f"deepspeed.{key}", f"is set by the spec; use {owner} instead"
    yield from _check_routing(spec)
    if "zero_optimization" in spec.deepspeed and "stage" in (spec.deepspeed["zero_optimization"] or {}):
        yield "deepspeed.zero_optimization.stage", "is set by the spec; use parallel.zero_stage instead"


def stage_ep_size(spec: JobSpec, i: Optional[int]) -> int:
    """Expert-parallel ranks of stage i (None: the top level), tolerating a bad override (which
    `override_problems` reports)."""
    if i is None:
        return P.ep_size(spec.parallel, spec.parallel.world_size)
    try:
        par = P.stage_parallel(spec, i)
    except SpecError:
        par = spec.parallel
    return P.ep_size(par, P.stage_world_size(spec, i))


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


def _check_stage_refs(spec: JobSpec, i: int, seen: dict[str, int], all_names: list[str]) -> Problems:
    """Replay sources, evaluation domains and (when it is a stage) the teacher of stage i."""
    p = f"stages[{i}]"
    st = spec.stages[i]
    if st.data.replay.fraction > 0:
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
    first = {s.name: s for s in P.job_corpus(spec).sources}
    for j, src in enumerate(st.data.sources or []):
        a, b = _source_body(src), _source_body(first[src.name])
        if a != b:
            diff = sorted(k for k in a if a[k] != b[k])
            yield f"{p}.data.sources[{j}]", (
                f"source {src.name!r} is defined differently from its first definition in this job "
                f"({', '.join(f'{k}: {a[k]!r} vs {b[k]!r}' for k in diff)}); a source name means one "
                "corpus across stages (only its weight may change): give it another name")
    for j, d in enumerate(st.eval_domains or []):
        if d not in first:
            yield f"{p}.eval_domains[{j}]", f"{d!r} is not a data source of this job ({sorted(first)})"
    t = st.distill.teacher if st.kind == "distill" else None
    if t and t in all_names:
        yield from earlier_stage_problem(t, f"{p}.distill.teacher", "a teacher", seen, all_names)
        if t in seen:
            teacher = stage_vocab_size(spec, seen[t])
            yield from vocab_problem(spec, i, teacher, f"stage {t!r}")


def vocab_problem(spec: JobSpec, i: int, teacher: Optional[int], where: str) -> Problems:
    """A student must predict over its teacher's vocabulary (the KD term compares them id by id)."""
    student = stage_vocab_size(spec, i)
    if teacher is not None and student is not None and teacher != student:
        yield f"stages[{i}].model.vocab_size", (f"the student's vocabulary ({student}) differs from its teacher's "
                                                f"({teacher}, {where}); distillation compares them token by token")


def _check_stage_model(spec: JobSpec, i: int) -> Problems:
    """Checks that need a stage's merged model/experts config (and an earlier stage it starts from)."""
    p = f"stages[{i}]"
    st = spec.stages[i]
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
    if mcfg.num_experts % stage_ep_size(spec, i):
        yield f"{p}.model.num_experts", (f"{mcfg.num_experts} is not divisible by the "
                                         f"{stage_ep_size(spec, i)} expert-parallel ranks of this stage")
    names = [s.name for s in spec.stages[:i]]
    if st.init_from is None or st.init_from not in names:
        return  # a directory: see jobs.preflight
    src, _ = stage_cfgs(spec, names.index(st.init_from))
    if src is None:
        return
    same_shape = (src.num_experts == mcfg.num_experts and src.moe_layer_ids() == mcfg.moe_layer_ids()
                  and src.d_expert == mcfg.d_expert)
    if not same_shape and not st.init_weights_only:
        yield f"{p}.init_weights_only", (
            f"false needs the same experts as stage {st.init_from!r}; this stage changes the MoE layers "
            f"or expert count ({src.num_experts} -> {mcfg.num_experts}), so the optimizer state "
            "cannot carry over: set init_weights_only: true")
    for k in SHAPE_KEYS:
        if getattr(src, k) != getattr(mcfg, k):
            yield f"{p}.model.{k}", (f"{getattr(mcfg, k)} differs from stage {st.init_from!r}'s "
                                     f"{getattr(src, k)}; init_from needs the same shape")


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
    ecfg = spec.experts
    yield from group_routing_problems(spec.model, ecfg, spec.parallel.expert_strategy)
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
