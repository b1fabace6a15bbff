"""`moeforge estimate` (jobs/memory_model.py, jobs/estimate.py): the per-part formulas on a tiny
config against hand-computed numbers (expert sharding 0, 1, 2 included), Mixtral-8x7B's expert
state, `parallel.expert_sharding` read from a spec, the CLI's exit codes and messages, and the
validate warning with its suggestions. No torch model, no ranks, no Ray."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.estimate import EstimateError, parse_device_memory, stage_layout
from jobs.memory_model import (Layout, estimate, expert_grads_held, expert_state, expert_step_buffers,
                               largest_micro_batch, load_factor, routed_activations, sharding_buffers)

REPO = Path(__file__).resolve().parents[2]
MIXTRAL = str(REPO / "examples/models/mixtral_8x7b.yaml")
TINY = Layout(d_model=8, n_layers=2, moe_layers=2, n_heads=2, n_kv_heads=2, head_dim=4, d_ff=16, num_experts=4,
              top_k=2, d_expert=8, vocab=10, micro_batch=3, seq_len=5)


def test_tiny_replicated_fp32_zero0_parts_by_hand():
    # dense: embed 10*8 = 80; per block: qkv 8*(2+4)*4 = 192, proj 8*8 = 64, two norms 16 -> 272, x2;
    # routers 8*4 per MoE layer, x2; final norm 8 -> 80 + 544 + 64 + 8 = 696. Experts (replicated,
    # so DeepSpeed's): 2 layers x 4 experts x 3 x 8 x 8 = 1536. Psi = 2232, fp32 AdamW at ZeRO 0.
    est = estimate(TINY)
    assert est.counts["deepspeed_params"] == 2232
    assert est.parts["dense_weights"] == 4 * 2232
    assert est.parts["dense_grads"] == 4 * 2232
    assert est.parts["dense_optimizer"] == 8 * 2232
    assert est.parts["expert_weights"] == est.parts["expert_optimizer"] == 0
    assert est.parts["comm_buffers"] == 0  # one rank: no all-reduce bucket
    # logits: fp32 (15 tokens x 10) x 4 (logits, log-softmax, its gradient, the logits' gradient) x 4 B
    assert est.parts["logits"] == 4 * 4 * 15 * 10
    # activations, per token per block: attention 4D+4+aD (norm) + aD (qkv input) + a(H+2G)d + a(H+G)d
    # + 2aHd + 4H = 36+32+32+96+64+64+8 = 332; ffn norm 36+32 = 68; router 4D + 12E + 24k = 32+48+48
    # = 128; expert rows k*(aD + 4aFe) = 2*(32+128) = 320 and the combine's k*aD = 64 -> 912;
    # two blocks + final norm and head input (4D+4+2aD = 100) + ids (16) = 1940 per token, 15 tokens
    assert est.parts["activations"] == 1940 * 15
    # the peak: held state (weights, moments) + activations + the larger of logits and dispatch
    held = 4 * 2232 + 8 * 2232
    assert est.total == held + max(1940 * 15 + max(est.parts["logits"], est.parts["dispatch"]),
                                   4 * 2232 + est.parts["dispatch"])


def test_tiny_ep_expert_pool_and_zero2_partition():
    lay = replace(TINY, strategy="ep", ep_size=2, world=4, zero=2)
    est = estimate(lay)
    owned = 2 * 2 * 3 * 8 * 8  # 2 layers x E/P = 2 experts x 192 parameters
    assert est.counts["owned_expert_params"] == owned
    assert (est.parts["expert_weights"], est.parts["expert_grads"], est.parts["expert_optimizer"]) == \
        (4 * owned, 4 * owned, 8 * owned)
    dense = 696
    part = -(-dense // 4)
    assert est.parts["dense_optimizer"] == 12 * part  # fp32 master + two moments of the partition
    assert est.parts["dense_grads"] == 4 * part  # the fp32 gradient partition
    # a whole reduce bucket (DeepSpeed's 5e8 elements, whatever the model's size; fp32 here) and
    # the EDP group of 2 summing one layer's owned gradients in fp32
    assert est.parts["comm_buffers"] == 4 * 500_000_000 + 4 * (owned // 2)
    # ep: the busiest expert at 1 + m = 3x the mean sits with one mean-loaded expert: (1 + 3) / 2
    assert est.counts["load_factor"] == pytest.approx(2.0)
    assert replace(lay, imbalance=1.0) and estimate(replace(lay, imbalance=1.0)).counts["load_factor"] == 1.0


@pytest.mark.parametrize("gpu", [True, False])
def test_expert_sharding_state_by_level(gpu):
    lay = replace(TINY, strategy="ep", ep_size=2, world=8, gpu=gpu)  # EDP = 4
    n = 2 * 2 * 3 * 8 * 8  # 2 layers x E/P = 2 owned experts x 3 x D x F
    shard = 2 * 2 * 3 * (8 * 8 // 4)  # per slot each weight's 64 elements in 4 pieces of 16
    work = 2 * n if gpu else 4 * n  # working weights: bf16 on a GPU, fp32 on CPU; the masters apart
    assert expert_state(lay) == (4 * n, 4 * n, 8 * n)
    # level 1: the whole fp32 gradient, reduce-scattered weight by weight (never more than 4n at once)
    assert expert_state(replace(lay, expert_sharding=1)) == (work + 4 * shard, 4 * n, 8 * shard)
    assert expert_state(replace(lay, expert_sharding=2)) == (work + 4 * shard, 4 * shard, 8 * shard)
    # through the forwards of a step of 2 micro-batches: the pool's .grad (0), the fp32 whole
    # buffer (1), only the shard's sums (2)
    held = [expert_grads_held(replace(lay, expert_sharding=s, grad_accum=2)) for s in (0, 1, 2)]
    assert held == [4 * n, 4 * n, 4 * shard]
    totals = [estimate(replace(lay, expert_sharding=s, grad_accum=2)).total for s in (0, 1, 2)]
    assert totals[2] < totals[0] and not estimate(replace(lay, expert_sharding=2)).notes
    # the reduce-scatter's transients (fp32): the member-major send buffer of 4 members' pieces,
    # gloo's copy of it on CPU, the received pieces; level 1 at the step, one weight of every
    # owned slot at a time; level 2 at each layer's end, that layer's slots, the three weights
    S, c, G = 4, 16, 4
    send = G if gpu else 2 * G
    assert sharding_buffers(replace(lay, expert_sharding=1)) == (0, 4 * S * c * (send + 1))
    k = 2  # owned slots of one layer
    layer_end = 4 * 3 * k * 64 + 4 * 3 * k * c * (send + 1) + (2 if gpu else 4) * k * 64
    assert sharding_buffers(replace(lay, expert_sharding=2)) == (layer_end, 0)
    # the expert step: AdamW's temporary (the pool's: foreach on a GPU, everything it steps;
    # single-tensor on CPU, 3 x one weight; the shards': fused on a GPU, none), sharded the
    # all-gather weight by weight (two weights' gathered pieces: the previous still bound; the
    # master cast on a GPU, gloo's copy on CPU)
    assert expert_step_buffers(lay) == (4 * 3 * S * 64, 0)
    a = 2 if gpu else 4
    assert expert_step_buffers(replace(lay, expert_sharding=2)) == \
        (0 if gpu else 4 * 3 * S * c, a * (2 * S * G * c + (S * c if gpu else S * G * c)))
    # level 1: the first expert gradient allocates the whole fp32 gradient in the backward
    # amid the experts' working set and every activation but that layer's routed rows
    one = estimate(replace(lay, expert_sharding=1))
    routed = int(routed_activations(one.layout, one.layout.top_k * load_factor(one.layout)) * one.layout.tokens)
    assert one.moments["first_expert_grad"] == one.moments["loss"] - max(one.parts["logits"], one.parts["dispatch"]) \
        + one.parts["dispatch"] - routed + 4 * n
    assert estimate(replace(lay, expert_sharding=2)).moments["first_expert_grad"] == 0
    est = estimate(replace(lay, expert_sharding=2))
    held = sum(est.parts[p] for p in ("dense_weights", "dense_optimizer", "expert_weights", "expert_optimizer"))
    assert est.total == held + max(est.moments.values())
    assert est.moments["expert_gather"] == est.parts["dense_grads"] + est.parts["comm_buffers"] - layer_end + \
        est.parts["expert_step"]


def test_expert_sharding_pieces_round_up_and_one_group_is_a_no_op():
    lay = replace(TINY, strategy="fssdp", ep_size=2, world=6, gpu=True, expert_sharding=2)  # EDP = 3
    assert expert_state(lay)[2] == 8 * 2 * 2 * 3 * 22  # ceil(64 / 3) = 22 elements a piece
    alone = replace(lay, world=2)  # P = world: one expert-parallel group, nothing to shard over
    assert alone.sharding == 0 and expert_state(alone) == expert_state(replace(alone, expert_sharding=0))
    assert "no effect" in estimate(alone).notes[0]


def test_spec_expert_sharding_is_read_and_the_flag_overrides_it(tmp_path, capsys):
    from jobs.spec_source import load_job_spec

    spec = load_job_spec(MIXTRAL)  # ships with parallel.expert_sharding: 2 (32 ranks, P = 8: EDP 4)
    lay = stage_layout(spec)
    assert (lay.expert_sharding, lay.sharding, lay.edp) == (2, 2, 4)
    assert estimate(lay).total == estimate(replace(stage_layout(spec, expert_sharding=0), expert_sharding=2)).total
    assert estimate(stage_layout(spec, expert_sharding=0)).total > estimate(lay).total
    assert main(["estimate", MIXTRAL, "--json"]) == 0
    out = capsys.readouterr().out
    assert '"expert_sharding": 2' in out and '"fits": true' in out and "what_if" not in out


def test_largest_micro_batch_is_the_largest_that_fits():
    lay = replace(TINY, micro_batch=1)
    budget = estimate(replace(lay, micro_batch=7)).total
    assert largest_micro_batch(lay, budget) == 7
    assert largest_micro_batch(lay, estimate(lay).total - 1) == 0


def test_mixtral_8x7b_expert_state_at_p8():
    from jobs.spec_source import load_job_spec

    lay = stage_layout(load_job_spec(MIXTRAL), world=16, ep_size=8, expert_sharding=0)
    est = estimate(lay)
    assert est.counts["expert_params_total"] == 32 * 8 * 3 * 4096 * 14336 == 45_097_156_608  # 45.1B
    state = est.parts["expert_weights"] + est.parts["expert_grads"] + est.parts["expert_optimizer"]
    assert state == 16 * 45_097_156_608 // 8 and state / 1e9 == pytest.approx(90.2, abs=0.1)  # ~90 GB
    assert est.parts["expert_optimizer"] / 1e9 == pytest.approx(45.1, abs=0.1)  # the two AdamW moments


def test_device_memory_names_and_sizes():
    assert parse_device_memory("80GB") == 80 * 10 ** 9
    assert parse_device_memory("80GiB") == 80 * 2 ** 30
    assert parse_device_memory("h100") == parse_device_memory("H100") > 79 * 2 ** 30
    with pytest.raises(EstimateError, match="--device-memory"):
        parse_device_memory("eighty")


def test_cli_estimate_fits_json_and_strict(capsys):
    assert main(["estimate", MIXTRAL, "--nodes", "1", "--json"]) == 0  # P = 8 = world: EDP 1, sharding moot
    assert '"fits": false' in capsys.readouterr().out
    assert main(["estimate", MIXTRAL, "--strict", "--expert-sharding", "0"]) == 2
    err = capsys.readouterr().err
    assert "error: memory: the estimate per rank" in err
    assert main(["estimate", MIXTRAL, "--nodes", "1"]) == 0
    assert "expert sharding 2 (no effect: EDP 1)" in capsys.readouterr().out
    assert main(["estimate", MIXTRAL, "--expert-sharding", "3"]) == 2
    assert "--expert-sharding: 3 must be 0, 1 or 2" in capsys.readouterr().err


def test_cli_bad_spec_names_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(MIXTRAL).read_text().replace("top_k: 2", "top_k: 9"))
    assert main(["estimate", str(bad)]) == 2
    assert "model.top_k" in capsys.readouterr().err


def test_validate_warns_on_a_gpu_spec_over_memory_and_strict_refuses(tmp_path, capsys):
    unsharded = tmp_path / "mixtral_s0.yaml"
    unsharded.write_text(Path(MIXTRAL).read_text().replace("expert_sharding: 2", "expert_sharding: 0"))
    assert main(["validate", str(unsharded)]) == 0
    err = capsys.readouterr().err
    # 32 ranks, P = 8: the expert state overflows and EDP is 4; level 1 (the first to fit) is the
    # concrete change
    assert "warning: memory: stage 'continual'" in err and "parallel.expert_sharding: 1 (fits" in err
    assert main(["validate", str(unsharded), "--strict"]) == 2
    assert "error: memory:" in capsys.readouterr().err
    assert main(["validate", MIXTRAL]) == 0  # the shipped spec (sharding 2) fits: no warning
    assert "memory" not in capsys.readouterr().err
    one_group = tmp_path / "mixtral_w8.yaml"  # P = world: EDP 1, nothing to shard over
    one_group.write_text(unsharded.read_text().replace("world_size: 32", "world_size: 8"))
    assert main(["validate", str(one_group)]) == 0
    err = capsys.readouterr().err
    assert "warning: memory:" in err and "expert_sharding" not in err
    assert main(["validate", str(unsharded), "--device-memory", "4TB"]) == 0  # fits: no warning
    assert "memory" not in capsys.readouterr().err
    assert main(["validate", MIXTRAL, "--device-memory", "eighty"]) == 2
    assert "error: --device-memory: 'eighty' is not a size" in capsys.readouterr().err


def test_recommend_finds_a_layout_that_fits_and_says_none_when_nothing_does():
    from jobs.estimate import recommend

    lay = replace(TINY, strategy="ep", ep_size=2, world=4, gpu=True)
    device = 20 * 2 ** 30  # above the 2 GiB reserve and ZeRO 1/2's whole reduce buckets
    rep = recommend(lay, device, gpus_per_node=8)
    assert rep["fits"] and rep["layout"]["micro_batch"] >= 1 and rep["total"] <= device - rep["reserve"]
    assert rep["layout"]["ep_size"] in (1, 2, 4) and rep["layout"]["expert_sharding"] in (0, 1, 2)
    assert recommend(lay, 1, gpus_per_node=8) is None  # a 1-byte device


def test_recommend_shards_the_expert_state_when_it_is_what_overflows():
    from jobs.estimate import recommend
    from jobs.spec_source import load_job_spec

    lay = stage_layout(load_job_spec(MIXTRAL), expert_sharding=0)  # 32 x H100
    device = parse_device_memory("H100")
    rep = recommend(lay, device, gpus_per_node=8)
    assert rep["fits"] and rep["layout"]["expert_sharding"] == 2 and rep["layout"]["ep_size"] == 8
    assert recommend(lay, device, gpus_per_node=8, shardings=(0,)) is None  # 84 GiB of expert state
