"""Tiny random models of every Hugging Face family we import, built with transformers itself."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("make_tiny_hf_moe", ROOT / "scripts" / "make_tiny_hf_moe.py")
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)

V = 96
# Each case exercises a family's distinctive features.
CASES = {
    # every-layer MoE, softmax top-k renormalised, GQA, untied head
    "mixtral": dict(family="mixtral"),
    # tied embeddings, a dense layer (mlp_only_layers), a gated shared expert, q/k/v biases, no renormalisation
    "qwen2_moe": dict(family="qwen2_moe", tie=True, mlp_only_layers=[1]),
    # per-head QK-norm, head_dim != d_model / n_heads, renormalised top-k, a dense layer by decoder_sparse_step
    "qwen3_moe": dict(family="qwen3_moe", head_dim=24, decoder_sparse_step=1, mlp_only_layers=[0]),
    # QK-norm over the whole projection, no renormalisation
    "olmoe": dict(family="olmoe"),
}


def build(case: str, out: Path, seed: int = 0) -> Path:
    kw = dict(CASES[case])
    family = kw.pop("family")
    return tiny.build_tiny(family, out, seed=seed, vocab_size=V, d_model=48, n_layers=3, n_heads=4, n_kv_heads=2,
                           num_experts=8, top_k=2, d_expert=32, **kw)
