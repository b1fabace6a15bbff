"""A source cut into work units for `moeforge prepare`, and each unit's documents.

A unit is a plain dict (it travels to Ray tasks): the source's kind and the part of its input
it covers (a byte range of a JSON-lines file, a list of text files, row groups of a parquet file,
one Arrow file of a Hugging Face `save_to_disk` directory, a range of embedded documents). Units
are listed in a deterministic order, and their documents, read unit after unit, are the source's
documents in the order `system.data.corpus.load_documents` gives them.
"""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any, Iterator

from system.data.config import SourceConfig
from system.data.corpus import _expand, _jsonl_line, embedded_files, load_documents

UNIT_BYTES = 64 << 20  # input bytes per unit (about 64 MiB of text)
COMPRESSED = (".gz", ".zst", ".zstd")


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
        import pyarrow.parquet as pq

        for f in files:
            meta = pq.ParquetFile(f).metadata
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
    """The non-empty documents of one unit, in order."""
    how = unit["read"]
    if how == "all":
        yield from load_documents(src)
        return
    if how == "text":
        for f in unit["files"]:
            try:
                doc = Path(f).read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{f}: not valid UTF-8 text ({e})") from e
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


def _column(src: SourceConfig, unit: dict[str, Any]) -> Iterator[str]:
    import pyarrow as pa

    path = Path(unit["file"])
    if unit["read"] == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if src.text_field not in pf.schema_arrow.names:
            raise ValueError(f"{path}: no column {src.text_field!r} (columns: {pf.schema_arrow.names}; "
                             "set text_field)")
        batches = (pf.read_row_group(g, columns=[src.text_field]).to_batches() for g in unit["row_groups"])
        batches = (b for bs in batches for b in bs)
    else:
        with pa.memory_map(str(path), "r") as m:
            try:
                table = pa.ipc.open_stream(m).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(m).read_all()
        if src.text_field not in table.column_names:
            raise ValueError(f"{path}: no column {src.text_field!r} (columns: {table.column_names}; set text_field)")
        batches = table.select([src.text_field]).to_batches()
    for b in batches:
        col = b.column(0)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            raise ValueError(f"{path}: column {src.text_field!r} is {col.type}, expected strings")
        for v in col.to_pylist():
            if v is not None:
                yield v

