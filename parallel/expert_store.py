"""The FSSDP runtime over the expert pool: which experts are materialized where, each iteration.

`ExpertStore` extends this rank's `ExpertPool` with the iteration: the plan (EP: the ownership
only; FSSDP: Hecate Algorithm 1 on the load predictor's forecast, with heterogeneous re-sharding
every `reshard_every` steps), the overlap budget t (agreed by every rank), the SparseAllGather
of each layer's copies (posted before its block's attention, to overlap it), optional
rematerialization, and the SparseReduceScatter of the copies' gradients: after the step's last
backward, or (`sprs_overlap`) each layer's as soon as its backward has finished, advanced one
round per later layer. What one iteration materializes is an `IterationState`; the per-layer
dispatch that uses the store is `parallel.sharded_experts`. docs/expert_parallel.md has the story.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from experts.backends import get_backend
from parallel import collectives as coll
from parallel import dist as pdist
from parallel.expert_autograd import pool_rows
from parallel.expert_pool import ExpertPool
from parallel.sharded_reduction import ShardedReduction
from parallel.groups import second_ep_group
from parallel.iteration_state import IterationState
from parallel.placement import (FSSDPPlanConfig, IterationPlan, LoadPredictor, overlap_budget, plan_iteration,
                                reshard_decision)


class ExpertStore(ShardedReduction, ExpertPool):
    """This rank's expert pool plus the iteration: plan, overlap budget, copies, spAG and spRS.
    `__init__` holds what lives across steps; the iteration's own state is `self.iteration`."""

    def __init__(self, *, num_layers: int, num_experts: int, d_model: int, d_expert: int, strategy: str,
                 plan_cfg: Optional[FSSDPPlanConfig] = None, dtype=torch.float32, device="cpu",
                 backend: str = "reference", groups=None, comm_dtype=None):
        if strategy not in ("ep", "fssdp"):
            raise ValueError(f"expert strategy {strategy!r}: the store serves 'ep' and 'fssdp'")
        super().__init__(num_layers=num_layers, num_experts=num_experts, d_model=d_model, d_expert=d_expert,
                         strategy=strategy, dtype=dtype, device=device, groups=groups)
        # spAG/spRS messages: the training dtype (bf16 under bf16), the fp32 masters stay here
        self.comm_dtype = comm_dtype or dtype  # the strategy sets bf16 when the engine trains in bf16
        self.cfg = plan_cfg or FSSDPPlanConfig()
        self.backend = get_backend(backend)
        self.predictor = LoadPredictor(self.cfg.window)
        # the plan in force (the ownership until the first plan) and the budget it was made with
        self.plan = IterationPlan([[[int(o)] for o in self.own.owner_LE[layer]] for layer in range(num_layers)])
        self.t_budget = self.cfg.overlap_budget if self.cfg.overlap_budget is not None else num_experts
        self.peak_copies = 0  # most copies held at once (all layers), over the run
        self.peak_copy_bytes = 0  # most bytes of copies resident at once (rematerialization frees them)
        self._attn_times: list = []  # measured attention seconds per block (to derive t)
        self._agreed: Optional[tuple[int, int]] = None  # (samples it was derived from, agreed t)
        # the overlapped spRS travels on its own group (NCCL: its own stream), see second_ep_group
        self.reduce_group = (second_ep_group(self.groups) if self.cfg.sprs_overlap and strategy == "fssdp"
                             else self.group)
        # NCCL: every spAG round is posted before the attention, on a communicator of its own (the
        # dispatch all-to-alls never queue behind it), and each layer's owned expert gradients are
        # summed over the expert-data-parallel group as soon as its backward is done. On gloo
        # (CPU) the rounds run one at a time and the EDP sum follows the backward: CPU results
        # stay bit for bit as before. Both can be set after construction (tests force them).
        self.gather_post_all = pdist.stream_ordered(self.group) and strategy == "fssdp"
        self.gather_group = second_ep_group(self.groups) if self.gather_post_all else self.group
        self.edp_in_backward = self.groups.edp_group is not None and pdist.stream_ordered(self.groups.edp_group)
        # forwards before the first begin_iteration (the step-0 evaluation) gather into this one
        self.iteration = IterationState()

    # -- the overlap budget t ---------------------------------------------------------------------
    def attention_clock(self) -> Optional[float]:
        """Start timing a block's attention while t is still to be derived (first iterations)."""
        if self.cfg.overlap_budget is not None or len(self._attn_times) >= 4 * self.cfg.window * self.L:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def attention_done(self, t0: Optional[float]) -> None:
        if t0 is None or not torch.is_grad_enabled():
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._attn_times.append(time.perf_counter() - t0)

    def derive_budget(self) -> int:
        """t = attention time x link bandwidth / expert bytes (Hecate), from this rank's times."""
        if self.cfg.overlap_budget is not None:
            return min(self.cfg.overlap_budget, self.E)
        if not self._attn_times:
            return self.E
        attn = float(np.median(self._attn_times))
        expert_bytes = self.expert_numel * torch.empty((), dtype=self.comm_dtype).element_size()
        # At least the hottest expert stays eligible: a straggler costs more than one exposed copy.
        return min(self.E, max(1, overlap_budget(attn, self.cfg.link_gbps * 1e9 / 8, expert_bytes)))

    def agreed_budget(self) -> int:
        """The budget every rank plans with: the minimum over ranks of the derived ones. Ranks
        time their own attention, so their budgets differ and their plans (hence the collectives
        they post) would too. Every rank holds the same number of timings, so all of them
        re-agree at the same iterations (while timings are still being collected)."""
        mine = self.derive_budget()
        if self.cfg.overlap_budget is not None or self.groups.world == 1:
            return mine
        n = len(self._attn_times)
        if self._agreed is None or self._agreed[0] != n:
            t = torch.tensor([mine], dtype=torch.int64)
            pdist.all_reduce_(t, "min")  # the world: every group plans alike
            self._agreed = (n, int(t.item()))
        return self._agreed[1]

    def budget_to_agree(self) -> Optional[tuple[int, torch.Tensor]]:
        """At the optimizer step: (timings, the next iteration's agreed budget as a device tensor,
        all-reduced, not yet read) when `agreed_budget` would re-agree; the strategy reads it with
        its own host sync and hands it to `set_agreed`, so the next iteration needs none."""
        if self.cfg.overlap_budget is not None or self.groups.world == 1:
            return None
        n = len(self._attn_times)
        if self._agreed is not None and self._agreed[0] == n:
            return None
        t = torch.full((1,), self.derive_budget(), dtype=torch.int64, device=self.device)
        return n, pdist.all_reduce_(t, "min")

    def set_agreed(self, samples: int, budget: int) -> None:
        self._agreed = (samples, int(budget))

    def plan_fingerprint(self) -> str:
        """A short hash of this iteration's plan and ownership (equal on every rank, or ranks hang)."""
        h = hashlib.sha256(repr((self.t_budget, self.plan.holders_L)).encode())
        h.update(np.ascontiguousarray(self.own.owner_LE).tobytes())
        return h.hexdigest()[:16]

    def record_loads(self, loads) -> None:
        if torch.is_grad_enabled():
            self.iteration.rank_loads.append(np.asarray(loads, dtype=np.float64))

    def straggler_ratio(self) -> float:
        """Busiest rank's expert rows over the mean, averaged over this step's layer forwards."""
        vals = [x.max() / x.mean() for x in self.iteration.rank_loads if x.mean() > 0]
        return float(np.mean(vals)) if vals else 1.0

    @property
    def sprs_in_backward(self) -> int:
        """Layers whose spRS started during this step's backward."""
        return self.iteration.sprs_in_backward

    # -- holders ---------------------------------------------------------------------------------
    @property
    def nodes(self):
        """Node of each place of the group for the planner: `ranks_per_node` when the layout is
        the default one (rank // ranks_per_node), else the node index array from Ray."""
        nodes = self.groups.nodes
        if np.array_equal(nodes, np.arange(self.world) // max(1, self.cfg.ranks_per_node)):
            return self.cfg.ranks_per_node
        return nodes

    def holders(self, layer: int) -> list[list[int]]:
        return self.plan.holders_L[layer]

    def local_experts(self, layer: int) -> list[int]:
        """The experts this rank computes for `layer`: the owned ones, then the copies (each by id)."""
        held = [e for e, hs in enumerate(self.plan.holders_L[layer]) if self.rank in hs]
        owned = [e for e in held if self.owner(layer, e) == self.rank]
        return owned + [e for e in held if self.owner(layer, e) != self.rank]

    # -- the iteration -------------------------------------------------------------------------
    def begin_iteration(self, step: int) -> None:
        """Plan this iteration: reshard every `reshard_every` steps, then materialize (FSSDP).
        The previous iteration's state is dropped (its messages completed) and a new one starts."""
        self.iteration.drop_copies()
        self.iteration = IterationState(step)
        self.comm.reset()
        self.t_budget = self.agreed_budget()
        if self.strategy == "ep":
            return
        load = self.group_forecast()
        if load is None:
            self.plan = plan_iteration(self.own, None, 0, 0)
            return
        if self.cfg.reshard_every and step > 0 and step % self.cfg.reshard_every == 0:
            self.maybe_reshard(load)
        self.plan = plan_iteration(self.own, load, self.t_budget, self.cfg.memory_cap, self.nodes,
                                   self.cfg.tolerance)

    def maybe_reshard(self, load) -> int:
        """Heterogeneous sharding (Algorithm 2), applied only when the predicted straggler ratio
        (with this iteration's materialization) is above tolerance and the new ownership lowers
        it: moving experts costs bytes, so a balanced layout stays where it is."""
        new = reshard_decision(self.own, load, self.t_budget, self.cfg.memory_cap, self.nodes,
                               self.cfg.tolerance)
        return 0 if new is None else self.reshard(new)

    def group_forecast(self):
        """The predicted (L, E) load of one expert-parallel group: the global forecast / groups."""
        load = self.predictor.predict()
        G = self.groups.num_groups
        return load if load is None or G == 1 else load / G

    def set_plan(self, plan: IterationPlan) -> None:
        """Use a given plan for this iteration (tests; calibration). It must contain the owners."""
        for layer, hs in enumerate(plan.holders_L):
            for e, hl in enumerate(hs):
                if self.owner(layer, e) not in hl:
                    raise ValueError(f"plan for layer {layer} expert {e} lacks its owner rank {self.owner(layer, e)}")
                if len(set(hl)) != len(hl) or any(not 0 <= int(h) < self.world for h in hl):
                    # a repeated holder would make the token assignment's sends collide
                    raise ValueError(f"plan for layer {layer} expert {e}: holders {list(hl)} must be distinct "
                                     f"ranks in [0, {self.world})")
        self.iteration.drop_copies()
        self.plan = plan

    def observe(self, counts_LE: torch.Tensor) -> None:
        """The step's global (L, E) counts (already all-reduced over the world): the load
        predictor's input; a group plans with the forecast / groups (`group_forecast`). Every
        group plans from the same global counts, so all keep one ownership (docs/expert_parallel.md,
        "FSSDP plans from the global counts")."""
        host = counts_LE.detach().cpu().numpy() if torch.is_tensor(counts_LE) else counts_LE  # trainer: host
        self.predictor.observe(host)  # global: the checkpoint fits any world

    def _layer_chains(self, layer: int) -> dict:
        return coll.layer_chains(self.plan.holders_L[layer], layer, self.groups.nodes)

    def start_gather(self, layer: int) -> None:
        """Post `layer`'s SparseAllGather (non-blocking); a no-op when the copies are present."""
        # Every rank (sender, receiver or neither) records the gather, so all agree on whether a
        # later forward of this iteration (another micro-batch, evaluation) gathers again.
        it = self.iteration
        if layer in it.pending or (not self.cfg.rematerialize and layer in it.gathered):
            return
        it.gathered.add(layer)
        chains = self._layer_chains(layer)
        if not chains:
            return
        it.pending[layer] = coll.sparse_all_gather_start(chains, self.rank, lambda k: self.pack(*k),
                                                        self.expert_numel, self.comm_dtype, self.device,
                                                        self.comm, self.peer, self.gather_group,
                                                        post_all=self.gather_post_all)

    def _finish_gather(self, layer: int) -> None:
        """Complete `layer`'s spAG into one stacked leaf per weight, (n_copies, ...), in the
        order of `local_experts` (copies by expert id). Rematerialization refills the same leaf
        tensors in place: autograd saved them (their gradients are summed by `_keep_copy_grad`)."""
        self.start_gather(layer)
        it = self.iteration
        pg = it.pending.pop(layer, None)
        if pg is None:
            return
        got = pg.wait()
        order = sorted(e for (got_layer, e) in got if got_layer == layer)
        if not order:  # this rank only sent
            return
        parts = [self.unpack(got[(layer, e)]) for e in order]
        stacks = [torch.stack([p[i] for p in parts]) for i in range(3)]
        old = it.copies.get(layer)
        if old is not None:
            for o, new in zip(old[1], stacks):
                o.untyped_storage().resize_(new.numel() * new.element_size())
                o.data.copy_(new)
        else:
            it.copies[layer] = (order, [t.requires_grad_(True) for t in stacks])
            for i, t in enumerate(it.copies[layer][1]):
                t.register_post_accumulate_grad_hook(lambda t, key=(layer, i): self._keep_copy_grad(t, key))
        self.peak_copy_bytes = max(self.peak_copy_bytes, it.live_copy_bytes())
        self.peak_copies = max(self.peak_copies, it.copy_count())

    def local_weights(self, layer: int, experts: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """This rank's weights for `layer`: the owned experts (views of the pool when their
        slots are contiguous) and the copies (the gathered stacks), each in `experts` order."""
        self._finish_gather(layer)
        owned = [e for e in experts if self.owner(layer, e) == self.rank]
        slots = [self.slot(layer, e) for e in owned]  # host-side: contiguity is decided without a sync
        own_w = [pool_rows(pool, slots) for pool in self.params()]
        copies = experts[len(owned):]
        if not copies:
            return own_w, []
        order, stacks = self.iteration.copies[layer]
        if order != copies:
            raise RuntimeError(f"layer {layer}: gathered copies {order} differ from the plan's {copies}")
        return own_w, stacks

    # -- rematerialization ------------------------------------------------------------------
    def release_layer(self, layer: int) -> None:
        """Free `layer`'s copies right after its forward pass (rematerialization)."""
        if not self.cfg.rematerialize or layer not in self.iteration.copies:
            return
        for t in self.iteration.copies[layer][1]:
            t.untyped_storage().resize_(0)

    def refill_layer(self, layer: int) -> None:
        """Gather `layer`'s copies again (a second spAG) into the freed tensors, for backward."""
        if not self.cfg.rematerialize:
            return
        with torch.no_grad():
            self._finish_gather(layer)

    # -- the SparseReduceScatter -------------------------------------------------------------
    def arm_reduce(self, final: bool) -> None:
        """Called before each backward pass: `final` marks the step's last micro-batch, whose
        backward may start the layers' spRS (`sprs_overlap`; FSSDP only, EP has no copies)."""
        self.iteration.reduce_armed = bool(final and self.cfg.sprs_overlap and self.strategy == "fssdp"
                                           and torch.is_grad_enabled())
        self.iteration.edp_armed = bool(final and self.edp_in_backward and torch.is_grad_enabled())
        self.iteration.accumulated.clear()

    @property
    def grad_dtype(self) -> torch.dtype:
        """Copies' gradients are summed over micro-batches and along the spRS chain in fp32 at least."""
        return torch.promote_types(self.comm_dtype, torch.float32)

    def _keep_copy_grad(self, t: torch.Tensor, key: tuple) -> None:
        """A copy's gradient of one backward, added into its fp32 sum over the step's micro-batches
        (the copies are bf16 under bf16: their own `.grad` would accumulate in bf16, and the hottest
        experts, copied most, would get the least precise gradients). The iteration current when
        the gradient arrives is looked up then."""
        it, g = self.iteration, t.grad
        t.grad = None
        acc = it.copy_grads.get(key)
        if acc is None:
            it.copy_grads[key] = g if g.dtype == self.grad_dtype else g.to(self.grad_dtype)
        else:
            acc.add_(g)
        it.accumulated.add(key)

    def _copy_grads(self, layer: int) -> dict:
        """{(layer, e): flat fp32 gradient} of this rank's copies of `layer`."""
        if layer not in self.iteration.copies:
            return {}
        order, ws = self.iteration.copies[layer]
        gs = [self.iteration.copy_grads.get((layer, i)) for i in range(len(ws))]
        gs = [g if g is not None else torch.zeros(w.shape, dtype=self.grad_dtype, device=self.device)
              for g, w in zip(gs, ws)]
        return {(layer, e): torch.cat([g[i].reshape(-1) for g in gs]) for i, e in enumerate(order)}

    def layer_backward_done(self, layer: int) -> None:
        """`layer`'s backward has finished on this rank (its dispatch's gradient is computed, so
        its copies' gradients are final). Every rank calls this at the same point of the backward
        pass, in the same layer order: advance the spRS already in flight by one round, then start
        `layer`'s. The message order is then the same on every rank, whatever the backend's tags."""
        it = self.iteration
        if self.shards is not None and self.shards.level == 2:
            self._reduce_layer_rows(layer)
            it.rows_marked.add(layer)
        if it.edp_armed and layer not in it.edp_works:
            self._start_layer_edp(layer)
        if not it.reduce_armed or layer in it.reducing:
            return
        if layer in it.copies and any((layer, i) not in it.accumulated for i in range(3)):
            raise RuntimeError(f"sprs_overlap: layer {layer}'s copies have no final gradient when its backward "
                               "finished; set parallel.fssdp.sprs_overlap: false")
        for k in sorted(it.reducing):
            it.reducing[k].advance()
        it.reducing[layer] = coll.sparse_reduce_scatter_start(
            self._layer_chains(layer), self.rank, self._copy_grads(layer), self.expert_numel, self.grad_dtype,
            self.device, self.comm, self.peer, self.reduce_group)
        it.sprs_in_backward += 1

    @property
    def marks_layer_backward(self) -> bool:
        """Whether a layer's dispatch must report the end of its backward (`layer_backward_done`)."""
        return ((self.cfg.sprs_overlap and self.strategy == "fssdp") or self.edp_in_backward
                or (self.shards is not None and self.shards.level == 2))

    @torch.no_grad()
    def _start_layer_edp(self, layer: int) -> None:
        """Post the all-reduces of `layer`'s owned expert gradients over the expert-data-parallel
        group (its last backward is done, so its owned rows' gradients in the pool are final but
        for the copies' spRS sums, which `reduce_grads` reduces separately). Every rank posts them
        at the same point, in the same layer order; the slots come from the host-side ownership."""
        works = []
        for p in self.params():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            rows, idx = self._layer_grad_rows(p, layer)
            if rows is None:
                continue
            w = pdist.all_reduce_start(rows, "sum", self.groups.edp_group)
            if w is not None:
                works.append((w, None if idx is None else p.grad, idx, rows))
        self.iteration.edp_works[layer] = works

    def _layer_grad_rows(self, p, layer: int):
        """(rows, idx): `layer`'s owned rows of `p.grad`, a view when their slots are one run
        (idx None), else a copy gathered at `idx`; (None, None) when this rank owns none."""
        slots = sorted(s for (lay, _e, s) in self.own.owned(self.rank) if lay == layer)
        if not slots:
            return None, None
        if slots == list(range(slots[0], slots[0] + len(slots))):
            return p.grad.narrow(0, slots[0], len(slots)), None
        idx = torch.tensor(slots, dtype=torch.long).to(p.grad.device)
        return p.grad.index_select(0, idx), idx

    @torch.no_grad()
    def reduce_grads(self) -> None:
        """SparseReduceScatter the copies' gradients into their owners (within the group), sum
        the owners' gradients over the expert-data-parallel group, and average over the world
        (each rank's loss is a mean over its own tokens, as DeepSpeed averages dense gradients).
        The layers whose spRS started in the backward pass are completed; the others (all of
        them without `sprs_overlap`) run as one schedule over their chains."""
        self.iteration.reduce_armed = False
        if self.shards is None:  # sharded: the gradients are the shards' (fp32, `_rows_grad`)
            for p in self.params():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        started = set(self.iteration.reducing)
        summed = self.iteration.finish_reduces()
        chains, grads = {}, {}
        for layer in range(self.L):
            if layer not in started:
                chains.update(self._layer_chains(layer))
                grads.update(self._copy_grads(layer))
        summed.update(coll.sparse_reduce_scatter(chains, self.rank, grads, self.expert_numel, self.grad_dtype,
                                                 self.device, self.comm, self.peer, self.group))
        if self.shards is not None:
            self._reduce_sharded(summed)
            return
        reduced = set(self.iteration.finish_edp())  # layers whose owned rows were summed in the backward
        if reduced:
            # the copies' sums of those layers still need their expert-data-parallel sum: one
            # all-reduce of just those rows (the same keys in every group: all groups plan alike)
            keys = sorted(k for k in summed if k[0] in reduced)
            if keys:
                flat = pdist.all_reduce_(torch.stack([summed[k] for k in keys]), "sum", self.groups.edp_group)
                summed.update(zip(keys, flat.unbind(0)))
        for (layer, e), flat in summed.items():
            s = self.slot(layer, e)
            g1, g3, g2 = self.unpack(flat.to(self.dtype))
            self.w1.grad[s] += g1
            self.w3.grad[s] += g3
            self.w2.grad[s] += g2
        if self.groups.edp_group is not None and len(reduced) < self.L:
            for p in self.params():
                if not reduced:
                    pdist.all_reduce_(p.grad, "sum", self.groups.edp_group)
                    continue
                for layer in range(self.L):  # the layers the backward did not reduce
                    rows, idx = self._layer_grad_rows(p, layer) if layer not in reduced else (None, None)
                    if rows is not None:
                        pdist.all_reduce_(rows, "sum", self.groups.edp_group)
                        if idx is not None:
                            p.grad.index_copy_(0, idx, rows)
        if self.groups.world > 1:
            for p in self.params():
                p.grad.div_(self.groups.world)

    @torch.no_grad()
    def step(self, lr: float, clip_coef: float = 1.0) -> None:
        super().step(lr, clip_coef)
        self.iteration.drop_copies()  # their gradients are spent

    def discard_grads(self) -> None:
        super().discard_grads()
        self.iteration.drop_copies()

    # -- memory and checkpoints ------------------------------------------------------------------
    def memory(self) -> dict[str, int]:
        """Bytes of expert state on this rank: owned parameters, optimizer state, copies."""
        return {**self.state_bytes(), "copy_bytes": self.iteration.live_copy_bytes(),
                "copies": self.iteration.copy_count(),
                "peak_copies": self.peak_copies, "peak_copy_bytes": self.peak_copy_bytes}

    def state_for_checkpoint(self) -> dict:
        return {**super().state_for_checkpoint(), "predictor": self.predictor.state_dict()}

    @torch.no_grad()
    def load(self, ckpt_dir: Path, optimizer_state: bool = True) -> dict:
        """Load every expert this rank owns, whatever world size or strategy wrote the files.

        With the same expert-parallel size the saved ownership is kept (heterogeneous sharding
        survives a restart); otherwise the even sharding.
        """
        info = super().load(ckpt_dir, optimizer_state)
        self.predictor.load_state_dict(info.pop("head").get("predictor", {}))
        self.plan = plan_iteration(self.own, None, 0, 0)
        return info
