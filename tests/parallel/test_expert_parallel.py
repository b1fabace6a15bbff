"""ep and fssdp on 2 and 4 gloo ranks against a single-process reference.

Layer level: forward outputs and the gradients of every parameter (router, every expert, the
input) under random and adversarial routing (every token to one expert), with the ownership plan
(= ep), hand-made plans that copy experts, random plans, and rematerialization. Store level:
memory per rank, resharding (heterogeneous sharding moves parameters and Adam state bit for bit)
and checkpoints loaded on another world size. Trainer level (slow): several optimizer steps of
the real DeepSpeed trainer equal single-process training.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from parallel.testing import run_distributed

E, D, F, TOKENS = 8, 16, 24, 6
BATCH = 4  # sequences in the global batch


def _layer(adversarial: bool, dtype=torch.float32):
    from experts.layer import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(D, E, 2, F).to(dtype)
    layer.reset_parameters(0.2, 0.2)
    xs = torch.randn(BATCH, TOKENS, D, dtype=dtype)
    if adversarial:  # every token's top choice is expert 3 (and the second is expert 5)
        with torch.no_grad():
            layer.router.weight.mul_(1e-3)
            layer.expert_bias[3], layer.expert_bias[5] = 5.0, 4.0
    return layer, xs


class _Holder(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.l = layer

    def moe_layers(self):
        return [self.l]


def _plans(world: int, owner):
    """Named plans: the ownership alone, copies of the hot experts everywhere, random ones."""
    from parallel.placement import IterationPlan

    own = [[int(owner[e])] for e in range(E)]
    hot = [list(h) for h in own]
    for e in (3, 5):
        hot[e] = hot[e] + [r for r in range(world) if r != hot[e][0]]
    rng = np.random.default_rng(world)
    rnd = [list(h) + [int(r) for r in rng.permutation(world) if r != h[0] and rng.random() < 0.5] for h in own]
    return {"ownership": IterationPlan([own]), "hot_everywhere": IterationPlan([hot]),
            "random": IterationPlan([rnd])}


def _layer_worker(rank: int, world: int, cases: list) -> list:
    from parallel.sharded_experts import shard_model
    from parallel.placement import FSSDPPlanConfig

    out = []
    per = BATCH // world
    for strategy, plan_name, adversarial, remat in cases:
        layer, xs = _layer(adversarial)
        store = shard_model(_Holder(layer), strategy, FSSDPPlanConfig(rematerialize=remat))
        if plan_name != "ownership":
            store.set_plan(_plans(world, store.own.owner_LE[0])[plan_name])
        x = xs[rank * per:(rank + 1) * per].clone().requires_grad_(True)
        y, _ = layer(x)
        (y.pow(2).sum() / BATCH).backward()  # this rank's share of the global mean
        store.reduce_grads()  # spRS, then / world (each rank's loss would be a local mean)
        experts = {e: tuple(g[s] * world for g in (store.w1.grad, store.w3.grad, store.w2.grad))
                   for (_, e, s) in store.own.owned(rank)}
        out.append({"y": y.detach(), "gx": x.grad, "grouter": layer.router.weight.grad, "experts": experts,
                    "memory": store.memory(), "copies_here": sum(1 for (_, _, h) in store.plan.copies() if h == rank),
                    "S": store.own.slots_per_rank})
    return out


CASES = [(s, p, adv, remat) for adv in (False, True)
         for (s, p, remat) in [("ep", "ownership", False), ("fssdp", "ownership", False),
                               ("fssdp", "hot_everywhere", False), ("fssdp", "random", False),
                               ("fssdp", "hot_everywhere", True)]]


def _reference(adversarial: bool):
    layer, xs = _layer(adversarial)
    x = xs.clone().requires_grad_(True)
    y, aux = layer(x)
    (y.pow(2).sum() / BATCH).backward()
    return layer, x, y.detach(), aux


@pytest.mark.procs
@pytest.mark.parametrize("world", [2, 4])
def test_layer_matches_single_process(world):
    results = run_distributed(_layer_worker, world, CASES)
    refs = {adv: _reference(adv) for adv in (False, True)}
    # adversarial routing really sends every token to experts 3 and 5
    assert refs[True][3].counts_E[3] == BATCH * TOKENS and refs[True][3].counts_E[5] == BATCH * TOKENS
    by_case = {}
    for c, case in enumerate(CASES):
        strategy, plan, adv, remat = case
        layer, x, y, _ = refs[adv]
        ranks = [r[c] for r in results]
        yd = torch.cat([r["y"] for r in ranks])
        torch.testing.assert_close(yd, y, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case} output: {m}")
        torch.testing.assert_close(torch.cat([r["gx"] for r in ranks]), x.grad, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{case} input grad: {m}")
        torch.testing.assert_close(sum(r["grouter"] for r in ranks), layer.router.weight.grad, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{case} router grad: {m}")
        seen = set()
        for r in ranks:
            for e, (g1, g3, g2) in r["experts"].items():
                seen.add(e)
                for g, ref in ((g1, layer.experts.w1.grad[e]), (g3, layer.experts.w3.grad[e]),
                               (g2, layer.experts.w2.grad[e])):
                    torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case} expert {e}: {m}")
        assert seen == set(range(E))  # every expert owned exactly once
        # memory: E/N experts' parameters per rank, plus exactly the copies the plan puts here
        for r in ranks:
            assert r["S"] == E // world
            assert r["memory"]["param_bytes"] == (E // world) * 3 * D * F * 4
            assert r["memory"]["peak_copies"] == r["copies_here"]
            # the copies' own bytes and nothing else (no stacked duplicate of owned experts)
            assert r["memory"]["peak_copy_bytes"] == r["copies_here"] * 3 * D * F * 4
            if plan == "ownership":
                assert r["copies_here"] == 0
        by_case[case] = yd
    # no copies = ep, bit for bit
    for adv in (False, True):
        assert torch.equal(by_case[("ep", "ownership", adv, False)], by_case[("fssdp", "ownership", adv, False)])
    hot = results[0][CASES.index(("fssdp", "hot_everywhere", True, False))]
    assert hot["copies_here"] > 0  # the copy plans did copy


class _TwoLayers(torch.nn.Module):
    """Two MoE layers with the same initial weights on every rank."""

    def __init__(self):
        super().__init__()
        self.ls = torch.nn.ModuleList(_layer(False)[0] for _ in range(2))

    def moe_layers(self):
        return list(self.ls)


def _store_worker(rank: int, world: int, ckpt: str) -> dict:
    """Two optimizer steps, then heterogeneous sharding; every expert's parameters and Adam
    moments before and after, and a checkpoint of the result."""
    from parallel.sharded_experts import shard_model
    from parallel.placement import heterogeneous_sharding

    model = _TwoLayers()
    store = shard_model(model, "fssdp")
    store.build_optimizer(1e-2, (0.9, 0.95), 1e-8, 0.1)
    _, xs = _layer(False)
    per = BATCH // world
    for _ in range(2):
        store.begin_iteration(0)
        h = xs[rank * per:(rank + 1) * per]
        for lay in model.ls:
            h = h + lay(h)[0]
        h.pow(2).mean().backward()
        store.reduce_grads()
        store.step(1e-2)
    before = store.state_for_checkpoint()["experts"]
    skew = np.stack([1.0 / np.arange(1, E + 1) ** 1.5, 1.0 / np.arange(E, 0, -1) ** 1.5]) * 1000
    new = heterogeneous_sharding(skew, store.own, 1, ranks_per_node=2)
    moved = store.reshard(new)
    after = store.state_for_checkpoint()["experts"]
    store.save(Path(ckpt))
    return {"before": before, "after": after, "moved": moved, "owner": store.own.owner_LE.tolist(),
            "memory": store.memory(), "S": store.own.slots_per_rank}


def _load_worker(rank: int, world: int, ckpt: str) -> dict:
    from parallel.sharded_experts import shard_model

    store = shard_model(_TwoLayers(), "ep")
    store.build_optimizer(1e-2, (0.9, 0.95), 1e-8, 0.1)
    info = store.load(Path(ckpt))
    return {"experts": store.state_for_checkpoint()["experts"], "info": info}


def _merge(parts, key):
    out = {}
    for p in parts:
        for k, v in p[key].items():
            assert k not in out, f"expert {k} held by two ranks"
            out[k] = v
    return out


@pytest.mark.procs
@pytest.mark.parametrize("world,new_world", [(2, 4), (4, 2)])
def test_reshard_and_checkpoint_on_other_world_size_bit_for_bit(tmp_path, world, new_world):
    res = run_distributed(_store_worker, world, str(tmp_path))
    before, after = _merge(res, "before"), _merge(res, "after")
    assert len(before) == len(after) == 2 * E
    assert res[0]["moved"] > 0
    owners = np.asarray(res[0]["owner"])
    assert sorted(np.bincount(owners.reshape(-1), minlength=world).tolist()) == [2 * E // world] * world
    for k in before:
        assert set(before[k]) == {"w1", "w3", "w2", "exp_avg.w1", "exp_avg.w3", "exp_avg.w2",
                                  "exp_avg_sq.w1", "exp_avg_sq.w3", "exp_avg_sq.w2"}
        for n in before[k]:
            assert torch.equal(before[k][n], after[k][n]), (k, n)
    for r in res:  # memory stays balanced: same slots, params + two Adam moments
        assert 0 <= r["memory"]["optimizer_bytes"] - 2 * r["memory"]["param_bytes"] <= 3 * 8  # + step counters
        assert r["memory"]["param_bytes"] == r["S"] * 3 * D * F * 4
    loaded = run_distributed(_load_worker, new_world, str(tmp_path))
    got = _merge(loaded, "experts")
    assert got.keys() == after.keys()
    for k in after:
        for n in after[k]:
            assert torch.equal(after[k][n], got[k][n]), (k, n)
    assert all(r["info"]["optimizer_state"] for r in loaded)


@pytest.mark.procs
def test_load_rejects_shape_mismatch(tmp_path):
    run_distributed(_store_worker, 2, str(tmp_path))
    from parallel.expert_store import ExpertStore
    store = ExpertStore(num_layers=2, num_experts=E, d_model=D, d_expert=F + 1, strategy="ep")
    with pytest.raises(ValueError, match="d_expert=24"):
        store.load(tmp_path)
    with pytest.raises(ValueError, match="no experts/rank"):
        store.load(tmp_path / "nowhere")


# -- the real trainer and DeepSpeed engine --------------------------------------------------------
def _run_stage(rank: int, world: int, spec: dict) -> list[dict]:
    from jobs.stage_runner import run_stage
    from system.metrics import read_jsonl

    run_stage(spec, 0)
    if rank != 0:
        return []
    return read_jsonl(Path(spec["run"]["output_dir"]) / spec["run"]["name"] / "metrics.jsonl")


def _spec(tmp_path: Path, world: int, strategy: str, name: str, zero: int = 0, fssdp=None, steps: int = 4,
          accum: int = 1):
    from tests.helpers import tiny_spec

    return tiny_spec(tmp_path, run={"name": name}, experts={"balancing": {"lbl": "none"}},
                     parallel={"world_size": world, "zero_stage": zero, "expert_strategy": strategy,
                               "fssdp": {"window": 1, "memory_cap": 2, "reshard_every": 2, "tolerance": 0.0,
                                         **(fssdp or {})}},
                     stages=[{"name": "pretrain", "steps": steps, "micro_batch_size": 8 // (world * accum),
                              "grad_accum_steps": accum, "checkpoint_every": 2, "eval_every": 2,
                              "eval_batches": 3 * world * accum,  # the same 24 held-out sequences
                              "optimizer": {"lr": 1e-3},
                              "lr_schedule": {"kind": "constant"}, "grad_clip": 0.05}])


def _weights(spec: dict) -> dict[str, torch.Tensor]:
    from system.checkpoint import latest_checkpoint, load_module_weights

    root = Path(spec["run"]["output_dir"]) / spec["run"]["name"] / "stages" / "pretrain" / "checkpoints"
    return load_module_weights(latest_checkpoint(root))


@pytest.fixture(scope="module")
def replicated_reference(tmp_path_factory):
    spec = _spec(tmp_path_factory.mktemp("ref"), 1, "replicated", "ref")
    return run_distributed(_run_stage, 1, spec)[0], _weights(spec)


@pytest.mark.slow
@pytest.mark.parametrize("world,strategy,zero,fssdp,accum", [
    (2, "ep", 0, None, 1),
    (2, "fssdp", 0, None, 2),
    (4, "fssdp", 0, None, 2),
    (4, "fssdp", 1, {"rematerialize": True, "reshard_every": 1}, 1),
    (4, "fssdp", 0, {"sprs_overlap": True}, 2),
])
def test_trainer_matches_single_process(tmp_path, replicated_reference, world, strategy, zero, fssdp, accum):
    """Four optimizer steps with clipping active (grad_clip below the norm), evaluations in
    between (forwards that reuse or re-gather copies): the loss, the global gradient norm, the
    held-out losses and every final parameter equal single-process replicated training."""
    ref, ref_w = replicated_reference
    spec = _spec(tmp_path, world, strategy, f"{strategy}{world}", zero, fssdp, accum=accum)
    recs = run_distributed(_run_stage, world, spec)[0]
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4]  # step 0: the evaluation before training
    for r, q in zip(recs, ref):
        for k in [k for k in q if k.startswith("eval/") and k.endswith("/loss")]:
            assert r[k] == pytest.approx(q[k], rel=1e-5), k
        if r["step"] == 0:
            assert any(k.startswith("eval/") for k in r)
            continue
        assert r["ce"] == pytest.approx(q["ce"], rel=1e-5)
        assert r["grad_norm"] == pytest.approx(q["grad_norm"], rel=1e-5)
        assert r["grad_norm"] > 0.05  # clipping was active
        assert r["moe/0/tokens_per_expert"] == q["moe/0/tokens_per_expert"]
    assert any(k.startswith("eval/") for k in recs[2])
    w = _weights(spec)
    assert w.keys() == ref_w.keys()  # expert files merged back: the same tensors as replicated
    for k in w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    last = recs[-1]
    assert last["ep/bytes_all_to_all"] > 0
    if strategy == "fssdp":
        assert last["ep/copies"] > 0 and last["ep/bytes_spag"] > 0 and last["ep/bytes_sprs"] > 0
        # with sprs_overlap every MoE layer's spRS started inside the backward pass
        assert last["ep/sprs_in_backward"] == (spec["model"]["n_layers"] if (fssdp or {}).get("sprs_overlap") else 0)
    else:
        assert last["ep/copies"] == 0 and last["ep/bytes_spag"] == 0


@pytest.mark.slow
def test_sharded_resume_equals_uninterrupted(tmp_path, replicated_reference):
    """Stop an fssdp run after step 2 and resume it: the final weights are those of the run
    without a stop (expert pools, Adam state, ownership and load history restored)."""
    ref_w = replicated_reference[1]
    spec = _spec(tmp_path, 2, "fssdp", "resume", steps=2)
    run_distributed(_run_stage, 2, spec)
    ck = Path(spec["run"]["output_dir"]) / "resume" / "stages" / "pretrain" / "checkpoints"
    assert (ck / "step_00000002" / "experts" / "rank00001.pt").is_file()
    spec["stages"][0]["steps"] = 4
    run_distributed(_run_stage, 2, spec)
    w = _weights(spec)
    for k in w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.slow
def test_init_from_a_sharded_checkpoint_into_owned_only_layers(tmp_path):
    """A stage with init_from builds only each rank's experts and fills them from the checkpoint
    of another run (fssdp on 2 ranks, loaded as ep on 2 ranks): its evaluation before training
    equals the source run's last evaluation (the same weights, the same held-out sequences)."""
    src = _spec(tmp_path, 2, "fssdp", "src", steps=2)
    src_recs = run_distributed(_run_stage, 2, src)[0]
    ck = Path(src["run"]["output_dir"]) / "src" / "stages" / "pretrain" / "checkpoints" / "step_00000002"
    assert ck.is_dir()
    dst = _spec(tmp_path, 2, "ep", "dst", steps=1)
    dst["stages"][0]["init_from"] = str(ck)
    dst_recs = run_distributed(_run_stage, 2, dst)[0]
    last_src = [r for r in src_recs if any(k.startswith("eval/") for k in r)][-1]
    first_dst = dst_recs[0]
    keys = [k for k in last_src if k.startswith("eval/") and k.endswith("/loss")]
    assert keys and first_dst["step"] == 0
    for k in keys:
        assert first_dst[k] == pytest.approx(last_src[k], rel=1e-6), k


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 1])
def test_deepspeed_moe_strategy_trains_and_resumes(tmp_path, zero):
    """expert_strategy deepspeed_moe: DeepSpeed's MoE layer through the same trainer (ZeRO 0/1).
    A run stopped after step 2 and resumed equals the run without a stop: the same losses,
    gradient norms, per-expert token counts and token totals in steps 3-4, the same weights."""
    full_spec = _spec(tmp_path, 2, "deepspeed_moe", f"ds{zero}full", zero, steps=4)
    full = [r for r in run_distributed(_run_stage, 2, full_spec)[0] if "ce" in r]  # not the step-0 evaluation
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    assert all(np.isfinite(r["ce"]) and np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in full)
    spec = _spec(tmp_path, 2, "deepspeed_moe", f"ds{zero}", zero, steps=2)
    first = [r for r in run_distributed(_run_stage, 2, spec)[0] if "ce" in r]
    assert [r["step"] for r in first] == [1, 2]
    spec["stages"][0]["steps"] = 4
    recs = [r for r in run_distributed(_run_stage, 2, spec)[0] if "ce" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]  # the metrics file keeps the first two
    for r, q in zip(recs[2:], full[2:]):  # the steps after the resume
        assert r["ce"] == pytest.approx(q["ce"], rel=1e-6)
        assert r["grad_norm"] == pytest.approx(q["grad_norm"], rel=1e-6)
        assert r["moe/0/tokens_per_expert"] == q["moe/0/tokens_per_expert"]
        assert r["tokens"] == q["tokens"]  # the stage's token count was restored, not restarted
    assert recs[-1]["tokens"] == 4 * 8 * 32
    w, ref = _weights(spec), _weights(full_spec)
    assert w.keys() == ref.keys()
    for key in w:
        torch.testing.assert_close(w[key], ref[key], rtol=1e-6, atol=1e-7, msg=lambda m: f"{key}: {m}")


def _repeat_worker(rank: int, world: int) -> dict:
    """One iteration, three forwards (two micro-batches and an evaluation-style no-grad pass)
    with a plan where rank 0 only sends and rank 1 only receives."""
    from parallel.sharded_experts import shard_model
    from parallel.placement import IterationPlan

    layer, xs = _layer(True)
    store = shard_model(_Holder(layer), "fssdp")
    holders = [[int(store.owner(0, e))] for e in range(E)]
    holders[0] = [0, 1]  # expert 0 is owned by rank 0
    store.set_plan(IterationPlan([holders]))
    store.comm.reset()
    outs = []
    per = BATCH // world
    for i in range(2):
        y, _ = layer(xs[rank * per:(rank + 1) * per])
        y.sum().backward()
        outs.append(y.detach())
    with torch.no_grad():
        outs.append(layer(xs[rank * per:(rank + 1) * per])[0])
    spag = store.comm.spag
    store.reduce_grads()
    return {"spag": spag, "outs": outs, "copies": len(store.iteration.copies)}


@pytest.mark.procs
def test_copies_gathered_once_per_iteration():
    """Later forwards of an iteration reuse the copies on every rank: a sender that re-sent while
    its receiver reused would leave a stale message for the next gather (or hang)."""
    res = run_distributed(_repeat_worker, 2, timeout_s=90)
    assert res[0]["spag"] == 3 * D * F * 4  # one expert sent once
    assert res[1]["spag"] == 0 and res[1]["copies"] == 1
    for r in res:
        assert torch.equal(r["outs"][0], r["outs"][1]) and torch.equal(r["outs"][0], r["outs"][2])


def _bf16_worker(rank: int, world: int) -> dict:
    from parallel.sharded_experts import shard_model

    layer, xs = _layer(False)
    ref = layer.experts.w1.detach().clone()
    store = shard_model(_Holder(layer), "fssdp")
    layer.router.to(torch.bfloat16)  # what a bf16 engine does to the dense module
    x = xs.to(torch.bfloat16).requires_grad_(True)
    y, _ = layer(x)
    y.float().pow(2).sum().backward()
    store.reduce_grads()
    return {"y": y.dtype, "pool": store.w1.dtype, "grad": store.w1.grad.dtype,
            "moved": float(store.w1.grad.abs().sum()), "kept": torch.equal(store.w1.detach(), ref[:E // world])}


@pytest.mark.procs
def test_bf16_activations_with_fp32_expert_pool():
    """Under a bf16 engine the experts compute in bf16 from the fp32 pool (the master weights),
    and their gradients arrive in fp32."""
    r = run_distributed(_bf16_worker, 1)[0]
    assert (r["y"], r["pool"], r["grad"]) == (torch.bfloat16, torch.float32, torch.float32)
    assert r["moved"] > 0 and r["kept"]


def test_set_plan_refuses_repeated_or_unknown_holders():
    """A repeated holder would make two of the token assignment's sends collide (tokens lost);
    one process, the store's own check."""
    from parallel.placement import IterationPlan
    from parallel.sharded_experts import shard_model

    layer, _ = _layer(False)
    store = shard_model(_Holder(layer), "fssdp")
    ok = [[0] for _ in range(E)]
    store.set_plan(IterationPlan([ok]))
    for bad in ([0, 0], [0, 3]):
        with pytest.raises(ValueError, match="must be distinct ranks"):
            store.set_plan(IterationPlan([[bad] + ok[1:]]))
