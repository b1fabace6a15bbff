"""The Hugging Face model families moeforge reads and writes, and how their config.json maps
onto our `ModelConfig` and router settings (both ways).

Families: dense `llama`, `qwen2`; MoE `mixtral`, `qwen2_moe`, `qwen3_moe`, `olmoe`. Anything a
family's config turns on that our model does not compute (rope scaling, sliding windows, MLA,
QKV clipping, router jitter, biases we do not have, ...) is refused with the config field
named; `deepseek_v2`/`deepseek_v3` are refused for their MLA attention (their routing is
available to our own specs through `experts.router`). Torch-free: the job spec's checks use it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

CONFIG_FILE = "config.json"
DENSE_FAMILIES = ("llama", "qwen2")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
FAMILIES = DENSE_FAMILIES + MOE_FAMILIES
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "olmoe": "OlmoeForCausalLM"}
REFUSED = {
    "deepseek_v3": "DeepSeek-V3's multi-head latent attention (MLA: q_lora_rank, kv_lora_rank, "
                   "qk_rope_head_dim) is not implemented in moeforge; its routing (sigmoid scores, "
                   "e_score_correction_bias, n_group/topk_group, routed_scaling_factor, shared experts) is: "
                   "set experts.router.score: sigmoid, n_group, topk_group, routed_scaling_factor and "
                   "model.d_shared in a spec of your own",
    "deepseek_v2": "DeepSeek-V2's multi-head latent attention (MLA) is not implemented in moeforge",
}


class HFConfigError(ValueError):
    """A config.json this code cannot represent exactly; the message names the field."""


@dataclass
class HFModel:
    """What a Hugging Face directory's config.json means in our terms."""

    model_type: str
    model: dict[str, Any]  # ModelConfig fields
    router: dict[str, Any] = field(default_factory=dict)  # experts.router fields (MoE families)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def is_moe(self) -> bool:
        return self.model_type in MOE_FAMILIES


def read_raw_config(path: str | Path) -> dict[str, Any]:
    f = Path(path) / CONFIG_FILE
    try:
        raw = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HFConfigError(f"{f}: not a readable Hugging Face config: {e}") from None
    if not isinstance(raw, dict):
        raise HFConfigError(f"{f}: not a JSON object")
    return raw


def _rope_theta(raw: dict[str, Any], where: str) -> float:
    """rope_theta of a plain (unscaled, full-rotary) RoPE; anything else is refused."""
    params = raw.get("rope_parameters")
    fname = "rope_parameters"
    if not params:
        params = dict(raw.get("rope_scaling") or {})
        fname = "rope_scaling"
        params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    per_type = [params] if ("rope_type" in params or "rope_theta" in params or "type" in params) \
        else list(params.values())
    thetas = set()
    for p in per_type:
        rtype = p.get("rope_type", p.get("type", "default"))
        if rtype != "default":
            raise HFConfigError(f"{where}: {fname} {json.dumps(raw.get(fname))} selects rope_type {rtype!r}; "
                                f"only plain RoPE (no rope scaling) is implemented")
        prf = p.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
        if prf not in (None, 1.0, 1):
            raise HFConfigError(f"{where}: partial_rotary_factor {prf} is not supported (full rotary only)")
        thetas.add(float(p.get("rope_theta", raw.get("rope_theta", 10000.0))))
    if len(thetas) != 1:
        raise HFConfigError(f"{where}: {fname} sets different rope_theta values per layer type {sorted(thetas)}")
    return thetas.pop()


def _refuse(raw: dict[str, Any], where: str, name: str, ok, why: str) -> None:
    if name in raw and not ok(raw[name]):
        raise HFConfigError(f"{where}: {name} {json.dumps(raw[name])} is not supported: {why}")


def _common(raw: dict[str, Any], where: str) -> dict[str, Any]:
    mt = raw["model_type"]
    _refuse(raw, where, "hidden_act", lambda v: v == "silu", "SwiGLU with silu only")
    _refuse(raw, where, "mlp_bias", lambda v: not v, "our FFNs have no biases")
    _refuse(raw, where, "attention_bias", lambda v: not v,
            "it also puts a bias on o_proj, which our attention output projection does not have")
    _refuse(raw, where, "clip_qkv", lambda v: v is None, "QKV clipping is not implemented")
    _refuse(raw, where, "router_jitter_noise", lambda v: not v,
            "multiplicative router input jitter during training is not implemented")
    _refuse(raw, where, "attention_dropout", lambda v: not v, "attention dropout is not implemented")
    D, H = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    head_dim = raw.get("head_dim")
    if head_dim is not None and int(head_dim) == D // H and D % H == 0:
        head_dim = None
    if head_dim is not None and mt not in ("qwen3_moe", "mixtral", "llama"):
        raise HFConfigError(f"{where}: head_dim {raw['head_dim']} != hidden_size / num_attention_heads "
                            f"({D} / {H}) is not supported for {mt}")
    layer_types = raw.get("layer_types") or []
    sliding = [i for i, t in enumerate(layer_types) if t != "full_attention"]
    if sliding:
        raise HFConfigError(f"{where}: layer_types makes layers {sliding} {layer_types[sliding[0]]!r}; only full "
                            f"causal attention is implemented")
    if raw.get("use_sliding_window") and raw.get("sliding_window") and \
            raw.get("max_window_layers", 0) < raw["num_hidden_layers"]:
        raise HFConfigError(f"{where}: use_sliding_window true (max_window_layers {raw.get('max_window_layers')}): "
                            f"sliding-window attention is not implemented")
    if mt == "mixtral" and raw.get("sliding_window"):
        raise HFConfigError(f"{where}: sliding_window {raw['sliding_window']}: sliding-window attention is not "
                            f"implemented (Mixtral checkpoints use null)")
    return {
        "d_model": D, "n_layers": int(raw["num_hidden_layers"]), "n_heads": H,
        "n_kv_heads": int(raw.get("num_key_value_heads") or H), "vocab_size": int(raw["vocab_size"]),
        "tie_embeddings": bool(raw.get("tie_word_embeddings", False)), "rope_theta": _rope_theta(raw, where),
        "norm_eps": float(raw.get("rms_norm_eps", 1e-6)), "head_dim": None if head_dim is None else int(head_dim),
    }


def _sparse_layers(raw: dict[str, Any], n_layers: int):
    """Qwen2/3-MoE: layer i is MoE unless in mlp_only_layers, when (i + 1) % decoder_sparse_step == 0."""
    step = int(raw.get("decoder_sparse_step", 1) or 1)
    dense = set(raw.get("mlp_only_layers") or [])
    ids = [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]
    return "all" if len(ids) == n_layers else ("none" if not ids else ids)


def parse_family_config(raw: dict[str, Any], where: str) -> HFModel:
    """Our fields for a config.json (`where` names the file in messages); raises HFConfigError."""
    mt = raw.get("model_type")
    if mt in REFUSED:
        raise HFConfigError(f"{where}: model_type {mt!r} is refused: {REFUSED[mt]}")
    if mt not in FAMILIES:
        raise HFConfigError(f"{where}: model_type {mt!r} is not supported (supported: {', '.join(FAMILIES)})")
    m = _common(raw, where)
    inter = int(raw["intermediate_size"])
    router: dict[str, Any] = {}
    if mt in DENSE_FAMILIES:
        m.update(d_ff=inter, d_expert=inter, qkv_bias=mt == "qwen2", qk_norm="none")
        return HFModel(mt, m, router, raw)
    m.update(top_k=int(raw["num_experts_per_tok"]), qk_norm="none", qkv_bias=False, d_shared=0,
             shared_expert_gate=False)
    router = {"kind": "topk", "score": "softmax", "normalize_topk": bool(raw.get("norm_topk_prob", False)),
              "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0}
    if mt == "mixtral":
        m.update(num_experts=int(raw["num_local_experts"]), d_expert=inter, d_ff=inter, moe_layers="all")
        router["normalize_topk"] = True
    elif mt == "olmoe":
        m.update(num_experts=int(raw["num_experts"]), d_expert=inter, d_ff=inter, moe_layers="all", qk_norm="full")
    else:  # qwen2_moe, qwen3_moe
        E = int(raw.get("num_experts") or raw.get("num_local_experts") or 0)
        m.update(num_experts=E, d_expert=int(raw["moe_intermediate_size"]), d_ff=inter,
                 moe_layers=_sparse_layers(raw, m["n_layers"]))
        if mt == "qwen2_moe":
            m.update(qkv_bias=bool(raw.get("qkv_bias", True)), d_shared=int(raw["shared_expert_intermediate_size"]),
                     shared_expert_gate=True)
            if m["d_shared"] < 1:
                raise HFConfigError(f"{where}: shared_expert_intermediate_size {m['d_shared']} must be >= 1")
        else:
            m["qk_norm"] = "head"
    if router["normalize_topk"] and m["top_k"] == 1:
        raise HFConfigError(f"{where}: num_experts_per_tok 1 with renormalised top-k"
                            f"{' (Mixtral always renormalises)' if mt == 'mixtral' else ' (norm_topk_prob true)'} "
                            f"makes every combine weight 1: not supported (our top-1 weight is the probability)")
    if m["top_k"] > m["num_experts"]:
        raise HFConfigError(f"{where}: num_experts_per_tok {m['top_k']} exceeds the {m['num_experts']} experts")
    return HFModel(mt, m, router, raw)


def read_family(path: str | Path) -> HFModel:
    """The family and our fields of the Hugging Face directory at `path`."""
    return parse_family_config(read_raw_config(path), str(Path(path) / CONFIG_FILE))


# ours -> the HF config name shown when a spec disagrees with config.json
HF_NAMES = {
    "d_model": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads", "d_ff": "intermediate_size", "d_expert": "intermediate_size",
    "vocab_size": "vocab_size", "tie_embeddings": "tie_word_embeddings", "rope_theta": "rope_theta",
    "norm_eps": "rms_norm_eps", "qkv_bias": "q/k/v projection biases", "head_dim": "head_dim",
    "num_experts": "num_experts", "top_k": "num_experts_per_tok", "moe_layers": "the MoE layer layout",
    "qk_norm": "q_norm/k_norm", "d_shared": "shared_expert_intermediate_size",
    "shared_expert_gate": "shared_expert_gate", "normalize_topk": "norm_topk_prob",
}


def same_value(ours: Any, theirs: Any) -> bool:
    if isinstance(theirs, float) and not isinstance(theirs, bool):
        return ours is not None and not isinstance(ours, bool) and math.isclose(float(ours), theirs, rel_tol=1e-9)
    return ours == theirs


def show(v: Any) -> str:
    return "null" if v is None else (str(v).lower() if isinstance(v, bool) else str(v))


# -- export: our model -> a family ------------------------------------------------------------

class NotRepresentable(ValueError):
    """Our model has a feature no supported Hugging Face family represents (named in the message)."""


def choose_family(m, r, moe_ids: list[int], bias_nonzero: bool = False) -> str:
    """The family that represents model config `m` with router config `r` exactly.

    `m` a ModelConfig, `r` a RouterConfig whose DTS gate (if any) has already gone hard;
    `bias_nonzero`: the aux-loss-free expert bias holds non-zero values."""
    if r.kind != "topk":
        raise NotRepresentable(f"router kind {r.kind!r} has no Hugging Face equivalent")
    # With k = 1 our router never renormalises (the weight stays the probability).
    r = effective_normalize(r, m.top_k)
    feats = []
    if r.score != "softmax":
        feats.append(f"router score {r.score!r}")
    if r.n_group > 1:
        feats.append("group-limited routing (n_group)")
    if r.routed_scaling_factor != 1.0:
        feats.append(f"routed_scaling_factor {r.routed_scaling_factor}")
    if bias_nonzero:
        feats.append("a non-zero aux-loss-free expert bias")
    if m.d_shared and not m.shared_expert_gate:
        feats.append("an ungated shared expert")
    if feats:
        raise NotRepresentable(", ".join(feats) + ": DeepSeek-V3-style routing; the family that has it "
                               "(deepseek_v3) needs MLA attention, which moeforge does not implement")
    if not moe_ids:
        if m.qk_norm != "none" or m.head_dim not in (None, m.d_model // m.n_heads):
            raise NotRepresentable(f"a dense model with qk_norm {m.qk_norm!r} / head_dim {m.head_dim}: "
                                   f"export it as llama/qwen2 needs neither")
        return "qwen2" if m.qkv_bias else "llama"
    every = len(moe_ids) == m.n_layers
    default_hd = m.head_dim in (None, m.d_model // m.n_heads) and m.d_model % m.n_heads == 0
    if m.qk_norm == "full":
        why = [w for w, bad in (("a shared expert", m.d_shared > 0), ("q/k/v biases", m.qkv_bias),
                                ("dense layers", not every), ("a head_dim other than d_model / n_heads",
                                                              not default_hd)) if bad]
        if why:
            raise NotRepresentable(f"qk_norm 'full' is OLMoE's, which has no {', '.join(why)}")
        return "olmoe"
    if m.qk_norm == "head":
        why = [w for w, bad in (("a shared expert", m.d_shared > 0), ("q/k/v biases without an o_proj bias",
                                                                       m.qkv_bias)) if bad]
        if why:
            raise NotRepresentable(f"qk_norm 'head' is Qwen3-MoE's, which has no {', '.join(why)}")
        return "qwen3_moe"
    if m.d_shared:
        if not default_hd:
            raise NotRepresentable("a gated shared expert is Qwen2-MoE's, which needs head_dim = d_model / n_heads")
        return "qwen2_moe"
    if r.normalize_topk and every and not m.qkv_bias:
        return "mixtral"
    why = [w for w, bad in (("normalize_topk false", not r.normalize_topk), ("dense layers", not every),
                            ("q/k/v biases", m.qkv_bias)) if bad]
    raise NotRepresentable(f"{', '.join(why)} without QK-norm or a shared expert: Mixtral has none of these, "
                           f"and Qwen2-MoE / Qwen3-MoE / OLMoE always add a shared expert or QK-norm")


def effective_normalize(r, top_k: int):
    from dataclasses import replace

    return replace(r, normalize_topk=bool(r.normalize_topk and top_k > 1))


def family_config(family: str, m, r, moe_ids: list[int], *, dtype: str = "float32",
                  bos: Optional[int] = None, eos: Optional[int] = None) -> dict[str, Any]:
    """config.json for our model in `family` (which `choose_family` picked)."""
    r = effective_normalize(r, m.top_k)
    hd = m.head_dim or m.d_model // m.n_heads
    cfg: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]], "model_type": family, "hidden_size": m.d_model,
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads, "num_key_value_heads": m.kv_heads(),
        "vocab_size": m.vocab_size, "tie_word_embeddings": bool(m.tie_embeddings), "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "hidden_act": "silu", "max_position_embeddings": 4096, "attention_dropout": 0.0, "use_cache": True,
        "initializer_range": m.init_std, "dtype": dtype, "torch_dtype": dtype, "bos_token_id": bos,
        "eos_token_id": eos,
    }
    if family in ("llama", "qwen2"):
        cfg["intermediate_size"] = m.d_ff
        if family == "llama":
            cfg.update(attention_bias=False, mlp_bias=False, head_dim=hd)
        else:
            cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.n_layers)
        return cfg
    cfg.update(num_experts_per_tok=m.top_k, output_router_logits=False, router_aux_loss_coef=0.0)
    if family == "mixtral":
        cfg.update(intermediate_size=m.d_expert, num_local_experts=m.num_experts, sliding_window=None,
                   router_jitter_noise=0.0, head_dim=hd)
    elif family == "olmoe":
        cfg.update(intermediate_size=m.d_expert, num_experts=m.num_experts, norm_topk_prob=bool(r.normalize_topk),
                   attention_bias=False, clip_qkv=None)
    else:
        dense = [i for i in range(m.n_layers) if i not in set(moe_ids)]
        cfg.update(intermediate_size=m.d_ff, moe_intermediate_size=m.d_expert, num_experts=m.num_experts,
                   norm_topk_prob=bool(r.normalize_topk), decoder_sparse_step=1, mlp_only_layers=dense,
                   use_sliding_window=False, sliding_window=None, max_window_layers=m.n_layers)
        if family == "qwen2_moe":
            cfg.update(shared_expert_intermediate_size=m.d_shared, qkv_bias=True)
        else:
            cfg.update(head_dim=hd, attention_bias=False)
    return cfg
