"""The sharded expert computation of one MoE layer under ep/fssdp, and the autograd pieces it uses.

`ShardedExperts` replaces a layer's `GroupedExperts`: same call (rows sorted by expert in,
rows out), no parameters of its own. `shard_model` moves a model's experts into an
`ExpertStore` and installs the dispatch, plus each MoE block's attention hook (the layer's
SparseAllGather is posted before the block's attention, so the transfer overlaps it).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from parallel import collectives as coll
from parallel.expert_autograd import mark_layer_backward, refill_before_backward, release_after_backward
from parallel.expert_store import ExpertStore
from parallel.placement import FSSDPPlanConfig, assign


def _monotone(counts_AB: np.ndarray) -> bool:
    """Rows laid out B-major (b, then a within b) are already A-major: true when the non-empty
    (a, b) segments, visited B-major, never go back in a. `counts_AB[a, b]` = segment sizes."""
    a_idx = np.nonzero(np.asarray(counts_AB).T)[1]  # a of each non-empty segment, in B-major order
    return bool(np.all(np.diff(a_idx) >= 0)) if a_idx.size else True


class AttentionOverlap:
    """A MoE block's attention hook: post the layer's spAG, and time the attention while the
    overlap budget is still being derived."""

    def __init__(self, store: ExpertStore, layer: int):
        self.store, self.layer = store, layer
        self._t0: Optional[float] = None

    def __enter__(self):
        self.store.start_gather(self.layer)
        self._t0 = self.store.attention_clock()
        return self

    def __exit__(self, *exc) -> None:
        self.store.attention_done(self._t0)


class ShardedExperts(nn.Module):
    """Drop-in for `GroupedExperts` under ep/fssdp: same call, rows in, rows out; no parameters.

    forward(x_ND, counts_E): rows sorted by expert (this rank's tokens) ->
      1. all-gather every rank's counts; every rank derives the same token assignment;
      2. uneven all-to-all of the rows to the holders the assignment names;
      3. the holder computes its local experts (owned ones from the pool, copies from spAG);
      4. the reverse all-to-all brings the results back in the input order.
    """

    def __init__(self, store: ExpertStore, layer: int, num_experts: int):
        super().__init__()
        object.__setattr__(self, "store", store)  # not a submodule: its pool is not a module parameter
        self.layer, self.num_experts = layer, num_experts

    def prefetch(self) -> None:
        self.store.start_gather(self.layer)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        st, l, E = self.store, self.layer, self.num_experts
        N, me = st.world, st.rank
        if st.cfg.sprs_overlap and st.strategy == "fssdp" and x_ND.requires_grad:
            x_ND = mark_layer_backward(x_ND, st, l)  # its backward: the layer's spRS may start
        counts = counts_E.detach().to(torch.int64)
        if N > 1:
            gathered = [torch.empty_like(counts) for _ in range(N)]
            dist.all_gather(gathered, counts, group=st.group)
            counts_NE = torch.stack(gathered).cpu().numpy()
        else:
            counts_NE = counts.cpu().numpy()[None]
        plan = assign(counts_NE, st.holders(l), st.nodes)  # O(N*E), never the (N, E, N) array
        st.record_loads(plan.rank_loads())
        mine = plan.from_rank(me)  # (E, N)
        dst_rows = torch.repeat_interleave(torch.arange(N).repeat(E), torch.from_numpy(np.ascontiguousarray(mine).reshape(-1)))
        order = torch.argsort(dst_rows, stable=True).to(x_ND.device)
        in_splits = mine.sum(axis=0).tolist()
        recv_SE = plan.to_rank(me)  # rows arriving from each source, by expert
        out_splits = recv_SE.sum(axis=1).tolist()
        # Classic EP's contiguous ownership makes these row permutations identities: skip them
        # (each is a full copy of the tokens' activations, forward and backward).
        send_id = _monotone(mine.T)  # segments in (expert, dst) order already grouped by dst
        xs = x_ND if send_id else x_ND.index_select(0, order)
        recv = coll.all_to_all(xs, in_splits, out_splits, st.group, st.comm) if N > 1 else xs
        experts = st.local_experts(l)  # owned first, then copies: the order of the weight stacks
        pos = torch.full((E,), E, dtype=torch.long)
        pos[torch.tensor(experts, dtype=torch.long)] = torch.arange(len(experts))
        # arriving rows are source-major, expert-minor; the experts want (local order)-major
        key = torch.repeat_interleave((torch.arange(N)[:, None] + N * pos[None, :]).reshape(-1),
                                      torch.from_numpy(np.ascontiguousarray(recv_SE).reshape(-1)))
        perm = torch.argsort(key, stable=True).to(x_ND.device)
        # arrival visits (source, expert id); identity when the local positions never go back
        arrival_pos = pos.numpy()[np.nonzero(recv_SE)[1]]
        recv_id = bool(np.all(np.diff(arrival_pos) >= 0))
        rows = recv if recv_id else recv.index_select(0, perm)
        local_counts = [int(recv_SE[:, e].sum()) for e in experts]
        held = set(experts)
        missing = [int(e) for e in np.flatnonzero(recv_SE.sum(axis=0)) if int(e) not in held]
        if missing:
            raise RuntimeError(f"layer {l}: rank {me} received tokens for experts {missing} it does not hold")
        own_w, copy_w = st.local_weights(l, experts)
        if own_w[0].dtype != rows.dtype:
            # The pool keeps fp32 master weights outside DeepSpeed; under bf16 the engine casts the
            # dense module only, so compute in the activations' dtype (gradients flow back in fp32).
            own_w = [w.to(rows.dtype) for w in own_w]
            copy_w = [w.to(rows.dtype) for w in copy_w]
        n_own = len(experts) - (copy_w[0].shape[0] if copy_w else 0)
        rows_own = sum(local_counts[:n_own])
        # owned experts straight from the pool, copies from the gathered stacks: no weight copies
        y = st.backend(rows[:rows_own], local_counts[:n_own], *own_w)
        if copy_w:
            if st.cfg.rematerialize and torch.is_grad_enabled():
                copy_w = [release_after_backward(w) for w in copy_w]
            y = torch.cat([y, st.backend(rows[rows_own:], local_counts[n_own:], *copy_w)])
        if rows.requires_grad and not y.requires_grad:
            # No rows here (e.g. every token went elsewhere): keep the reverse all-to-all in the
            # graph, or this rank would skip the collective in backward while its peers wait.
            y = y + rows.sum() * 0
        if st.cfg.rematerialize and st.strategy == "fssdp":
            # On every rank (senders too): backward gathers the copies again before it needs them.
            if y.requires_grad:
                y = refill_before_backward(y, st, l)
            st.release_layer(l)
        y_src = y if recv_id else y.index_select(0, torch.argsort(perm))
        back = coll.all_to_all(y_src, out_splits, in_splits, st.group, st.comm) if N > 1 else y_src
        return back if send_id else back.index_select(0, torch.argsort(order))


def shard_model(model, strategy: str, plan_cfg: Optional[FSSDPPlanConfig] = None, groups=None,
                comm_dtype=None) -> Optional[ExpertStore]:
    """Move the model's experts into an ExpertStore (this rank keeps the ones it owns) and put
    `ShardedExperts` in their place. The model must be built identically on every rank.
    `groups` (`parallel.groups.ExpertGroups`): the expert-parallel layout; None: the world."""
    layers = model.moe_layers()
    if not layers:
        return None
    first = layers[0].experts
    store = ExpertStore(num_layers=len(layers), num_experts=first.num_experts, d_model=first.w1.shape[1],
                        d_expert=first.w1.shape[2], strategy=strategy, plan_cfg=plan_cfg, dtype=first.w1.dtype,
                        device=first.w1.device, backend=first.backend_name, groups=groups,
                        comm_dtype=comm_dtype)
    if getattr(first, "recompute", False):
        from experts.backends import recomputing

        store.backend = recomputing(store.backend)  # local expert rows only; collectives are not redone
    for i, layer in enumerate(layers):
        ex = layer.experts
        if getattr(ex, "partial", False):  # built with only this rank's experts (meta-free init)
            store.load_rows(i, ex.rows, ex.w1.detach(), ex.w3.detach(), ex.w2.detach())
        else:
            store.load_full_layer(i, ex.w1.detach(), ex.w3.detach(), ex.w2.detach())
        layer.experts = ShardedExperts(store, i, ex.num_experts)
    # A Transformer's MoE blocks post the layer's gather before their attention (a bare layer in
    # tests or benchmarks has no blocks: its gather runs when the layer needs the copies).
    for i, blk in enumerate(b for b in getattr(model, "blocks", []) if getattr(b, "is_moe", False)):
        blk.attention_hook = AttentionOverlap(store, i)
    return store
