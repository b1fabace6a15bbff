"""The autograd pieces of sharded experts: pool rows as views, rematerialization's free and
refill, and the end of a layer's backward (where an overlapped SparseReduceScatter starts)."""
from __future__ import annotations

import torch


class _PoolRows(torch.autograd.Function):
    """pool[slots] whose backward adds straight into pool.grad (index_add_), instead of building a
    pool-sized zero gradient per MoE layer and per micro-batch for autograd to sum. `slots` is a
    host-side tuple: whether it is one contiguous run is decided there (no device value read)."""

    @staticmethod
    def forward(ctx, pool, slots):
        n = len(slots)
        ctx.pool, ctx.n, ctx.slots = pool, n, slots
        ctx.start = slots[0] if n and slots == tuple(range(slots[0], slots[0] + n)) else None
        if ctx.start is not None:  # a contiguous run of slots (the usual case): a view, no copy
            ctx.idx = None
            return pool.detach().narrow(0, ctx.start, n)
        host = torch.tensor(slots, dtype=torch.long)
        if pool.device.type == "cuda":
            host = host.pin_memory()
        ctx.idx = host.to(pool.device, non_blocking=True)
        return pool.detach().index_select(0, ctx.idx)

    @staticmethod
    def backward(ctx, g):
        pool = ctx.pool
        sink = getattr(pool, "moeforge_grad_sink", None)
        if sink is not None:  # expert sharding 2: the store reduces the rows at the layer's end
            sink(pool, ctx.slots, g)
            return None, None
        if pool.grad is None:
            pool.grad = torch.zeros_like(pool)
        if ctx.start is not None:
            pool.grad.narrow(0, ctx.start, ctx.n).add_(g.to(pool.grad.dtype))
        else:
            pool.grad.index_add_(0, ctx.idx, g.to(pool.grad.dtype))
        return None, None


class _ReleaseAfterBackward(torch.autograd.Function):
    """Identity on a copy's weights; its backward runs once the expert computation's backward has
    used them and frees their storage again (rematerialization keeps copies resident only while
    their layer computes)."""

    @staticmethod
    def forward(ctx, w):
        ctx.w = w
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):
        ctx.w.untyped_storage().resize_(0)
        return g


class _Refill(torch.autograd.Function):
    """Identity in the forward pass; in the backward pass, gathers the layer's copies again
    (rematerialization) before the expert computation's backward needs them."""

    @staticmethod
    def forward(ctx, y, store, layer):
        ctx.store, ctx.layer = store, layer
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        ctx.store.refill_layer(ctx.layer)
        return g, None, None


class _LayerBackwardDone(torch.autograd.Function):
    """Identity on a MoE layer's input rows; its backward runs once the layer's whole backward
    (reverse combine, expert computation, reverse dispatch) has run, and tells the store, which
    may then start the layer's SparseReduceScatter while the backward pass goes on."""

    @staticmethod
    def forward(ctx, x, store, layer):
        ctx.store, ctx.layer = store, layer
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.store.layer_backward_done(ctx.layer)
        return g, None, None


def pool_rows(pool: torch.Tensor, slots) -> torch.Tensor:
    """pool[slots] (a view when the slots are contiguous) whose gradient adds into pool.grad;
    `slots`: the pool rows as host integers (a tensor is read back to the host once)."""
    if isinstance(slots, torch.Tensor):
        slots = slots.tolist()
    return _PoolRows.apply(pool, tuple(int(s) for s in slots))


def release_after_backward(w: torch.Tensor) -> torch.Tensor:
    return _ReleaseAfterBackward.apply(w)


def refill_before_backward(y: torch.Tensor, store, layer: int) -> torch.Tensor:
    return _Refill.apply(y, store, layer)


def mark_layer_backward(x: torch.Tensor, store, layer: int) -> torch.Tensor:
    return _LayerBackwardDone.apply(x, store, layer)
