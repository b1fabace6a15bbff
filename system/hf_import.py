"""Import dense Llama / Qwen2 causal LMs from a local Hugging Face directory into our naming.

Only local directories are read (`local_files_only=True`); nothing is downloaded.

Name mapping (HF -> ours), per layer i:
    model.embed_tokens.weight                        -> embed.weight
    model.layers.i.input_layernorm.weight            -> blocks.i.attn_norm.weight
    model.layers.i.self_attn.{q,k,v}_proj.weight     -> blocks.i.attn.qkv.weight  (rows [q; k; v])
    model.layers.i.self_attn.{q,k,v}_proj.bias       -> blocks.i.attn.qkv.bias    (Qwen2)
    model.layers.i.self_attn.o_proj.weight           -> blocks.i.attn.proj.weight
    model.layers.i.post_attention_layernorm.weight   -> blocks.i.ffn_norm.weight
    model.layers.i.mlp.gate_proj.weight              -> blocks.i.ffn.w1.weight
    model.layers.i.mlp.up_proj.weight                -> blocks.i.ffn.w3.weight
    model.layers.i.mlp.down_proj.weight              -> blocks.i.ffn.w2.weight
    model.norm.weight                                -> norm.weight
    lm_head.weight                                   -> head.weight  (only when not tied)

Conventions checked against transformers' Llama/Qwen2 code: HF's `rotate_half` RoPE with
cos/sin = cat(freqs, freqs) rotates the pairs (x[i], x[i + d/2]), exactly our `apply_rope`
(HF-format checkpoints are already permuted from Meta's interleaved layout), with inv_freq
1 / theta^(2j/d) as in our `rope_tables`; query/key heads are contiguous row blocks of
q_proj/k_proj, and query head h uses key/value head h // (n_heads / n_kv_heads) (HF
`repeat_kv`, SDPA `enable_gqa`); RMSNorm computes in float32 and scales by the weight after
casting back, as ours does.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
CONFIG_FILE = "config.json"
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def is_hf_model_dir(path: str | Path) -> bool:
    """True when `path` is a directory with a Hugging Face `config.json` (a `model_type`) and weights.

    Any model type counts (so that an unsupported one gets a clear error later, not
    "not a checkpoint"); a moeforge checkpoint (with `moeforge.json`) never counts.
    """
    p = Path(path)
    cfg = p / CONFIG_FILE
    if not p.is_dir() or not cfg.is_file() or (p / "moeforge.json").exists():
        return False
    try:
        raw = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(raw, dict) and "model_type" in raw and any(any(p.glob(g)) for g in _WEIGHT_PATTERNS)


def _raw_config(path: Path) -> dict[str, Any]:
    f = path / CONFIG_FILE
    try:
        raw = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{f}: not a readable Hugging Face config: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{f}: not a JSON object")
    return raw


def _load_config(path: Path):
    """The transformers config of a supported model directory (rejects the unsupported)."""
    raw = _raw_config(path)
    cfg_file = path / CONFIG_FILE
    mt = raw.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{cfg_file}: model_type {mt!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    _reject_unsupported(cfg, raw, cfg_file)
    return cfg


def _rope_params(cfg, raw: dict[str, Any], cfg_file: Path) -> float:
    """rope_theta, after checking that the RoPE is the plain (unscaled, full-rotary) kind."""
    field = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    params = getattr(cfg, "rope_parameters", None)
    if params is None:  # transformers 4.x: rope_theta + rope_scaling attributes
        scaling = getattr(cfg, "rope_scaling", None)
        params = dict(scaling or {})
        params.setdefault("rope_type", params.get("type", "default"))
        params.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    per_type = [params] if "rope_type" in params or "rope_theta" in params else list(params.values())
    thetas = set()
    for p in per_type:
        rtype = p.get("rope_type", p.get("type", "default"))
        if rtype != "default":
            raise ValueError(f"{cfg_file}: {field} {json.dumps(raw.get(field))} selects rope_type "
                             f"{rtype!r}; only plain RoPE (no rope scaling) is supported")
        prf = p.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
        if prf not in (None, 1.0):
            raise ValueError(f"{cfg_file}: partial_rotary_factor {prf} is not supported (full rotary only)")
        thetas.add(float(p["rope_theta"]))
    if len(thetas) != 1:
        raise ValueError(f"{cfg_file}: {field} sets different rope_theta values per layer type {sorted(thetas)}")
    return thetas.pop()


def _reject_unsupported(cfg, raw: dict[str, Any], cfg_file: Path) -> None:
    mt = cfg.model_type
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"{cfg_file}: hidden_act {cfg.hidden_act!r} is not supported (SwiGLU with silu only)")
    if getattr(cfg, "mlp_bias", False):
        raise ValueError(f"{cfg_file}: mlp_bias true is not supported (our FFN has no biases)")
    if mt == "llama" and getattr(cfg, "attention_bias", False):
        raise ValueError(f"{cfg_file}: attention_bias true is not supported: Llama then also has a bias on "
                         f"o_proj, which our attention output projection does not have")
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim is not None and head_dim * n_heads != cfg.hidden_size:
        raise ValueError(f"{cfg_file}: head_dim {head_dim} is not hidden_size / num_attention_heads "
                         f"({cfg.hidden_size} / {n_heads}); our attention needs head_dim = d_model / n_heads")
    layer_types = getattr(cfg, "layer_types", None) or []
    sliding = [i for i, t in enumerate(layer_types) if t != "full_attention"]
    if sliding:
        raise ValueError(f"{cfg_file}: layer_types makes layers {sliding} {layer_types[sliding[0]]!r} "
                         f"(use_sliding_window={raw.get('use_sliding_window')}, "
                         f"max_window_layers={raw.get('max_window_layers')}); only full causal attention "
                         f"is supported")
    if not layer_types and getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None) \
            and getattr(cfg, "max_window_layers", 0) < cfg.num_hidden_layers:
        raise ValueError(f"{cfg_file}: use_sliding_window true with max_window_layers "
                         f"{cfg.max_window_layers} < num_hidden_layers {cfg.num_hidden_layers}: sliding-window "
                         f"attention is not supported")
    _rope_params(cfg, raw, cfg_file)


def _fields_from_config(cfg, raw: dict[str, Any], cfg_file: Path) -> dict[str, Any]:
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return {
        "d_model": cfg.hidden_size,
        "n_layers": cfg.num_hidden_layers,
        "n_heads": cfg.num_attention_heads,
        "n_kv_heads": n_kv,
        "d_ff": cfg.intermediate_size,
        "d_expert": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "tie_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "rope_theta": _rope_params(cfg, raw, cfg_file),
        "norm_eps": float(cfg.rms_norm_eps),
        "qkv_bias": cfg.model_type == "qwen2",  # Qwen2: q/k/v biases always; Llama: attention_bias (rejected)
    }


def hf_model_config_fields(path: str | Path) -> dict[str, Any]:
    """Our `ModelConfig` fields implied by the HF model at `path` (raises ValueError if unsupported).

    `d_ff` and `d_expert` are both the HF intermediate_size (dense layers load it as is, MoE
    layers upcycle it); `n_kv_heads` is always an int.
    """
    p = Path(path)
    cfg = _load_config(p)
    return _fields_from_config(cfg, _raw_config(p), p / CONFIG_FILE)


# ours -> (HF config name, how to display our value)
_HF_NAMES = {
    "d_model": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads", "d_ff": "intermediate_size", "d_expert": "intermediate_size",
    "vocab_size": "vocab_size", "tie_embeddings": "tie_word_embeddings", "rope_theta": "rope_theta",
    "norm_eps": "rms_norm_eps", "qkv_bias": "q/k/v projection biases",
}


def check_hf_compat(path: str | Path, model_cfg) -> list[tuple[str, str]]:
    """Every `ModelConfig` field of `model_cfg` that disagrees with the HF model at `path`.

    Returns (field, message) pairs: field is the bare ModelConfig name ("d_model"), message
    names it again so it reads on its own, e.g. "model.d_model: 64 but the Hugging Face
    checkpoint at P has hidden_size 128". `d_ff` is compared only when the model has
    dense layers, `d_expert` only when it has MoE layers (they are upcycled from the dense
    FFN, so need d_expert == intermediate_size). `vocab_size: null` is reported too: the
    embedding must match the checkpoint's (often padded) vocabulary, not the tokenizer's.
    An unsupported checkpoint raises ValueError (see `hf_model_config_fields`).
    """
    hf = hf_model_config_fields(path)
    try:
        moe_ids = model_cfg.moe_layer_ids()
    except ValueError:
        moe_ids = []
    has_moe, has_dense = bool(moe_ids), len(moe_ids) < model_cfg.n_layers
    problems: list[tuple[str, str]] = []
    for name, theirs in hf.items():
        if (name == "d_ff" and not has_dense) or (name == "d_expert" and not has_moe):
            continue
        ours = getattr(model_cfg, name)
        shown = repr(ours).lower() if isinstance(ours, bool) else ("null" if ours is None else ours)
        if name == "n_kv_heads" and ours is None:
            ours, shown = model_cfg.n_heads, f"null (= n_heads = {model_cfg.n_heads})"
        if isinstance(theirs, float):
            same = ours is not None and math.isclose(float(ours), theirs, rel_tol=1e-9, abs_tol=0.0)
        else:
            same = ours == theirs
        if not same:
            their_shown = repr(theirs).lower() if isinstance(theirs, bool) else theirs
            msg = (f"model.{name}: {shown} but the Hugging Face checkpoint at {path} has "
                   f"{_HF_NAMES[name]} {their_shown}")
            if name == "d_expert":
                msg += " (upcycled experts start as copies of the dense FFN)"
            if name == "vocab_size" and ours is None:
                msg += f"; set model.vocab_size: {theirs}"
            problems.append((name, msg))
    return problems


def load_hf_dense_state_dict(path: str | Path, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """The HF model's weights in our naming, for a dense Transformer (moe_layers "none").

    `dtype`: None keeps the dtype stored in the checkpoint. Raises ValueError for
    unsupported architectures or tensors this mapping does not account for.
    """
    p = Path(path)
    cfg = _load_config(p)
    fields = _fields_from_config(cfg, _raw_config(p), p / CONFIG_FILE)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True,
                                              dtype=dtype if dtype is not None else "auto")
    src = {k: v.detach() for k, v in hf.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    del hf
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in src:
            raise ValueError(f"Hugging Face checkpoint at {p} has no tensor {key!r}")
        used.add(key)
        return src[key]

    out: dict[str, torch.Tensor] = {"embed.weight": take("model.embed_tokens.weight")}
    for i in range(fields["n_layers"]):
        hp, op = f"model.layers.{i}.", f"blocks.{i}."
        at = hp + "self_attn."
        out[op + "attn_norm.weight"] = take(hp + "input_layernorm.weight")
        out[op + "attn.qkv.weight"] = torch.cat([take(at + f"{n}_proj.weight") for n in "qkv"], dim=0)
        if fields["qkv_bias"]:
            out[op + "attn.qkv.bias"] = torch.cat([take(at + f"{n}_proj.bias") for n in "qkv"], dim=0)
        out[op + "attn.proj.weight"] = take(at + "o_proj.weight")
        out[op + "ffn_norm.weight"] = take(hp + "post_attention_layernorm.weight")
        out[op + "ffn.w1.weight"] = take(hp + "mlp.gate_proj.weight")
        out[op + "ffn.w3.weight"] = take(hp + "mlp.up_proj.weight")
        out[op + "ffn.w2.weight"] = take(hp + "mlp.down_proj.weight")
    out["norm.weight"] = take("model.norm.weight")
    if fields["tie_embeddings"]:
        used.add("lm_head.weight")  # the same tensor as the embedding
    else:
        out["head.weight"] = take("lm_head.weight")
    left = sorted(set(src) - used)
    if left:
        raise ValueError(f"Hugging Face checkpoint at {p} has tensors this import does not map: "
                         f"{left[:8]}{' ...' if len(left) > 8 else ''}")
    D, H = fields["d_model"], fields["n_heads"]
    qkv_shape = ((H + 2 * fields["n_kv_heads"]) * (D // H), D)
    for i in range(fields["n_layers"]):
        got = tuple(out[f"blocks.{i}.attn.qkv.weight"].shape)
        if got != qkv_shape:
            raise ValueError(f"Hugging Face checkpoint at {p}: layer {i}'s fused q/k/v weight has shape "
                             f"{got}, expected {qkv_shape} from {CONFIG_FILE}")
    return {k: v.contiguous() for k, v in out.items()}
