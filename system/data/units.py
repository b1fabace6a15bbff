"""A source cut into work units for `moeforge prepare`, and each unit's documents.

A unit is a plain dict (it travels to Ray tasks): the source's kind and the part of its input
it covers (a byte range of a JSON-lines file, a list of text files, row groups of a parquet file,
one Arrow file of a Hugging Face `save_to_disk` directory, a range of embedded documents). Units
are listed in a deterministic order, and their documents, read unit after unit, are the source's
documents in the order `system.data.corpus.load_documents` gives them. `sample_documents` reads
the first of them through the same code, bounded: what `moeforge validate` checks.
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import itertools
import json
from pathlib import Path
from typing import Any, Iterator

from system.data.config import SourceConfig
from system.data.corpus import SourceFormatError, _expand, _jsonl_line, embedded_files, load_documents

UNIT_BYTES = 64 << 20  # input bytes per unit (about 64 MiB of text)
COMPRESSED = (".gz", ".zst", ".zstd")
# What `sample_documents` reads of a source's first file (`moeforge validate`'s check).
SAMPLE_BYTES = 1 << 20
SAMPLE_DOCUMENTS = 64


def input_files(src: SourceConfig) -> list[Path]:
    """The files a source reads (what its fingerprint stats)."""
    if src.kind == "embedded":
        return embedded_files(src.embedded_domain)
    if src.kind == "hf_dataset":
        return [p for root in src.paths for p in _arrow_files(Path(root).expanduser())]
    return _expand(src.paths)


def plan_units(src: SourceConfig, unit_bytes: int = UNIT_BYTES) -> list[dict[str, Any]]:
    """The source's work units, in document order. A capped source (max_documents) is one unit:
    where the cap falls is only known by reading in order."""
    if src.kind == "embedded" or src.max_documents is not None:
        return [{"read": "all"}]
    files = input_files(src)
    units: list[dict[str, Any]] = []
    if src.kind == "text":
        group, size = [], 0
        for f in files:
            group.append(str(f))
            size += f.stat().st_size
            if size >= unit_bytes:
                units.append({"read": "text", "files": group})
                group, size = [], 0
        if group:
            units.append({"read": "text", "files": group})
    elif src.kind == "jsonl":
        for f in files:
            if f.suffix in COMPRESSED:  # a compressed stream cannot be entered in the middle
                units.append({"read": "jsonl", "file": str(f), "start": 0, "stop": None})
                continue
            size = f.stat().st_size
            for start in range(0, max(size, 1), unit_bytes):
                units.append({"read": "jsonl", "file": str(f), "start": start, "stop": min(size, start + unit_bytes)})
    elif src.kind == "parquet":
        for f in files:
            meta = _parquet_file(f).metadata
            group, size = [], 0
            for g in range(meta.num_row_groups):
                group.append(g)
                size += meta.row_group(g).total_byte_size
                if size >= unit_bytes:
                    units.append({"read": "parquet", "file": str(f), "row_groups": group})
                    group, size = [], 0
            if group or meta.num_row_groups == 0:
                units.append({"read": "parquet", "file": str(f), "row_groups": group})
    elif src.kind == "hf_dataset":
        units = [{"read": "arrow", "file": str(f)} for f in files]
    else:
        raise ValueError(f"source {src.name!r}: kind {src.kind!r} has no documents to tokenize")
    return units


def unit_documents(src: SourceConfig, unit: dict[str, Any]) -> Iterator[str]:
    """The non-empty documents of one unit, in order (a text unit's files cut to their first
    `chars` characters when it has that key: a sample)."""
    how = unit["read"]
    if how == "all":
        if src.kind == "embedded":
            yield from load_documents(src)
            return
        # A capped file source: the uncapped source's units, read in order up to the cap (so a
        # capped source reads every format exactly as an uncapped one).
        whole = dataclasses.replace(src, max_documents=None)
        docs = (d for u in plan_units(whole) for d in unit_documents(whole, u))
        yield from itertools.islice(docs, src.max_documents)
        return
    if how == "text":
        for f in unit["files"]:
            try:
                with open(f, encoding="utf-8") as fh:
                    doc = fh.read(unit.get("chars", -1))
            except UnicodeDecodeError as e:
                raise SourceFormatError(f"{f}: not valid UTF-8 text ({e})", "kind") from e
            if doc.strip():
                yield doc
        return
    if how == "jsonl":
        yield from _jsonl_range(Path(unit["file"]), unit["start"], unit["stop"], src.text_field)
        return
    if how in ("parquet", "arrow"):
        for text in _column(src, unit):
            if text.strip():
                yield text
        return
    raise ValueError(f"unknown unit kind {how!r}")


def _open_stream(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix in (".zst", ".zstd"):
        try:
            import zstandard
        except ImportError as e:
            raise ValueError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)") from e
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _jsonl_range(path: Path, start: int, stop, text_field: str) -> Iterator[str]:
    """Documents of the lines that start in [start, stop) (all lines when stop is None)."""
    with _open_stream(path) as f:
        lineno = 0
        if start:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()  # the line that started before `start` belongs to the previous unit
            lineno = None  # line numbers in messages are then relative to nothing: use offsets
        while True:
            at = f.tell() if stop is not None else None
            if at is not None and at >= stop:
                return
            raw = f.readline()
            if not raw:
                return
            if lineno is not None:
                lineno += 1
            where = lineno if lineno is not None else f"byte {at}"
            doc = _jsonl_line(raw, path, where, text_field)
            if doc is not None and doc.strip():
                yield doc


def _arrow_files(root: Path) -> list[Path]:
    """The Arrow files of a `datasets` save_to_disk directory, in its own order (state.json)."""
    state = root / "state.json"
    if not state.is_file():
        raise ValueError(f"{root}: not a Hugging Face save_to_disk directory (no state.json)")
    try:
        files = [root / d["filename"] for d in json.loads(state.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{state}: cannot read its _data_files ({e})") from e
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{root}: missing data files {missing}")
    return files


def _parquet_file(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except pa.ArrowInvalid as e:
        raise SourceFormatError(f"{path}: not a parquet file ({e})", "kind") from e


def _column(src: SourceConfig, unit: dict[str, Any]) -> Iterator[str]:
    import pyarrow as pa

    path = Path(unit["file"])
    if unit["read"] == "parquet":
        pf = _parquet_file(path)
        if src.text_field not in pf.schema_arrow.names:
            raise SourceFormatError(f"{path}: no column {src.text_field!r} (columns: {pf.schema_arrow.names}); "
                                    "set text_field to the column holding the text", "text_field")
        batches = (pf.read_row_group(g, columns=[src.text_field]).to_batches() for g in unit["row_groups"])
        batches = (b for bs in batches for b in bs)
    else:
        with pa.memory_map(str(path), "r") as m:
            try:
                table = pa.ipc.open_stream(m).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(m).read_all()
        if src.text_field not in table.column_names:
            raise SourceFormatError(f"{path}: no column {src.text_field!r} (columns: {table.column_names}); "
                                    "set text_field to the column holding the text", "text_field")
        batches = table.select([src.text_field]).to_batches()
    for b in batches:
        col = b.column(0)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            raise SourceFormatError(f"{path}: column {src.text_field!r} is {col.type}, expected strings; "
                                    "set text_field to the column holding the text", "text_field")
        for v in col.to_pylist():
            if v is not None:
                yield v


def sample_documents(src: SourceConfig, max_bytes: int = SAMPLE_BYTES,
                     max_docs: int = SAMPLE_DOCUMENTS) -> list[str]:
    """The first non-empty documents of a file source's first file, read by `unit_documents` as
    prepare reads them, so a file prepare would refuse raises the same ValueError here. Bounded,
    to stay fast on any corpus: about `max_bytes` of a text or JSON-lines file, the first row
    group of a parquet file, the first Arrow file of a dataset, at most `max_docs` documents.
    No document is an error only when that read saw the source's whole input."""
    if src.kind in ("embedded", "tokens"):
        return []  # no file to read / no text to read
    files = input_files(src)
    if not files:
        return []
    f = files[0]
    try:
        if src.kind == "text":
            unit: dict[str, Any] = {"read": "text", "files": [str(f)], "chars": max_bytes}
        elif src.kind == "jsonl":
            unit = {"read": "jsonl", "file": str(f), "start": 0, "stop": max_bytes}
        elif src.kind == "parquet":
            groups = _parquet_file(f).metadata.num_row_groups
            unit = {"read": "parquet", "file": str(f), "row_groups": [0] if groups else []}
        else:
            unit = {"read": "arrow", "file": str(f)}
        docs = list(itertools.islice(unit_documents(src, unit), min(max_docs, src.max_documents or max_docs)))
    except SourceFormatError as e:
        if e.field != "kind":
            raise
        raise SourceFormatError(f"{e}; {_format_hint(f, src.kind)}", "kind") from e
    if not docs and len(files) == 1 and _sample_saw_all(src, f, max_bytes):
        raise SourceFormatError(f"{f}: no non-empty documents (source {src.name!r}); "
                                "prepare would have nothing to tokenize", "paths")
    return docs


def _sample_saw_all(src: SourceConfig, f: Path, max_bytes: int) -> bool:
    """Whether `sample_documents`' read of `f` (that found no document) covered the whole file."""
    if src.kind == "parquet":
        return _parquet_file(f).metadata.num_row_groups <= 1
    if src.kind == "hf_dataset":
        return True
    if src.kind == "jsonl" and f.suffix in COMPRESSED:
        with _open_stream(f) as stream:
            return len(stream.read(max_bytes + 1)) <= max_bytes
    return f.stat().st_size <= max_bytes


# The first bytes of the formats a mislabelled source most often is.
_MAGIC = ((b"PAR1", "it is a parquet file: set kind: parquet"),
          (b"\x1f\x8b", "it is gzip-compressed: kind jsonl reads it when it is named .jsonl.gz"),
          (b"\x28\xb5\x2f\xfd", "it is zstd-compressed: kind jsonl reads it when it is named .jsonl.zst"),
          (b"{", "it looks like JSON lines: set kind: jsonl"))


def _format_hint(f: Path, kind: str) -> str:
    """The fix for a file that does not read as `kind`: its format when its first bytes say."""
    from typing import get_args, get_type_hints

    with open(f, "rb") as fh:
        head = fh.read(4)
    for magic, hint in _MAGIC:
        if head.startswith(magic) and not hint.endswith(f"kind: {kind}"):
            return hint
    kinds = [k for k in get_args(get_type_hints(SourceConfig)["kind"]) if k != "embedded"]
    return f"is it a {kind} file? If not, set kind to its format ({', '.join(kinds)})"
