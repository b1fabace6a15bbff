"""The expert store's side of `parallel.expert_sharding` (`parallel.expert_shards` holds the
pieces): where the owned rows' gradients go, when each layer's rows are reduce-scattered over
the expert-data-parallel group, and how the copies' spRS sums join them. A mixin of
`parallel.expert_store.ExpertStore`, which calls it from its backward marks and `reduce_grads`."""
from __future__ import annotations

import torch

from parallel.expert_shards import device_index, one_run


class ShardedReduction:
    """Expert sharding's gradient path in the store (see the module)."""

    def enable_sharding(self, level: int) -> int:
        """Expert state sharded over the EDP group (`ExpertPool.enable_sharding`). Its gradients
        are reduce-scattered, not all-reduced, so the all-reduce in the backward is off; level 2
        reduces each layer's owned rows when that layer's backward ends (`_reduce_layer_rows`)."""
        level = super().enable_sharding(level)
        if level:
            self.edp_in_backward = False
        for p in self.params():  # the pool rows' gradients go to the shards, in fp32 (`pool_rows`)
            p.moeforge_grad_sink = self._rows_grad if level else None
        return level

    def _owned_slots(self, layer: int) -> list[int]:
        return [self.slot(layer, e) for e in range(self.E) if self.owner(layer, e) == self.rank]

    def _rows_grad(self, pool: torch.Tensor, slots: tuple, g: torch.Tensor) -> None:
        """Expert sharding: one backward's gradient of owned pool rows `slots` (`pool_rows`).
        Level 1 adds it into the step's fp32 pool gradient; level 2 keeps it until its layer's
        backward ends (`_reduce_layer_rows`): no pool-sized gradient exists."""
        i = next(k for k, p in enumerate(self.params()) if p is pool)
        if self.shards.level == 1:
            self.shards.add_full(i, slots, g)
        else:
            self.iteration.row_grads.append((i, tuple(slots), g))

    @torch.no_grad()
    def _reduce_layer_rows(self, layer: int) -> None:
        """Expert sharding 2, at the end of `layer`'s backward (every micro-batch): reduce-scatter
        its owned rows' gradients over the EDP group into this member's sums. Every member of
        the group owns the same slots, so all post it at the same point (zeros when no row of
        theirs got a gradient)."""
        slots = self._owned_slots(layer)
        if not slots:
            return
        pos = {s: k for k, s in enumerate(slots)}
        rows = [torch.zeros(len(slots), n, dtype=torch.float32, device=self.device) for n in self.shards.n]
        keep = []
        for i, sl, g in self.iteration.row_grads:
            if not all(s in pos for s in sl):
                keep.append((i, sl, g))
                continue
            at = [pos[s] for s in sl]
            g = g.reshape(len(sl), -1).to(torch.float32)
            if one_run(at):
                rows[i].narrow(0, at[0], len(at)).add_(g)
            elif at:
                rows[i].index_add_(0, device_index(at, self.device), g)
        self.iteration.row_grads = keep
        self.shards.add_slots(slots, self.shards.scatter(rows))

    @torch.no_grad()
    def _reduce_sharded(self, summed: dict) -> None:
        """`reduce_grads` under expert sharding: the copies' spRS sums join the owned rows'
        gradients, everything is reduce-scattered over the EDP group into this member's pieces,
        and averaged over the world. Level 1 scatters the pool's gradient once; level 2 already
        scattered the owned rows in the backward and scatters the copies' sums here (the same
        keys in every group: all groups plan alike)."""
        sh = self.shards
        if sh.level == 1:
            for (layer, e), flat in summed.items():
                for i, part in enumerate(flat.to(torch.float32).split(sh.n)):
                    sh.add_full(i, [self.slot(layer, e)], part)
            sh.reduce_pool_grads()
        else:
            for layer in range(self.L):  # layers whose input needs no gradient report no end
                if layer not in self.iteration.rows_marked:
                    self._reduce_layer_rows(layer)
            if self.iteration.row_grads:
                raise RuntimeError("expert sharding 2: owned-row gradients left unreduced after the backward")
            keys = sorted(summed)
            if keys:
                flat = torch.stack([summed[k].to(torch.float32) for k in keys])
                rows = list(flat.split(sh.n, dim=1))
                sh.add_slots([self.slot(*k) for k in keys], sh.scatter(rows))
        if self.groups.world > 1:
            sh.scale(1.0 / self.groups.world)
