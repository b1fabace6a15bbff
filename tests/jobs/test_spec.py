"""Tests of the typed job spec: every class of bad input names its dotted path; `moeforge validate`."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from jobs.cli import EXIT_SPEC, main
from system.configtree import SpecError
from jobs.plan import plan_job
from jobs.validate import check_job
from jobs.schema import JobSpec, ParallelSection, StageSection
from jobs.spec import dump_spec, load_spec, parse_spec, parse_spec_text, with_absolute_paths
from system.model import ModelConfig

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
# Job specs; examples/simulate.yaml configures `moeforge simulate` (tests/parallel/test_simulate.py).
EXAMPLES = sorted(p for ext in ("*.yaml", "*.yml") for p in (ROOT / "examples").rglob(ext)
                  if p.name != "simulate.yaml")

BASE = {"stages": [{"name": "pretrain"}]}


def _spec(**sections) -> dict:
    """A minimal valid spec with some top-level sections replaced."""
    d = copy.deepcopy(BASE)
    d.update(copy.deepcopy(sections))
    return d


def _problems(data) -> dict[str, str]:
    """Parse `data`, which must fail; return {dotted path: message}."""
    with pytest.raises(SpecError) as ei:
        parse_spec(data)
    probs = ei.value.problems
    assert probs, "SpecError without problems"
    out = dict(probs)
    # Every problem is also in the exception's text, path first.
    for path, msg in probs:
        assert (f"{path}: {msg}" if path else msg) in str(ei.value)
    return out


def _only(data, path: str) -> str:
    """Parse `data`; exactly one problem is expected, at `path`. Returns its message."""
    probs = _problems(data)
    assert list(probs) == [path], probs
    return probs[path]


# ---------------------------------------------------------------- valid specs

def test_minimal_spec_parses_with_defaults():
    spec = parse_spec(BASE)
    assert isinstance(spec, JobSpec)
    assert [s.name for s in spec.stages] == ["pretrain"]
    assert spec.parallel.world_size == 1
    assert spec.stages[0].optimizer.lr == 1e-3
    assert isinstance(spec.stages[0].optimizer.lr, float)


def test_int_is_accepted_for_float_field_and_converted():
    spec = parse_spec(_spec(stages=[{"name": "a", "optimizer": {"lr": 1}}]))
    assert spec.stages[0].optimizer.lr == 1.0
    assert isinstance(spec.stages[0].optimizer.lr, float)


def test_quickstart_loads():
    spec = load_spec(QUICKSTART)
    assert spec.run.name == "quickstart"
    assert spec.parallel.world_size == 2
    assert [s.name for s in spec.stages] == ["pretrain"]
    assert spec.stages[0].global_batch_size == 16


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates(path, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)  # examples name data files relative to the repository root
    text = path.read_text()
    if "runs/tiny-qwen3-moe" in text:  # the model scripts/make_tiny_hf_moe.py builds first
        from tests.hf.families import tiny

        model = tiny.build_tiny("qwen3_moe", tmp_path / "tiny", tokenizer=tiny.train_tokenizer(300))
        text = text.replace("runs/tiny-qwen3-moe", str(model))
    spec = parse_spec_text(text, str(path))
    assert spec.stages


def test_examples_exist():
    assert QUICKSTART in EXAMPLES


def _roundtrip_specs():
    yield load_spec(QUICKSTART)
    yield parse_spec({
        "run": {"name": "rt", "seed": 7},
        "model": {"moe_layers": [0, 2], "vocab_size": 300, "tie_embeddings": False},
        "experts": {"balancing": {"lbl": "none", "lbl_coeff": 0.5}},
        "data": {"sources": [{"name": "legal", "weight": 2}, {"name": "c", "domain": "c_headers"}]},
        "stages": [{"name": "a", "lr_schedule": {"kind": "wsd", "warmup_steps": 3}},
                   {"name": "b", "init_from": "a", "world_size": 2, "micro_batch_size": 2,
                    "global_batch_size": 4, "data": {"sources": [{"name": "python_code"}]}}],
        "deepspeed": {"zero_optimization": {"reduce_bucket_size": 1000}},
        "ray": {"scaling_config": {"resources_per_worker": {"CPU": 2, "memory": 1e9}}},
    })


@pytest.mark.parametrize("spec", list(_roundtrip_specs()), ids=["quickstart", "custom"])
def test_round_trip(spec):
    again = parse_spec(spec.to_dict())
    assert again == spec
    assert again.to_dict() == spec.to_dict()
    # and through YAML text
    assert parse_spec(yaml.safe_load(dump_spec(spec))) == spec


# ---------------------------------------------------------------- unknown keys and types

def test_unknown_nested_key():
    msg = _only(_spec(model={"nope": 1}), "model.nope")
    assert "unknown key" in msg
    assert "d_model" in msg  # lists the known keys


def test_unknown_key_near_miss_suggestion():
    msg = _only(_spec(model={"dModel": 64}), "model.dModel")
    assert "did you mean 'd_model'" in msg


def test_unknown_key_in_stage_names_index():
    msg = _only({"stages": [{"name": "a"}, {"name": "b", "micro_batchsize": 2}]},
                "stages[1].micro_batchsize")
    assert "did you mean 'micro_batch_size'" in msg


def test_unknown_top_level_key():
    msg = _only(_spec(modle={}), "modle")
    assert "unknown key" in msg


def test_wrong_type_string_for_int():
    msg = _only(_spec(model={"d_model": "x"}), "model.d_model")
    assert "'x'" in msg and "integer" in msg


def test_wrong_type_bool_is_not_an_int():
    msg = _only(_spec(model={"n_layers": True}), "model.n_layers")
    assert "True" in msg and "integer" in msg


def test_wrong_type_section_not_a_mapping():
    msg = _only(_spec(parallel=[1, 2]), "parallel")
    assert "[1, 2]" in msg and "mapping" in msg


def test_wrong_type_union_field():
    msg = _only(_spec(model={"moe_layers": 3}), "model.moe_layers")
    assert "3" in msg


def test_top_level_must_be_mapping():
    with pytest.raises(SpecError) as ei:
        parse_spec([1, 2])
    assert ei.value.problems[0][0] == ""
    assert "mapping" in ei.value.problems[0][1]


def test_missing_required_stage_name():
    msg = _only({"stages": [{"steps": 3}]}, "stages[0].name")
    assert "required" in msg


def test_several_problems_are_all_reported():
    probs = _problems(_spec(model={"d_model": "x"}, data={"seq_len": "y"},
                            stages=[{"name": "a", "steps": "z"}]))
    assert {"model.d_model", "data.seq_len", "stages[0].steps"} <= set(probs)


# ---------------------------------------------------------------- out of range / literals

def test_negative_learning_rate():
    msg = _only({"stages": [{"name": "a", "optimizer": {"lr": -1}}]}, "stages[0].optimizer.lr")
    assert "-1" in msg


def test_learning_rate_in_second_stage():
    msg = _only({"stages": [{"name": "a"}, {"name": "b", "optimizer": {"lr": 0}}]},
                "stages[1].optimizer.lr")
    assert "0" in msg


@pytest.mark.parametrize("frac", [0.7, 0.0, -0.1, 0.5])
def test_holdout_fraction_out_of_range(frac):
    msg = _only(_spec(data={"holdout_fraction": frac}), "data.holdout_fraction")
    assert str(float(frac)) in msg


def test_schedule_min_lr_ratio_out_of_range():
    msg = _only({"stages": [{"name": "a", "lr_schedule": {"min_lr_ratio": 1.5}}]},
                "stages[0].lr_schedule.min_lr_ratio")
    assert "1.5" in msg


def test_model_heads_not_dividing_d_model():
    msg = _only(_spec(model={"d_model": 30, "n_heads": 4}), "model.n_heads")
    assert "30" in msg


def test_top_k_exceeds_num_experts():
    msg = _only(_spec(model={"num_experts": 2, "top_k": 3}), "model.top_k")
    assert "3" in msg


def test_literal_not_allowed():
    msg = _only(_spec(parallel={"zero_stage": 3}), "parallel.zero_stage")
    assert "3" in msg and "[0, 1, 2]" in msg


def test_literal_string_not_allowed():
    msg = _only(_spec(model={}, data={"tokenizer": {"kind": "sentencepiece"}}), "data.tokenizer.kind")
    assert "'sentencepiece'" in msg


def test_distill_stage_needs_a_teacher():
    msg = _only({"stages": [{"name": "a", "kind": "distill"}]}, "stages[0].distill.teacher")
    assert "needs a teacher" in msg


def test_nccl_needs_gpu():
    _only(_spec(parallel={"backend": "nccl"}), "parallel.backend")


# ---------------------------------------------------------------- cross-field consistency

def test_inconsistent_global_batch_size():
    data = {"parallel": {"world_size": 2},
            "stages": [{"name": "a", "micro_batch_size": 2, "global_batch_size": 4},
                       {"name": "b", "micro_batch_size": 4, "grad_accum_steps": 3, "global_batch_size": 20}]}
    msg = _only(data, "stages[1].global_batch_size")
    assert "20" in msg
    assert "= 24" in msg  # 4 x 3 x 2


def test_global_batch_size_uses_stage_world_size():
    ok = {"parallel": {"world_size": 2},
          "stages": [{"name": "a", "world_size": 3, "micro_batch_size": 2, "global_batch_size": 6}]}
    assert plan_job(parse_spec(ok)).stages[0].world_size == 3
    bad = copy.deepcopy(ok)
    bad["stages"][0]["global_batch_size"] = 4
    msg = _only(bad, "stages[0].global_batch_size")
    assert "= 6" in msg


def test_expert_parallel_size_must_be_1_when_replicated():
    msg = _only(_spec(parallel={"world_size": 4, "expert_parallel_size": 2}), "parallel.expert_parallel_size")
    assert "replicated" in msg


def test_expert_parallel_size_not_dividing_world_size():
    probs = _problems(_spec(parallel={"world_size": 3, "expert_parallel_size": 2}))
    assert list(probs) == ["parallel.expert_parallel_size"]
    with pytest.raises(SpecError) as ei:
        parse_spec(_spec(parallel={"world_size": 3, "expert_parallel_size": 2}))
    msgs = [m for p, m in ei.value.problems if p == "parallel.expert_parallel_size"]
    assert any("does not divide world_size=3" in m for m in msgs)


def test_expert_parallel_size_below_one():
    with pytest.raises(SpecError) as ei:
        parse_spec(_spec(parallel={"expert_parallel_size": 0}))
    assert {p for p, _ in ei.value.problems} == {"parallel.expert_parallel_size"}
    assert any("0 must be >= 1" in m for _, m in ei.value.problems)


def test_jobspec_check_num_experts_and_stage_world_size_divisibility():
    # jobs.validate.check_job's own divisibility rules are exercised directly (ParallelSection.check would
    # reject expert_parallel_size > 1 with 'replicated' first).
    spec = JobSpec(model=ModelConfig(num_experts=6),
                   parallel=ParallelSection(world_size=4, expert_strategy="ep"),
                   stages=[StageSection(name="a", world_size=4)])
    probs = dict(check_job(spec))
    assert "model.num_experts" in probs
    assert "6" in probs["model.num_experts"] and "4 expert-parallel ranks" in probs["model.num_experts"]
    assert "stages[0].world_size" not in probs
    spec = JobSpec(model=ModelConfig(num_experts=6),
                   parallel=ParallelSection(world_size=4, expert_strategy="deepspeed_moe", expert_parallel_size=4),
                   stages=[StageSection(name="a", world_size=6)])
    probs = dict(check_job(spec))
    assert "expert_parallel_size=4" in probs["stages[0].world_size"]


def test_init_from_unknown_stage(tmp_path):
    missing = str(tmp_path / "no_such_stage")
    msg = _only({"stages": [{"name": "a", "init_from": missing}]}, "stages[0].init_from")
    assert repr(missing) in msg


def test_init_from_later_stage():
    msg = _only({"stages": [{"name": "a", "init_from": "b"}, {"name": "b"}]}, "stages[0].init_from")
    assert "'b'" in msg and "later" in msg


def test_init_from_itself():
    _only({"stages": [{"name": "a"}, {"name": "b", "init_from": "b"}]}, "stages[1].init_from")


def test_init_from_earlier_stage_or_directory_is_fine(tmp_path):
    spec = parse_spec({"stages": [{"name": "a"}, {"name": "b", "init_from": "a"},
                                  {"name": "c", "init_from": str(tmp_path)}]})
    assert [s.init_from for s in spec.stages] == [None, "a", str(tmp_path)]


def test_duplicate_stage_names():
    msg = _only({"stages": [{"name": "a"}, {"name": "b"}, {"name": "a"}]}, "stages[2].name")
    assert "'a'" in msg and "stages[0]" in msg


@pytest.mark.parametrize("kind", ["text", "jsonl"])
def test_missing_data_file(tmp_path, kind):
    present = tmp_path / f"present.{kind}"
    present.write_text('{"text": "hi"}\n')
    missing = tmp_path / f"missing.{kind}"
    data = _spec(data={"sources": [{"name": "mine", "kind": kind, "paths": [str(missing), str(present)]}]})
    msg = _only(data, "data.sources[0].paths[0]")
    assert str(missing) in msg
    # with the file present it validates
    data["data"]["sources"][0]["paths"] = [str(present)]
    assert parse_spec(data).data.sources[0].paths == [str(present)]


def test_missing_data_file_in_stage_override(tmp_path):
    missing = str(tmp_path / "gone.txt")
    data = {"stages": [{"name": "a"},
                       {"name": "b", "data": {"sources": [{"name": "x", "kind": "text", "paths": [missing]}]}}]}
    msg = _only(data, "stages[1].data.sources[0].paths[0]")
    assert missing in msg


def test_text_source_needs_paths():
    _only(_spec(data={"sources": [{"name": "mine", "kind": "text"}]}), "data.sources[0].paths")


def test_unknown_embedded_domain():
    msg = _only(_spec(data={"sources": [{"name": "legal"}, {"name": "poetry"}]}), "data.sources[1].name")
    assert "'poetry'" in msg


@pytest.mark.parametrize("data", [{}, {"stages": []}], ids=["absent", "empty"])
def test_missing_stages(data):
    msg = _only(data, "stages")
    assert "at least one stage" in msg


@pytest.mark.parametrize("key,owner", [("train_batch_size", "global_batch_size"),
                                       ("gradient_accumulation_steps", "grad_accum_steps"),
                                       ("optimizer", "optimizer")])
def test_deepspeed_owned_key(key, owner):
    msg = _only(_spec(deepspeed={key: 8}), f"deepspeed.{key}")
    assert owner in msg


def test_deepspeed_zero_stage_owned():
    msg = _only(_spec(deepspeed={"zero_optimization": {"stage": 2}}), "deepspeed.zero_optimization.stage")
    assert "parallel.zero_stage" in msg


def test_deepspeed_other_keys_pass_through():
    spec = parse_spec(_spec(deepspeed={"zero_optimization": {"reduce_bucket_size": 1000}, "steps_per_print": 5}))
    assert spec.deepspeed == {"zero_optimization": {"reduce_bucket_size": 1000}, "steps_per_print": 5}


def test_ray_num_workers_mismatch():
    msg = _only(_spec(parallel={"world_size": 2}, ray={"scaling_config": {"num_workers": 4}}),
                "ray.scaling_config.num_workers")
    assert "4" in msg and "world_size=2" in msg
    # matching is fine
    parse_spec(_spec(parallel={"world_size": 2}, ray={"scaling_config": {"num_workers": 2}}))


def test_ray_use_gpu_mismatch():
    _only(_spec(ray={"scaling_config": {"use_gpu": True}}), "ray.scaling_config.use_gpu")


def test_ray_negative_resources():
    msg = _only(_spec(ray={"scaling_config": {"resources_per_worker": {"CPU": -1}}}),
                "ray.scaling_config.resources_per_worker.CPU")
    assert "-1" in msg


# ---------------------------------------------------------------- files

def test_load_spec_yaml_syntax_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("stages:\n  - name: [unclosed\n")
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    assert ei.value.problems[0][0] == ""
    assert "YAML syntax error" in ei.value.problems[0][1]
    assert str(p) in str(ei.value)


def test_load_spec_missing_file(tmp_path):
    p = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    assert "does not exist" in ei.value.problems[0][1]
    assert str(p) in ei.value.problems[0][1]


def test_load_spec_reports_dotted_path(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("stages:\n  - name: a\n    optimizer:\n      lr: -1\n")
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    assert [path for path, _ in ei.value.problems] == ["stages[0].optimizer.lr"]


# ---------------------------------------------------------------- the CLI

def test_cli_validate_broken_spec_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # anything written relative to the cwd would land here
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({
        "run": {"name": "broken", "output_dir": "out"},
        "stages": [{"name": "a", "optimizer": {"lr": -1}}],
    }))
    rc = main(["validate", str(spec_file)])
    captured = capsys.readouterr()
    assert rc == EXIT_SPEC == 2
    assert "stages[0].optimizer.lr" in captured.err
    assert "-1" in captured.err
    assert captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]
    assert not (tmp_path / "out").exists()


def test_cli_validate_yaml_error(tmp_path, capsys):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("run: {name: x\n")
    assert main(["validate", str(spec_file)]) == 2
    assert "YAML syntax error" in capsys.readouterr().err


def test_cli_validate_missing_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_validate_quickstart(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["validate", str(QUICKSTART)])
    captured = capsys.readouterr()
    assert rc == 0
    assert "ok" in captured.out and "pretrain" in captured.out
    assert captured.err == ""
    assert list(tmp_path.iterdir()) == []  # validate writes nothing, not even the run dir


def test_cli_validate_spec_from_environment(monkeypatch, capsys):
    monkeypatch.setenv("MOEFORGE_TEST_SPEC", yaml.safe_dump({"stages": [{"name": "a", "steps": 0}]}))
    assert main(["validate", "env:MOEFORGE_TEST_SPEC"]) == 2
    assert "stages[0].steps" in capsys.readouterr().err
    monkeypatch.setenv("MOEFORGE_TEST_SPEC", yaml.safe_dump({"stages": [{"name": "a"}]}))
    assert main(["validate", "env:MOEFORGE_TEST_SPEC"]) == 0
    monkeypatch.delenv("MOEFORGE_TEST_SPEC")
    assert main(["validate", "env:MOEFORGE_TEST_SPEC"]) == 2
    assert "MOEFORGE_TEST_SPEC is not set" in capsys.readouterr().err


def test_with_absolute_paths(tmp_path):
    data_file = tmp_path / "d.txt"
    data_file.write_text("hello")
    spec = parse_spec({"run": {"output_dir": "out"},
                       "data": {"sources": [{"name": "t", "kind": "text", "paths": [str(data_file)]}]},
                       "stages": [{"name": "a"}, {"name": "b", "init_from": "a"}]})
    fixed = with_absolute_paths(spec, tmp_path / "base")
    assert fixed.run.output_dir == str(tmp_path / "base" / "out")
    assert fixed.data.sources[0].paths == [str(data_file)]  # already absolute
    assert fixed.stages[1].init_from == "a"  # a stage name, not a path
    assert spec.run.output_dir == "out"  # the original is untouched


# ---------------------------------------------------------------- routing and recipes

def test_stage_overrides_merge_into_model_and_experts():
    spec = parse_spec(_spec(
        model={"num_experts": 8, "top_k": 1},
        experts={"router": {"kind": "dts", "dts": {"decay_steps": 50}}},
        stages=[{"name": "one", "model": {"num_experts": 1}, "experts": {"router": {"kind": "topk"}}},
                {"name": "evo", "init_from": "one", "upcycle": {"diversify": "mask", "fraction": 0.25}}]))
    one, evo = plan_job(spec).stages
    assert one.model.num_experts == 1 and evo.model.num_experts == 8
    assert one.experts.router.kind == "topk"
    assert evo.experts.router.kind == "dts" and evo.experts.router.dts.decay_steps == 50
    assert one.model.top_k == 1  # untouched fields come from the top level
    assert evo.init.kind == "stage" and evo.init.ref == "one" and evo.upcycle.diversify == "mask"
    assert spec.stages[1].upcycle.fraction == 0.25


def test_stage_override_errors_name_the_stage_field():
    assert "not an integer" in _only(_spec(stages=[{"name": "a", "model": {"num_experts": "many"}}]),
                                     "stages[0].model.num_experts")
    assert "unknown key" in _only(_spec(stages=[{"name": "a", "experts": {"router": {"kinds": "dts"}}}]),
                                  "stages[0].experts.router.kinds")
    # a cross-field problem the override creates: top_k 2 (top level) > 1 expert
    assert "exceeds num_experts=1" in _only(_spec(stages=[{"name": "a", "model": {"num_experts": 1}}]),
                                            "stages[0].model.top_k")


def test_routing_fields_are_validated():
    probs = _problems(_spec(experts={"router": {"kind": "dts", "score": "sigmoid",
                                                "dts": {"t_min": 3.0, "t_max": 2.0, "hard_top_k": 9}},
                                     "balancing": {"lbl": "global", "bias_update_rate": -1}}))
    assert "must be in (0, t_max=2.0]" in probs["experts.router.dts.t_min"]
    assert "softmax" in probs["experts.router.score"]
    assert "not one of" in probs["experts.balancing.lbl"]
    assert "must be in [0, 1]" in probs["experts.balancing.bias_update_rate"]
    assert "exceeds model.num_experts" in probs["experts.router.dts.hard_top_k"]
    assert "not one of" in _only(_spec(experts={"backend": "fast"}), "experts.backend")
    assert "must be in [0, 1]" in _only(_spec(stages=[{"name": "a", "upcycle": {"fraction": 1.5}}]),
                                        "stages[0].upcycle.fraction")


def test_full_state_init_across_an_expert_count_change_is_rejected():
    msg = _only(_spec(stages=[{"name": "one", "model": {"num_experts": 1, "top_k": 1}},
                              {"name": "many", "init_from": "one", "init_weights_only": False}]),
                "stages[1].init_weights_only")
    assert "optimizer state" in msg and "1 -> 8" in msg


def test_init_from_stage_with_other_width_is_rejected():
    assert "differs from stage 'a'" in _only(
        _spec(stages=[{"name": "a", "model": {"d_model": 64}}, {"name": "b", "init_from": "a"}]),
        "stages[1].model.d_model")


def test_hf_init_from_mismatch_names_the_field(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, intermediate_size=48, vocab_size=300)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    with pytest.raises(SpecError) as ei:
        parse_spec(_spec(model={"d_model": 64, "n_layers": 2, "n_heads": 2, "vocab_size": 300, "d_expert": 48},
                         stages=[{"name": "a", "init_from": str(tmp_path / "llama")}]))
    msgs = [m for p, m in ei.value.problems if p == "stages[0].init_from"]
    assert any("model.d_model: 64" in m and "hidden_size 32" in m for m in msgs), msgs
    assert any("tie_embeddings" in m for m in msgs), msgs


@pytest.mark.parametrize("strategy", ["ep", "fssdp"])
def test_sharded_strategies_expert_parallel_size(strategy):
    spec = parse_spec(_spec(parallel={"world_size": 2, "expert_strategy": strategy}))
    assert plan_job(spec).stages[0].ep_size == 2  # default: one group of every rank
    spec = parse_spec(_spec(parallel={"world_size": 4, "expert_strategy": strategy, "expert_parallel_size": 2}))
    assert plan_job(spec).stages[0].ep_size == 2  # EP x DP: two groups of 2
    msg = _only(_spec(parallel={"world_size": 6, "expert_strategy": strategy, "expert_parallel_size": 4}),
                "parallel.expert_parallel_size")
    assert "does not divide world_size=6" in msg


def test_fssdp_section_fields_named():
    probs = _problems(_spec(parallel={"expert_strategy": "fssdp",
                                      "fssdp": {"window": 0, "memory_cap": -1, "link_gbps": 0}}))
    assert {"parallel.fssdp.window", "parallel.fssdp.memory_cap", "parallel.fssdp.link_gbps"} <= set(probs)
    with pytest.raises(SpecError) as ei:
        parse_spec(_spec(parallel={"fssdp": {"windw": 3}}))
    assert any("windw" in p or "windw" in m for p, m in ei.value.problems)


# ---------------------------------------------------------------- pipelines (issue 5)

def _stages(*stages) -> dict:
    return {"stages": list(stages)}


def test_replay_must_name_an_earlier_stage():
    later = _stages({"name": "a"}, {"name": "b", "data": {"replay": {"fraction": 0.1, "stages": ["c"]}}},
                    {"name": "c"})
    assert "later stage" in _only(later, "stages[1].data.replay.stages[0]")
    unknown = _stages({"name": "a"}, {"name": "b", "data": {"replay": {"fraction": 0.1, "stages": ["zz"]}}})
    assert "not a stage of this job" in _only(unknown, "stages[1].data.replay.stages[0]")
    first = _stages({"name": "a", "data": {"replay": {"fraction": 0.1}}})
    assert "first stage" in _only(first, "stages[0].data.replay")
    assert "[0, 1)" in _only(_stages({"name": "a"}, {"name": "b", "data": {"replay": {"fraction": 1.0}}}),
                             "stages[1].data.replay.fraction")
    ok = parse_spec(_stages({"name": "a"}, {"name": "b", "data": {"replay": {"fraction": 0.25}}}))
    a, b = plan_job(ok).stages
    assert b.replay_stages == ("a",) and a.replay_stages == () and b.replay_fraction == 0.25


def test_distill_teacher_must_exist_and_come_earlier():
    assert "later stage" in _only(_stages({"name": "s", "kind": "distill", "distill": {"teacher": "t"}},
                                          {"name": "t"}), "stages[0].distill.teacher")
    assert "neither an earlier stage" in _only(
        _stages({"name": "s", "kind": "distill", "distill": {"teacher": "/nonexistent/dir"}}),
        "stages[0].distill.teacher")
    assert "only used by kind 'distill'" in _only(_stages({"name": "s", "distill": {"teacher": "x"}}),
                                                 "stages[0].distill.teacher")
    assert "set top_k" in _only(_stages({"name": "t"}, {"name": "s", "kind": "distill",
                                                        "distill": {"teacher": "t", "mode": "offline"}}),
                                "stages[1].distill.top_k")
    parse_spec(_stages({"name": "t"}, {"name": "s", "kind": "distill", "model": {"d_model": 32},
                                       "distill": {"teacher": "t", "divergence": "jsd", "beta": 0.9}}))


def test_student_vocabulary_must_match_the_teacher():
    msg = _only(_stages({"name": "t"}, {"name": "s", "kind": "distill", "model": {"vocab_size": 300},
                                        "distill": {"teacher": "t"}}), "stages[1].model.vocab_size")
    assert "300" in msg and "257" in msg


def test_student_vocabulary_checked_against_an_hf_teacher(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 1000, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "hidden_act": "silu"}))
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    msg = _only(_stages({"name": "s", "kind": "distill", "distill": {"teacher": str(tmp_path / "hf")}}),
                "stages[0].model.vocab_size")
    assert "1000" in msg and "257" in msg


def test_stage_parallel_override_and_eval_domains():
    spec = parse_spec({"parallel": {"world_size": 2},
                       "stages": [{"name": "a"}, {"name": "b", "parallel": {"expert_strategy": "ep"},
                                                  "world_size": 4}]})
    a, b = plan_job(spec).stages
    assert a.parallel.expert_strategy == "replicated"
    assert b.parallel.expert_strategy == "ep" and b.parallel.world_size == 4
    assert b.ep_size == 4 and b.world_size == 4 and b.global_batch_size == 4 * b.micro_batch_size
    assert "zero_stage" in " ".join(_problems(_stages({"name": "a", "parallel": {"zero_stage": 5}})))
    assert "not a data source" in _only(_stages({"name": "a", "eval_domains": ["klingon"]}),
                                        "stages[0].eval_domains[0]")


def test_a_source_name_means_one_corpus_across_stages():
    data = {"sources": [{"name": "english_docs", "max_documents": 30}]}
    bad = {"data": data, "stages": [{"name": "a"}, {"name": "b", "data": {"sources": [
        {"name": "english_docs", "max_documents": 60, "weight": 2.0}]}}]}
    msg = _only(bad, "stages[1].data.sources[0]")
    assert "max_documents: 60 vs 30" in msg
    ok = {"data": data, "stages": [{"name": "a"}, {"name": "b", "data": {"sources": [
        {"name": "english_docs", "max_documents": 30, "weight": 2.0}, {"name": "python_code"}]}}]}
    spec = parse_spec(ok)
    plan = plan_job(spec)
    assert [s.name for s in plan.corpus.sources] == ["english_docs", "python_code"]
    assert plan.stages[0].eval_domains == ("english_docs", "python_code")
    assert plan.stages[1].new_domains == ("english_docs", "python_code")
