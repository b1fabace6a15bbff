"""The collectives of expert parallelism: a differentiable uneven all-to-all, SparseAllGather
and SparseReduceScatter, each counting the bytes it moves.

spAG/spRS are point-to-point: for every (expert, extra holder) pair of the plan the owner sends
one flat message (w1|w3|w2 of that expert) and the holder receives it; spRS sends the holders'
gradients back and the owner sums them. All messages of one call are posted at once
(`batch_isend_irecv`), so they proceed in the background; `SparseAllGather.start` returns a
handle whose `wait()` finishes them, which is how the gathers overlap with the attention compute
that runs before the MoE layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    """Bytes this rank sent, by collective. Each expert strategy owns one (reset once per step)
    and passes it to the collectives it calls; None counts nothing."""

    all_to_all: int = 0
    spag: int = 0
    sprs: int = 0
    reshard: int = 0
    messages: int = 0

    def reset(self) -> None:
        self.all_to_all = self.spag = self.sprs = self.reshard = self.messages = 0

    def as_dict(self) -> dict[str, int]:
        return {"all_to_all": self.all_to_all, "spag": self.spag, "sprs": self.sprs, "reshard": self.reshard}



class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, in_splits: list[int], out_splits: list[int], group, stats) -> torch.Tensor:
        ctx.in_splits, ctx.out_splits, ctx.group, ctx.stats = in_splits, out_splits, group, stats
        return _a2a(x.contiguous(), in_splits, out_splits, group, stats)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return _a2a(g.contiguous(), ctx.out_splits, ctx.in_splits, ctx.group, ctx.stats), None, None, None, None


def _a2a(x: torch.Tensor, in_splits: list[int], out_splits: list[int], group,
         stats: Optional[CommStats]) -> torch.Tensor:
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    if stats is not None:
        row = x[0].numel() * x.element_size() if x.shape[0] else 0
        me = dist.get_rank(group)
        stats.all_to_all += row * (sum(in_splits) - in_splits[me])  # rows that leave this rank
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    return out


def all_to_all(x: torch.Tensor, in_splits: Sequence[int], out_splits: Sequence[int], group=None,
               stats: Optional[CommStats] = None) -> torch.Tensor:
    """Rows [sum(in_splits[:d]), ...) go to rank d; rows from rank s arrive in order of s.

    Differentiable: the backward pass is the reverse all-to-all of the gradient.
    """
    return _AllToAll.apply(x, [int(v) for v in in_splits], [int(v) for v in out_splits], group, stats)


# --------------------------------------------------------------------------------------------
# SparseAllGather / SparseReduceScatter
# --------------------------------------------------------------------------------------------
@dataclass
class Transfer:
    """One expert moving between two ranks: `src` sends rows of its pool slot to `dst`."""

    layer: int
    expert: int
    src: int
    dst: int
    tag: int


@dataclass
class PendingGather:
    """Receives in flight; `wait()` completes them and returns the buffers by (layer, expert)."""

    works: list = field(default_factory=list)
    recv: dict = field(default_factory=dict)  # (layer, expert) -> flat buffer

    def wait(self) -> dict:
        for w in self.works:
            w.wait()
        self.works = []
        return self.recv


def _post(ops: list) -> list:
    if not ops:
        return []
    return dist.batch_isend_irecv(ops)


def sparse_all_gather_start(transfers: Sequence[Transfer], rank: int, pack, numel: int, dtype, device,
                            stats: Optional[CommStats] = None) -> PendingGather:
    """Post spAG: each owner sends `pack(layer, expert)` (a flat tensor) to every extra holder.

    Returns at once; the received flat buffers are valid after `wait()`.
    """
    ops, recv, sent = [], {}, []
    for tr in transfers:
        if tr.src == rank:
            buf = pack(tr.layer, tr.expert)
            sent.append(buf)  # keep alive until the send completes
            ops.append(dist.P2POp(dist.isend, buf, tr.dst, tag=tr.tag))
            if stats is not None:
                stats.spag += buf.numel() * buf.element_size()
                stats.messages += 1
        elif tr.dst == rank:
            buf = torch.empty(numel, dtype=dtype, device=device)
            recv[(tr.layer, tr.expert)] = buf
            ops.append(dist.P2POp(dist.irecv, buf, tr.src, tag=tr.tag))
    pg = PendingGather(_post(ops), recv)
    pg._sent = sent  # noqa: SLF001 - lifetime only
    return pg


def sparse_reduce_scatter(transfers: Sequence[Transfer], rank: int, grads: dict, numel: int, dtype, device,
                          stats: Optional[CommStats] = None) -> dict:
    """spRS: every holder sends its gradient of a copy (`grads[(layer, expert)]`, flat) back to
    the owner; returns, on the owner, the list of received gradients by (layer, expert)."""
    ops, recv, sent = [], {}, []
    for tr in transfers:  # a transfer src -> dst in spAG runs dst -> src here
        if tr.dst == rank:
            g = grads[(tr.layer, tr.expert)].contiguous()
            sent.append(g)
            ops.append(dist.P2POp(dist.isend, g, tr.src, tag=tr.tag))
            if stats is not None:
                stats.sprs += g.numel() * g.element_size()
                stats.messages += 1
        elif tr.src == rank:
            buf = torch.empty(numel, dtype=dtype, device=device)
            recv.setdefault((tr.layer, tr.expert), []).append(buf)
            ops.append(dist.P2POp(dist.irecv, buf, tr.dst, tag=tr.tag))
    for w in _post(ops):
        w.wait()
    return recv


def transfers_for(copies: Sequence[tuple[int, int, int]], owner_of, num_experts: int) -> list[Transfer]:
    """Transfers of a plan's copies (layer, expert, holder); tags are unique per (layer, expert)."""
    out = []
    for l, e, h in copies:
        out.append(Transfer(l, e, int(owner_of(l, e)), int(h), tag=l * num_experts + e))
    return out
