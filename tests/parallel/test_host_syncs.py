"""Host syncs per training step (issue 28): at most one per MoE layer per micro-batch (the split
sizes dropless dispatch needs) plus two per step (the optimizer step's flag-and-norm read, the
logging read), counted by `system.host_syncs.HostSyncCounter` on real steps of the Trainer with
a DeepSpeed engine, for every expert strategy, 2 gloo ranks, 2 micro-batches a step. Step 1 is
a warm-up (one-off syncs: the overlap budget's first agreement); steps 2 and 3 are counted.
DeepSpeed's own code is counted apart: its MoE gate syncs (5 a layer a micro-batch), which the
deepspeed_moe case reports without bounding."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from parallel.testing import run_distributed
from system.host_syncs import HostSyncCounter
from tests.helpers import tiny_spec

MICRO = 2
STEPS = 3
LAYERS = 2  # TINY_SPEC: 2 blocks, both MoE


def test_the_counter_counts_each_kind_and_restores_tensor_methods():
    x = torch.arange(6.0)
    tolist, numpy = torch.Tensor.tolist, torch.Tensor.numpy
    with HostSyncCounter() as c:
        float(x.sum()), bool(x[0] > 1), x.tolist(), x.numpy(), torch.nonzero(x)
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 3]))
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 3]), output_size=6)  # not a sync
        x[x > 2], torch.bincount(torch.tensor([1, 2])), torch.equal(x, x)
        x + 1, x.index_select(0, torch.tensor([0, 2]))  # not syncs
    assert c.by_kind == {"item": 2, "tolist": 1, "numpy": 1, "nonzero": 1, "repeat_interleave": 1,
                         "bool_mask_index": 1, "bincount": 1, "equal": 1}, c.report()
    assert all(where.startswith("parallel/test_host_syncs.py:") for where in c.by_origin)
    assert (torch.Tensor.tolist, torch.Tensor.numpy) == (tolist, numpy)


def test_a_moe_layer_syncs_once_forward_and_backward():
    from experts.layer import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(16, num_experts=4, top_k=2, d_expert=8)
    layer.reset_parameters(0.02, 0.02)
    x = torch.randn(2, 8, 16, requires_grad=True)
    with HostSyncCounter() as c:
        y, aux = layer(x)
        y.sum().backward()
    assert c.by_kind == {"tolist": 1}, c.report()  # the split sizes (GroupedExperts.forward)


def test_device_built_permutations_equal_the_stable_argsorts():
    """The dispatch's row permutations (and inverses), expanded from segment tables, are the
    ones a stable argsort of the rows' destination / local-expert keys gives."""
    import types

    import numpy as np

    from parallel.sharded_experts import ShardedExperts, _segment_perms

    rng, cpu, nonidentity = np.random.default_rng(0), torch.device("cpu"), 0
    for _ in range(300):
        R, E = int(rng.integers(1, 5)), int(rng.integers(1, 7))
        me = types.SimpleNamespace(store=types.SimpleNamespace(world=R), num_experts=E)
        send_ER = np.ascontiguousarray(rng.integers(0, 4, size=(E, R)) * (rng.random((E, R)) < 0.7))
        dst = torch.repeat_interleave(torch.arange(R).repeat(E), torch.from_numpy(send_ER.reshape(-1)))
        experts = [int(e) for e in rng.permutation(E)[:int(rng.integers(0, E + 1))]]
        recv_RE = rng.integers(0, 4, size=(R, E)) * (rng.random((R, E)) < 0.7)
        recv_RE[:, [e for e in range(E) if e not in experts]] = 0
        recv_RE = np.ascontiguousarray(recv_RE)
        pos = torch.full((E,), E, dtype=torch.long)
        pos[torch.tensor(experts, dtype=torch.long)] = torch.arange(len(experts))
        key = torch.repeat_interleave((torch.arange(R)[:, None] + R * pos[None, :]).reshape(-1),
                                      torch.from_numpy(recv_RE.reshape(-1)))
        for segs, want in ((ShardedExperts._send_segments(me, send_ER), torch.argsort(dst, stable=True)),
                           (ShardedExperts._recv_segments(me, recv_RE, experts), torch.argsort(key, stable=True))):
            if segs is None:
                assert torch.equal(want, torch.arange(len(want)))
                continue
            nonidentity += 1
            order, inverse = _segment_perms([(*segs[0], cpu), (*segs[1], cpu)])
            assert torch.equal(order, want) and torch.equal(inverse, torch.argsort(want))
    assert nonidentity > 200


def _count_steps(rank, world, spec):
    """Run the stage with every `Trainer.train_step` counted; return each step's counts."""
    from jobs.stage_runner import run_stage
    from parallel.trainer import Trainer

    per_step = []
    orig = Trainer.train_step

    def counted(self):
        with HostSyncCounter() as c:
            rec = orig(self)
        per_step.append(dict(c.counts))
        return rec

    Trainer.train_step = counted
    try:
        run_stage(spec, 0)
    finally:
        Trainer.train_step = orig  # kept rank processes: leave the class as it was
    return per_step


def _spec(tmp: Path, strategy: str, zero: int = 0) -> dict:
    return tiny_spec(tmp, run={"name": f"syncs-{strategy}-{zero}"},
                     parallel={"world_size": 2, "expert_strategy": strategy, "zero_stage": zero},
                     stages=[{"name": "pretrain", "steps": STEPS, "micro_batch_size": 2,
                              "grad_accum_steps": MICRO, "checkpoint_every": 100, "eval_every": 0,
                              "grad_clip": 1e-3 if zero else 1.0}])


def _total(counts: dict, keep=lambda where: True) -> int:
    return sum(n for (_, where), n in counts.items() if keep(where))


def _show(counts: dict) -> str:
    return ", ".join(f"{k}@{w} x{n}" for (k, w), n in sorted(counts.items(), key=lambda kv: -kv[1]))



@pytest.mark.procs
@pytest.mark.parametrize("strategy,zero,sharding", [("replicated", 0, 0), ("ep", 0, 0), ("fssdp", 0, 0),
                                                    ("deepspeed_moe", 0, 0), ("fssdp", 1, 0), ("fssdp", 0, 2)])
def test_host_syncs_per_step_are_bounded(tmp_path, strategy, zero, sharding):
    """ZeRO 1 with every step clipped: one more read, the multipliers of the float32 thresholds
    around the estimate (`sharded_strategy._threshold_from`, DeepSpeed's clip matched bit for
    bit); DeepSpeed's ZeRO step reads its own norm (counted apart, not bounded). Expert sharding
    2 (P = 1, the pieces over both ranks) adds none: its indices are host lists copied async."""
    spec = _spec(tmp_path, strategy, zero)
    if sharding:
        spec["parallel"].update(expert_parallel_size=1, expert_sharding=sharding)
    results = run_distributed(_count_steps, 2, spec, timeout_s=240)
    bound = LAYERS * MICRO + 2 + (1 if zero else 0)
    bad = []
    for rank, per_step in enumerate(results):
        assert len(per_step) == STEPS
        for step, counts in enumerate(per_step[1:], start=2):
            ours = _total(counts, lambda where: not where.startswith("deepspeed/"))
            theirs = _total(counts) - ours
            print(f"{strategy} rank {rank} step {step}: ours {ours} (bound {bound}), DeepSpeed's {theirs}: "
                  f"{_show(counts)}")
            # DeepSpeed's code syncs only in its MoE gate (deepspeed_moe); elsewhere it must not
            if ours > bound or (theirs and strategy != "deepspeed_moe" and not zero):
                bad.append(f"rank {rank} step {step}: ours {ours}, DeepSpeed's {theirs}: {_show(counts)}")
    assert not bad, f"{strategy}: more host syncs than {bound} a step:\n" + "\n".join(bad)
