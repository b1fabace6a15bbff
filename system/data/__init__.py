"""The data pipeline: sources -> documents -> tokens -> packed chunks -> a mixture stream.

The names below load on first use: the job spec reads only `system.data.config`, which needs no
torch (`moeforge validate` stays a fraction of a second).
"""
from __future__ import annotations

import importlib

_WHERE = {
    **dict.fromkeys(("EMBEDDED_DOMAINS", "DataConfig", "SourceConfig", "TokenizerConfig"), "system.data.config"),
    "load_documents": "system.data.corpus",
    **dict.fromkeys(("PackedCorpus", "default_cache_dir", "pack", "split_holdout"), "system.data.dataset"),
    **dict.fromkeys(("BLOCK", "DataStream", "MixtureSampler", "holdout_batches"), "system.data.sampler"),
    **dict.fromkeys(("EOS_TOKEN", "BPETokenizer", "ByteTokenizer", "HFTokenizer", "Tokenizer", "build_tokenizer"),
                    "system.data.tokenizer"),
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'system.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
