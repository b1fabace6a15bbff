"""Tensor names and layouts: our state dict <-> a Hugging Face family's checkpoint, and a reader
that streams a checkpoint tensor by tensor.

Per layer i, HF's `model.layers.i.` is our `blocks.i.`: the two norms, the fused q/k/v projection
(rows [q; k; v]) and o_proj, the QK-norms, dense MLPs, the router, the experts (stacked and
transposed: ours are (E, D, F) / (E, F, D), x @ w), Qwen2-MoE's shared expert and its gate; plus
model.embed_tokens, model.norm and lm_head (absent when the embeddings are tied). These are the
Hub's per-expert names, which transformers' `save_pretrained`, vLLM and older transformers read.

The table, name by name: docs/hf.md#tensor-names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class Piece:
    """One of our tensors and the HF tensors it is made of.

    kind: "same" (one tensor as is), "rows" (HF tensors stacked along dim 0: q, k, v), or
    "experts" (expert e is HF tensor e, transposed)."""

    ours: str
    hf: tuple[str, ...]
    kind: str = "same"


def layer_pieces(family: str, i: int, is_moe: bool, *, qkv_bias: bool, qk_norm: str, num_experts: int,
                 shared: bool, shared_gate: bool) -> list[Piece]:
    hp, op = f"model.layers.{i}.", f"blocks.{i}."
    at = hp + "self_attn."
    out = [Piece(op + "attn_norm.weight", (hp + "input_layernorm.weight",)),
           Piece(op + "attn.qkv.weight", tuple(at + f"{n}_proj.weight" for n in "qkv"), "rows"),
           Piece(op + "attn.proj.weight", (at + "o_proj.weight",)),
           Piece(op + "ffn_norm.weight", (hp + "post_attention_layernorm.weight",))]
    if qkv_bias:
        out.append(Piece(op + "attn.qkv.bias", tuple(at + f"{n}_proj.bias" for n in "qkv"), "rows"))
    if qk_norm != "none":
        out += [Piece(op + "attn.q_norm.weight", (at + "q_norm.weight",)),
                Piece(op + "attn.k_norm.weight", (at + "k_norm.weight",))]
    if not is_moe:
        out += [Piece(op + f"ffn.{w}.weight", (hp + f"mlp.{n}_proj.weight",))
                for w, n in (("w1", "gate"), ("w3", "up"), ("w2", "down"))]
        return out
    moe = hp + ("block_sparse_moe." if family == "mixtral" else "mlp.")
    names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    out.append(Piece(op + "ffn.router.weight", (moe + "gate.weight",)))
    for w, n in zip(("w1", "w3", "w2"), names):
        out.append(Piece(op + f"ffn.experts.{w}", tuple(moe + f"experts.{e}.{n}.weight" for e in range(num_experts)),
                         "experts"))
    if shared:
        out += [Piece(op + f"shared.{w}.weight", (hp + f"mlp.shared_expert.{n}_proj.weight",))
                for w, n in (("w1", "gate"), ("w3", "up"), ("w2", "down"))]
    if shared_gate:
        out.append(Piece(op + "shared_gate.weight", (hp + "mlp.shared_expert_gate.weight",)))
    return out


def model_pieces(family: str, m, moe_ids: list[int]) -> list[Piece]:
    """Every tensor of a model of config `m` (a ModelConfig) in `family`, in checkpoint order."""
    out = [Piece("embed.weight", ("model.embed_tokens.weight",))]
    moe = set(moe_ids)
    for i in range(m.n_layers):
        out += layer_pieces(family, i, i in moe, qkv_bias=m.qkv_bias, qk_norm=m.qk_norm, num_experts=m.num_experts,
                            shared=bool(m.d_shared), shared_gate=bool(m.shared_expert_gate))
    out.append(Piece("norm.weight", ("model.norm.weight",)))
    if not m.tie_embeddings:
        out.append(Piece("head.weight", ("lm_head.weight",)))
    return out


class HFReader:
    """Reads a local HF checkpoint one tensor at a time (safetensors, or pickled .bin shards
    through `torch.load(weights_only=True, mmap=True)`), never the whole model at once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._where: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        self.bytes_read = 0
        p = self.path
        if (p / SAFE_INDEX).is_file() or (p / BIN_INDEX).is_file():
            idx = p / (SAFE_INDEX if (p / SAFE_INDEX).is_file() else BIN_INDEX)
            try:
                wm = json.loads(idx.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{idx}: not a readable checkpoint index: {e}") from None
            self._where = {k: p / f for k, f in wm.items()}
            missing = sorted({f for f in self._where.values() if not f.is_file()})
            if missing:
                raise ValueError(f"{idx} names shard files that do not exist: {[str(f) for f in missing[:4]]}")
        else:
            files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
            if not files:
                raise ValueError(f"{p}: no *.safetensors or *.bin weights")
            for f in files:
                for k in self._keys_of(f):
                    self._where[k] = f

    def _handle(self, f: Path):
        if f not in self._open:
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                self._open[f] = safe_open(str(f), framework="pt")
            else:
                self._open[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        return self._open[f]

    def _keys_of(self, f: Path) -> list[str]:
        h = self._handle(f)
        return list(h.keys())

    def keys(self) -> set[str]:
        return set(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise KeyError(key)
        h = self._handle(self._where[key])
        t = h.get_tensor(key) if hasattr(h, "get_tensor") else h[key]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def close(self) -> None:
        self._open.clear()


def assemble(piece: Piece, reader: HFReader) -> torch.Tensor:
    """Our tensor for `piece`, built from the checkpoint (the state-dict path of dense imports;
    `system.hf_import.load_hf_into_model` copies into place instead)."""
    if piece.kind == "same":
        return reader.get(piece.hf[0])
    if piece.kind == "rows":
        return torch.cat([reader.get(k) for k in piece.hf], dim=0)
    return torch.stack([reader.get(k).t() for k in piece.hf])


def split(piece: Piece, t: torch.Tensor, sizes: Optional[list[int]] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF tensors of our tensor `t` (inverse of `assemble`); `sizes`: the row split of "rows"."""
    if piece.kind == "same":
        yield piece.hf[0], t
    elif piece.kind == "rows":
        for k, part in zip(piece.hf, torch.split(t, sizes, dim=0)):
            yield k, part
    else:
        for e, k in enumerate(piece.hf):
            yield k, t[e].t()


def qkv_sizes(m) -> list[int]:
    d = m.head_dim or m.d_model // m.n_heads
    return [m.n_heads * d, m.kv_heads() * d, m.kv_heads() * d]
