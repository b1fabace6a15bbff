"""`moeforge validate` reads a sample of each data source with prepare's own reader (issue 27,
item 7): a wrong kind or text_field, non-string values or an empty file is a spec error (exit 2,
the field and the file named) instead of a traceback once `moeforge run` has started.

The CLI runs twice (one spec holding every failing case, one holding a valid source of each
kind); the other cases call `parse_spec` / `sample_documents` directly.
"""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.spec import parse_spec
from system.configtree import SpecError
from system.data.config import SourceConfig
from system.data.units import plan_units, sample_documents, unit_documents
from tests.helpers import tiny_spec, write_spec

ROOT = Path(__file__).resolve().parents[2]
DOCS = [f"document {i}: " + "words " * (i % 7 + 1) for i in range(40)]


def _jsonl(path: Path, key: str = "text", opener=open, docs=DOCS) -> str:
    with opener(path, "wt") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({key: d, "id": i}) + "\n")
    return str(path)


def _parquet(path: Path, column: str = "text", values=DOCS) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: values}), path, row_group_size=16)
    return str(path)


def _spec(tmp_path: Path, sources: list[dict]) -> dict:
    spec = tiny_spec(tmp_path)
    spec["data"]["sources"] = sources
    return spec


def _cli_validate(tmp_path: Path, sources: list[dict]) -> subprocess.CompletedProcess:
    path = write_spec(tmp_path / "spec.yaml", _spec(tmp_path, sources))
    return subprocess.run([sys.executable, "-m", "jobs.cli", "validate", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def _problems(data: dict, **kw) -> dict[str, str]:
    with pytest.raises(SpecError) as ei:
        parse_spec(data, **kw)
    return dict(ei.value.problems)


@pytest.mark.procs  # runs `moeforge validate` in a subprocess
def test_cli_reports_every_unreadable_source_at_once(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.jsonl").write_bytes(b"")
    sources = [  # name, kind, file, text_field -> (field, fix) expected
        {"name": "j", "kind": "jsonl", "paths": [_jsonl(bad / "a.jsonl", "body")]},
        {"name": "gz", "kind": "jsonl", "paths": [_jsonl(bad / "b.jsonl.gz", "body", gzip.open)]},
        {"name": "pq", "kind": "parquet", "paths": [_parquet(bad / "c.parquet", "body")]},
        {"name": "pq_as_jsonl", "kind": "jsonl", "paths": [_parquet(bad / "d.parquet")]},
        {"name": "jsonl_as_pq", "kind": "parquet", "paths": [_jsonl(bad / "e.jsonl")]},
        {"name": "empty", "kind": "jsonl", "paths": [str(bad / "empty.jsonl")]},
    ]
    want = [("text_field", "a.jsonl:1", "fields: ['body', 'id']); set text_field"),
            ("text_field", "b.jsonl.gz:1", "fields: ['body', 'id']); set text_field"),
            ("text_field", "c.parquet", "columns: ['body']); set text_field"),
            ("kind", "d.parquet", "it is a parquet file: set kind: parquet"),
            ("kind", "e.jsonl", "not a parquet file"),
            ("paths[0]", "empty.jsonl", "no non-empty documents")]
    out = _cli_validate(tmp_path, sources)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    # one line per mistake, each naming the spec, the field, the file and the fix
    assert all(line.startswith(f"error: {tmp_path / 'spec.yaml'}: ") for line in lines), out.stderr
    problems = [line.split(": ", 2)[2] for line in lines]
    assert len(problems) == len(want), out.stderr
    for j, (problem, (field, file, fix)) in enumerate(zip(problems, want)):
        assert problem.startswith(f"data.sources[{j}].{field}: {bad}/{file}"), problem
        assert fix in problem, problem
    assert "set kind: jsonl" in problems[4]  # the fix names the format the file is in


@pytest.mark.procs  # runs `moeforge validate` in a subprocess
def test_cli_passes_a_valid_source_of_each_kind(tmp_path):
    import datasets
    import zstandard

    (tmp_path / "txt").mkdir()
    for i, d in enumerate(DOCS[:5]):
        (tmp_path / "txt" / f"{i}.txt").write_text(d)
    with zstandard.ZstdCompressor().stream_writer(open(tmp_path / "d.jsonl.zst", "wb")) as w:
        w.write("".join(json.dumps({"body": d}) + "\n" for d in DOCS).encode())
    datasets.Dataset.from_dict({"content": DOCS}).save_to_disk(str(tmp_path / "hf"), num_shards=2)
    sources = [{"name": "txt", "kind": "text", "paths": [str(tmp_path / "txt")]},
               {"name": "j", "kind": "jsonl", "paths": [_jsonl(tmp_path / "d.jsonl")]},
               {"name": "gz", "kind": "jsonl", "paths": [_jsonl(tmp_path / "d.jsonl.gz", opener=gzip.open)]},
               {"name": "zst", "kind": "jsonl", "paths": [str(tmp_path / "d.jsonl.zst")], "text_field": "body"},
               {"name": "pq", "kind": "parquet", "paths": [_parquet(tmp_path / "d.parquet")]},
               {"name": "hf", "kind": "hf_dataset", "paths": [str(tmp_path / "hf")], "text_field": "content"},
               {"name": "english_docs", "max_documents": 5}]
    out = _cli_validate(tmp_path, sources)
    assert out.returncode == 0, out.stderr
    assert ": ok (" in out.stdout


def test_values_that_are_not_strings(tmp_path):
    (tmp_path / "n.jsonl").write_text('{"text": "fine"}\n{"text": 5}\n')
    spec = _spec(tmp_path, [{"name": "j", "kind": "jsonl", "paths": [str(tmp_path / "n.jsonl")]},
                            {"name": "p", "kind": "parquet", "paths": [_parquet(tmp_path / "n.parquet",
                                                                                values=[1, 2, 3])]}])
    probs = _problems(spec)
    assert list(probs) == ["data.sources[0].text_field", "data.sources[1].text_field"]
    assert "n.jsonl:2: field 'text' is int, expected a string" in probs["data.sources[0].text_field"]
    assert "n.parquet: column 'text' is int64, expected strings" in probs["data.sources[1].text_field"]


def test_text_and_compressed_sources_that_do_not_read(tmp_path):
    (tmp_path / "garbage.jsonl.zst").write_bytes(b"not zstd at all" * 4)
    spec = _spec(tmp_path, [{"name": "t", "kind": "text", "paths": [_parquet(tmp_path / "p.parquet")]},
                            {"name": "z", "kind": "jsonl", "paths": [str(tmp_path / "garbage.jsonl.zst")]}])
    probs = _problems(spec)
    assert list(probs) == ["data.sources[0].kind", "data.sources[1].paths[0]"]
    assert "not valid UTF-8 text" in probs["data.sources[0].kind"]
    assert "set kind: parquet" in probs["data.sources[0].kind"]
    assert "garbage.jsonl.zst" in probs["data.sources[1].paths[0]"] and "cannot be read as jsonl" in \
        probs["data.sources[1].paths[0]"]


def test_a_stage_override_source_is_sampled_too(tmp_path):
    spec = _spec(tmp_path, [{"name": "english_docs", "max_documents": 5}])
    spec["stages"][0]["data"] = {"sources": [{"name": "j", "kind": "jsonl",
                                              "paths": [_jsonl(tmp_path / "a.jsonl", "body")]}]}
    assert list(_problems(spec)) == ["stages[0].data.sources[0].text_field"]


def test_the_sample_is_bounded_and_an_empty_first_file_is_not_the_source(tmp_path):
    # A bad record past the sample is prepare's to find: validate reads a bounded prefix.
    path = tmp_path / "big.jsonl"
    _jsonl(path, docs=DOCS * 2000)  # about 2.6 MB
    with open(path, "a") as f:
        f.write('{"body": "late"}\n')
    src = SourceConfig(name="j", kind="jsonl", paths=[str(path)])
    assert sample_documents(src) == DOCS + DOCS[:24]  # SAMPLE_DOCUMENTS
    assert sample_documents(src, max_bytes=200, max_docs=1000) == DOCS[:5]  # the lines starting in 200 bytes
    assert sample_documents(SourceConfig(name="j", kind="jsonl", paths=[str(path)], max_documents=3)) == DOCS[:3]
    # No document in the first file is only an error when that file is the whole source.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "0.jsonl").write_text("\n")
    _jsonl(tmp_path / "d" / "1.jsonl")
    assert sample_documents(SourceConfig(name="d", kind="jsonl", paths=[str(tmp_path / "d")])) == []
    with gzip.open(tmp_path / "e.jsonl.gz", "wt") as f:
        f.write('{"text": "  "}\n')
    with pytest.raises(ValueError, match="e.jsonl.gz: no non-empty documents"):
        sample_documents(SourceConfig(name="e", kind="jsonl", paths=[str(tmp_path / "e.jsonl.gz")]))


def test_a_worker_reparsing_the_spec_reads_no_sample(tmp_path, monkeypatch):
    import system.data.units as units

    calls = []
    monkeypatch.setattr(units, "sample_documents", lambda src, *a, **k: calls.append(src.name) or [])
    spec = _spec(tmp_path, [{"name": "j", "kind": "jsonl", "paths": [_jsonl(tmp_path / "a.jsonl", "body")]}])
    parse_spec(spec, preflight=False)
    assert calls == []
    parse_spec(spec)
    assert calls == ["j"]


def test_a_tokenizer_directory_that_does_not_load(tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    spec = _spec(tmp_path, [{"name": "english_docs", "max_documents": 5}])
    spec["data"]["tokenizer"] = {"kind": "hf", "path": str(tmp_path / "tok")}
    probs = _problems(spec)
    assert list(probs) == ["data.tokenizer.path"]
    assert str(tmp_path / "tok") in probs["data.tokenizer.path"] and "save_pretrained" in probs["data.tokenizer.path"]


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_capped_source_reads_every_format_as_prepare_does(tmp_path, kind):
    """max_documents: prepare reads the uncapped source's units up to the cap (a capped .jsonl.gz
    or parquet source was read as plain JSON lines before, and failed)."""
    path = _jsonl(tmp_path / "d.jsonl.gz", opener=gzip.open) if kind == "jsonl" else _parquet(tmp_path / "d.pq")
    src = SourceConfig(name="c", kind=kind, paths=[path], max_documents=20)
    (unit,) = plan_units(src)
    assert list(unit_documents(src, unit)) == DOCS[:20]
    # The sample: up to the cap, of a parquet file its first row group (16 rows).
    assert sample_documents(src, max_docs=100) == DOCS[:16 if kind == "parquet" else 20]
