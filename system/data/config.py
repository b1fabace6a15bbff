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

    def check(self) -> Iterator[tuple[str, str]]:
        if self.kind == "bpe" and not (259 <= self.vocab_size <= 1_000_000):
            yield "vocab_size", f"{self.vocab_size} must be in [259, 1000000] for a BPE tokenizer"
        if self.kind == "hf" and not self.path:
            yield "path", "a local tokenizer directory is required when kind is 'hf'"


@dataclass
class SourceConfig:
    """One named domain of the mixture."""

    name: str
    kind: Literal["embedded", "text", "jsonl"] = "embedded"
    weight: float = 1.0
    # `embedded`: which built-in domain (defaults to `name`); `text`/`jsonl`: file paths
    domain: Optional[str] = None
    paths: list[str] = field(default_factory=list)
    text_field: str = "text"  # `jsonl`: the key holding each document's text
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
    cache_dir: Optional[str] = None  # tokenized-corpus cache; default ~/.cache/moeforge
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
        if not (0.0 < self.holdout_fraction < 0.5):
            yield "holdout_fraction", f"{self.holdout_fraction} must be in (0, 0.5)"
