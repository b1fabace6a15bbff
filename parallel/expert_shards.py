"""Expert optimizer state sharded over the expert-data-parallel group (`parallel.expert_sharding`).

The G ranks at one place of the G expert-parallel groups (an EDP group, `parallel.groups`) own
the same experts in the same pool slots. With sharding, member j keeps piece j of every slot:
each weight's D*F elements per slot are cut into G pieces of ceil(D*F / G) (the last one padded
with zeros, which stay zero), and only piece j has an fp32 master and AdamW moments here, so a
rank's expert optimizer memory falls as 1/G. Gradients are reduce-scattered over the EDP group
instead of all-reduced (level 1: once a step, from the pool's full gradient; level 2: each
layer's rows as soon as that layer's backward ends, so no pool-sized gradient ever exists), each
member steps its pieces, and the updated weights are all-gathered into every member's working
pool. Pieces are per slot, so an ownership move (Algorithm 2) carries them like a weight row.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from parallel import dist as pdist


def device_index(positions, device: torch.device) -> torch.Tensor:
    """Host integers as an index tensor on `device`, copied without a host sync (pinned, async)."""
    t = torch.tensor(list(positions), dtype=torch.long)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def one_run(positions) -> bool:
    """Whether host integers are one ascending run (then a narrow view serves, no index)."""
    p = list(positions)
    return bool(p) and p == list(range(p[0], p[0] + len(p)))


class ExpertShards:
    """Piece `member` of the G-way split of every slot of a pool's weights: fp32 masters, their
    gradient sums and their AdamW (see the module). `params`: the pool's (S, a, b) weights."""

    def __init__(self, level: int, params: list[torch.Tensor], group, size: int, member: int):
        if level not in (1, 2) or size < 2:
            raise ValueError(f"expert sharding {level} over {size} rank(s): needs level 1 or 2 and 2+ ranks")
        self.level, self.group, self.G, self.j = level, group, size, member
        self.S = params[0].shape[0]
        self.device = params[0].device
        self.n = [p[0].numel() for p in params]  # elements of one slot, per weight
        self.c = [-(-n // size) for n in self.n]  # piece length
        self.masters = [nn.Parameter(torch.zeros(self.S, c, dtype=torch.float32, device=self.device))
                        for c in self.c]
        self.grads: list[Optional[torch.Tensor]] = [None] * len(params)  # (S, c) fp32 sums, this step
        # level 1: the pool's whole gradient, (S, n) fp32, summed over the step's backward passes
        # (the working weights may be bf16: their own .grad would sum in bf16)
        self.full_grads: list[Optional[torch.Tensor]] = [None] * len(params)
        self.optimizer: Optional[torch.optim.Optimizer] = None

    # -- pieces ------------------------------------------------------------------------------------
    def span(self, i: int) -> tuple[int, int]:
        """The elements [lo, hi) of a slot's weight `i` this member's piece covers (hi <= n)."""
        lo = self.j * self.c[i]
        return min(lo, self.n[i]), min(lo + self.c[i], self.n[i])

    def piece_of(self, i: int, rows: torch.Tensor) -> torch.Tensor:
        """This member's piece (k, c) of full flat rows (k, n) of weight `i` (zeros past n)."""
        lo, hi = self.span(i)
        out = rows.new_zeros(rows.shape[0], self.c[i])
        out[:, :hi - lo] = rows[:, lo:hi]
        return out

    @torch.no_grad()
    def init_from(self, params: list[torch.Tensor]) -> None:
        """Masters from the pool's working weights (at the start, before any step)."""
        for i, (m, p) in enumerate(zip(self.masters, params)):
            m.copy_(self.piece_of(i, p.detach().reshape(self.S, -1).float()))

    def build_optimizer(self, lr: float, betas, eps: float, weight_decay: float) -> None:
        # fused on CUDA: the default (foreach) keeps an fp32 temporary the size of what it steps
        self.optimizer = torch.optim.AdamW([{"params": self.masters, "weight_decay": weight_decay,
                                             "name": "expert_sharded"}], lr=lr, betas=tuple(betas), eps=eps,
                                           **({"fused": True} if self.device.type == "cuda" else {}))

    def moments(self, i: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        st = None if self.optimizer is None else self.optimizer.state.get(self.masters[i])
        return (st["exp_avg"], st["exp_avg_sq"]) if st else None

    def slot_tensors(self) -> list[torch.Tensor]:
        """Every per-slot tensor held here (masters, then moments), for ownership moves."""
        out = list(self.masters)
        for i in range(len(self.masters)):
            m = self.moments(i)
            if m is not None:
                out += list(m)
        return out

    # -- gradients ---------------------------------------------------------------------------------
    @torch.no_grad()
    def scatter(self, rows: list[torch.Tensor], only: Optional[int] = None) -> list[torch.Tensor]:
        """Sum full flat rows (k, n_i) of each weight over the EDP group; this member gets its
        pieces (k, c_i) in fp32. One reduce-scatter carries all the weights (`only`: `rows` is
        weight `only`'s alone, and so is the answer)."""
        which = range(len(self.c)) if only is None else [only]
        k = rows[0].shape[0]
        send = torch.empty(self.G, k * sum(self.c[i] for i in which), dtype=torch.float32, device=rows[0].device)
        at = 0
        for i, r in zip(which, rows):  # member-major: piece j of every weight together
            block = send[:, at:at + k * self.c[i]].view(self.G, k, self.c[i])
            for j in range(self.G):
                lo, hi = min(j * self.c[i], self.n[i]), min((j + 1) * self.c[i], self.n[i])
                block[j, :, :hi - lo].copy_(r[:, lo:hi])
                block[j, :, hi - lo:].zero_()
            at += k * self.c[i]
        out = pdist.reduce_scatter_(send.new_empty(send.shape[1]), send.reshape(-1), self.group)
        return [t.view(k, self.c[i]) for t, i in zip(out.split([k * self.c[i] for i in which]), which)]

    @torch.no_grad()
    def add_slots(self, slots, pieces: list[torch.Tensor]) -> None:
        """Add reduced pieces (k, c_i) of every weight into this step's sums at pool `slots`."""
        for i, piece in enumerate(pieces):
            self.add_piece(i, slots, piece)

    @torch.no_grad()
    def add_piece(self, i: int, slots, piece: torch.Tensor) -> None:
        """Add weight `i`'s reduced pieces (k, c_i) into this step's sums at `slots` (host ints)."""
        slots = list(slots)
        if self.grads[i] is None:
            self.grads[i] = torch.zeros(self.S, self.c[i], dtype=torch.float32, device=self.device)
        if one_run(slots):
            self.grads[i].narrow(0, slots[0], len(slots)).add_(piece)
        else:
            self.grads[i].index_add_(0, device_index(slots, self.device), piece)

    @torch.no_grad()
    def add_full(self, i: int, slots, g: torch.Tensor) -> None:
        """Level 1: add one backward's gradient of pool rows `slots` (host ints) of weight `i`
        into the step's whole fp32 gradient."""
        if self.full_grads[i] is None:
            self.full_grads[i] = torch.zeros(self.S, self.n[i], dtype=torch.float32, device=self.device)
        slots = list(slots)
        rows = g.reshape(len(slots), -1).to(torch.float32)
        if one_run(slots):
            self.full_grads[i].narrow(0, slots[0], len(slots)).add_(rows)
        elif slots:
            self.full_grads[i].index_add_(0, device_index(slots, self.device), rows)

    def reduce_pool_grads(self) -> None:
        """Level 1: reduce-scatter the step's whole gradients into this member's sums, weight by
        weight (each freed once scattered: the transient is one weight's send buffer)."""
        for i, n in enumerate(self.n):
            g = self.full_grads[i]
            if g is None:
                g = torch.zeros(self.S, n, dtype=torch.float32, device=self.device)
            self.full_grads[i] = None
            piece = self.scatter([g], only=i)[0]
            del g
            self.add_piece(i, range(self.S), piece)

    def scale(self, factor: float) -> None:
        for g in self.grads:
            if g is not None:
                g.mul_(factor)

    def grad_sq_norm(self) -> torch.Tensor:
        """This member's pieces' squared gradient norm (the sum over the world is the experts')."""
        return sum((g.double().pow(2).sum() for g in self.grads if g is not None),
                   torch.zeros((), dtype=torch.float64, device=self.device))

    # -- the update --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, lr: float, clip_coef: float, params: list[torch.Tensor]) -> None:
        """Step the masters with this step's summed gradients, then all-gather the updated weights
        into the working pool (in its dtype: the training dtype when it is not fp32)."""
        if self.optimizer is None:
            raise RuntimeError("ExpertShards.step before build_optimizer")
        for m, g in zip(self.masters, self.grads):
            m.grad = g if g is not None else torch.zeros_like(m)
            if clip_coef < 1.0:
                m.grad.mul_(clip_coef)
        for grp in self.optimizer.param_groups:
            grp["lr"] = lr
        self.optimizer.step()
        self.discard()
        self.gather_into(params)

    @torch.no_grad()
    def gather_into(self, params: list[torch.Tensor]) -> None:
        """Every member's pieces, all-gathered weight by weight (the transient is one weight's
        gathered pieces, in the pool's dtype), each member's block copied into its columns."""
        for i, (p, m) in enumerate(zip(params, self.masters)):
            mine = m.detach().to(p.dtype).reshape(-1)
            full = pdist.all_gather_into_(mine.new_empty(self.G * mine.numel()), mine, self.group)
            rows = p.detach().view(self.S, -1)
            for j, block in enumerate(full.view(self.G, self.S, self.c[i]).unbind(0)):
                lo, hi = min(j * self.c[i], self.n[i]), min((j + 1) * self.c[i], self.n[i])
                if hi > lo:
                    rows[:, lo:hi].copy_(block[:, :hi - lo])
            del full

    def discard(self) -> None:
        """Drop this step's gradient sums (after the step, or a skipped step)."""
        self.grads = [None] * len(self.grads)
        self.full_grads = [None] * len(self.full_grads)
        for m in self.masters:
            m.grad = None

    # -- memory ------------------------------------------------------------------------------------
    def state_bytes(self) -> dict[str, int]:
        masters = sum(m.numel() * m.element_size() for m in self.masters)
        moments = sum(t.numel() * t.element_size() for i in range(len(self.masters)) for t in (self.moments(i) or ()))
        grads = sum(g.numel() * g.element_size() for g in self.grads + self.full_grads if g is not None)
        return {"master_bytes": masters, "optimizer_bytes": moments, "grad_shard_bytes": grads}
