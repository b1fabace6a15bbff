"""The expert pool of `ep` and `fssdp`: this rank's owned experts, their AdamW and their files.

Three tensors (S, D, F) / (S, F, D) of S = L*E/N slots shared by all MoE layers, so every rank
keeps the same number of slots whatever heterogeneous sharding does. The pool is outside the
module tree (DeepSpeed never sees, reduces or steps an expert): it has its own AdamW (or, with
`parallel.expert_sharding`, fp32 masters and moments of 1/G of its rows: `parallel.expert_shards`),
moves rows and moments when ownership changes (`reshard`) and writes its own checkpoint files
(`system.expert_files`, written by the first expert-parallel group). Ranks here are places in
the expert-parallel group (`parallel.groups`); `peer` turns a place into a global rank.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from parallel import dist as pdist
from parallel.collectives import CommStats
from parallel.expert_shards import ExpertShards
from parallel.groups import ExpertGroups, single_group
from parallel.placement import Ownership, moves
from system.expert_files import read_expert_files, write_expert_file

WEIGHT_NAMES = ("w1", "w3", "w2")


class ExpertPool:
    """This rank's owned experts of every MoE layer in S slots, with their AdamW (see the module)."""

    def __init__(self, *, num_layers: int, num_experts: int, d_model: int, d_expert: int, strategy: str,
                 dtype=torch.float32, device="cpu", groups: Optional[ExpertGroups] = None):
        if groups is None:
            w, r = pdist.world_size(), pdist.rank()
            groups = single_group(w, r)
        self.groups = groups
        self.group = groups.ep_group  # None: the whole world
        self.rank = groups.local_rank
        self.world = groups.ep_size
        self.L, self.E, self.D, self.F = num_layers, num_experts, d_model, d_expert
        self.strategy = strategy
        self.dtype, self.device = dtype, torch.device(device)
        self.comm = CommStats()  # bytes this rank sent in this step, by collective
        self.own = Ownership.even(num_layers, num_experts, self.world)
        S = self.own.slots_per_rank
        self.w1 = nn.Parameter(torch.zeros(S, d_model, d_expert, dtype=dtype, device=self.device))
        self.w3 = nn.Parameter(torch.zeros(S, d_model, d_expert, dtype=dtype, device=self.device))
        self.w2 = nn.Parameter(torch.zeros(S, d_expert, d_model, dtype=dtype, device=self.device))
        for p in self.params():
            p.moeforge_expert = True
        self.optimizer: Optional[torch.optim.Optimizer] = None  # unsharded: AdamW over the whole pool
        self.shards: Optional[ExpertShards] = None  # sharded over the EDP group: masters and AdamW there
        self.reshards = 0

    def enable_sharding(self, level: int) -> int:
        """`parallel.expert_sharding`: keep the fp32 masters and AdamW moments of 1/G of the owned
        rows (G: the expert-data-parallel size; `parallel.expert_shards`). Before
        `build_optimizer`. Returns the level in force: 0 when there is a single group."""
        if self.optimizer is not None:
            raise RuntimeError("enable_sharding after build_optimizer")
        g = self.groups
        self.shards = None if not level or g.num_groups < 2 else \
            ExpertShards(level, self.params(), g.edp_group, g.num_groups, g.group_index)
        return 0 if self.shards is None else level

    # -- basic views ------------------------------------------------------------------------
    def params(self) -> list[nn.Parameter]:
        return [self.w1, self.w3, self.w2]

    @property
    def expert_numel(self) -> int:
        return 3 * self.D * self.F

    def owner(self, layer: int, e: int) -> int:
        return int(self.own.owner_LE[layer, e])

    def slot(self, layer: int, e: int) -> int:
        return int(self.own.slot_LE[layer, e])

    def peer(self, place: int) -> int:
        """The global rank at `place` of this rank's expert-parallel group."""
        return self.groups.global_rank(place)

    def pack(self, layer: int, e: int) -> torch.Tensor:
        s = self.slot(layer, e)
        return torch.cat([self.w1[s].detach().reshape(-1), self.w3[s].detach().reshape(-1),
                          self.w2[s].detach().reshape(-1)])

    def unpack(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.D * self.F
        return (flat[:n].view(self.D, self.F), flat[n:2 * n].view(self.D, self.F), flat[2 * n:].view(self.F, self.D))

    # -- building ----------------------------------------------------------------------------
    @torch.no_grad()
    def load_full_layer(self, layer: int, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> None:
        """Take this rank's experts of `layer` from full (E, ...) tensors."""
        for e in range(self.E):
            if self.owner(layer, e) == self.rank:
                s = self.slot(layer, e)
                self.w1[s].copy_(w1[e])
                self.w3[s].copy_(w3[e])
                self.w2[s].copy_(w2[e])

    @torch.no_grad()
    def load_rows(self, layer: int, experts, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> None:
        """Take this rank's experts of `layer` from tensors holding only them: row j is expert
        experts[j] (`GroupedExperts.rows`); they must be exactly the experts this rank owns."""
        mine = [e for e in range(self.E) if self.owner(layer, e) == self.rank]
        if list(experts) != mine:
            raise ValueError(f"layer {layer}: the model materialized experts {list(experts)}, this rank owns {mine}")
        for j, e in enumerate(mine):
            s = self.slot(layer, e)
            self.w1[s].copy_(w1[j])
            self.w3[s].copy_(w3[j])
            self.w2[s].copy_(w2[j])

    @torch.no_grad()
    def set_working_dtype(self, dtype: torch.dtype) -> None:
        """Sharded: the pool's working weights (what the experts compute with and spAG sends) in
        the training dtype; the fp32 masters are the shards'. Unsharded, the pool is its own fp32
        master and stays fp32."""
        if self.shards is None or self.w1.dtype == dtype:
            return
        for p in self.params():
            p.data = p.data.to(dtype)

    def build_optimizer(self, lr: float, betas, eps: float, weight_decay: float) -> None:
        if self.shards is not None:
            self.shards.init_from(self.params())
            self.shards.build_optimizer(lr, betas, eps, weight_decay)
            return
        self.optimizer = torch.optim.AdamW([{"params": self.params(), "weight_decay": weight_decay,
                                             "name": "expert_sharded"}], lr=lr, betas=tuple(betas), eps=eps)

    # -- the update ---------------------------------------------------------------------------
    def grad_sq_norm(self) -> torch.Tensor:
        """This rank's owned experts' squared gradient norm: summed over `norm_groups`, the experts'."""
        if self.shards is not None:
            return self.shards.grad_sq_norm()
        return sum((p.grad.double().pow(2).sum() for p in self.params() if p.grad is not None),
                   torch.zeros((), dtype=torch.float64))

    def norm_groups(self) -> list:
        """The groups `grad_sq_norm` is summed over: the expert-parallel group holds every expert
        once (its EDP replicas hold equal gradients); sharded, each EDP member holds 1/G of them."""
        return [self.group] + ([self.groups.edp_group] if self.shards is not None else [])

    @torch.no_grad()
    def step(self, lr: float, clip_coef: float = 1.0) -> None:
        if self.shards is not None:
            self.shards.step(lr, clip_coef, self.params())
            return
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

    @torch.no_grad()
    def discard_grads(self) -> None:
        """A skipped step: drop the gradients, change nothing else."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        if self.shards is not None:
            self.shards.discard()
        for p in self.params():
            p.grad = None

    # -- heterogeneous sharding -------------------------------------------------------------------
    @torch.no_grad()
    def reshard(self, new: Ownership) -> int:
        """Move ownership (parameters and Adam moments) to `new`; returns experts moved."""
        mv = moves(self.own, new)
        if not mv:
            return 0
        tensors = self._slot_tensors()  # as bytes: sharded, bf16 weights travel with fp32 pieces
        nbytes = [t[0].numel() * t.element_size() for t in tensors]
        ops, outgoing, incoming = [], [], []
        for i, (layer, e, src, s_slot, dst, d_slot) in enumerate(mv):
            tag = layer * self.E + e
            if src == self.rank:
                buf = torch.cat([t[s_slot].reshape(-1).view(torch.uint8) for t in tensors])
                outgoing.append(buf)
                self.comm.reshard += buf.numel() * buf.element_size()
                if dst == self.rank:
                    incoming.append((d_slot, buf))
                else:
                    ops.append(pdist.p2p_op("send", buf, self.peer(dst), self.group, tag))
            elif dst == self.rank:
                buf = torch.empty(sum(nbytes), dtype=torch.uint8, device=self.device)
                incoming.append((d_slot, buf))
                ops.append(pdist.p2p_op("recv", buf, self.peer(src), self.group, tag))
        for w in pdist.batch_isend_irecv(ops):
            w.wait()
        for d_slot, buf in incoming:  # after every send has left, so no slot is overwritten early
            off = 0
            for t, n in zip(tensors, nbytes):
                t[d_slot].copy_(buf[off:off + n].view(t.dtype).view_as(t[d_slot]))
                off += n
        self.own = new
        self.reshards += 1
        return len(mv)

    def _slot_tensors(self) -> list[torch.Tensor]:
        out = list(self.params())
        if self.shards is not None:
            return out + self.shards.slot_tensors()  # masters and moments move with their slot
        if self.optimizer is not None:
            for p in self.params():
                st = self.optimizer.state.get(p)
                if st:
                    out += [st["exp_avg"], st["exp_avg_sq"]]
        return out

    # -- memory ---------------------------------------------------------------------------------
    def state_bytes(self) -> dict[str, int]:
        """Bytes of this rank's owned expert parameters and their optimizer state."""
        params = sum(p.numel() * p.element_size() for p in self.params())
        opt = 0
        if self.optimizer is not None:
            for p in self.params():
                for v in self.optimizer.state.get(p, {}).values():
                    if torch.is_tensor(v):
                        opt += v.numel() * v.element_size()
        out = {"owned_experts": self.own.slots_per_rank, "param_bytes": params, "optimizer_bytes": opt}
        if self.shards is not None:
            sh = self.shards.state_bytes()
            out.update(optimizer_bytes=sh["optimizer_bytes"] + sh["master_bytes"], master_bytes=sh["master_bytes"],
                       grad_shard_bytes=sh["grad_shard_bytes"])
        return out

    # -- full weights ---------------------------------------------------------------------------
    @torch.no_grad()
    def full_layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`layer`'s (E, ...) weights of every expert, assembled on every rank (a collective)."""
        src = self.params()
        if self.shards is not None and src[0].dtype != torch.float32:  # the fp32 masters, not bf16 copies
            src = [torch.empty(p.shape, dtype=torch.float32, device=p.device) for p in src]
            self.shards.gather_into(src)
        out = [torch.zeros((self.E,) + tuple(p.shape[1:]), dtype=p.dtype, device=p.device) for p in src]
        for e in range(self.E):
            if self.owner(layer, e) == self.rank:
                s = self.slot(layer, e)
                for o, p in zip(out, src):
                    o[e].copy_(p[s])
        if self.world > 1:
            for o in out:
                pdist.all_reduce_(o, "sum", self.group)  # each expert is non-zero on its owner only
        return tuple(out)

    # -- checkpoints ------------------------------------------------------------------------------
    def state_for_checkpoint(self) -> dict:
        if self.shards is not None:
            return self._sharded_state_for_checkpoint()
        experts = {}
        st = {} if self.optimizer is None else self.optimizer.state
        names = ("w1", "w3", "w2")
        def host(t: torch.Tensor) -> torch.Tensor:  # record by record: no device-side copy of the pool
            return t.detach().to("cpu", copy=True)

        for layer, e, s in self.own.owned(self.rank):
            rec = {n: host(p[s]) for n, p in zip(names, self.params())}
            for n, p in zip(names, self.params()):
                if st.get(p):
                    rec[f"exp_avg.{n}"] = host(st[p]["exp_avg"][s])
                    rec[f"exp_avg_sq.{n}"] = host(st[p]["exp_avg_sq"][s])
            experts[f"{layer}.{e}"] = rec
        adam_step = None
        if st.get(self.w1):
            adam_step = float(st[self.w1]["step"])
        return {"format": 1, "num_layers": self.L, "num_experts": self.E, "d_model": self.D, "d_expert": self.F,
                "rank": self.rank, "world": self.world, "strategy": self.strategy, "adam_step": adam_step,
                "expert_parallel_size": self.world, "world_size": self.groups.world,
                "ownership": self.own.to_dict(), "experts": experts}

    def _sharded_state_for_checkpoint(self) -> dict:
        """Format 2: this EDP member's pieces of its owned experts (fp32 masters as the weights,
        AdamW moments), each trimmed to the elements it covers; `read_expert_files` joins the
        members' pieces back into whole records, so any layout can read them."""
        sh, names = self.shards, ("w1", "w3", "w2")
        mom = [sh.moments(i) for i in range(len(names))]
        experts = {}
        for layer, e, s in self.own.owned(self.rank):
            rec = {}
            for i, n in enumerate(names):
                lo, hi = sh.span(i)
                rec[n] = sh.masters[i][s, :hi - lo].detach().to("cpu", copy=True)
                if mom[i] is not None:
                    rec[f"exp_avg.{n}"] = mom[i][0][s, :hi - lo].to("cpu", copy=True)
                    rec[f"exp_avg_sq.{n}"] = mom[i][1][s, :hi - lo].to("cpu", copy=True)
            experts[f"{layer}.{e}"] = rec
        st = sh.optimizer.state.get(sh.masters[0]) if sh.optimizer is not None else None
        return {"format": 2, "num_layers": self.L, "num_experts": self.E, "d_model": self.D, "d_expert": self.F,
                "rank": self.rank, "world": self.world, "strategy": self.strategy,
                "adam_step": float(st["step"]) if st else None, "expert_parallel_size": self.world,
                "world_size": self.groups.world, "edp_size": sh.G, "member": sh.j, "expert_sharding": sh.level,
                "ownership": self.own.to_dict(), "experts": experts}

    def save(self, ckpt_dir: Path) -> None:
        """Unsharded: the first expert-parallel group writes one file per place (every group
        holds the same experts after the expert-data-parallel reduction). Sharded: every rank
        writes its pieces (file number = its global rank: member x P + place)."""
        if self.shards is not None:
            write_expert_file(ckpt_dir, self.shards.j * self.world + self.rank, self.state_for_checkpoint())
        elif self.groups.group_index == 0:
            write_expert_file(ckpt_dir, self.rank, self.state_for_checkpoint())

    @torch.no_grad()
    def load(self, ckpt_dir: Path, optimizer_state: bool = True) -> dict:
        """Load every expert this rank owns, whatever world size or strategy wrote the files.

        With the same expert-parallel size the saved ownership is kept (heterogeneous sharding
        survives a restart, whatever the number of groups); otherwise the even sharding.
        """
        head, allx = read_expert_files(Path(ckpt_dir), mmap=True)  # only the owned records are read
        for k, v in (("num_layers", self.L), ("num_experts", self.E), ("d_model", self.D), ("d_expert", self.F)):
            if head[k] != v:
                raise ValueError(f"checkpoint {ckpt_dir}: experts have {k}={head[k]}, this model has {v}")
        if head["world"] == self.world:
            self.own = Ownership.from_dict(head["ownership"])
        else:
            self.own = Ownership.even(self.L, self.E, self.world)
        names = ("w1", "w3", "w2")
        have_state = optimizer_state and all(f"exp_avg.{n}" in next(iter(allx.values())) for n in names)
        if self.shards is not None:
            self._load_pieces(allx, float(head["adam_step"]) if have_state else None)
            return {"world": head["world"], "experts": len(allx), "optimizer_state": have_state, "head": head}
        if have_state and self.optimizer is not None:
            for p in self.params():
                self.optimizer.state[p] = {"step": torch.tensor(float(head["adam_step"])),
                                           "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        for layer, e, s in self.own.owned(self.rank):
            rec = allx[f"{layer}.{e}"]
            for n, p in zip(names, self.params()):
                p[s].copy_(rec[n])
                if have_state and self.optimizer is not None:
                    self.optimizer.state[p]["exp_avg"][s].copy_(rec[f"exp_avg.{n}"])
                    self.optimizer.state[p]["exp_avg_sq"][s].copy_(rec[f"exp_avg_sq.{n}"])
        return {"world": head["world"], "experts": len(allx), "optimizer_state": have_state, "head": head}



    @torch.no_grad()
    def _load_pieces(self, allx, adam_step: Optional[float]) -> None:
        """Sharded: the owned experts' whole weights into the pool, this member's pieces of them
        (and of the moments when `adam_step` is given) into the masters and AdamW state."""
        sh, names = self.shards, ("w1", "w3", "w2")
        if adam_step is not None and sh.optimizer is not None:
            for m in sh.masters:
                sh.optimizer.state[m] = {"step": torch.tensor(adam_step), "exp_avg": torch.zeros_like(m),
                                         "exp_avg_sq": torch.zeros_like(m)}
        for layer, e, s in self.own.owned(self.rank):
            rec = allx[f"{layer}.{e}"]
            for i, (n, p) in enumerate(zip(names, self.params())):
                p[s].copy_(rec[n])
                sh.masters[i][s].copy_(sh.piece_of(i, rec[n].reshape(1, -1).float())[0])
                if adam_step is not None and sh.optimizer is not None:
                    mom = sh.moments(i)
                    for t, key in zip(mom, ("exp_avg", "exp_avg_sq")):
                        t[s].copy_(sh.piece_of(i, rec[f"{key}.{n}"].reshape(1, -1))[0])
