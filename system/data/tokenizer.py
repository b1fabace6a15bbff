"""Tokenizers: raw bytes, a byte-level BPE trained locally (and cached), or a local HF tokenizer.

All kinds share one small interface (`Tokenizer`); `fingerprint` is a stable hash that
changes whenever the text -> ids mapping may change, so packed corpora can be cached by it.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from system.data.config import TokenizerConfig

EOS_TOKEN = "<|eos|>"
_BPE_FORMAT = "bpe-v1"  # bump when the BPE recipe below changes, to retrain cached files
# The files that define an HF tokenizer; weights sharing the directory are not hashed.
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                       "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt")
_HF_TOKENIZER_SUFFIXES = (".model", ".tiktoken")


class Tokenizer:
    """Text <-> token ids. Subclasses set `vocab_size`, `eos_id` and `fingerprint`."""

    vocab_size: int
    eos_id: int
    fingerprint: str

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, without an eos token."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` for many texts at once, each as an int32 array (faster for big corpora)."""
        return [np.asarray(self.encode(t), dtype=np.int32) for t in texts]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, eos 256: needs no training and never sees an unknown token."""

    def __init__(self) -> None:
        self.vocab_size = 257
        self.eos_id = 256
        self.fingerprint = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # eos (and any id outside a byte) has no text; invalid UTF-8 from a cut sequence
        # is shown as U+FFFD rather than failing an evaluation printout.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32) for t in texts]


class BPETokenizer(Tokenizer):
    """A `tokenizers` byte-level BPE model with an `<|eos|>` special token."""

    def __init__(self, tok, json_text: str) -> None:
        # Text that happens to spell "<|eos|>" stays text: only the packer inserts eos ids.
        tok.encode_special_tokens = True
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        eos = tok.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(f"BPE tokenizer has no {EOS_TOKEN} token")
        self.eos_id = eos
        self.fingerprint = "bpe-" + hashlib.sha256(json_text.encode("utf-8")).hexdigest()[:24]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def to_json(self) -> str:
        """The `tokenizers` JSON of this model (what export writes as tokenizer.json)."""
        return self._tok.to_str()

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]


class HFTokenizer(Tokenizer):
    """A pretrained tokenizer loaded from a local directory with `transformers`."""

    def __init__(self, tok, fingerprint: str, path: Optional[str] = None) -> None:
        self._tok = tok
        self.path = path  # the local directory it was loaded from
        self.vocab_size = len(tok)
        self.eos_id = tok.eos_token_id
        self.fingerprint = fingerprint

    # split_special_tokens: special-token text inside a document is encoded as plain text,
    # so a document cannot fake an eos (or any control token) boundary.
    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False, split_special_tokens=True))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        ids = self._tok(list(texts), add_special_tokens=False,
                        split_special_tokens=True)["input_ids"]
        return [np.asarray(x, dtype=np.int32) for x in ids]


def build_tokenizer(cfg: TokenizerConfig, training_texts: Callable[[], Iterable[str]],
                    cache_dir: Path, corpus_key: Optional[str] = None) -> Tokenizer:
    """The tokenizer described by `cfg`.

    `training_texts` is only called for `bpe` when no cached model exists. `corpus_key`
    identifies those texts (e.g. a hash of the sources); when omitted it is computed by
    hashing the texts, which costs one extra pass over them.
    """
    if cfg.kind == "byte":
        return ByteTokenizer()
    if cfg.kind == "bpe":
        return _bpe(cfg.vocab_size, training_texts, Path(cache_dir), corpus_key)
    if cfg.kind == "hf":
        return _hf(cfg.path)
    raise ValueError(f"tokenizer.kind {cfg.kind!r} is unknown; choose byte, bpe or hf")


def _bpe(vocab_size: int, training_texts: Callable[[], Iterable[str]], cache_dir: Path,
         corpus_key: Optional[str]) -> BPETokenizer:
    from tokenizers import Tokenizer as HFCoreTokenizer

    if corpus_key is None:
        h = hashlib.sha256()
        for t in training_texts():
            h.update(hashlib.sha256(t.encode("utf-8")).digest())
        corpus_key = h.hexdigest()
    key = hashlib.sha256(f"{_BPE_FORMAT}|{vocab_size}|{corpus_key}".encode()).hexdigest()[:20]
    path = cache_dir / f"tokenizer-bpe-{vocab_size}-{key}.json"
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
            return BPETokenizer(HFCoreTokenizer.from_str(text), text)
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt, not fatal
            pass
    tok = _train_bpe(vocab_size, training_texts())
    text = tok.to_str()
    atomic_write_bytes(path, text.encode("utf-8"))
    return BPETokenizer(tok, text)


def _train_bpe(vocab_size: int, texts: Iterable[str]):
    from tokenizers import Tokenizer as HFCoreTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFCoreTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
        # All 256 byte symbols up front, so any text encodes even if the corpus lacks a byte.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _hf(path: Optional[str]) -> HFTokenizer:
    if not path:
        raise ValueError("tokenizer.path: a local tokenizer directory is required when kind is 'hf'")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"tokenizer.path {path!r} is not a directory")
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ValueError(f"tokenizer.kind 'hf' needs the transformers package ({e})") from e
    try:
        tok = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer.path {path!r}: cannot load a tokenizer from it ({e})") from e
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer.path {path!r}: the tokenizer defines no eos token;"
                         " documents could not be separated")
    return HFTokenizer(tok, _hf_fingerprint(root), str(root.absolute()))


def _hf_fingerprint(root: Path) -> str:
    h = hashlib.sha256(b"hf-v1")
    for f in sorted(root.iterdir()):
        if f.is_file() and (f.name in _HF_TOKENIZER_FILES or f.suffix in _HF_TOKENIZER_SUFFIXES):
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return "hf-" + h.hexdigest()[:24]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
