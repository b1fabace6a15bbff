"""Import local Hugging Face causal LMs (Llama, Qwen2, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).

Only local directories are read; nothing is downloaded. `system.hf.families` maps config.json
onto our config, `system.hf.tensors` the tensor names (table: docs/hf.md#tensor-names). Weights
are read tensor by tensor from the safetensors (or .bin) shards -- transformers never builds the
model -- and copied into ours one tensor at a time, so the host holds the model plus one tensor.

RoPE, grouped-query heads, RMSNorm, QK-norm, the routers and Qwen2-MoE's shared expert follow
transformers' code; what was checked, convention by convention:
docs/hf.md#conventions-checked-against-transformers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch

from system.hf.families import (CONFIG_FILE, HF_NAMES, HFConfigError, read_family, read_raw_config, same_value,
                                show)
from system.hf.tensors import HFReader, assemble, model_pieces

_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def is_hf_model_dir(path: str | Path) -> bool:
    """True when `path` is a directory with a Hugging Face `config.json` (a `model_type`) and weights.

    Any model type counts (so that an unsupported one gets a clear error later, not
    "not a checkpoint"); a moeforge checkpoint (with `moeforge.json`) never counts.
    """
    p = Path(path)
    if not p.is_dir() or not (p / CONFIG_FILE).is_file() or (p / "moeforge.json").exists():
        return False
    try:
        raw = read_raw_config(p)
    except ValueError:
        return False
    return "model_type" in raw and any(any(p.glob(g)) for g in _WEIGHT_PATTERNS)


def hf_model_config_fields(path: str | Path) -> dict[str, Any]:
    """Our `ModelConfig` fields implied by the HF model at `path` (raises ValueError if unsupported).

    Dense families give `d_ff` and `d_expert` both as intermediate_size (dense layers load it as
    is, MoE layers upcycle it) and no MoE fields; MoE families give every MoE field too."""
    return dict(read_family(path).model)


def hf_router_fields(path: str | Path) -> dict[str, Any]:
    """The `experts.router` fields the HF MoE model at `path` implies ({} for dense models)."""
    return dict(read_family(path).router)


def check_hf_compat(path: str | Path, model_cfg, experts_cfg=None) -> list[tuple[str, str]]:
    """Every config field of ours that disagrees with the HF model at `path`, field by field.

    Returns (field, message) pairs: field is the bare name ("d_model", or "router.normalize_topk"),
    message names it again, e.g. "model.d_model: 64 but the Hugging Face checkpoint at P has
    hidden_size 128". From a dense checkpoint, `d_ff` is compared only when the model has dense
    layers and `d_expert` only when it has MoE layers (they are upcycled from the dense FFN, so
    need d_expert == intermediate_size). From an MoE checkpoint every MoE field is compared
    (the experts load as they are). `vocab_size: null` is reported too: the embedding must match
    the checkpoint's (often padded) vocabulary, not the tokenizer's. An unsupported checkpoint
    raises ValueError.
    """
    fam = read_family(path)
    try:
        moe_ids = model_cfg.moe_layer_ids()
    except ValueError:
        moe_ids = []
    has_moe, has_dense = bool(moe_ids), len(moe_ids) < model_cfg.n_layers
    problems: list[tuple[str, str]] = []
    for name, theirs in fam.model.items():
        if name == "d_ff" and not has_dense:
            continue
        if name == "d_expert" and not has_moe:
            continue
        ours = getattr(model_cfg, name)
        shown = show(ours)
        if name == "n_kv_heads" and ours is None:
            ours, shown = model_cfg.n_heads, f"null (= n_heads = {model_cfg.n_heads})"
        if name == "head_dim" and ours is not None and ours == model_cfg.d_model // model_cfg.n_heads:
            ours = None
        if name == "moe_layers":
            ours, theirs = moe_ids, _layer_ids(theirs, model_cfg.n_layers)
        if not same_value(ours, theirs):
            their_shown = show(theirs)
            msg = f"model.{name}: {shown} but the Hugging Face checkpoint at {path} has {HF_NAMES[name]} {their_shown}"
            if name == "d_expert" and not fam.is_moe:
                msg += " (upcycled experts start as copies of the dense FFN)"
            if name == "vocab_size" and ours is None:
                msg += f"; set model.vocab_size: {theirs}"
            problems.append((name, msg))
    if experts_cfg is not None and fam.is_moe:
        r = experts_cfg.router
        for name, theirs in fam.router.items():
            ours = getattr(r, name)
            if not same_value(ours, theirs):
                problems.append((f"router.{name}", f"experts.router.{name}: {show(ours)} but the Hugging Face "
                                 f"{fam.model_type} checkpoint at {path} routes with {name} {show(theirs)}"
                                 + (f" ({HF_NAMES[name]})" if name in HF_NAMES else "")))
    return problems


def _layer_ids(spec, n_layers: int) -> list[int]:
    if spec == "all":
        return list(range(n_layers))
    if spec == "none":
        return []
    return list(spec)


def _config_of(fields: dict[str, Any]):
    from system.model_config import ModelConfig

    return ModelConfig(**fields)


def load_hf_dense_state_dict(path: str | Path, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """The HF model's weights in our naming as a state dict (dense families: the upcycling path).

    `dtype`: None keeps the stored dtype. Raises ValueError for unsupported architectures or
    tensors this mapping does not account for."""
    p = Path(path)
    fam = read_family(p)
    fields = dict(fam.model)
    if fam.is_moe:
        raise HFConfigError(f"{p / CONFIG_FILE}: {fam.model_type} is an MoE model; load it with load_hf_into_model")
    cfg = _config_of({**fields, "moe_layers": "none"})
    reader = HFReader(p)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for piece in model_pieces(fam.model_type, cfg, []):
        _require(reader, piece, p)
        t = assemble(piece, reader)
        out[piece.ours] = t if dtype is None else t.to(dtype)
        used.update(piece.hf)
    _no_leftovers(reader, used, cfg.tie_embeddings, p)
    _check_qkv(out, cfg, p)
    return {k: v.contiguous() for k, v in out.items()}


def _require(reader: HFReader, piece, p: Path) -> None:
    missing = [k for k in piece.hf if k not in reader]
    if missing:
        raise ValueError(f"Hugging Face checkpoint at {p} has no tensor {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def _no_leftovers(reader: HFReader, used: set[str], tied: bool, p: Path) -> None:
    left = sorted(k for k in reader.keys() - used
                  if not k.endswith("rotary_emb.inv_freq") and not (tied and k == "lm_head.weight"))
    if left:
        raise ValueError(f"Hugging Face checkpoint at {p} has tensors this import does not map: "
                         f"{left[:8]}{' ...' if len(left) > 8 else ''}")


def _check_qkv(out: dict[str, torch.Tensor], cfg, p: Path) -> None:
    d = cfg.attn_head_dim()
    want = ((cfg.n_heads + 2 * cfg.kv_heads()) * d, cfg.d_model)
    for i in range(cfg.n_layers):
        got = tuple(out[f"blocks.{i}.attn.qkv.weight"].shape)
        if got != want:
            raise ValueError(f"Hugging Face checkpoint at {p}: layer {i}'s fused q/k/v weight has shape "
                             f"{got}, expected {want} from {CONFIG_FILE}")


def is_hf_moe_dir(path: str | Path) -> bool:
    try:
        return is_hf_model_dir(path) and read_family(path).is_moe
    except ValueError:
        return False


def _copy_into(dst: torch.Tensor, piece, reader: HFReader, p: Path, want_expert, pos, model=None) -> None:
    """Copy the checkpoint tensors of `piece` straight into their place in `dst`, one at a time
    (no assembled copy of a stacked or fused tensor is ever made). An MoE layer built with only
    this rank's experts (`GroupedExperts.rows`) gets those and nothing else is read."""
    def put(view: torch.Tensor, key: str, t: torch.Tensor) -> None:
        if tuple(t.shape) != tuple(view.shape):
            raise ValueError(f"init from {p}: {key}: checkpoint shape {tuple(t.shape)} does not fit {piece.ours} "
                             f"{tuple(dst.shape)} (expected {tuple(view.shape)})")
        view.copy_(t)

    if piece.kind == "same":
        put(dst, piece.hf[0], reader.get(piece.hf[0]))
    elif piece.kind == "rows":
        row = 0
        for k in piece.hf:
            t = reader.get(k)
            if row + t.shape[0] > dst.shape[0]:
                raise ValueError(f"init from {p}: {k}: its {t.shape[0]} rows overflow {piece.ours} {tuple(dst.shape)}")
            put(dst[row:row + t.shape[0]], k, t)
            row += t.shape[0]
        if row != dst.shape[0]:
            raise ValueError(f"init from {p}: {piece.ours}: the checkpoint's {'/'.join(piece.hf)} have {row} rows, "
                             f"the model {dst.shape[0]} (check n_heads, n_kv_heads, head_dim)")
    else:
        blk = int(piece.ours.split(".")[1])
        ex = getattr(getattr(model.blocks[blk], "ffn", None), "experts", None) if model is not None else None
        slot = {e: j for j, e in enumerate(ex.rows)} if getattr(ex, "partial", False) else None
        n = dst.shape[0] if slot is None else ex.num_experts
        if len(piece.hf) != n:
            raise ValueError(f"init from {p}: {piece.ours}: {len(piece.hf)} experts in the checkpoint, "
                             f"{n} in the model")
        layer = pos[blk]
        for e, k in enumerate(piece.hf):
            if slot is not None:
                if e in slot:
                    put(dst[slot[e]], k, reader.get(k).t())
            elif want_expert is None or want_expert(layer, e):
                put(dst[e], k, reader.get(k).t())


@torch.no_grad()
def load_hf_into_model(model, path: str | Path,
                       want_expert: Optional[Callable[[int, int], bool]] = None) -> dict[str, Any]:
    """Copy the HF model at `path` into `model` (a Transformer of the same shape), tensor by tensor.

    `want_expert(moe_layer_pos, e)`: False skips reading that expert (an ep/fssdp rank reads only
    the experts it will own; the others stay as built and are dropped when the model is
    sharded). Every model tensor must come from the checkpoint (the aux-free `expert_bias`
    starts at zero) and every checkpoint tensor must be used; shapes must agree. Returns a
    report with the tensors loaded and the bytes read."""
    p = Path(path)
    fam = read_family(p)
    cfg = model.cfg
    problems = check_hf_compat(p, cfg)
    if problems:
        raise ValueError("; ".join(m for _, m in problems))
    moe_ids = cfg.moe_layer_ids()
    pos = {blk: j for j, blk in enumerate(moe_ids)}
    target = dict(model.state_dict(keep_vars=True))
    reader = HFReader(p)
    used: set[str] = set()
    loaded: list[str] = []
    pieces = model_pieces(fam.model_type, cfg, moe_ids)
    for piece in pieces:
        _require(reader, piece, p)
    for piece in pieces:
        if piece.ours not in target:
            raise ValueError(f"init from {p}: our model has no {piece.ours} (built differently from {CONFIG_FILE})")
        dst = target[piece.ours]
        _copy_into(dst.data, piece, reader, p, want_expert, pos, model)
        used.update(piece.hf)
        loaded.append(piece.ours)
    _no_leftovers(reader, used, cfg.tie_embeddings, p)
    kept = sorted(set(target) - set(loaded))
    unexpected = [k for k in kept if not k.endswith("expert_bias")]
    if unexpected:
        raise ValueError(f"init from {p}: model tensors with no counterpart in the checkpoint: {unexpected[:6]}")
    for k in kept:
        target[k].data.zero_()
    return {"source": str(p), "kind": f"huggingface:{fam.model_type}", "loaded": loaded, "upcycled_layers": {},
            "moe_layers_loaded": list(range(len(moe_ids))), "kept_init": kept, "bytes_read": reader.bytes_read}
