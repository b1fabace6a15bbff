"""Sharded experts for `ep` and `fssdp`: every expert, and its optimizer state, on one rank.

`ExpertStore` holds this rank's expert pool: three tensors (S, D, F) / (S, F, D) of S = L*E/N
slots shared by all MoE layers, so every rank keeps the same number of expert slots whatever
heterogeneous sharding does. The pool is outside the module tree: DeepSpeed never sees, reduces
or steps expert parameters; the store has its own AdamW over the pool (one copy of every
expert's optimizer state in the world) and its own checkpoint files.

Per iteration (`begin_iteration`): the plan says which experts are materialized where (EP: the
ownership only; FSSDP: Hecate Algorithm 1 on predicted loads). In the forward pass each MoE layer
gathers its copies (SparseAllGather, posted before the attention of its block so the transfer
overlaps it), sends tokens to holders with an uneven all-to-all, computes, and sends results
back. After the last backward of the step, `reduce_grads` sums the copies' gradients into the
owners (SparseReduceScatter); `step` clips with the global norm and steps owned experts only.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from experts.backends import get_backend
from parallel import collectives as coll
from parallel.placement import (FSSDPPlanConfig, IterationPlan, LoadPredictor, Ownership, assign_tokens,
                                moves, plan_iteration, reshard_decision)

EXPERT_DIR = "experts"


class ExpertStore:
    def __init__(self, *, num_layers: int, num_experts: int, d_model: int, d_expert: int, strategy: str,
                 plan_cfg: Optional[FSSDPPlanConfig] = None, dtype=torch.float32, device="cpu",
                 backend: str = "reference", group=None):
        if strategy not in ("ep", "fssdp"):
            raise ValueError(f"expert strategy {strategy!r}: the store serves 'ep' and 'fssdp'")
        self.group = group
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.L, self.E, self.D, self.F = num_layers, num_experts, d_model, d_expert
        self.strategy = strategy
        self.cfg = plan_cfg or FSSDPPlanConfig()
        self.dtype, self.device = dtype, torch.device(device)
        self.backend = get_backend(backend)
        self.own = Ownership.even(num_layers, num_experts, self.world)
        S = self.own.slots_per_rank
        self.w1 = nn.Parameter(torch.zeros(S, d_model, d_expert, dtype=dtype, device=self.device))
        self.w3 = nn.Parameter(torch.zeros(S, d_model, d_expert, dtype=dtype, device=self.device))
        self.w2 = nn.Parameter(torch.zeros(S, d_expert, d_model, dtype=dtype, device=self.device))
        for p in self.params():
            p.moeforge_expert = True
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.predictor = LoadPredictor(self.cfg.window)
        self.plan = IterationPlan([[[int(o)] for o in self.own.owner_LE[l]] for l in range(num_layers)])
        self.iteration = 0
        self.t_budget = self.cfg.overlap_budget if self.cfg.overlap_budget is not None else num_experts
        self._copies: dict = {}  # l -> (expert ids, [w1, w3, w2] stacked leaf tensors) of this iteration
        self._gathered: set = set()  # layers whose spAG ran this iteration (same on every rank)
        self._pending: dict = {}  # l -> PendingGather
        self.peak_copies = 0  # most copies held at once (all layers)
        self.peak_copy_bytes = 0  # most bytes of copies resident at once (rematerialization frees them)
        self.reshards = 0
        self._rank_loads: list = []  # per training forward: (N,) expert rows per rank
        self._attn_times: list = []  # measured attention seconds per block (to derive t)

    # -- the overlap budget t ---------------------------------------------------------------------
    def attention_clock(self) -> Optional[float]:
        """Start timing a block's attention while t is still to be derived (first iterations)."""
        if self.cfg.overlap_budget is not None or len(self._attn_times) >= 4 * self.cfg.window * self.L:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        import time
        return time.perf_counter()

    def attention_done(self, t0: Optional[float]) -> None:
        if t0 is None or not torch.is_grad_enabled():
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        import time
        self._attn_times.append(time.perf_counter() - t0)

    def derive_budget(self) -> int:
        """t = attention time x link bandwidth / expert bytes (Hecate), from the measured times."""
        from parallel.placement import overlap_budget
        if self.cfg.overlap_budget is not None:
            return min(self.cfg.overlap_budget, self.E)
        if not self._attn_times:
            return self.E
        attn = float(np.median(self._attn_times))
        expert_bytes = self.expert_numel * torch.empty((), dtype=self.dtype).element_size()
        # At least the hottest expert stays eligible: a straggler costs more than one exposed copy.
        return min(self.E, max(1, overlap_budget(attn, self.cfg.link_gbps * 1e9 / 8, expert_bytes)))

    def record_loads(self, loads) -> None:
        if torch.is_grad_enabled():
            self._rank_loads.append(np.asarray(loads, dtype=np.float64))

    def straggler_ratio(self) -> float:
        """Busiest rank's expert rows over the mean, averaged over this step's layer forwards."""
        vals = [x.max() / x.mean() for x in self._rank_loads if x.mean() > 0]
        return float(np.mean(vals)) if vals else 1.0

    # -- basic views ------------------------------------------------------------------------
    def params(self) -> list[nn.Parameter]:
        return [self.w1, self.w3, self.w2]

    @property
    def expert_numel(self) -> int:
        return 3 * self.D * self.F

    def owner(self, l: int, e: int) -> int:
        return int(self.own.owner_LE[l, e])

    def slot(self, l: int, e: int) -> int:
        return int(self.own.slot_LE[l, e])

    def holders(self, l: int) -> list[list[int]]:
        return self.plan.holders_L[l]

    def local_experts(self, l: int) -> list[int]:
        """The experts this rank computes for layer l: the owned ones, then the copies (each by id)."""
        held = [e for e, hs in enumerate(self.plan.holders_L[l]) if self.rank in hs]
        return [e for e in held if self.owner(l, e) == self.rank] + [e for e in held if self.owner(l, e) != self.rank]

    def pack(self, l: int, e: int) -> torch.Tensor:
        s = self.slot(l, e)
        return torch.cat([self.w1[s].detach().reshape(-1), self.w3[s].detach().reshape(-1),
                          self.w2[s].detach().reshape(-1)])

    def unpack(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.D * self.F
        return (flat[:n].view(self.D, self.F), flat[n:2 * n].view(self.D, self.F), flat[2 * n:].view(self.F, self.D))

    # -- building ----------------------------------------------------------------------------
    @torch.no_grad()
    def load_full_layer(self, l: int, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> None:
        """Take this rank's experts of layer l from full (E, ...) tensors."""
        for e in range(self.E):
            if self.owner(l, e) == self.rank:
                s = self.slot(l, e)
                self.w1[s].copy_(w1[e])
                self.w3[s].copy_(w3[e])
                self.w2[s].copy_(w2[e])

    def build_optimizer(self, lr: float, betas, eps: float, weight_decay: float) -> None:
        self.optimizer = torch.optim.AdamW([{"params": self.params(), "weight_decay": weight_decay,
                                             "name": "expert_sharded"}], lr=lr, betas=tuple(betas), eps=eps)

    # -- the iteration -------------------------------------------------------------------------
    def begin_iteration(self, step: int) -> None:
        """Plan this iteration: reshard every `reshard_every` steps, then materialize (FSSDP)."""
        self.iteration = step
        self._drop_copies()
        coll.STATS.reset()
        self._rank_loads = []
        self.t_budget = self.derive_budget()
        if self.strategy == "ep":
            return
        load = self.predictor.predict()
        if load is None:
            self.plan = plan_iteration(self.own, None, 0, 0)
            return
        if self.cfg.reshard_every and step > 0 and step % self.cfg.reshard_every == 0:
            self.maybe_reshard(load)
        self.plan = plan_iteration(self.own, load, self.t_budget, self.cfg.memory_cap, self.cfg.ranks_per_node,
                                   self.cfg.tolerance)

    def maybe_reshard(self, load) -> int:
        """Heterogeneous sharding (Algorithm 2), applied only when the predicted straggler ratio
        (with this iteration's materialization) is above tolerance and the new ownership lowers
        it: moving experts costs bytes, so a balanced layout stays where it is."""
        new = reshard_decision(self.own, load, self.t_budget, self.cfg.memory_cap, self.cfg.ranks_per_node,
                               self.cfg.tolerance)
        return 0 if new is None else self.reshard(new)

    def set_plan(self, plan: IterationPlan) -> None:
        """Use a given plan for this iteration (tests; calibration). It must contain the owners."""
        for l, hs in enumerate(plan.holders_L):
            for e, hl in enumerate(hs):
                if self.owner(l, e) not in hl:
                    raise ValueError(f"plan for layer {l} expert {e} lacks its owner rank {self.owner(l, e)}")
        self._drop_copies()
        self.plan = plan

    def observe(self, counts_LE: torch.Tensor) -> None:
        """The step's global (L, E) counts (already all-reduced): the load predictor's input."""
        self.predictor.observe(counts_LE.detach().cpu().numpy())

    def _layer_transfers(self, l: int) -> list[coll.Transfer]:
        copies = [(l, e, h) for e, hl in enumerate(self.plan.holders_L[l]) for h in hl[1:]]
        return coll.transfers_for(copies, self.owner, self.E)

    def start_gather(self, l: int) -> None:
        """Post layer l's SparseAllGather (non-blocking); a no-op when the copies are present."""
        # Every rank (sender, receiver or neither) records the gather, so all agree on whether a
        # later forward of this iteration (another micro-batch, evaluation) gathers again.
        if l in self._pending or (not self.cfg.rematerialize and l in self._gathered):
            return
        self._gathered.add(l)
        trs = self._layer_transfers(l)
        if not trs:
            return
        self._pending[l] = coll.sparse_all_gather_start(trs, self.rank, self.pack, self.expert_numel,
                                                        self.dtype, self.device)

    def _finish_gather(self, l: int) -> None:
        """Complete layer l's spAG into one stacked leaf per weight, (n_copies, ...), in the
        order of `local_experts` (copies by expert id). Rematerialization refills the same leaf
        tensors in place: autograd saved them, and their `.grad` accumulates across forwards."""
        self.start_gather(l)
        pg = self._pending.pop(l, None)
        if pg is None:
            return
        got = pg.wait()
        order = sorted(e for (ll, e) in got if ll == l)
        if not order:  # this rank only sent
            return
        parts = [self.unpack(got[(l, e)]) for e in order]
        stacks = [torch.stack([p[i] for p in parts]) for i in range(3)]
        old = self._copies.get(l)
        if old is not None:
            for o, new in zip(old[1], stacks):
                o.untyped_storage().resize_(new.numel() * new.element_size())
                o.data.copy_(new)
        else:
            self._copies[l] = (order, [t.requires_grad_(True) for t in stacks])
        self.peak_copy_bytes = max(self.peak_copy_bytes, self._live_copy_bytes())
        self.peak_copies = max(self.peak_copies, sum(len(c[0]) for c in self._copies.values()))

    def _live_copy_bytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for _, ts in self._copies.values() for t in ts)

    def local_weights(self, l: int, experts: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """This rank's weights for layer l: the owned experts (views of the pool when their
        slots are contiguous) and the copies (the gathered stacks), each in `experts` order."""
        self._finish_gather(l)
        owned = [e for e in experts if self.owner(l, e) == self.rank]
        idx = torch.tensor([self.slot(l, e) for e in owned], dtype=torch.long, device=self.device)
        own_w = [_PoolRows.apply(pool, idx) for pool in self.params()]
        copies = experts[len(owned):]
        if not copies:
            return own_w, []
        order, stacks = self._copies[l]
        if order != copies:
            raise RuntimeError(f"layer {l}: gathered copies {order} differ from the plan's {copies}")
        return own_w, stacks

    def _drop_copies(self) -> None:
        self._copies.clear()
        self._gathered.clear()
        for pg in self._pending.values():
            pg.wait()
        self._pending.clear()

    # -- rematerialization ------------------------------------------------------------------
    def release_layer(self, l: int) -> None:
        """Free layer l's copies right after its forward pass (rematerialization)."""
        if not self.cfg.rematerialize or l not in self._copies:
            return
        for t in self._copies[l][1]:
            t.untyped_storage().resize_(0)

    def refill_layer(self, l: int) -> None:
        """Gather layer l's copies again (a second spAG) into the freed tensors, for backward."""
        if not self.cfg.rematerialize:
            return
        with torch.no_grad():
            self._finish_gather(l)

    # -- after the backward pass ------------------------------------------------------------------
    @torch.no_grad()
    def reduce_grads(self) -> None:
        """SparseReduceScatter the copies' gradients into their owners, then average over ranks
        (each rank's loss is a mean over its own tokens, as DeepSpeed averages dense gradients)."""
        for p in self.params():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        trs = [tr for l in range(self.L) for tr in self._layer_transfers(l)]
        grads = {}
        for l, (order, ws) in self._copies.items():
            gs = [w.grad if w.grad is not None else torch.zeros(w.shape, dtype=self.dtype, device=self.device)
                  for w in ws]
            for i, e in enumerate(order):
                grads[(l, e)] = torch.cat([g[i].reshape(-1) for g in gs])
        recv = coll.sparse_reduce_scatter(trs, self.rank, grads, self.expert_numel, self.dtype, self.device)
        for (l, e), bufs in recv.items():
            s = self.slot(l, e)
            for flat in bufs:
                g1, g3, g2 = self.unpack(flat)
                self.w1.grad[s] += g1
                self.w3.grad[s] += g3
                self.w2.grad[s] += g2
        if self.world > 1:
            for p in self.params():
                p.grad.div_(self.world)

    def grad_sq_norm(self) -> torch.Tensor:
        """This rank's owned experts' squared gradient norm (sum over ranks = experts' share)."""
        return sum((p.grad.double().pow(2).sum() for p in self.params() if p.grad is not None),
                   torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def step(self, lr: float, clip_coef: float = 1.0) -> None:
        if self.optimizer is None:
            raise RuntimeError("ExpertStore.step before build_optimizer")
        if clip_coef < 1.0:
            for p in self.params():
                if p.grad is not None:
                    p.grad.mul_(clip_coef)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._drop_copies()

    # -- heterogeneous sharding -------------------------------------------------------------------
    @torch.no_grad()
    def reshard(self, new: Ownership) -> int:
        """Move ownership (parameters and Adam moments) to `new`; returns experts moved."""
        mv = moves(self.own, new)
        if not mv:
            return 0
        tensors = self._slot_tensors()
        ops, outgoing, incoming = [], [], []
        for i, (l, e, src, s_slot, dst, d_slot) in enumerate(mv):
            tag = l * self.E + e
            if src == self.rank:
                buf = torch.cat([t[s_slot].reshape(-1) for t in tensors])
                outgoing.append(buf)
                coll.STATS.reshard += buf.numel() * buf.element_size()
                if dst == self.rank:
                    incoming.append((d_slot, buf))
                else:
                    ops.append(dist.P2POp(dist.isend, buf, dst, tag=tag))
            elif dst == self.rank:
                buf = torch.empty(sum(t[0].numel() for t in tensors), dtype=self.dtype, device=self.device)
                incoming.append((d_slot, buf))
                ops.append(dist.P2POp(dist.irecv, buf, src, tag=tag))
        for w in (dist.batch_isend_irecv(ops) if ops else []):
            w.wait()
        for d_slot, buf in incoming:  # after every send has left, so no slot is overwritten early
            off = 0
            for t in tensors:
                n = t[0].numel()
                t[d_slot].copy_(buf[off:off + n].view_as(t[d_slot]))
                off += n
        self.own = new
        self.reshards += 1
        return len(mv)

    def _slot_tensors(self) -> list[torch.Tensor]:
        out = list(self.params())
        if self.optimizer is not None:
            for p in self.params():
                st = self.optimizer.state.get(p)
                if st:
                    out += [st["exp_avg"], st["exp_avg_sq"]]
        return out

    # -- memory ---------------------------------------------------------------------------------
    def memory(self) -> dict[str, int]:
        """Bytes of expert state on this rank: owned parameters, optimizer state, copies."""
        params = sum(p.numel() * p.element_size() for p in self.params())
        opt = 0
        if self.optimizer is not None:
            for p in self.params():
                for v in self.optimizer.state.get(p, {}).values():
                    if torch.is_tensor(v):
                        opt += v.numel() * v.element_size()
        return {"owned_experts": self.own.slots_per_rank, "param_bytes": params, "optimizer_bytes": opt,
                "copy_bytes": self._live_copy_bytes(), "copies": sum(len(c[0]) for c in self._copies.values()),
                "peak_copies": self.peak_copies, "peak_copy_bytes": self.peak_copy_bytes}

    # -- checkpoints ------------------------------------------------------------------------------
    def state_for_checkpoint(self) -> dict:
        experts = {}
        st = {} if self.optimizer is None else self.optimizer.state
        names = ("w1", "w3", "w2")
        for l, e, s in self.own.owned(self.rank):
            rec = {n: p[s].detach().clone() for n, p in zip(names, self.params())}
            for n, p in zip(names, self.params()):
                if st.get(p):
                    rec[f"exp_avg.{n}"] = st[p]["exp_avg"][s].clone()
                    rec[f"exp_avg_sq.{n}"] = st[p]["exp_avg_sq"][s].clone()
            experts[f"{l}.{e}"] = rec
        adam_step = None
        if st.get(self.w1):
            adam_step = float(st[self.w1]["step"])
        return {"format": 1, "num_layers": self.L, "num_experts": self.E, "d_model": self.D, "d_expert": self.F,
                "rank": self.rank, "world": self.world, "strategy": self.strategy, "adam_step": adam_step,
                "ownership": self.own.to_dict(), "predictor": self.predictor.state_dict(), "experts": experts}

    def save(self, ckpt_dir: Path) -> None:
        d = Path(ckpt_dir) / EXPERT_DIR
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".rank{self.rank:05d}.pt.tmp"
        torch.save(self.state_for_checkpoint(), tmp)
        os.replace(tmp, d / f"rank{self.rank:05d}.pt")

    @torch.no_grad()
    def load(self, ckpt_dir: Path, optimizer_state: bool = True) -> dict:
        """Load every expert this rank owns, whatever world size or strategy wrote the files.

        With the same world size the saved ownership is kept (heterogeneous sharding survives a
        restart); otherwise the new world starts from the even sharding.
        """
        head, allx = _read_expert_files(Path(ckpt_dir))
        for k, v in (("num_layers", self.L), ("num_experts", self.E), ("d_model", self.D), ("d_expert", self.F)):
            if head[k] != v:
                raise ValueError(f"checkpoint {ckpt_dir}: experts have {k}={head[k]}, this model has {v}")
        if head["world"] == self.world:
            self.own = Ownership.from_dict(head["ownership"])
        else:
            self.own = Ownership.even(self.L, self.E, self.world)
        self.predictor.load_state_dict(head.get("predictor", {}))
        names = ("w1", "w3", "w2")
        have_state = optimizer_state and all(f"exp_avg.{n}" in next(iter(allx.values())) for n in names)
        if have_state and self.optimizer is not None:
            for p in self.params():
                self.optimizer.state[p] = {"step": torch.tensor(float(head["adam_step"])),
                                           "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        for l, e, s in self.own.owned(self.rank):
            rec = allx[f"{l}.{e}"]
            for n, p in zip(names, self.params()):
                p[s].copy_(rec[n])
                if have_state and self.optimizer is not None:
                    self.optimizer.state[p]["exp_avg"][s].copy_(rec[f"exp_avg.{n}"])
                    self.optimizer.state[p]["exp_avg_sq"][s].copy_(rec[f"exp_avg_sq.{n}"])
        self.plan = plan_iteration(self.own, None, 0, 0)
        return {"world": head["world"], "experts": len(allx), "optimizer_state": have_state}


def _read_expert_files(ckpt_dir: Path) -> tuple[dict, dict]:
    files = sorted((Path(ckpt_dir) / EXPERT_DIR).glob("rank*.pt"))
    if not files:
        raise ValueError(f"checkpoint {ckpt_dir} has no {EXPERT_DIR}/rank*.pt files (not an ep/fssdp checkpoint)")
    parts = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    head = parts[0]
    if len(parts) != head["world"]:
        raise ValueError(f"checkpoint {ckpt_dir}: {len(parts)} expert files, written by {head['world']} ranks")
    allx = {}
    for p in parts:
        allx.update(p["experts"])
    if len(allx) != head["num_layers"] * head["num_experts"]:
        raise ValueError(f"checkpoint {ckpt_dir}: {len(allx)} experts on disk, expected "
                         f"{head['num_layers'] * head['num_experts']}")
    return head, allx


def full_expert_weights(ckpt_dir: Path) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every MoE layer's stacked (E, ...) expert weights from an ep/fssdp checkpoint (any world)."""
    head, allx = _read_expert_files(ckpt_dir)
    out = {}
    for l in range(head["num_layers"]):
        out[l] = tuple(torch.stack([allx[f"{l}.{e}"][n] for e in range(head["num_experts"])])
                       for n in ("w1", "w3", "w2"))
    return out


# ------------------------------------------------------------------------------------------------
# the sharded expert computation of one layer
# ------------------------------------------------------------------------------------------------
def _monotone(counts_AB: np.ndarray) -> bool:
    """Rows laid out B-major (b, then a within b) are already A-major: true when the non-empty
    (a, b) segments, visited B-major, never go back in a. `counts_AB[a, b]` = segment sizes."""
    a_idx = np.nonzero(np.asarray(counts_AB).T)[1]  # a of each non-empty segment, in B-major order
    return bool(np.all(np.diff(a_idx) >= 0)) if a_idx.size else True


class _PoolRows(torch.autograd.Function):
    """pool[idx] whose backward adds straight into pool.grad (index_add_), instead of building a
    pool-sized zero gradient per MoE layer and per micro-batch for autograd to sum."""

    @staticmethod
    def forward(ctx, pool, idx):
        ctx.pool, ctx.idx = pool, idx
        n = idx.numel()
        ctx.start = int(idx[0]) if n and bool((idx == torch.arange(int(idx[0]), int(idx[0]) + n,
                                                                     device=idx.device)).all()) else None
        if ctx.start is not None:  # a contiguous run of slots (the usual case): a view, no copy
            return pool.detach().narrow(0, ctx.start, n)
        return pool.detach().index_select(0, idx)

    @staticmethod
    def backward(ctx, g):
        pool = ctx.pool
        if pool.grad is None:
            pool.grad = torch.zeros_like(pool)
        if ctx.start is not None:
            pool.grad.narrow(0, ctx.start, ctx.idx.numel()).add_(g.to(pool.grad.dtype))
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
        counts = counts_E.detach().to(torch.int64)
        if N > 1:
            gathered = [torch.empty_like(counts) for _ in range(N)]
            dist.all_gather(gathered, counts, group=st.group)
            counts_NE = torch.stack(gathered).cpu().numpy()
        else:
            counts_NE = counts.cpu().numpy()[None]
        send = assign_tokens(counts_NE, st.holders(l), st.cfg.ranks_per_node)  # (N, E, N)
        st.record_loads(send.sum(axis=(0, 1)))
        mine = send[me]  # (E, N)
        dst_rows = torch.repeat_interleave(torch.arange(N).repeat(E), torch.from_numpy(np.ascontiguousarray(mine).reshape(-1)))
        order = torch.argsort(dst_rows, stable=True).to(x_ND.device)
        in_splits = mine.sum(axis=0).tolist()
        recv_SE = send[:, :, me]  # rows arriving from each source, by expert
        out_splits = recv_SE.sum(axis=1).tolist()
        # Classic EP's contiguous ownership makes these row permutations identities: skip them
        # (each is a full copy of the tokens' activations, forward and backward).
        send_id = _monotone(mine.T)  # segments in (expert, dst) order already grouped by dst
        xs = x_ND if send_id else x_ND.index_select(0, order)
        recv = coll.all_to_all(xs, in_splits, out_splits, st.group) if N > 1 else xs
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
        missing = [e for e in range(E) if recv_SE[:, e].sum() > 0 and e not in experts]
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
                copy_w = [_ReleaseAfterBackward.apply(w) for w in copy_w]
            y = torch.cat([y, st.backend(rows[rows_own:], local_counts[n_own:], *copy_w)])
        if rows.requires_grad and not y.requires_grad:
            # No rows here (e.g. every token went elsewhere): keep the reverse all-to-all in the
            # graph, or this rank would skip the collective in backward while its peers wait.
            y = y + rows.sum() * 0
        if st.cfg.rematerialize and st.strategy == "fssdp":
            # On every rank (senders too): backward gathers the copies again before it needs them.
            if y.requires_grad:
                y = _Refill.apply(y, st, l)
            st.release_layer(l)
        y_src = y if recv_id else y.index_select(0, torch.argsort(perm))
        back = coll.all_to_all(y_src, out_splits, in_splits, st.group) if N > 1 else y_src
        return back if send_id else back.index_select(0, torch.argsort(order))


def shard_model(model, strategy: str, plan_cfg: Optional[FSSDPPlanConfig] = None, group=None) -> Optional[ExpertStore]:
    """Move the model's experts into an ExpertStore (this rank keeps the ones it owns) and put
    `ShardedExperts` in their place. The model must be built identically on every rank."""
    layers = model.moe_layers()
    if not layers:
        return None
    first = layers[0].experts
    store = ExpertStore(num_layers=len(layers), num_experts=first.num_experts, d_model=first.w1.shape[1],
                        d_expert=first.w1.shape[2], strategy=strategy, plan_cfg=plan_cfg, dtype=first.w1.dtype,
                        device=first.w1.device, backend=first.backend_name, group=group)
    for i, layer in enumerate(layers):
        ex = layer.experts
        store.load_full_layer(i, ex.w1.detach(), ex.w3.detach(), ex.w2.detach())
        layer.experts = ShardedExperts(store, i, ex.num_experts)
    object.__setattr__(model, "expert_store", store)
    return store
