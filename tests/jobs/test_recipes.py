"""Routing recipes run from the spec: EvoMoE (one expert -> diversified experts + DTS gate),
sparse upcycling from a dense stage and from a Hugging Face Llama directory, single-domain
micro-batches with global-batch LBL, and the per-layer routing metrics they log."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from parallel.testing import run_distributed
from tests.helpers import tiny_spec

pytestmark = pytest.mark.slow

STAGE = {"micro_batch_size": 4, "checkpoint_every": 100, "optimizer": {"lr": 1e-2},
         "lr_schedule": {"kind": "constant"}}


def _run_all(rank: int, world: int, spec: dict) -> list[dict]:
    from jobs.stage_runner import run_stage
    from system.metrics import read_jsonl

    for i in range(len(spec["stages"])):
        run_stage(spec, i)
    return read_jsonl(Path(spec["run"]["output_dir"]) / spec["run"]["name"] / "metrics.jsonl")


def _final(spec: dict, stage: str) -> tuple[dict, dict]:
    from system.checkpoint import latest_checkpoint, load_module_weights, read_manifest

    ck = latest_checkpoint(Path(spec["run"]["output_dir"]) / spec["run"]["name"] / "stages" / stage / "checkpoints")
    return load_module_weights(ck), read_manifest(ck)


def test_evomoe_recipe_single_expert_then_diversify_and_dts(tmp_path):
    dts = {"t_max": 2.0, "t_min": 0.5, "decay_steps": 6, "schedule": "linear", "threshold": 0.05,
           "hard_at_step": 6}
    spec = tiny_spec(tmp_path, run={"name": "evo"},
                     model={"num_experts": 4, "top_k": 1},
                     experts={"router": {"kind": "dts", "dts": dts}},
                     stages=[{"name": "one_expert", **STAGE, "steps": 6,
                              "model": {"num_experts": 1}, "experts": {"router": {"kind": "topk"}}},
                             {"name": "evolve", **STAGE, "steps": 8, "init_from": "one_expert",
                              "upcycle": {"diversify": "mask", "fraction": 0.5}, "eval_every": 8}])
    recs = run_distributed(_run_all, 1, spec)[0]
    one = [r for r in recs if r["stage"] == "one_expert"]
    evo = [r for r in recs if r["stage"] == "evolve" and r["step"] > 0]  # step 0: the starting evaluation
    assert len(one) == 6 and len(evo) == 8
    assert one[0]["moe/0/tokens_per_expert"] == [4 * 32]  # every token on the single expert
    # The DTS gate: temperature anneals 2.0 -> 0.5 over 6 steps, then hard top-1.
    temps = [r["moe/0/temperature"] for r in evo]
    assert temps[0] == pytest.approx(2.0) and temps[5] == pytest.approx(0.75) and temps[6] == pytest.approx(0.5)
    assert [r["moe/0/dts_hard"] for r in evo] == [0.0] * 6 + [1.0] * 2
    active = [r["moe/0/active_per_token"] for r in evo]
    assert active[0] > 2.0  # dense start: most of the 4 experts per token
    assert active[-1] == pytest.approx(1.0)  # hard top-1
    assert all(r["moe/0/dead_experts"] == 0 for r in evo[:3])  # no token dropped in the dense phase
    # Spawned experts: expert 0 an exact copy of the single expert, the others half re-initialised.
    w1, _ = _final(spec, "one_expert")
    _, manifest = _final(spec, "evolve")
    rep = manifest["init_report"]
    assert rep["upcycled_layers"] and set(rep["upcycled_layers"].values()) == {"moe_1_expert"}
    from system.upcycle import UpcycleConfig, init_model_from  # noqa: F401  (report came from it)
    w2, _ = _final(spec, "evolve")
    assert w2["blocks.0.ffn.experts.w1"].shape[0] == 4 and w1["blocks.0.ffn.experts.w1"].shape[0] == 1
    assert "eval/moe/0/mutual_information" in evo[-1]


def test_dense_stage_upcycles_into_moe_with_identical_function(tmp_path):
    """Copy-upcycling a dense stage (top-2, normalised weights) starts from the dense model's loss."""
    spec = tiny_spec(tmp_path, run={"name": "up"},
                     model={"num_experts": 4, "top_k": 2, "d_expert": 64, "d_ff": 64},
                     stages=[{"name": "dense", **STAGE, "steps": 20, "model": {"moe_layers": "none"},
                              "eval_every": 20},
                             {"name": "moe", **STAGE, "steps": 1, "init_from": "dense", "eval_every": 1,
                              "optimizer": {"lr": 1e-9}}])
    recs = run_distributed(_run_all, 1, spec)[0]
    dense_eval = [r for r in recs if r["stage"] == "dense"][-1]
    moe_eval = [r for r in recs if r["stage"] == "moe"][-1]
    for d in ("english_docs", "python_code"):
        assert moe_eval[f"eval/{d}/loss"] == pytest.approx(dense_eval[f"eval/{d}/loss"], rel=1e-4)
    _, manifest = _final(spec, "moe")
    assert set(manifest["init_report"]["upcycled_layers"].values()) == {"dense"}


def test_hf_llama_directory_upcycles_into_a_stage(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=48, vocab_size=257,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    model = {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "d_expert": 48, "d_ff": 48,
             "vocab_size": 257, "tie_embeddings": False, "rope_theta": float(cfg.rope_parameters["rope_theta"])
             if getattr(cfg, "rope_parameters", None) else 10000.0, "norm_eps": cfg.rms_norm_eps,
             "num_experts": 4, "top_k": 2}
    spec = tiny_spec(tmp_path, run={"name": "hf"}, model=model,
                     stages=[{"name": "upcycled", **STAGE, "steps": 2, "init_from": str(tmp_path / "llama"),
                              "upcycle": {"diversify": "noise", "noise_std": 0.01}}])
    from jobs.spec import parse_spec
    parse_spec(spec)  # validates against the HF config
    recs = run_distributed(_run_all, 1, spec)[0]
    assert len(recs) == 2
    _, manifest = _final(spec, "upcycled")
    assert manifest["init_report"]["kind"] == "huggingface"
    assert len(manifest["init_report"]["upcycled_layers"]) == 2


def test_single_domain_microbatches_with_global_lbl_and_aux_free(tmp_path):
    spec = tiny_spec(tmp_path, run={"name": "gl"},
                     data={"microbatch_domains": "single"},
                     experts={"balancing": {"lbl": "global_batch", "global_accumulation": "running",
                                            "aux_free": True, "bias_update_rate": 0.01},
                              "router": {"score": "sigmoid"}},
                     stages=[{"name": "s", **STAGE, "steps": 4, "grad_accum_steps": 2, "eval_every": 4}])
    recs = run_distributed(_run_all, 1, spec)[0]
    r = recs[-1]
    for key in ("frac_global", "frac_micro", "maxvio_global", "maxvio_micro", "dead_experts", "entropy",
                "load_entropy", "active_per_token", "bias_spread", "tokens_per_expert"):
        assert f"moe/0/{key}" in r, key
    assert r["moe/0/bias_spread"] > 0
    assert sum(r["moe/0/frac_global"]) == pytest.approx(1.0)
    assert "eval/moe/1/normalized_mi" in r and "eval/moe/0/top_share/python_code" in r
    consumed = json.loads((Path(spec["run"]["output_dir"]) / "gl" / "stages" / "s" / "consumed.json").read_text())
    assert consumed["sampler"]["group_size"] == 4


def _lbl_of_stage(rank: int, world: int, spec: dict) -> float:
    from jobs.stage_runner import run_stage

    return run_stage(spec, 0)["lbl"]


def test_dts_gate_with_exact_global_counts_replays_the_noise(tmp_path):
    """The exact mode's routing pre-pass must draw the same Gumbel noise as the training pass
    (the RNG is replayed); `finish_step` raises if the two passes counted differently."""
    spec = tiny_spec(tmp_path, run={"name": "dtsx"},
                     experts={"router": {"kind": "dts", "dts": {"decay_steps": 10, "threshold": 0.05}},
                              "balancing": {"lbl": "global_batch", "global_accumulation": "exact"}},
                     stages=[{"name": "s", **STAGE, "steps": 3, "micro_batch_size": 2, "grad_accum_steps": 2}])
    lbls = run_distributed(_lbl_of_stage, 2, spec)
    assert lbls[0] == lbls[1] and lbls[0] > 0
