"""YAML as people type it, and one error per actual mistake (issue 27, items 3 and 9).

Each case is spec text parsed the way `moeforge validate` parses it (`jobs.spec.parse_spec_text`,
PyYAML then the schema, the cross-field rules and pre-flight).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jobs import plan as P
from jobs.spec import parse_spec_text
from system.configtree import SpecError

ROOT = Path(__file__).resolve().parents[2]


def spec_text(stage: str = "", model: str = "", parallel: str = "", num_experts: str = "4") -> str:
    """A small job spec as a user writes it; `stage`, `model` and `parallel` are extra YAML
    lines of the first stage, the model section and the parallel section."""
    return textwrap.dedent("""\
        run: {name: tiny, output_dir: runs}
        model:
          d_model: 32
          n_layers: 2
          n_heads: 2
          d_ff: 64
          num_experts: %s
          top_k: 2
          d_expert: 32
        %s
        parallel:
          world_size: 1
        %s
        data:
          seq_len: 32
          sources:
          - {name: english_docs, max_documents: 30}
        stages:
        - name: pretrain
          steps: 4
          micro_batch_size: 4
        %s
        """) % (num_experts, _indent(model, 2), _indent(parallel, 2), _indent(stage, 2))


def _indent(lines: str, n: int) -> str:
    return textwrap.indent(textwrap.dedent(lines), " " * n)


def problems(text: str) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as ei:
        parse_spec_text(text)
    return ei.value.problems


# ---------------------------------------------------------------- item 3: numbers as typed

def test_exponent_numbers_are_floats_in_float_fields():
    spec = parse_spec_text(spec_text(stage="""\
        optimizer: {lr: 3e-4, weight_decay: 1e-1, eps: 1E-8, betas: [9e-1, 9.5e-1]}
        grad_clip: 1e0
        """))
    opt = spec.stages[0].optimizer
    assert (opt.lr, opt.weight_decay, opt.eps, opt.betas) == (3e-4, 0.1, 1e-8, [0.9, 0.95])
    assert all(type(v) is float for v in (opt.lr, opt.weight_decay, opt.eps, *opt.betas))
    assert spec.stages[0].grad_clip == 1.0


def test_signs_and_dots_as_yaml_1_2_allows_them():
    spec = parse_spec_text(spec_text(model="""\
        rope_theta: 2.5e3
        init_std: +2E-2
        norm_eps: 1.e-5
        """))
    assert (spec.model.rope_theta, spec.model.init_std, spec.model.norm_eps) == (2500.0, 0.02, 1e-5)


def test_a_string_field_keeps_what_was_typed():
    spec = parse_spec_text(spec_text().replace("name: pretrain", "name: 1e5")
                           .replace("{name: tiny, output_dir: runs}", "{name: 3e-4, output_dir: 1E8}"))
    assert spec.stages[0].name == "1e5"
    assert (spec.run.name, spec.run.output_dir) == ("3e-4", "1E8")


def test_an_int_field_takes_an_integral_exponent_and_refuses_a_fraction():
    spec = parse_spec_text(spec_text(stage="checkpoint_every: 1e3").replace("steps: 4", "steps: 1e5"))
    assert spec.stages[0].steps == 100000 and type(spec.stages[0].steps) is int
    assert spec.stages[0].checkpoint_every == 1000
    assert problems(spec_text().replace("steps: 4", "steps: 2.5e0")) == [
        ("stages[0].steps", "'2.5e0' is not an integer")]


def test_something_that_is_not_a_number_is_still_refused():
    assert problems(spec_text(stage="optimizer: {lr: 3e-4x}")) == [
        ("stages[0].optimizer.lr", "'3e-4x' is not a number")]


def test_stage_overrides_take_numbers_where_they_land_in_a_typed_field():
    # world_size 2e0 must count as 2 for the batch-size rule, as it does when the stage runs.
    spec = parse_spec_text(spec_text(stage="""\
        global_batch_size: 8
        parallel: {world_size: 2e0}
        model: {rope_theta: 1e6}
        """))
    assert spec.stages[0].parallel == {"world_size": 2}
    assert P.stage_world_size(spec, 0) == 2
    assert P.stage_model(spec, 0).rope_theta == 1e6


# ---------------------------------------------------------------- item 9: one error per mistake

def test_a_non_integral_num_experts_is_one_error():
    assert [p for p, _ in problems(spec_text(num_experts="4.5"))] == [
        "model.num_experts"]


def test_a_non_integral_num_experts_is_one_error_with_expert_parallel_ranks():
    text = spec_text(num_experts="4.5", parallel="expert_strategy: ep")
    assert problems(text.replace("world_size: 1", "world_size: 2")) == [
        ("model.num_experts", "4.5 is not an integer")]


def test_a_misspelled_stage_key_is_one_error_naming_it():
    # The default micro_batch_size (8) that took its place would not match global_batch_size.
    text = spec_text(stage="global_batch_size: 4").replace("micro_batch_size: 4", "micro_batchsize: 4")
    assert problems(text) == [("stages[0].micro_batchsize", "unknown key (did you mean 'micro_batch_size'?)")]


def test_a_bad_stage_override_is_one_error():
    text = spec_text(stage="""\
        global_batch_size: 8
        parallel: {world_size: two}
        """)
    assert problems(text) == [("stages[0].parallel.world_size", "'two' is not an integer")]


def test_a_stage_without_a_name_is_one_error():
    # stages[1] starts from the stage whose name is missing: not "not a stage of this job".
    text = spec_text().replace("- name: pretrain\n  steps", "- steps") + "- {name: second, init_from: pretrain}\n"
    assert problems(text) == [("stages[0].name", "required key is missing")]


def test_a_nested_section_is_checked_once():
    assert problems(spec_text(parallel="fssdp: {window: 0}")) == [("parallel.fssdp.window", "0 must be >= 1")]


def test_independent_mistakes_are_each_reported():
    text = spec_text(num_experts="4.5", stage="optimizer: {lr: -3e-4}")
    assert [p for p, _ in problems(text)] == ["model.num_experts", "stages[0].optimizer.lr"]


@pytest.mark.procs  # runs `moeforge validate` in a subprocess
def test_moeforge_validate_prints_one_error_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(spec_text(num_experts="4.5"))
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "validate", str(path)], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    assert lines[0].endswith(f"{path}: model.num_experts: 4.5 is not an integer"), out.stderr
