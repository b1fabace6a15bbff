"""The sharded expert computation of one MoE layer under ep/fssdp, and the autograd pieces it uses.

`ShardedExperts` replaces a layer's `GroupedExperts`: same call (rows sorted by expert in,
rows out), no parameters of its own. `shard_model` moves a model's experts into an
`ExpertStore` and installs the dispatch, plus each MoE block's attention hook (the layer's
SparseAllGather is posted before the block's attention, so the transfer overlaps it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from parallel import collectives as coll
from parallel import dist as pdist
from parallel.expert_autograd import mark_layer_backward, refill_before_backward, release_after_backward
from parallel.expert_store import ExpertStore
from parallel.placement import FSSDPPlanConfig, assign


def _monotone(counts_AB: np.ndarray) -> bool:
    """Rows laid out B-major (b, then a within b) are already A-major: true when the non-empty
    (a, b) segments, visited B-major, never go back in a. `counts_AB[a, b]` = segment sizes."""
    a_idx = np.nonzero(np.asarray(counts_AB).T)[1]  # a of each non-empty segment, in B-major order
    return bool(np.all(np.diff(a_idx) >= 0)) if a_idx.size else True


@dataclass(frozen=True)
class DispatchMeta:
    """What `combine` needs to undo a `dispatch`: the all-to-all splits and both row
    permutations with their inverses (None when the permutation is the identity, as under classic
    EP's contiguous ownership: each is a full copy of the tokens' activations, forward and backward)."""

    send_splits: tuple[int, ...]  # rows this rank sends to each rank
    recv_splits: tuple[int, ...]  # rows each rank sends to this one
    send_order: Optional[torch.Tensor]  # this rank's rows (sorted by expert) -> grouped by destination rank
    send_inverse: Optional[torch.Tensor]
    recv_order: Optional[torch.Tensor]  # arriving rows (source-major) -> grouped by local expert
    recv_inverse: Optional[torch.Tensor]

    @property
    def send_is_identity(self) -> bool:
        return self.send_order is None

    @property
    def recv_is_identity(self) -> bool:
        return self.recv_order is None


def _segments(lens_in_out_order: np.ndarray, starts_in_src: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A permutation made of contiguous segments, as (per-segment shift, segment lengths): output
    row j of segment s is source row starts_in_src[s] + (j - start of s in the output)."""
    out_starts = np.cumsum(lens_in_out_order) - lens_in_out_order
    return starts_in_src - out_starts, lens_in_out_order


def _src_starts(lens: np.ndarray) -> np.ndarray:
    return np.cumsum(lens) - lens


def _segment_perms(parts: list) -> list:
    """Each (shift, lens) of `_segments` as a row index tensor on `device`, built there: the host
    sends the small segment tables in one copy (pinned and asynchronous on a GPU), the device
    expands them (repeat_interleave with its output size known, plus an arange), so no row index
    crosses from the host and nothing is sorted."""
    device = parts[0][2]
    sizes = [len(sh) for sh, _, _ in parts]
    host = torch.from_numpy(np.concatenate([np.concatenate([sh, ln]) for sh, ln, _ in parts]).astype(np.int64))
    if device.type == "cuda":
        host = host.pin_memory()
    table = host.to(device, non_blocking=True)
    out, off = [], 0
    for n, (_, ln, _) in zip(sizes, parts):
        shift, lens = table[off:off + n], table[off + n:off + 2 * n]
        off += 2 * n
        total = int(ln.sum())
        out.append(torch.arange(total, device=device)
                   + torch.repeat_interleave(shift, lens, output_size=total))
    return out


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

    forward(x_ND, counts_E), rows sorted by expert (this rank's tokens), in three steps:
      dispatch: all-gather every rank's counts (every rank derives the same token assignment),
                then an uneven all-to-all of the rows to the holders the assignment names;
      compute:  the holder computes its local experts (owned ones from the pool, copies from spAG);
      combine:  the reverse all-to-all brings the results back in the input order.
    """

    def __init__(self, store: ExpertStore, layer: int, num_experts: int):
        super().__init__()
        object.__setattr__(self, "store", store)  # not a submodule: its pool is not a module parameter
        self.layer, self.num_experts = layer, num_experts

    def prefetch(self) -> None:
        self.store.start_gather(self.layer)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        st = self.store
        if st.marks_layer_backward and x_ND.requires_grad:
            x_ND = mark_layer_backward(x_ND, st, self.layer)  # its backward: the layer's spRS may start
        rows, local_counts, meta = self.dispatch(x_ND, counts_E)
        return self.combine(self.compute(rows, local_counts), meta)

    # -- dispatch ---------------------------------------------------------------------------------
    def dispatch(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> tuple[torch.Tensor, list[int], DispatchMeta]:
        """Send each row to the rank the token assignment names. Returns the rows this rank
        computes, grouped by local expert (`local_experts` order), their count per local expert,
        and the metadata `combine` needs."""
        st, layer, world, rank = self.store, self.layer, self.store.world, self.store.rank
        all_counts = self._all_counts(counts_E)
        x_ND = x_ND[:int(all_counts[rank].sum())]  # an untrimmed plan's invalid rows (DTS padding) stay here
        plan = assign(all_counts, st.holders(layer), st.nodes)  # O(R*E), no (R, E, R) array
        st.record_loads(plan.rank_loads())
        send_ER = np.ascontiguousarray(plan.from_rank(rank))  # rows of each expert this rank sends to each rank
        send_splits = tuple(send_ER.sum(axis=0).tolist())
        recv_RE = np.ascontiguousarray(plan.to_rank(rank))  # rows arriving from each source rank, by expert
        recv_splits = tuple(recv_RE.sum(axis=1).tolist())
        experts = st.local_experts(layer)  # owned first, then copies: the order of the weight stacks
        held = set(experts)
        missing = [int(e) for e in np.flatnonzero(recv_RE.sum(axis=0)) if int(e) not in held]
        if missing:
            raise RuntimeError(f"layer {layer}: rank {rank} received tokens for experts {missing} it does not hold")
        send, recv = self._send_segments(send_ER), self._recv_segments(recv_RE, experts)
        wanted = [p for p in (send, recv) if p is not None]
        perms = iter(_segment_perms([(sh, ln, x_ND.device) for p in wanted for sh, ln in p]) if wanted else [])
        send_order, send_inverse = (next(perms), next(perms)) if send is not None else (None, None)
        recv_order, recv_inverse = (next(perms), next(perms)) if recv is not None else (None, None)
        xs = x_ND if send_order is None else x_ND.index_select(0, send_order)
        got = coll.all_to_all(xs, send_splits, recv_splits, st.group, st.comm) if world > 1 else xs
        rows = got if recv_order is None else got.index_select(0, recv_order)
        local_counts = [int(recv_RE[:, e].sum()) for e in experts]
        return rows, local_counts, DispatchMeta(send_splits, recv_splits, send_order, send_inverse,
                                                recv_order, recv_inverse)

    def _all_counts(self, counts_E: torch.Tensor) -> np.ndarray:
        """(world, E): every rank's rows per expert, the same array on every rank. Bringing it to
        the host is the layer's one host sync: everything after it is planned there."""
        st = self.store
        counts = counts_E.detach().to(torch.int64)
        if st.world > 1:
            counts = torch.stack(pdist.all_gather(counts, st.group))
        return np.asarray(counts.tolist(), dtype=np.int64).reshape(-1, self.num_experts)

    def _send_segments(self, send_ER: np.ndarray):
        """The permutation grouping this rank's rows (expert-major) by destination rank, and its
        inverse, as segment tables; None when it is the identity (the (expert, destination)
        segments already rank-major). Row order within a segment is kept (a stable sort's)."""
        if _monotone(send_ER.T):
            return None
        starts_ER = _src_starts(send_ER.reshape(-1)).reshape(send_ER.shape)  # expert-major layout
        fwd = _segments(send_ER.T.reshape(-1), starts_ER.T.reshape(-1))  # destination-major output
        out_starts_RE = _src_starts(send_ER.T.reshape(-1)).reshape(send_ER.T.shape)
        inv = _segments(send_ER.reshape(-1), out_starts_RE.T.reshape(-1))
        return fwd, inv

    def _recv_segments(self, recv_RE: np.ndarray, experts: list[int]):
        """The permutation taking the arriving rows (source-major, expert-minor) to local-expert
        order (sources ascending within an expert), and its inverse; None when it is the
        identity (the local positions never go back on arrival)."""
        E = self.num_experts
        pos = np.full(E, E, dtype=np.int64)  # each expert's position among the local ones
        pos[np.asarray(experts, dtype=np.int64)] = np.arange(len(experts))
        arrival_pos = pos[np.nonzero(recv_RE)[1]]  # arrival visits (source, expert id)
        if np.all(np.diff(arrival_pos) >= 0):
            return None
        starts_RE = _src_starts(recv_RE.reshape(-1)).reshape(recv_RE.shape)
        local = np.asarray(experts, dtype=np.int64)
        fwd = _segments(recv_RE[:, local].T.reshape(-1), starts_RE[:, local].T.reshape(-1))  # expert-major
        out_lens = recv_RE[:, local].T.reshape(-1)
        out_starts = np.zeros_like(recv_RE)
        out_starts[:, local] = _src_starts(out_lens).reshape(len(local), -1).T
        inv = _segments(recv_RE.reshape(-1), out_starts.reshape(-1))
        return fwd, inv

    # -- compute ----------------------------------------------------------------------------------
    def compute(self, rows: torch.Tensor, local_counts: list[int]) -> torch.Tensor:
        """This rank's local experts on their rows: owned experts straight from the pool, copies
        from the gathered stacks (no weight copies); rows out in the same order."""
        st, layer = self.store, self.layer
        experts = st.local_experts(layer)
        own_w, copy_w = st.local_weights(layer, experts)
        if own_w[0].dtype != rows.dtype:
            # The pool keeps fp32 master weights outside DeepSpeed; under bf16 the engine casts the
            # dense module only, so compute in the activations' dtype (gradients flow back in fp32).
            own_w = [w.to(rows.dtype) for w in own_w]
            copy_w = [w.to(rows.dtype) for w in copy_w]
        n_own = len(experts) - (copy_w[0].shape[0] if copy_w else 0)
        rows_own = sum(local_counts[:n_own])
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
                y = refill_before_backward(y, st, layer)
            st.release_layer(layer)
        return y

    # -- combine ----------------------------------------------------------------------------------
    def combine(self, y: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        """The reverse of `dispatch`: every result row back to its token's rank, in input order."""
        st = self.store
        y_src = y if meta.recv_inverse is None else y.index_select(0, meta.recv_inverse)
        back = (coll.all_to_all(y_src, meta.recv_splits, meta.send_splits, st.group, st.comm) if st.world > 1
                else y_src)
        return back if meta.send_inverse is None else back.index_select(0, meta.send_inverse)


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
