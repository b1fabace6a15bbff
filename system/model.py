"""A decoder-only transformer with MoE feed-forward layers. Single-device code.

Token embedding -> N x [RMSNorm -> causal attention (RoPE, SDPA) -> RMSNorm -> FFN or MoE]
-> RMSNorm -> output head (tied or untied).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from experts.config import ExpertsConfig
from experts.layer import MoEAux, MoELayer, init_std_for_depth
from system.attention import DocumentLayout, document_attention, document_layout
from system.model_config import ModelConfig


@dataclass
class ModelOutput:
    logits_BTV: torch.Tensor
    moe_aux: list[MoEAux] = field(default_factory=list)  # one entry per MoE layer, in order


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_tables(seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles_TH = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles_TH.cos(), angles_TH.sin()


def apply_rope(x_BHTd: torch.Tensor, cos_TH: torch.Tensor, sin_TH: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) by position-dependent angles."""
    x1, x2 = x_BHTd.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos_TH - x2 * sin_TH, x1 * sin_TH + x2 * cos_TH], dim=-1)
    return out.to(x_BHTd.dtype)


class Attention(nn.Module):
    """Causal self-attention with RoPE; grouped-query when n_kv_heads < n_heads.

    `qkv` is one fused projection whose output rows are [q (n_heads*d); k (n_kv_heads*d);
    v (n_kv_heads*d)], heads contiguous within each (d = head_dim, d_model / n_heads unless set);
    query head h reads key/value head h // (n_heads / n_kv_heads). With n_kv_heads = n_heads and
    d = d_model / n_heads this is the plain (3D, D) layout. QK-norm (`qk_norm`) normalises the
    queries and keys before RoPE, per head (weights of size d) or over the whole projection
    (n_heads*d for q, n_kv_heads*d for k).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.attn_head_dim()
        self.n_kv_heads = cfg.kv_heads()
        H, G, d = self.n_heads, self.n_kv_heads, self.head_dim
        self.qkv = nn.Linear(cfg.d_model, (H + 2 * G) * d, bias=cfg.qkv_bias)
        self.proj = nn.Linear(H * d, cfg.d_model, bias=False)
        if self.qkv.bias is not None:
            nn.init.zeros_(self.qkv.bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "head"
            self.q_norm = RMSNorm(d if per_head else H * d, cfg.norm_eps)
            self.k_norm = RMSNorm(d if per_head else G * d, cfg.norm_eps)

    def forward(self, x_BTD: torch.Tensor, cos_TH, sin_TH, docs: Optional[DocumentLayout] = None) -> torch.Tensor:
        """`docs`: attention stays within these documents (`system.attention`); None: plain
        causal attention."""
        B, T, _ = x_BTD.shape
        H, G, d = self.n_heads, self.n_kv_heads, self.head_dim
        if self.qk_norm == "full":
            q, k, v = self.qkv(x_BTD).split([H * d, G * d, G * d], dim=-1)
            q, k = self.q_norm(q), self.k_norm(k)
            q, k, v = (t.reshape(B, T, -1, d).transpose(1, 2) for t in (q, k, v))
        else:
            q, k, v = self.qkv(x_BTD).view(B, T, H + 2 * G, d).transpose(1, 2).split([H, G, G], dim=1)
            if self.qk_norm == "head":
                q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos_TH, sin_TH), apply_rope(k, cos_TH, sin_TH)  # (B, H|G, T, d)
        if docs is None:
            gqa = {} if G == H else {"enable_gqa": True}
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
        else:
            y = document_attention(q, k, v, docs)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * d))


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# Builds a MoE feed-forward layer from the model and experts configs; the default is ours.
MoEFactory = Callable[[ModelConfig, ExpertsConfig], nn.Module]


def default_moe_layer(cfg: ModelConfig, experts: ExpertsConfig, expert_rows=None) -> nn.Module:
    """Our MoE layer; `expert_rows`: materialize only those experts (`GroupedExperts.rows`)."""
    return MoELayer(cfg.d_model, cfg.num_experts, cfg.top_k, cfg.d_expert, experts.router, experts.backend,
                    expert_rows=expert_rows)


class Block(nn.Module):
    """Pre-norm attention and feed-forward (dense or MoE, plus an optional shared expert) with
    residuals.

    `attention_hook`: a context manager entered around the attention (None: nothing). An expert
    strategy sets it to start work that overlaps the attention (FSSDP posts the layer's
    SparseAllGather there); it stays outside any recomputation.
    Activation checkpointing (`cfg.activation_checkpointing`): "full" recomputes the attention
    sublayer and the feed-forward compute in the backward pass, "moe" only the experts' and the
    shared expert's FFNs. Routing and the expert strategies' communication are never redone: the
    MoE layer's experts recompute their own rows (`recompute` on the experts module).
    """

    def __init__(self, cfg: ModelConfig, moe: bool, experts: ExpertsConfig, moe_factory: MoEFactory):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = moe
        self.ffn = moe_factory(cfg, experts) if moe else DenseFFN(cfg.d_model, cfg.d_ff)
        self.shared = DenseFFN(cfg.d_model, cfg.d_shared) if moe and cfg.d_shared else None
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False) if self.shared is not None and \
            cfg.shared_expert_gate else None
        self.attention_hook: Optional[ContextManager] = None
        self.checkpointing = cfg.activation_checkpointing
        if moe and self.checkpointing != "none":
            set_expert_recompute(self.ffn)

    def _attend(self, x_BTD, cos_TH, sin_TH, docs=None):
        return self.attn(self.attn_norm(x_BTD), cos_TH, sin_TH, docs)

    def _shared_ffn(self, h):
        y = self.shared(h)
        return y if self.shared_gate is None else torch.sigmoid(self.shared_gate(h)) * y

    def forward(self, x_BTD, cos_TH, sin_TH, docs=None) -> tuple[torch.Tensor, Optional[MoEAux]]:
        full = self.checkpointing == "full" and torch.is_grad_enabled()
        with self.attention_hook or contextlib.nullcontext():
            a = _recompute(self._attend, x_BTD, cos_TH, sin_TH, docs) if full \
                else self._attend(x_BTD, cos_TH, sin_TH, docs)
            x_BTD = x_BTD + a
        h = self.ffn_norm(x_BTD)
        if not self.is_moe:
            return x_BTD + (_recompute(self.ffn, h) if full else self.ffn(h)), None
        y, aux = self.ffn(h)
        if self.shared is not None:
            again = self.checkpointing != "none" and torch.is_grad_enabled()
            y = y + (_recompute(self._shared_ffn, h) if again else self._shared_ffn(h))
        return x_BTD + y, aux


def _recompute(fn, *args):
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


def set_expert_recompute(moe_layer: nn.Module) -> None:
    """Make a MoE layer's experts recompute their FFN activations in the backward pass."""
    if hasattr(moe_layer, "enable_expert_recompute"):
        moe_layer.enable_expert_recompute()
        return
    experts = getattr(moe_layer, "experts", None)
    if experts is None or not hasattr(experts, "recompute"):
        raise ValueError(f"{type(moe_layer).__name__} does not support activation checkpointing of its experts")
    experts.recompute = True


class Transformer(nn.Module):
    """`moe_factory` builds each MoE layer (default: `experts.layer.MoELayer`); an expert
    strategy may supply another with the same interface (DeepSpeed's MoE layer).
    `document_sep_id`: with a token id (the tokenizer's eos, `data.document_mask`), attention
    stays within each document of a packed sequence (`system.attention`: no (B, T, T) mask);
    `document_attention_path` picks how ("auto": FlexAttention on CUDA, else the split path)."""

    def __init__(self, cfg: ModelConfig, experts: Optional[ExpertsConfig] = None,
                 moe_factory: Optional[MoEFactory] = None, document_sep_id: Optional[int] = None):
        super().__init__()
        self.document_sep_id = document_sep_id
        self.document_attention_path = "auto"
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size must be set (from the tokenizer) before building the model")
        self.cfg = cfg
        self.experts_cfg = experts = experts or ExpertsConfig()
        moe_ids = set(cfg.moe_layer_ids())
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        factory = moe_factory or default_moe_layer
        self.blocks = nn.ModuleList(Block(cfg, i in moe_ids, experts, factory) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std, out_std = self.cfg.init_std, init_std_for_depth(self.cfg.init_std, self.cfg.n_layers)
        nn.init.normal_(self.embed.weight, std=std)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=std)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=std)
            nn.init.normal_(blk.attn.proj.weight, std=out_std)
            if blk.is_moe:
                blk.ffn.reset_parameters(std, out_std)
                if blk.shared is not None:
                    nn.init.normal_(blk.shared.w1.weight, std=std)
                    nn.init.normal_(blk.shared.w3.weight, std=std)
                    nn.init.normal_(blk.shared.w2.weight, std=out_std)
                if blk.shared_gate is not None:
                    nn.init.normal_(blk.shared_gate.weight, std=std)
            else:
                nn.init.normal_(blk.ffn.w1.weight, std=std)
                nn.init.normal_(blk.ffn.w3.weight, std=std)
                nn.init.normal_(blk.ffn.w2.weight, std=out_std)

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def set_routing_step(self, step: int) -> None:
        """The optimizer step step-dependent routers (the DTS gate's temperature) follow."""
        for layer in self.moe_layers():
            layer.routing_step = int(step)

    def forward(self, input_ids_BT: torch.Tensor) -> ModelOutput:
        B, T = input_ids_BT.shape
        cos_TH, sin_TH = rope_tables(T, self.cfg.attn_head_dim(), self.cfg.rope_theta,
                                     input_ids_BT.device)
        x_BTD = self.embed(input_ids_BT)
        docs = None if self.document_sep_id is None else \
            document_layout(input_ids_BT, self.document_sep_id, self.document_attention_path)
        aux: list[MoEAux] = []
        for blk in self.blocks:
            x_BTD, a = blk(x_BTD, cos_TH, sin_TH, docs)
            if a is not None:
                aux.append(a)
        h = self.norm(x_BTD)
        logits = h @ self.embed.weight.t() if self.head is None else self.head(h)
        return ModelOutput(logits, aux)


@torch.no_grad()
def greedy_decode(model: Transformer, input_ids_BT: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Append `new_tokens` argmax tokens to each prompt (full recompute per token: a checking and
    sampling tool, not a server)."""
    ids = input_ids_BT
    for _ in range(new_tokens):
        nxt = model(ids).logits_BTV[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids
