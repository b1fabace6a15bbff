"""Data configuration: plain dataclasses, validated by `jobs.spec` when a spec is loaded.

Each class may define `check()`, yielding `(field, message)` pairs for values that are
well-typed but out of range; the spec loader prefixes them with the dotted path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Literal, Optional

EMBEDDED_DOMAINS = ("python_code", "english_docs", "legal", "c_headers")


@dataclass
class TokenizerConfig:
    """Which tokenizer turns text into ids."""

    kind: Literal["byte", "bpe", "hf"] = "byte"
    vocab_size: int = 4096  # only for `bpe`: target vocabulary trained locally
    path: Optional[str] = None  # only for `hf`: a local directory with an HF tokenizer
    # only for `bpe`: it is trained on the first this many bytes of training text (sources in
    # order, holdout excluded), once, and cached by that sample's identity
    train_sample_bytes: int = 256 << 20

    def check(self) -> Iterator[tuple[str, str]]:
        if self.kind == "bpe" and not (259 <= self.vocab_size <= 1_000_000):
            yield "vocab_size", f"{self.vocab_size} must be in [259, 1000000] for a BPE tokenizer"
        if self.train_sample_bytes < 1:
            yield "train_sample_bytes", f"{self.train_sample_bytes} must be >= 1"
        if self.kind == "hf" and not self.path:
            yield "path", "a local tokenizer directory is required when kind is 'hf'"


@dataclass
class SourceConfig:
    """One named domain of the mixture."""

    name: str
    # embedded: a built-in domain; text: plain-text files or directories (a file is a document);
    # jsonl: JSON lines (also .gz, .zst); parquet: parquet files; hf_dataset: directories written
    # by Hugging Face datasets' save_to_disk; tokens: token ids made elsewhere (.npy, or raw .bin
    # with token_dtype), used as they are
    kind: Literal["embedded", "text", "jsonl", "parquet", "hf_dataset", "tokens"] = "embedded"
    weight: float = 1.0
    # `embedded`: which built-in domain (defaults to `name`); the other kinds: file paths
    domain: Optional[str] = None
    paths: list[str] = field(default_factory=list)
    text_field: str = "text"  # jsonl, parquet, hf_dataset: the key or column holding each document's text
    # tokens: the dtype of raw .bin files (.npy files carry theirs)
    token_dtype: Literal["uint8", "uint16", "uint32", "int32", "int64"] = "uint16"
    # tokens: per path, an .npy of document end offsets (default: documents end after each eos id)
    doc_offsets: Optional[list[str]] = None
    max_documents: Optional[int] = None  # cap, to keep tests and quick runs small

    def check(self) -> Iterator[tuple[str, str]]:
        if self.weight < 0:
            yield "weight", f"{self.weight} must be >= 0"
        if self.kind == "embedded":
            dom = self.domain or self.name
            if dom not in EMBEDDED_DOMAINS:
                yield ("domain" if self.domain else "name"), (
                    f"{dom!r} is not an embedded domain; choose one of {list(EMBEDDED_DOMAINS)}"
                    " or set kind: text/jsonl with paths")
            if self.paths:
                yield "paths", "embedded sources take no paths"
        elif not self.paths:
            yield "paths", f"a {self.kind} source needs at least one file path"
        if self.doc_offsets is not None and (self.kind != "tokens" or len(self.doc_offsets) != len(self.paths)):
            yield "doc_offsets", ("only a tokens source takes doc_offsets" if self.kind != "tokens" else
                                  f"{len(self.doc_offsets)} offset files for {len(self.paths)} token files: "
                                  "give one per path")
        if self.max_documents is not None and self.max_documents < 1:
            yield "max_documents", f"{self.max_documents} must be >= 1"

    @property
    def embedded_domain(self) -> str:
        return self.domain or self.name


@dataclass
class DataConfig:
    """The training data: a weighted mixture of sources, packed to fixed-length sequences."""

    sources: list[SourceConfig] = field(
        default_factory=lambda: [SourceConfig(name=d) for d in EMBEDDED_DOMAINS])
    seq_len: int = 128
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    holdout_fraction: float = 0.05  # share of each source's documents kept for evaluation
    # prepared token shards and tokenizers (moeforge prepare); default $MOEFORGE_CACHE, else
    # ~/.cache/moeforge; on a cluster, storage every node sees
    cache_dir: Optional[str] = None
    # input megabytes per prepare task and shard (the chunks are the same for any value)
    shard_mb: float = 64.0
    # "single": every micro-batch holds sequences of one domain, chosen with the mixture weights
    microbatch_domains: Literal["mixed", "single"] = "mixed"
    # Attention stays within each document of a packed sequence (documents end with the
    # tokenizer's eos); false: plain causal attention across the documents packed together.
    document_mask: bool = False

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.sources:
            yield "sources", "at least one data source is required"
        names = [s.name for s in self.sources]
        for n in sorted({n for n in names if names.count(n) > 1}):
            yield "sources", f"source name {n!r} appears more than once"
        if self.sources and sum(s.weight for s in self.sources) <= 0:
            yield "sources", "the source weights must not all be zero"
        if not (8 <= self.seq_len <= 1 << 20):
            yield "seq_len", f"{self.seq_len} must be in [8, 1048576]"
        if not self.shard_mb > 0:
            yield "shard_mb", f"{self.shard_mb} must be > 0"
        if not (0.0 < self.holdout_fraction < 0.5):
            yield "holdout_fraction", f"{self.holdout_fraction} must be in (0, 0.5)"
