"""The job spec's JSON Schema (`moeforge schema`): generated from the parser's typed sections,
committed as docs/moeforge.schema.json, referenced by every example, validating every example
with `jsonschema`, and rejecting what the parser rejects structurally (wrong types, unknown keys,
values outside an enum)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from jobs.cli import main, spec_schema
from jobs.spec import parse_spec
from system.configtree import SpecError
from tests.helpers import tiny_spec

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "docs" / "moeforge.schema.json"
JOB_EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.yaml") if p.name != "simulate.yaml")


@pytest.fixture(scope="module")
def validator():
    schema = spec_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_committed_schema_is_current():
    assert json.loads(SCHEMA_FILE.read_text()) == spec_schema(), (
        "docs/moeforge.schema.json is stale: run `python -m jobs.cli schema --out docs/moeforge.schema.json`")


def test_moeforge_schema_prints_it(capsys):
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == spec_schema()


@pytest.mark.parametrize("example", JOB_EXAMPLES, ids=lambda p: p.name)
def test_every_example_names_and_passes_the_schema(validator, example):
    first = example.read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=../docs/moeforge.schema.json"
    assert (example.parent / "../docs/moeforge.schema.json").resolve() == SCHEMA_FILE
    errors = sorted(validator.iter_errors(yaml.safe_load(example.read_text())), key=str)
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]


def test_fields_carry_their_types_defaults_and_descriptions():
    s = spec_schema()
    stage = s["$defs"]["StageSection"]["properties"]
    assert stage["max_bad_steps"]["type"] == "integer" and stage["max_bad_steps"]["default"] == 3
    assert "non-finite" in stage["max_bad_steps"]["description"] or "NaN" in stage["max_bad_steps"]["description"]
    assert stage["kind"]["enum"] == ["pretrain", "continual", "distill"]
    assert s["$defs"]["StageSection"]["required"] == ["name"]
    fssdp = s["$defs"]["FSSDPSection"]
    assert fssdp["properties"]["overlap_budget"] == {
        "anyOf": [{"type": "integer"}, {"type": "null"}], "default": None,
        "description": "t: experts a rank may gather per layer; null: derived"}
    assert fssdp["description"].startswith("The FSSDP planner")
    assert s["properties"]["stages"]["items"] == {"$ref": "#/$defs/StageSection"}


def _bad(spec: dict, path: list, value) -> dict:
    s = copy.deepcopy(spec)
    node = s
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return s


CASES = [
    (["stages", 0, "steps"], "ten"),  # wrong type
    (["model", "d_model"], 32.5),  # a number where an integer is required
    (["parallel", "expert_strategy"], "sharded"),  # not in the enum
    (["model", "d_modle"], 32),  # unknown key
    (["run", "seed"], True),  # a boolean is not an integer
    (["stages", 0, "lr_schedule"], "cosine"),  # a string where a section is required
]


@pytest.mark.parametrize("path,value", CASES, ids=lambda x: str(x))
def test_the_schema_rejects_what_the_parser_rejects(validator, tmp_path, path, value):
    good = tiny_spec(tmp_path)
    assert not list(validator.iter_errors(good))
    bad = _bad(good, path, value)
    assert list(validator.iter_errors(bad)), f"the schema accepted {path} = {value!r}"
    with pytest.raises(SpecError):
        parse_spec(bad, preflight=False)
