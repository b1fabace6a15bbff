"""The data pipeline: sources -> documents -> tokens -> packed chunks -> a mixture stream."""
from system.data.config import EMBEDDED_DOMAINS, DataConfig, SourceConfig, TokenizerConfig
from system.data.corpus import load_documents
from system.data.dataset import PackedCorpus, default_cache_dir, pack, split_holdout
from system.data.sampler import BLOCK, DataStream, MixtureSampler, holdout_batches
from system.data.tokenizer import (EOS_TOKEN, BPETokenizer, ByteTokenizer, HFTokenizer,
                                   Tokenizer, build_tokenizer)

__all__ = [
    "EMBEDDED_DOMAINS", "DataConfig", "SourceConfig", "TokenizerConfig",
    "load_documents",
    "PackedCorpus", "default_cache_dir", "pack", "split_holdout",
    "BLOCK", "DataStream", "MixtureSampler", "holdout_batches",
    "EOS_TOKEN", "BPETokenizer", "ByteTokenizer", "HFTokenizer", "Tokenizer", "build_tokenizer",
]
