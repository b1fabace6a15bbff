"""`model: {from: init_from}` takes the shape from config.json; restated fields are checked;
replay may name sources from before the job; the continual example runs end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from jobs.plan import plan_job  # noqa: E402
from jobs.spec import parse_spec  # noqa: E402
from system.configtree import SpecError  # noqa: E402
from tests.hf.families import build  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> Path:
    return build("qwen2_moe", tmp_path_factory.mktemp("from") / "q2")


def _spec(path: Path, model=None, experts=None, **stage):
    return {"model": {"from": "init_from", **(model or {})}, "experts": experts or {},
            "stages": [{"name": "cpt", "kind": "continual", "init_from": str(path), **stage}]}


def test_model_from_init_from_fills_every_field(qwen2):
    plan = plan_job(parse_spec(_spec(qwen2)))
    m, r = plan.stages[0].model, plan.stages[0].experts.router
    assert (m.d_model, m.n_layers, m.num_experts, m.d_expert, m.d_shared) == (48, 3, 8, 32, 64)
    assert m.moe_layers == [0, 2] and m.shared_expert_gate and m.qkv_bias and m.vocab_size == 96
    assert r.normalize_topk is False and r.score == "softmax"


def test_restated_fields_are_checked_field_by_field(qwen2):
    with pytest.raises(SpecError) as ei:
        parse_spec(_spec(qwen2, model={"d_model": 64, "num_experts": 8, "top_k": 4},
                         experts={"router": {"normalize_topk": True}}))
    msg = str(ei.value)
    assert "model.d_model: 64 but" in msg and "hidden_size 48" in msg
    assert "model.top_k: 4" in msg and "num_experts_per_tok 2" in msg
    assert "experts.router.normalize_topk" in msg
    assert "num_experts" not in msg.replace("num_experts_per_tok", "")  # 8 agrees


def test_model_from_needs_a_directory(tmp_path):
    with pytest.raises(SpecError, match="no stage's init_from names a directory"):
        parse_spec({"model": {"from": "init_from"}, "stages": [{"name": "a"}]})
    with pytest.raises(SpecError, match="is not a directory"):
        parse_spec({"model": {"from": str(tmp_path / "nope")}, "stages": [{"name": "a"}]})


def test_a_spec_without_from_is_checked_against_the_hf_checkpoint(qwen2):
    fields = json.loads((qwen2 / "config.json").read_text())
    with pytest.raises(SpecError, match="num_experts"):
        parse_spec({"model": {"d_model": 48, "n_layers": 3, "n_heads": 4, "num_experts": 4},
                    "stages": [{"name": "cpt", "init_from": str(qwen2)}]})
    assert fields["model_type"] == "qwen2_moe"


def test_replay_sources_name_data_from_before_the_job(qwen2):
    spec = _spec(qwen2, data={"sources": [{"name": "python_code"}],
                              "replay": {"fraction": 0.25, "sources": ["english_docs"]}})
    spec["data"] = {"sources": [{"name": "english_docs"}, {"name": "python_code"}]}
    st = plan_job(parse_spec(spec)).stages[0]
    assert st.replay_sources == ("english_docs",) and st.replay_stages == ()
    spec["stages"][0]["data"]["replay"]["sources"] = ["python_code"]
    with pytest.raises(SpecError, match="own training sources"):
        parse_spec(spec)
    spec["stages"][0]["data"]["replay"]["sources"] = ["legal"]
    with pytest.raises(SpecError, match="not a source of this job"):
        parse_spec(spec)


@pytest.mark.slow
def test_continual_hf_example_end_to_end(tmp_path, monkeypatch, shared_ray):
    """examples/continual_hf.yaml (shortened) on a Ray cluster (the session's): continual with
    replay from a named source -> distill -> export both; transformers loads each and generates."""
    import yaml

    from jobs.cli import main
    from system.metrics import read_jsonl

    monkeypatch.chdir(tmp_path)
    from tests.hf.families import tiny as mk

    tok = mk.train_tokenizer(300)
    mk.build_tiny("qwen3_moe", tmp_path / "runs" / "tiny-qwen3-moe", tokenizer=tok, d_model=48, n_layers=2,
                  num_experts=4, d_expert=32)
    spec = yaml.safe_load((ROOT / "examples" / "continual_hf.yaml").read_text())
    for st in spec["stages"]:
        st.update(steps=6, checkpoint_every=6, eval_every=3)
        for s in st["data"]["sources"]:
            s["max_documents"] = 40
    for s in spec["data"]["sources"]:
        s["max_documents"] = 40
    spec["metrics"] = {"progress_bar": False, "ray_metrics": False}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    # as a user runs it: its own process, a driver of the cluster
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), **shared_ray.client_env())
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "run", "spec.yaml", "--address", shared_ray.ensure()],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "continual_hf"
    recs = read_jsonl(run / "metrics.jsonl")
    cont = [r for r in recs if r.get("stage") == "continual" and "data/replay_fraction_total" in r]
    assert cont and 0.1 < cont[-1]["data/replay_fraction_total"] < 0.4
    for stage in ("continual", "distill"):
        out = run / "hf" / stage
        assert main(["export", str(run), "--stage", stage, "--to", str(out)]) == 0
        t = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
        m = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True,
                                                              dtype=torch.float32).eval()
        ids = t("def main(", return_tensors="pt", add_special_tokens=False).input_ids
        gen = m.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        assert gen.shape[1] == ids.shape[1] + 8
