"""Loading a source's raw documents: the embedded domains, plain-text files and JSON lines.

Every loader returns documents in a deterministic order, so the same machine and config
always yield the same list (the packed-corpus cache relies on it).
"""
from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator, Optional

from system.data.config import EMBEDDED_DOMAINS, SourceConfig

# Standard-library folders that are tests, third-party code, tooling or generated data
# rather than representative library source.
_STDLIB_SKIP_DIRS = frozenset({
    "test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages", "dist-packages",
    "__pycache__", "pydoc_data", "lib-dynload", "turtledemo", "ensurepip",
})
_LICENSE_DIR = Path("/usr/share/common-licenses")
_HEADER_DIRS = (Path("/usr/include"), Path("/usr/include/linux"))
# Licence texts are few and long; grouping paragraphs into pieces of this size gives
# enough documents for a train/holdout split by document.
_LEGAL_MIN_CHARS = 2048
_LEGAL_MAX_CHARS = 4096


def load_documents(src: SourceConfig) -> list[str]:
    """All documents of `src` in a deterministic order, at most `src.max_documents`."""
    if src.kind == "embedded":
        docs = _embedded(src.embedded_domain)
    elif src.kind == "text":
        docs = _text_documents(src.paths)
    elif src.kind == "jsonl":
        docs = _jsonl_documents(src.paths, src.text_field)
    else:
        raise ValueError(f"source {src.name!r}: unknown kind {src.kind!r};"
                         " choose embedded, text or jsonl")
    out: list[str] = []
    for doc in docs:
        if not doc.strip():
            continue  # an empty document would only contribute an eos token
        out.append(doc)
        if src.max_documents is not None and len(out) >= src.max_documents:
            break
    if not out:
        raise ValueError(f"source {src.name!r} yielded no non-empty documents")
    return out


def _embedded(domain: str) -> Iterator[str]:
    if domain == "python_code":
        return _read_all(_stdlib_files())
    if domain == "english_docs":
        return _python_doc_topics()
    if domain == "legal":
        return _legal_documents()
    if domain == "c_headers":
        return _read_all(_header_files())
    raise ValueError(f"{domain!r} is not an embedded domain; choose one of {list(EMBEDDED_DOMAINS)}")


def embedded_files(domain: str) -> list[Path]:
    """The files an embedded domain's documents come from (what a prepared source's fingerprint
    stats)."""
    if domain == "python_code":
        return _stdlib_files()
    if domain == "c_headers":
        return _header_files()
    if domain == "legal":
        return _unique_regular(sorted(_LICENSE_DIR.iterdir())) if _LICENSE_DIR.is_dir() else []
    if domain == "english_docs":
        import pydoc_data.topics

        return [Path(pydoc_data.topics.__file__)]
    raise ValueError(f"{domain!r} is not an embedded domain; choose one of {list(EMBEDDED_DOMAINS)}")


def _read_all(paths: list[Path]) -> Iterator[str]:
    for p in paths:
        # System files are not guaranteed to be UTF-8; a stray byte must not stop training.
        yield p.read_text(encoding="utf-8", errors="replace")


def _unique_regular(paths: list[Path]) -> list[Path]:
    """Regular files among `paths` in the given order, minus symlinks to a file already listed.

    That drops duplicates such as `GPL -> GPL-3` (whichever sorts first) while keeping a
    symlink to a file outside the list.
    """
    files = [p for p in paths if p.is_file()]
    real_targets = {os.path.realpath(p) for p in files if not p.is_symlink()}
    seen: set[str] = set()
    out = []
    for p in files:
        real = os.path.realpath(p)
        if real in seen or (p.is_symlink() and real in real_targets):
            continue
        seen.add(real)
        out.append(p)
    return out


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames
                       if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-")]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    files = _unique_regular(sorted(found))
    if not files:
        raise ValueError(f"embedded domain 'python_code': no .py files found under {root}")
    return files


def _header_files() -> list[Path]:
    found: list[Path] = []
    for d in _HEADER_DIRS:  # /usr/include first, then /usr/include/linux, each sorted
        found += sorted(d.glob("*.h")) if d.is_dir() else []
    files = _unique_regular(found)
    if not files:
        raise ValueError("embedded domain 'c_headers': no .h files found in "
                         + " or ".join(str(d) for d in _HEADER_DIRS))
    return files


def _python_doc_topics() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise ValueError("embedded domain 'english_docs': the standard library's"
                         f" pydoc_data.topics is unavailable ({e})") from e
    if not topics:
        raise ValueError("embedded domain 'english_docs': pydoc_data.topics is empty")
    for key in sorted(topics):
        yield topics[key]


def _legal_documents() -> Iterator[str]:
    files = _unique_regular(sorted(_LICENSE_DIR.iterdir())) if _LICENSE_DIR.is_dir() else []
    if not files:
        raise ValueError(f"embedded domain 'legal': no licence texts found in {_LICENSE_DIR}")
    for p in files:
        yield from _paragraph_groups(p.read_text(encoding="utf-8", errors="replace"))


def _paragraph_groups(text: str) -> Iterator[str]:
    """Consecutive paragraphs joined into pieces of roughly 2-4 KB (long paragraphs split by line)."""
    pieces: list[str] = []
    for para in text.split("\n\n"):
        if len(para) <= _LEGAL_MAX_CHARS:
            pieces.append(para)
            continue
        lines: list[str] = []
        for line in para.split("\n"):
            if lines and sum(len(x) + 1 for x in lines) + len(line) > _LEGAL_MAX_CHARS:
                pieces.append("\n".join(lines))
                lines = []
            lines.append(line)
        pieces.append("\n".join(lines))
    group: list[str] = []
    size = 0
    for piece in pieces:
        if group and size + len(piece) > _LEGAL_MAX_CHARS:
            yield "\n\n".join(group)
            group, size = [], 0
        group.append(piece)
        size += len(piece) + 2
        if size >= _LEGAL_MIN_CHARS:
            yield "\n\n".join(group)
            group, size = [], 0
    if group:
        yield "\n\n".join(group)


def _expand(paths: list[str]) -> list[Path]:
    """Files named by `paths`: a file stands for itself, a directory for its files (sorted)."""
    out = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            inside = [f for f in p.rglob("*") if f.is_file()
                      and not any(part.startswith(".") for part in f.relative_to(p).parts)]
            if not inside:
                raise ValueError(f"data path {raw!r} is a directory with no files")
            out += sorted(inside)
        else:
            raise ValueError(f"data path {raw!r} does not exist")
    return out


def _text_documents(paths: list[str]) -> Iterator[str]:
    for p in _expand(paths):
        try:
            yield p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{p}: not valid UTF-8 text ({e})") from e


def _jsonl_documents(paths: list[str], text_field: str) -> Iterator[str]:
    for p in _expand(paths):
        with open(p, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                doc = _jsonl_line(raw, p, lineno, text_field)
                if doc is not None:
                    yield doc


class SourceFormatError(ValueError):
    """A source's file that does not read as the source says. `field` is the source setting to
    fix (`kind`, `text_field`, `paths`), so `jobs.preflight` can name it; prepare sees a
    ValueError like the readers' other errors."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def _jsonl_line(raw: bytes, path: Path, lineno: int, text_field: str) -> Optional[str]:
    if not raw.strip():
        return None  # blank lines (e.g. a trailing newline) are not records
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceFormatError(f"{path}:{lineno}: invalid JSON ({e})", "kind") from e
    if not isinstance(record, dict):
        raise SourceFormatError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}", "kind")
    if text_field not in record:
        raise SourceFormatError(f"{path}:{lineno}: no field {text_field!r} (fields: {list(record)[:20]});"
                                " set text_field to the key holding the text", "text_field")
    text = record[text_field]
    if not isinstance(text, str):
        raise SourceFormatError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, expected"
                                " a string; set text_field to the key holding the text", "text_field")
    return text
