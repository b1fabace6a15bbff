"""The transformer's shape: `ModelConfig`. Torch-free, so config tools (the job spec, the
cluster simulator `parallel.simulator`) can read and validate it without importing torch;
`system.model` builds the network from it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Union


@dataclass
class ModelConfig:
    """Model shape. `vocab_size: null` takes the tokenizer's vocabulary size."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # key/value heads (grouped-query attention); null: n_heads
    d_ff: int = 512  # hidden size of the dense SwiGLU FFN layers
    moe_layers: Union[str, list[int]] = "all"  # "all", "none", "every_2" or explicit indices
    num_experts: int = 8
    top_k: int = 2
    d_expert: int = 256  # hidden size of each expert's SwiGLU FFN
    vocab_size: Optional[int] = None
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    qkv_bias: bool = False  # biases on the query/key/value projections (Qwen2, Qwen2-MoE)
    head_dim: Optional[int] = None  # per-head width; null: d_model / n_heads (Qwen3-MoE sets its own)
    # RMSNorm on queries and keys before RoPE: "head" over each head (Qwen3-MoE), "full" over the
    # whole q / k projection (OLMoE), "none".
    qk_norm: Literal["none", "head", "full"] = "none"
    # A shared expert beside the routed ones in every MoE layer: a SwiGLU FFN of this hidden size
    # that every token passes (0: none). DeepSeek's n_shared_experts x moe_intermediate_size;
    # Qwen2-MoE's shared_expert_intermediate_size.
    d_shared: int = 0
    shared_expert_gate: bool = False  # scale the shared expert by sigmoid(w . x) (Qwen2-MoE)
    # Recompute activations in the backward pass: "full" (attention and feed-forward compute of
    # every block), "moe" (only the expert and shared-expert FFNs), "none".
    activation_checkpointing: Literal["none", "full", "moe"] = "none"

    def check(self) -> Iterator[tuple[str, str]]:
        for name in ("d_model", "n_layers", "n_heads", "d_ff", "num_experts", "top_k", "d_expert"):
            if getattr(self, name) < 1:
                yield name, f"{getattr(self, name)} must be >= 1"
        if self.head_dim is not None:
            if self.head_dim < 2 or self.head_dim % 2:
                yield "head_dim", f"{self.head_dim} must be an even number >= 2 (rotary embeddings rotate pairs)"
        elif self.n_heads >= 1 and self.d_model % self.n_heads:
            yield "n_heads", (f"d_model={self.d_model} is not divisible by n_heads={self.n_heads} "
                              f"(or set head_dim)")
        elif self.n_heads >= 1 and (self.d_model // self.n_heads) % 2:
            yield "n_heads", f"head dim {self.d_model // self.n_heads} must be even for rotary embeddings"
        if self.d_shared < 0:
            yield "d_shared", f"{self.d_shared} must be >= 0 (0: no shared expert)"
        if self.shared_expert_gate and self.d_shared == 0:
            yield "shared_expert_gate", "true needs a shared expert (d_shared > 0)"
        if self.n_kv_heads is not None:
            if self.n_kv_heads < 1:
                yield "n_kv_heads", f"{self.n_kv_heads} must be >= 1"
            elif self.n_heads >= 1 and self.n_heads % self.n_kv_heads:
                yield "n_kv_heads", f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"
        if self.top_k > self.num_experts:
            yield "top_k", f"{self.top_k} exceeds num_experts={self.num_experts}"
        if self.vocab_size is not None and self.vocab_size < 2:
            yield "vocab_size", f"{self.vocab_size} must be >= 2"
        try:
            self.moe_layer_ids()
        except ValueError as e:
            yield "moe_layers", str(e)

    def attn_head_dim(self) -> int:
        """The width of one attention head (head_dim, or d_model / n_heads when unset)."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    def kv_heads(self) -> int:
        """The number of key/value heads (n_kv_heads, or n_heads when unset)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def moe_layer_ids(self) -> list[int]:
        spec = self.moe_layers
        if isinstance(spec, str):
            if spec == "all":
                return list(range(self.n_layers))
            if spec == "none":
                return []
            if spec.startswith("every_") and spec[6:].isdigit() and int(spec[6:]) >= 1:
                n = int(spec[6:])
                return [i for i in range(self.n_layers) if i % n == n - 1]
            raise ValueError(f"{spec!r} is not 'all', 'none', 'every_N' or a list of layer indices")
        bad = [i for i in spec if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"layer indices {bad} out of range [0, {self.n_layers})")
        if len(set(spec)) != len(spec):
            raise ValueError(f"{spec} repeats a layer index")
        return sorted(spec)
