#!/usr/bin/env python
"""Build a small random Hugging Face MoE model and its tokenizer locally (nothing downloaded).

    python scripts/make_tiny_hf_moe.py --family qwen3_moe --out runs/tiny-qwen3-moe
    python scripts/make_tiny_hf_moe.py --family olmoe --out runs/tiny-olmoe --d-model 96

The tokenizer is a byte-level BPE trained on the embedded corpus (our `embedded` sources),
saved as a transformers fast tokenizer (`AutoTokenizer.from_pretrained` loads it); the model
is built with transformers itself (`AutoModelForCausalLM.from_config`, random weights from
`--seed`) and saved with `save_pretrained`. Families: mixtral, qwen2_moe, qwen3_moe, olmoe.
`build_tiny` is what the tests and `examples/continual_hf.yaml` use.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def family_config(family: str, *, vocab_size: int, d_model: int = 64, n_layers: int = 3, n_heads: int = 4,
                  n_kv_heads: int = 2, num_experts: int = 8, top_k: int = 2, d_expert: int = 64,
                  tie: bool = False, **extra: Any):
    """A transformers config of `family` with these sizes (extra: more config fields)."""
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=n_layers,
                  num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, num_experts_per_tok=top_k,
                  tie_word_embeddings=tie, rms_norm_eps=1e-6, max_position_embeddings=4096)
    if family == "mixtral":
        kw = dict(num_local_experts=num_experts, intermediate_size=d_expert, sliding_window=None)
        cls = transformers.MixtralConfig
    elif family == "olmoe":
        kw = dict(num_experts=num_experts, intermediate_size=d_expert, norm_topk_prob=False)
        cls = transformers.OlmoeConfig
    elif family == "qwen2_moe":
        kw = dict(num_experts=num_experts, moe_intermediate_size=d_expert, intermediate_size=2 * d_expert,
                  shared_expert_intermediate_size=2 * d_expert, norm_topk_prob=False, decoder_sparse_step=1,
                  mlp_only_layers=[], use_sliding_window=False)
        cls = transformers.Qwen2MoeConfig
    elif family == "qwen3_moe":
        kw = dict(num_experts=num_experts, moe_intermediate_size=d_expert, intermediate_size=2 * d_expert,
                  head_dim=d_model // n_heads, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                  use_sliding_window=False)
        cls = transformers.Qwen3MoeConfig
    else:
        raise ValueError(f"family {family!r} is not one of {FAMILIES}")
    kw.update(extra)
    return cls(**{**common, **kw})


def sharpen(model, seed: int = 0) -> None:
    """Make every tensor matter in a comparison: non-trivial norms and biases, sharp attention."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(6.0)
            elif "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("gate.weight") or "router" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def build_tiny(family: str, out: str | Path, *, seed: int = 0, vocab_size: Optional[int] = None,
               tokenizer: Any = None, sharp: bool = True, **sizes: Any) -> Path:
    """Save a random `family` model (and `tokenizer`, a transformers tokenizer, when given) to `out`.

    With no `vocab_size`, the tokenizer's length is used (a BPE tokenizer is trained when
    neither is given)."""
    import torch
    import transformers

    out = Path(out)
    if tokenizer is None and vocab_size is None:
        tokenizer = train_tokenizer()
    V = vocab_size if vocab_size is not None else len(tokenizer)
    cfg = family_config(family, vocab_size=V, **sizes)
    if tokenizer is not None:
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.bos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = None
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    if sharp:
        sharpen(model, seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def train_tokenizer(vocab_size: int = 512, max_chars: int = 2_000_000):
    """A byte-level BPE on the embedded corpus, as a transformers fast tokenizer (eos `<|eos|>`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from system.data.config import EMBEDDED_DOMAINS, SourceConfig
    from system.data.corpus import load_documents

    def texts():
        n = 0
        for d in EMBEDDED_DOMAINS:
            for doc in load_documents(SourceConfig(name=d, kind="embedded", max_documents=300)):
                yield doc
                n += len(doc)
                if n > max_chars:
                    return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|eos|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=FAMILIES, default="qwen3_moe")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--d-expert", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=512, help="BPE vocabulary to train")
    a = ap.parse_args(argv)
    tok = train_tokenizer(a.vocab)
    out = build_tiny(a.family, a.out, seed=a.seed, tokenizer=tok, d_model=a.d_model, n_layers=a.layers,
                     num_experts=a.experts, top_k=a.top_k, d_expert=a.d_expert)
    print(f"wrote a random {a.family} model (vocabulary {len(tok)}) and its tokenizer to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
