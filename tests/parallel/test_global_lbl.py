"""Global-batch LBL on N gloo ranks x M micro-batches equals the loss on the concatenated global
batch in one process: the same loss value and the same router (and all other) gradients.

The distributed side does what the trainer does: per micro-batch, all-reduce the per-layer expert
counts (`reduce_counts`), accumulate them in `GlobalCountBuffer`, pass them into the pure loss,
backward with the loss scaled by 1/M, then average gradients over ranks (DeepSpeed's data-parallel
all-reduce). Both known pitfalls would break the equality: a gradient 1/dp too small, and a count
buffer that never advances (micro-batch LBL in disguise; `finish_step` also refuses it).
"""
from __future__ import annotations

import pytest
import torch

from experts.config import BalancingConfig, ExpertsConfig
from parallel.testing import run_distributed
from system.model import ModelConfig, Transformer

B, S, V = 2, 6, 40  # sequences per micro-batch, sequence length, vocabulary


def _model(lbl: str, mode: str = "running") -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, moe_layers="all", num_experts=4, top_k=2,
                      d_expert=16, vocab_size=V)
    bal = BalancingConfig(lbl=lbl, lbl_coeff=0.5, z_loss_coeff=0.0, global_accumulation=mode)
    m = Transformer(cfg, ExpertsConfig(balancing=bal)).double()
    with torch.no_grad():  # large router weights: routing far from uniform, so f matters
        for layer in m.moe_layers():
            layer.router.weight.mul_(40)
    return m


def _global_batch(n_seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    # Two "domains" (low and high token ids) so micro-batches route very differently.
    lo = torch.randint(0, V // 2, (n_seq // 2, S + 1), generator=g)
    hi = torch.randint(V // 2, V, (n_seq - n_seq // 2, S + 1), generator=g)
    tok = torch.cat([lo, hi])
    return tok[:, :-1], tok[:, 1:]


def _reference(n_seq: int):
    from system.losses import training_loss

    model = _model("global_batch")
    ids, labels = _global_batch(n_seq)
    out = model(ids)
    loss, parts = training_loss(out, labels, model.experts_cfg.balancing,
                                counts_override=[a.counts_E for a in out.moe_aux])
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    counts = torch.stack([a.counts_E for a in out.moe_aux])
    return float(parts["lbl"]), float(parts["ce"]), grads, counts


def _worker(rank: int, world: int, n_micro: int, lbl: str, mode: str):
    import torch.distributed as dist

    from parallel.balancing import GlobalCountBuffer, reduce_counts, stack_counts
    from system.losses import training_loss

    model = _model(lbl, mode)
    bal = model.experts_cfg.balancing
    ids, labels = _global_batch(B * n_micro * world)
    # micro-batch m of rank r holds global rows [(m * world + r) * B, ... + B)
    chunks = [((m * world + rank) * B, (m * world + rank + 1) * B) for m in range(n_micro)]
    buf = GlobalCountBuffer(n_micro, mode)
    if mode == "exact":
        with torch.no_grad():
            total = sum(stack_counts([a.counts_E for a in model(ids[a:b]).moe_aux]) for a, b in chunks)
        buf.set_total(reduce_counts(total))
    lbl_sum = 0.0
    for a, b in chunks:
        out = model(ids[a:b])
        override = buf.add(reduce_counts(stack_counts([x.counts_E for x in out.moe_aux]))) \
            if lbl == "global_batch" else None
        loss, parts = training_loss(out, labels[a:b], bal, counts_override=override)
        (loss / n_micro).backward()  # DeepSpeed scales by 1/gradient_accumulation_steps
        lbl_sum += float(parts["lbl"])
    step_counts = buf.finish_step() if lbl == "global_batch" else None
    grads = {}
    for k, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.clone()
            dist.all_reduce(g)
            grads[k] = g / world  # the data-parallel average
    lbl_mean = torch.tensor([lbl_sum / n_micro], dtype=torch.float64)
    dist.all_reduce(lbl_mean)
    return float(lbl_mean) / world, grads, step_counts


def _router_keys(grads):
    return [k for k in grads if k.endswith("router.weight")]


@pytest.mark.procs
@pytest.mark.parametrize("world,n_micro,mode", [(2, 1, "running"), (2, 2, "exact"), (4, 1, "running"),
                                                 (4, 2, "exact"), (2, 3, "exact")])
def test_global_batch_lbl_matches_concatenated_batch(world, n_micro, mode):
    ref_lbl, _, ref_grads, ref_counts = _reference(B * n_micro * world)
    res = run_distributed(_worker, world, n_micro, "global_batch", mode)
    for lbl_val, grads, counts in res:
        assert lbl_val == pytest.approx(ref_lbl, rel=1e-10)
        assert torch.equal(counts, ref_counts)  # the buffer advanced through every micro-batch
        assert len(_router_keys(grads)) == 2
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-9, atol=1e-12,
                                       msg=lambda m: f"{k}: {m}")


@pytest.mark.procs
def test_running_accumulation_ends_on_the_global_counts():
    """Megatron-style running buffer: the step's final counts are the global batch's; earlier
    micro-batches saw a prefix of it, so the gradient differs from the exact form by design."""
    world, n_micro = 2, 2
    ref_lbl, _, ref_grads, ref_counts = _reference(B * n_micro * world)
    res = run_distributed(_worker, world, n_micro, "global_batch", "running")
    _, grads, counts = res[0]
    assert torch.equal(counts, ref_counts)
    k = _router_keys(ref_grads)[0]
    assert not torch.allclose(grads[k], ref_grads[k], rtol=1e-6, atol=1e-9)


@pytest.mark.procs
def test_micro_batch_lbl_differs_from_global_batch():
    """Negative control: the equality above is not automatic. With per-micro-batch counts the
    router gradients differ from the global-batch ones on this two-domain batch."""
    world, n_micro = 2, 1
    ref_lbl, _, ref_grads, _ = _reference(B * n_micro * world)
    (lbl_val, grads, _), _ = run_distributed(_worker, world, n_micro, "micro_batch", "running")
    assert lbl_val != pytest.approx(ref_lbl, rel=1e-6)
    k = _router_keys(ref_grads)[0]
    assert not torch.allclose(grads[k], ref_grads[k], rtol=1e-6, atol=1e-9)


def test_buffer_that_does_not_advance_is_refused():
    from parallel.balancing import GlobalCountBuffer

    buf = GlobalCountBuffer(3, "running")
    c = torch.tensor([[1, 2]])
    buf.add(c)
    with pytest.raises(RuntimeError, match="1 micro-batches recorded in a step of 3"):
        buf.finish_step()
    buf = GlobalCountBuffer(2, "running")
    assert buf.add(c).tolist() == [[1, 2]] and buf.add(c).tolist() == [[2, 4]]
    assert buf.finish_step().tolist() == [[2, 4]] and buf.micro == 0 and buf.seen is None
    exact = GlobalCountBuffer(2, "exact")
    with pytest.raises(RuntimeError, match="set_total"):
        exact.add(c)
