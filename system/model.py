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
from torch import nn

from experts.config import ExpertsConfig
from experts.layer import MoEAux, MoELayer, init_std_for_depth
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
    v (n_kv_heads*d)], heads contiguous within each; query head h reads key/value head
    h // (n_heads / n_kv_heads). With n_kv_heads = n_heads this is the plain (3D, D) layout.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.n_kv_heads = cfg.kv_heads()
        self.qkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        if self.qkv.bias is not None:
            nn.init.zeros_(self.qkv.bias)

    def forward(self, x_BTD: torch.Tensor, cos_TH, sin_TH) -> torch.Tensor:
        B, T, D = x_BTD.shape
        H, G, d = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x_BTD).view(B, T, H + 2 * G, d).transpose(1, 2).split([H, G, G], dim=1)
        q, k = apply_rope(q, cos_TH, sin_TH), apply_rope(k, cos_TH, sin_TH)  # (B, H|G, T, d)
        if G == H:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


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


def default_moe_layer(cfg: ModelConfig, experts: ExpertsConfig) -> nn.Module:
    return MoELayer(cfg.d_model, cfg.num_experts, cfg.top_k, cfg.d_expert, experts.router, experts.backend)


class Block(nn.Module):
    """Pre-norm attention and feed-forward (dense or MoE) with residuals.

    `attention_hook`: a context manager entered around the attention (None: nothing). An expert
    strategy sets it to start work that overlaps the attention (FSSDP posts the layer's
    SparseAllGather there)."""

    def __init__(self, cfg: ModelConfig, moe: bool, experts: ExpertsConfig, moe_factory: MoEFactory):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = moe
        self.ffn = moe_factory(cfg, experts) if moe else DenseFFN(cfg.d_model, cfg.d_ff)
        self.attention_hook: Optional[ContextManager] = None

    def forward(self, x_BTD, cos_TH, sin_TH) -> tuple[torch.Tensor, Optional[MoEAux]]:
        with self.attention_hook or contextlib.nullcontext():
            x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos_TH, sin_TH)
        h = self.ffn_norm(x_BTD)
        if self.is_moe:
            y, aux = self.ffn(h)
            return x_BTD + y, aux
        return x_BTD + self.ffn(h), None


class Transformer(nn.Module):
    """`moe_factory` builds each MoE layer (default: `experts.layer.MoELayer`); an expert
    strategy may supply another with the same interface (DeepSpeed's MoE layer)."""

    def __init__(self, cfg: ModelConfig, experts: Optional[ExpertsConfig] = None,
                 moe_factory: Optional[MoEFactory] = None):
        super().__init__()
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
        cos_TH, sin_TH = rope_tables(T, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_theta,
                                     input_ids_BT.device)
        x_BTD = self.embed(input_ids_BT)
        aux: list[MoEAux] = []
        for blk in self.blocks:
            x_BTD, a = blk(x_BTD, cos_TH, sin_TH)
            if a is not None:
                aux.append(a)
        h = self.norm(x_BTD)
        logits = h @ self.embed.weight.t() if self.head is None else self.head(h)
        return ModelOutput(logits, aux)
