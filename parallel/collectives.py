"""The collectives of expert parallelism: a differentiable uneven all-to-all, SparseAllGather
and SparseReduceScatter, each counting the bytes it moves (`CommStats`).

spAG sends an expert's flat message (w1|w3|w2) from its owner down the pipelined chain of its
holders (`parallel.copy_schedule`); spRS sums the copies' gradients back up the same chain, so
no rank sends more than one copy of an expert. Each round is posted at once, in the same order
on every rank (matching never relies on tags). Both return handles that run one round at a time
(`PendingGather`, `PendingReduce`), so the transfers overlap the attention and the backward pass.
Ranks are places in the expert-parallel group; `peer` maps them to global ranks.
docs/expert_parallel.md ("SparseAllGather / SparseReduceScatter as pipelined chains") has more.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from parallel import dist as pdist
from parallel.copy_schedule import chain, chunk_bounds, gather_rounds, num_chunks, reduce_rounds


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
        me = pdist.rank(group)
        stats.all_to_all += row * (sum(in_splits) - in_splits[me])  # rows that leave this rank
    pdist.all_to_all_single(out, x, out_splits, in_splits, group)
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
def _post(ops: list) -> list:
    return pdist.batch_isend_irecv(ops)


def _op(kind: str, buf: torch.Tensor, peer: int, group, tag: int):
    return pdist.p2p_op(kind, buf, peer, group, tag)


_SIDE_STREAMS: dict = {}


@contextlib.contextmanager
def _side_stream(device):
    """On CUDA, a stream of its own that first waits for the current one (whose kernels packed
    the messages): rounds chained there never make the compute stream wait. Elsewhere nothing."""
    device = torch.device(device)
    if device.type != "cuda":
        yield
        return
    s = _SIDE_STREAMS.get(device)
    if s is None:
        s = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        yield


class PendingGather:
    """spAG in flight: round 0 is posted; `wait()` runs the remaining rounds and returns this
    rank's received flat buffers by key (the keys it holds a copy of, not the ones it owns).

    `post_all` (a stream-ordered backend, NCCL, on a group of its own): every round is posted at
    once. A round's sends forward what the previous round received, so each round is posted
    after a `wait()` on the previous round's works, made on a side stream: the device orders the
    rounds, no host thread blocks, and the whole chain runs behind the attention. On gloo a
    `wait()` blocks, so there the rounds run one at a time from `wait()` (the default)."""

    def __init__(self, rounds, rank: int, chains: dict, pack, numel: int, dtype, device, chunks: dict,
                 stats: Optional[CommStats], peer, group, post_all: bool = False):
        self.rounds, self.rank, self.pack, self.numel = rounds, rank, pack, numel
        self.dtype, self.device, self.chunks, self.stats, self.peer, self.group = (dtype, device, chunks, stats,
                                                                                  peer, group)
        self.buf: dict = {}  # key -> flat message (owner: packed; holders: received)
        self.recv: dict = {}
        for key, c in chains.items():
            if self.rank == c[0] and len(c) > 1:
                self.buf[key] = pack(key).to(dtype)
            elif self.rank in c[1:]:
                self.buf[key] = self.recv[key] = torch.empty(numel, dtype=dtype, device=device)
        self.next_round = 0
        self.works: list = []
        if not post_all:
            self._post_next()
            return
        posted: list = []
        with _side_stream(device):
            while self.next_round < len(self.rounds):
                for w in self.works:  # NCCL: the side stream waits; gloo (tests): the host does
                    w.wait()
                self._post_next()
                posted += self.works
        # `wait()`: on CUDA the consumer's stream waits for every round (a work waited on twice is
        # an event waited on twice); a gloo point-to-point work must be waited on once only
        if torch.device(device).type == "cuda":
            self.works = posted

    def _post_next(self) -> None:
        if self.next_round >= len(self.rounds):
            return
        ops = []
        for tag, h in enumerate(self.rounds[self.next_round]):
            if self.rank not in (h.src, h.dst):
                continue
            a, b = chunk_bounds(self.numel, self.chunks[h.key])[h.chunk]
            piece = self.buf[h.key][a:b]
            if h.src == self.rank:
                ops.append(_op("send", piece, self.peer(h.dst), self.group, tag))
                if self.stats is not None:
                    self.stats.spag += piece.numel() * piece.element_size()
                    self.stats.messages += 1
            else:
                ops.append(_op("recv", piece, self.peer(h.src), self.group, tag))
        self.next_round += 1
        self.works = _post(ops)

    def wait(self) -> dict:
        while True:
            for w in self.works:
                w.wait()
            self.works = []
            if self.next_round >= len(self.rounds):
                return self.recv
            self._post_next()


def layer_chains(holders_E: Sequence[Sequence[int]], layer: int, nodes) -> dict:
    """{(layer, expert): chain} of a layer's experts that have copies."""
    return {(layer, e): chain(hs, e, nodes) for e, hs in enumerate(holders_E) if len(hs) > 1}


def sparse_all_gather_start(chains: dict, rank: int, pack, numel: int, dtype, device,
                            stats: Optional[CommStats] = None, peer=lambda r: r, group=None,
                            max_chunks: int = 4, post_all: bool = False) -> PendingGather:
    """Post spAG: every key's owner (chain[0]) sends `pack(key)` (a flat tensor, cast to `dtype`)
    down its chain. Returns at once; the received flat buffers are valid after `wait()`.
    `post_all`: every round now (see `PendingGather`)."""
    chunks = {k: num_chunks(len(c), max_chunks) for k, c in chains.items()}
    return PendingGather(gather_rounds(chains, max_chunks), rank, chains, pack, numel, dtype, device, chunks,
                         stats, peer, group, post_all)


class PendingReduce:
    """spRS in flight: the chains' rounds run one `advance()` at a time, so a layer's reduction
    can start as soon as its gradients are final and proceed while the backward pass computes
    earlier layers (each advance waits for the round posted by the previous one, then posts the
    next). Every rank must call `advance` at the same points, in the same order, for the same
    pending reductions: the matching of point-to-point messages relies on that order only."""

    def __init__(self, rounds, rank: int, chains: dict, grads: dict, numel: int, dtype, device, chunks: dict,
                 stats: Optional[CommStats], peer, group):
        self.rounds, self.rank, self.numel, self.dtype, self.device = rounds, rank, numel, dtype, device
        self.chunks, self.stats, self.peer, self.group = chunks, stats, peer, group
        self.acc, self.out = {}, {}
        for key, c in chains.items():
            if rank in c[1:]:
                self.acc[key] = grads[key].reshape(-1).to(dtype).clone()
            elif rank == c[0]:
                self.out[key] = self.acc[key] = torch.zeros(numel, dtype=dtype, device=device)
        self.next_round = 0
        self.works: list = []
        self.arrived: list = []

    @property
    def done(self) -> bool:
        return self.next_round >= len(self.rounds) and not self.works and not self.arrived

    def _complete(self) -> None:
        for w in self.works:
            w.wait()
        self.works = []
        for key, a, b, buf in self.arrived:
            self.acc[key][a:b] += buf
        self.arrived = []

    def advance(self) -> None:
        """Complete the round in flight (sum what arrived), then post the next one."""
        self._complete()
        if self.next_round >= len(self.rounds):
            return
        ops = []
        for tag, h in enumerate(self.rounds[self.next_round]):
            if self.rank not in (h.src, h.dst):
                continue
            a, b = chunk_bounds(self.numel, self.chunks[h.key])[h.chunk]
            if h.src == self.rank:
                piece = self.acc[h.key][a:b]
                ops.append(_op("send", piece, self.peer(h.dst), self.group, tag))
                if self.stats is not None:
                    self.stats.sprs += piece.numel() * piece.element_size()
                    self.stats.messages += 1
            else:
                buf = torch.empty(b - a, dtype=self.dtype, device=self.device)
                self.arrived.append((h.key, a, b, buf))
                ops.append(_op("recv", buf, self.peer(h.src), self.group, tag))
        self.next_round += 1
        self.works = _post(ops)

    def finish(self) -> dict:
        """Run the remaining rounds; returns, on the owner, {key: the sum of its copies' gradients}."""
        while not self.done:
            self.advance()
        return self.out


def sparse_reduce_scatter_start(chains: dict, rank: int, grads: dict, numel: int, dtype, device,
                                stats: Optional[CommStats] = None, peer=lambda r: r, group=None,
                                max_chunks: int = 4) -> PendingReduce:
    """Post the first round of spRS (see `sparse_reduce_scatter`); `advance()` runs one more
    round, `finish()` the rest and returns the owners' sums."""
    chunks = {k: num_chunks(len(c), max_chunks) for k, c in chains.items()}
    pr = PendingReduce(reduce_rounds(chains, max_chunks), rank, chains, grads, numel, dtype, device, chunks,
                       stats, peer, group)
    pr.advance()
    return pr


def sparse_reduce_scatter(chains: dict, rank: int, grads: dict, numel: int, dtype, device,
                          stats: Optional[CommStats] = None, peer=lambda r: r, group=None,
                          max_chunks: int = 4) -> dict:
    """spRS: the copies' gradients (`grads[key]`, flat, on every holder but the owner) summed up
    each chain into its owner; returns, on the owner, {key: the sum of its copies' gradients}."""
    return sparse_reduce_scatter_start(chains, rank, grads, numel, dtype, device, stats, peer, group,
                                       max_chunks).finish()
