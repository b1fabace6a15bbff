"""The cluster simulator (`moeforge simulate`): cost model, policies, traces, config errors, CLI."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jobs.cli import EXIT_SPEC, main
from parallel import placement
from parallel import simulator as sim
from system.model_config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]

# small and fast: 8 GPUs in 2 nodes of 4, 16 experts, 2 MoE layers
SMALL = {
    "cluster": {"gpus": 8, "gpus_per_node": 4},
    "model": {"num_experts": 16, "n_layers": 2, "d_model": 512, "d_expert": 1024},
    "load": {"tokens_per_gpu": 2048, "seed": 3},
    "sim": {"iterations": 12},
}


def _cfg(**over):
    """SMALL with dotted overrides, e.g. _cfg(**{"load.zipf_s": 1.5})."""
    return sim.config_from_dict(SMALL, over)


def _run(**over) -> dict:
    return sim.simulate(_cfg(**over))["policies"]


# --------------------------------------------------------------------------------------------
# policies
# --------------------------------------------------------------------------------------------
def test_uniform_loads_fssdp_is_ep():
    # 2048 tokens x top-2 = 4096 pairs per GPU = 256 per expert exactly: no copies, no straggler
    r = _run(**{"load.kind": "uniform", "sim.policies": ["ep", "fssdp", "fssdp_remat"]})
    assert r["fssdp"]["copies_per_layer"] == 0
    assert r["fssdp"]["time_ms"] == pytest.approx(r["ep"]["time_ms"], rel=1e-12)
    assert r["fssdp_remat"]["time_ms"] == pytest.approx(r["ep"]["time_ms"], rel=1e-12)
    for p in r.values():
        assert p["straggler"] == pytest.approx(1.0)
        assert p["comm_total_ms"] == 0.0
    assert r["fssdp"]["memory_gib"] == pytest.approx(r["ep"]["memory_gib"])


@pytest.mark.parametrize("spag", ["p2p", "broadcast"])
def test_zipf_skew_fssdp_beats_ep(spag):
    r = _run(**{"load.zipf_s": 1.5, "fssdp.spag": spag})
    ep, fs = r["ep"], r["fssdp"]
    assert ep["straggler"] > 2.0  # the skew is real
    assert fs["straggler"] < ep["straggler"]
    assert fs["time_ms"] < ep["time_ms"]
    assert fs["speedup_vs_ep"] > 1.2
    assert fs["a2a_ms"] < ep["a2a_ms"]  # local copies keep tokens home
    assert fs["copies_per_layer"] > 0
    # the end-to-end speedup is diluted by the (unchanged) attention time
    assert 1.0 < fs["e2e_speedup_vs_ep"] < fs["speedup_vs_ep"]


def test_remat_saves_memory_and_is_not_faster():
    r = _run(**{"load.zipf_s": 1.5, "sim.policies": ["ep", "fssdp", "fssdp_remat"]})
    fs, rm, ep = r["fssdp"], r["fssdp_remat"], r["ep"]
    assert rm["memory_gib"] < fs["memory_gib"]
    assert ep["memory_gib"] <= rm["memory_gib"]
    assert rm["time_ms"] >= fs["time_ms"]
    assert rm["comm_total_ms"] > fs["comm_total_ms"]  # the second spAG
    assert rm["straggler"] == pytest.approx(fs["straggler"])  # same plan, same tokens


def test_zero3_moves_more_bytes_than_fssdp():
    r = _run(**{"load.zipf_s": 1.5})
    z, fs = r["zero3"], r["fssdp"]
    assert z["gb_moved_per_gpu"] > fs["gb_moved_per_gpu"]
    assert z["a2a_ms"] == 0.0 and z["straggler"] == pytest.approx(1.0)  # tokens stay local
    assert z["comm_total_ms"] > fs["comm_total_ms"]


def test_fastermoe_shadows_the_hot_expert_and_uses_assign_tokens():
    cfg = _cfg(**{"load.zipf_s": 1.5, "load.drift": 0.0})
    s = sim.Simulator(cfg)
    counts = s.gen.next()[0]  # (N, E) of layer 0
    own = placement.Ownership.even(2, 16, 8)
    holders = s.fastermoe_holders(counts, own.owner_LE[0])
    hot = int(np.argmax(counts.sum(0)))
    assert sorted(holders[hot]) == list(range(8))  # broadcast to every GPU
    # the greedy search's token formula is what placement.assign_tokens does for such a plan
    send = placement.assign_tokens(counts, holders, 4)
    tok = sim.token_matrix(send)
    shadow = [e for e, h in enumerate(holders) if len(h) > 1]
    expect = np.zeros((8, 8), dtype=np.int64)
    for e in range(16):
        if e in shadow:
            expect[np.arange(8), np.arange(8)] += counts[:, e]
        else:
            expect[:, own.owner_LE[0, e]] += counts[:, e]
    np.testing.assert_array_equal(tok, expect)


def test_simulator_plans_with_the_training_planner(monkeypatch):
    calls = {"plan": 0, "assign": 0}
    real_plan, real_assign = placement.plan_iteration, placement.assign

    def plan(*a, **k):
        calls["plan"] += 1
        return real_plan(*a, **k)

    def assign(*a, **k):
        calls["assign"] += 1
        return real_assign(*a, **k)

    monkeypatch.setattr(placement, "plan_iteration", plan)
    monkeypatch.setattr(placement, "assign", assign)
    _run(**{"load.zipf_s": 1.5, "sim.iterations": 4, "sim.policies": ["fssdp"]})
    assert calls["plan"] == 4 and calls["assign"] == 4 * 2  # every iteration, every layer


def test_heterogeneous_sharding_runs_and_is_charged():
    r = sim.simulate(_cfg(**{"load.zipf_s": 1.2, "fssdp.reshard_every": 5, "sim.iterations": 11,
                             "sim.policies": ["ep", "fssdp"]}))
    assert r["derived"]["ownership_moves"] > 0
    assert r["policies"]["fssdp"]["reshard_ms"] > 0
    assert r["policies"]["ep"]["reshard_ms"] == 0


def test_more_gpus_than_experts_uses_expert_groups():
    cfg = sim.config_from_dict(SMALL, {"cluster.gpus": 32, "cluster.gpus_per_node": 8, "load.zipf_s": 1.0,
                                       "sim.iterations": 4})
    r = sim.simulate(cfg)
    assert r["derived"]["expert_group"] == 16 and r["derived"]["replicas"] == 2
    p = r["policies"]
    # EP holds one expert per layer per GPU; ZeRO-3 shards over all 32
    P = r["derived"]["expert_params"]
    assert p["ep"]["memory_gib"] == pytest.approx(2 * P * 16 / 2**30)
    assert p["ep"]["comm_total_ms"] > 0  # the replicas' gradient all-reduce


# --------------------------------------------------------------------------------------------
# network model
# --------------------------------------------------------------------------------------------
def test_expert_parallel_groups_keep_tokens_inside_the_group():
    # 8 GPUs as 2 groups of 4 (one per node): every group holds all 16 experts, 4 per GPU
    one = sim.simulate(_cfg(**{"load.zipf_s": 1.2}))
    two = sim.simulate(_cfg(**{"load.zipf_s": 1.2, "cluster.expert_parallel_size": 4}))
    assert one["derived"]["expert_parallel_size"] == 8 and one["derived"]["replicas"] == 1
    assert two["derived"]["expert_parallel_size"] == 4 and two["derived"]["replicas"] == 2
    P = two["derived"]["expert_params"]
    assert two["policies"]["ep"]["memory_gib"] == pytest.approx(2 * 4 * P * 16 / 2**30)  # 2 layers x 4 experts
    assert two["policies"]["ep"]["memory_gib"] == pytest.approx(2 * one["policies"]["ep"]["memory_gib"])
    # groups of one node: the all-to-all never crosses nodes, so it is cheaper than over both nodes...
    assert two["policies"]["ep"]["a2a_ms"] < one["policies"]["ep"]["a2a_ms"]
    # ...and the groups all-reduce their expert gradients once per iteration
    assert one["derived"]["replica_allreduce_ms"] == 0 < two["derived"]["replica_allreduce_ms"]


def test_training_dtype_sets_the_bytes_on_the_wire():
    bf = sim.simulate(_cfg(**{"load.zipf_s": 1.5}))
    fp = sim.simulate(_cfg(**{"load.zipf_s": 1.5, "cost_model.dtype": "fp32"}))
    assert bf["derived"]["param_bytes"] == 2 and fp["derived"]["param_bytes"] == 4
    assert fp["derived"]["expert_mib"] == pytest.approx(2 * bf["derived"]["expert_mib"])
    ep_bf, ep_fp = bf["policies"]["ep"], fp["policies"]["ep"]
    assert ep_fp["gb_moved_per_gpu"] == pytest.approx(2 * ep_bf["gb_moved_per_gpu"])  # the all-to-all's tokens
    assert ep_fp["a2a_ms"] > ep_bf["a2a_ms"]
    # fp32 experts take twice as long to copy: the overlap budget t (copies hidden by the attention) shrinks
    assert fp["derived"]["t"] <= bf["derived"]["t"]
    per_copy = [r["policies"]["fssdp"]["gb_moved_per_gpu"] / max(r["policies"]["fssdp"]["copies_per_layer"], 1)
                for r in (bf, fp)]
    assert per_copy[1] > per_copy[0]


def test_chain_schedule_sits_between_the_ideal_broadcast_and_p2p():
    over = {"cluster.gpus": 16, "cluster.gpus_per_node": 8, "load.zipf_s": 1.5, "sim.policies": ["fssdp"],
            "sim.iterations": 6}
    t = {m: sim.simulate(_cfg(**over, **{"fssdp.spag": m})) for m in ("chain", "broadcast", "p2p")}
    comm = {m: r["policies"]["fssdp"]["comm_total_ms"] for m, r in t.items()}
    assert comm["broadcast"] < comm["chain"] < comm["p2p"]
    assert t["chain"]["derived"]["spag_rounds_per_layer"] > 1  # the chains' rounds, as training runs them
    # the same plan whatever the schedule: same copies, same all-to-all and compute
    assert len({r["policies"]["fssdp"]["copies_per_layer"] for r in t.values()}) == 1
    assert len({r["policies"]["fssdp"]["a2a_ms"] for r in t.values()}) == 1


def test_all_to_all_cost_by_link_class():
    c = sim.ClusterConfig(gpus=8, gpus_per_node=4, nvlink_bandwidth=100.0, internode_bandwidth=10.0,
                          nvlink_alpha=1.0, internode_alpha=2.0)
    net = sim.Network(c, 8)
    tok = np.zeros((8, 8))
    tok[0, 1] = 50  # intra-node
    tok[0, 5] = 30  # inter-node
    tok[2, 5] = 10
    # alpha: 3 intra + 4 inter peers; busiest rank 0: 50/100 + 30/10 (rank 5 receives 40/10 = 4)
    assert net.all_to_all(tok, 1.0) == pytest.approx(3 * 1.0 + 4 * 2.0 + max(0.5 + 3.0, 4.0))


def test_chain_broadcast_and_p2p_costs():
    hs = [3] + [r for r in range(16) if r != 3]
    hops = sim.copy_hops(hs, 5, 8, "chain")  # training's chain (parallel.copy_schedule)
    assert len(hops) == 15 and sorted(d for _, d in hops) == sorted(hs[1:])
    assert hops[0][0] == 3
    assert sum((s // 8) != (d // 8) for s, d in hops) == 1  # one hop into the other node
    c = sim.ClusterConfig(gpus=16)
    net = sim.Network(c, 16)
    Bp, Mp = sim.copy_traffic([hs], 16, 8, 1e8, "p2p")
    Bb, Mb = sim.copy_traffic([hs], 16, 8, 1e8, "broadcast")
    assert Bp.sum() == Bb.sum() == 15 * 1e8  # same bytes in all...
    p2p = net.rank_times(Bp, Mp).max()
    assert net.rank_times(Bb, Mb).max() < p2p / 5  # ...but the owner is not a hotspot
    # the chain as training runs it: 15 hops in 4 pieces = 18 rounds of a quarter of the expert
    rounds = sim.round_arrays(sim.layer_chains([hs], 8, 16), 1e8, max_chunks=4)
    assert len(rounds) == 15 + 4 - 1
    assert all(nb.max() == pytest.approx(0.25e8) for _, _, nb in rounds)
    t, first = net.schedule_time(rounds)
    assert 0 < first < t < p2p / 2
    # the same rounds reversed (spRS) cost the same; holding round 1 back delays the end
    back = sim.round_arrays(sim.layer_chains([hs], 8, 16), 1e8, max_chunks=4, reduce=True)
    assert net.schedule_time(back)[0] == pytest.approx(t)
    assert net.schedule_time(rounds, hold=1.0)[0] == pytest.approx(1.0 + t - first, rel=0.05)


# --------------------------------------------------------------------------------------------
# traces
# --------------------------------------------------------------------------------------------
def _write_trace(path: Path) -> list[list[list[int]]]:
    steps = [
        [[400, 100, 100, 100, 100, 100, 50, 50], [10, 20, 30, 40, 50, 60, 70, 720]],
        [[380, 120, 100, 100, 100, 100, 50, 50], [20, 20, 30, 40, 50, 60, 70, 710]],
        [[360, 140, 100, 100, 100, 100, 50, 50], [30, 20, 30, 40, 50, 60, 70, 700]],
    ]
    lines = []
    for i, st in enumerate(steps):
        rec = {"stage": "pretrain", "step": i + 1, "loss": 3.0, "moe/0/entropy": 1.0}
        rec.update({f"moe/{l}/tokens_per_expert": v for l, v in enumerate(st)})
        lines.append(json.dumps(rec))
        if i == 0:
            lines.append(json.dumps({"stage": "pretrain", "eval/loss": 3.1}))  # no counts: skipped
    lines.append("")
    path.write_text("\n".join(lines))
    return steps


def test_read_trace(tmp_path):
    steps = _write_trace(tmp_path / "metrics.jsonl")
    arr = sim.read_trace(str(tmp_path))  # a run directory works too
    assert arr.shape == (3, 2, 8)
    np.testing.assert_array_equal(arr, np.asarray(steps, dtype=float))


def test_simulate_from_trace(tmp_path):
    _write_trace(tmp_path / "metrics.jsonl")
    cfg = sim.config_from_dict(SMALL, {"load.kind": "trace", "load.trace": str(tmp_path / "metrics.jsonl"),
                                       "sim.iterations": 10})
    s = sim.Simulator(cfg)
    assert (s.L, s.E) == (2, 8)  # the trace sets the layers and experts
    counts = s.gen.next()
    assert counts.shape == (2, 8, 8) and (counts.sum(axis=2) == 2048 * 2).all()  # scaled to tokens_per_gpu
    r = sim.Simulator(cfg).run()
    assert r["derived"]["iterations"] == 3  # as many as the trace has
    assert r["policies"]["ep"]["straggler"] > 2.0  # layer 1's expert 7 takes ~70% of the tokens
    assert r["policies"]["fssdp"]["straggler"] < r["policies"]["ep"]["straggler"]
    # unscaled: the trace's own pairs split over the 8 GPUs
    cfg2 = sim.config_from_dict(SMALL, {"load.kind": "trace", "load.trace": str(tmp_path), "load.trace_scale": False})
    assert sim.Simulator(cfg2).gen.next().sum(axis=2).max() == 1000 // 8
    # the trace's 2 MoE layers keep the config's spacing (every 2nd of 6 blocks -> every 2nd of 4)
    cfg3 = sim.config_from_dict(SMALL, {"load.kind": "trace", "load.trace": str(tmp_path), "model.n_layers": 6,
                                        "model.moe_layers": "every_2"})
    s3 = sim.Simulator(cfg3)
    assert (s3.L, s3.E, s3.d.moe_every) == (2, 8, 2)
    assert (s3.cfg.model.n_layers, s3.cfg.model.moe_layers, s3.cfg.model.num_experts) == (4, "every_2", 8)


def test_bad_trace_names_the_field(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    with pytest.raises(ValueError, match="load.trace"):
        sim.read_trace(str(tmp_path / "m.jsonl"))


# --------------------------------------------------------------------------------------------
# config errors and the CLI
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, field", [
    ({"cluster": {"gpuz": 8}}, "cluster.gpuz"),
    ({"cluster": {"gpus": 300}}, "cluster.gpus"),
    ({"model": {"top_k": 100}}, "model.top_k"),
    ({"model": {"num_experts": 48}}, "model.num_experts"),  # 48 experts on 32 GPUs
    ({"model": {"n_heads": 5}}, "model.n_heads"),  # the training ModelConfig's own checks
    ({"model": {"moe_layers": "none"}}, "model.moe_layers"),  # nothing to simulate
    ({"model": {"moe_layers": [0, 1, 5]}}, "model.moe_layers"),  # irregular spacing
    ({"model": {"n_layers": 13, "moe_layers": "every_2"}}, "model.moe_layers"),  # a dense block left over
    ({"model": {"moe_layers": [0, 2, 4, 6, 8, 10]}}, "model.moe_layers"),  # every 2nd, but MoE first
    ({"cost_model": {"matrices": 4}}, "cost_model.matrices"),
    ({"cost_model": {"attention_time_ms": -1.0}}, "cost_model.attention_time_ms"),
    ({"load": {"zipf_s": "steep"}}, "load.zipf_s"),
    ({"fssdp": {"spag": "tree"}}, "fssdp.spag"),
    ({"fssdp": {"max_chunks": 0}}, "fssdp.max_chunks"),
    ({"fssdp": {"gather_overlap": "some"}}, "fssdp.gather_overlap"),
    ({"cost_model": {"dtype": "fp8"}}, "cost_model.dtype"),
    ({"cluster": {"gpus": 8, "expert_parallel_size": 3}}, "cluster.expert_parallel_size"),  # not a divisor of 8
    ({"cluster": {"gpus": 16, "gpus_per_node": 8, "expert_parallel_size": 16}, "model": {"num_experts": 8}},
     "cluster.expert_parallel_size"),  # 8 experts cannot be split over 16 ranks
    ({"sim": {"policies": ["ep", "deepspeed"]}}, "sim.policies[1]"),
    ({"bogus": {}}, "bogus"),
])
def test_bad_field_is_named(data, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        sim.config_from_dict(data)


@pytest.mark.parametrize("old, new", [
    ("experts", "model.num_experts"), ("moe_every", "model.moe_layers"), ("d_ffn_dense", "model.d_ff"),
    ("matrices", "cost_model.matrices"), ("bytes_per_param", "cost_model.bytes_per_param"),
    ("bytes_per_activation", "cost_model.bytes_per_activation"), ("seq_len", "cost_model.seq_len"),
    ("attention_time_ms", "cost_model.attention_time_ms"),
])
def test_old_model_keys_name_the_new_field(old, new):
    with pytest.raises(ValueError, match=rf"model\.{old}: .*{re.escape(new)}"):
        sim.config_from_dict({"model": {old: 2}})


def test_old_moe_layer_count_is_explained():
    with pytest.raises(ValueError, match=r"model\.moe_layers: 12 is a count.*n_layers: 12 with moe_layers: all"):
        sim.config_from_dict({"model": {"moe_layers": 12}})


def test_model_section_is_the_training_model_config():
    cfg = sim.config_from_dict({"model": {"d_expert": 2048}})
    assert isinstance(cfg.model, ModelConfig)
    # keys left out take the simulator's model, not the training defaults
    assert cfg.model == ModelConfig(**{**sim.MODEL_DEFAULTS, "d_expert": 2048})
    assert sim.config_from_dict({}).model == sim.config_from_dict({"model": None}).model == sim.SimConfig().model


@pytest.mark.parametrize("n_layers, moe_layers, spacing", [
    (12, "all", (12, 1)), (24, "every_2", (12, 2)), (12, "every_3", (4, 3)), (3, "every_3", (1, 3)),
    (6, [1, 3, 5], (3, 2)), (4, [0, 1, 2, 3], (4, 1)),
])
def test_moe_spacing_from_the_pattern(n_layers, moe_layers, spacing):
    assert sim.moe_spacing(ModelConfig(n_layers=n_layers, moe_layers=moe_layers)) == spacing


def test_dense_blocks_widen_the_overlap_window():
    # MoE every 2nd of 4 blocks: before each MoE layer 2 attentions and 1 dense FFN of width d_ff
    cfg = _cfg(**{"model.n_layers": 4, "model.moe_layers": "every_2", "model.d_ff": 768})
    d = sim.derive(cfg)
    H, T, S = 512, 2048, 1024
    attn = T * (8.0 * H * H + 4.0 * S * H)
    dense = T * 2.0 * 3 * H * 768
    assert (d.moe_layers, d.moe_every) == (2, 2)
    assert d.non_moe_fwd_s == pytest.approx((2 * attn + dense) / cfg.cluster.flops)
    s = sim.Simulator(cfg)
    assert s.L == 2 and s.gen.next().shape == (2, 8, 16)
    # with every block MoE, d_ff is not priced
    assert sim.derive(_cfg(**{"model.d_ff": 1})).non_moe_fwd_s == sim.derive(_cfg()).non_moe_fwd_s


def test_cli_bad_field_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster:\n  gpus: 16\n  nvlink_bw: 1.0e+11\n")
    assert main(["simulate", str(bad)]) == EXIT_SPEC
    assert "cluster.nvlink_bw" in capsys.readouterr().err
    assert main(["simulate", "--gpus", "7"]) == EXIT_SPEC
    assert "cluster.gpus" in capsys.readouterr().err
    assert main(["simulate", "--set", "model.experts=16"]) == EXIT_SPEC  # a key of the old model section
    assert "model.experts: no longer a key" in capsys.readouterr().err


def test_cli_json_and_sweep(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["simulate", "--experts", "16", "--layers", "2", "--d-model", "512", "--d-expert", "1024",
            "--tokens-per-gpu", "1024", "--zipf-s", "1.2", "--iterations", "3"]
    assert main(args + ["--sweep-gpus", "8,16", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["derived"]["gpus"] for r in res] == [8, 16]
    text = capsys.readouterr().out
    assert "fssdp ms (x)" in text and "zipf s=1.2" in text


@pytest.mark.procs
def test_cli_subprocess_runs_the_example():
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "simulate", "examples/simulate.yaml",
                           "--iterations", "5"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for p in sim.POLICIES:
        assert f"\n{p} " in proc.stdout
    assert "32 GPUs" in proc.stdout
