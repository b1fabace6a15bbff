"""What one iteration of an expert store materializes on a rank: the copies gathered for it, the
collectives in flight (spAG, spRS, the expert-data-parallel sums) and the counters its step
metrics read (`parallel.expert_store.ExpertStore` owns one per iteration)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class IterationState:
    """What one iteration materializes on this rank: the copies gathered for it, the collectives
    in flight, and the counters its step metrics read. `ExpertStore.begin_iteration` creates it
    and drops the previous one; `drop_copies` ends the copies' life at the optimizer step (or a
    new plan), and forwards after it (evaluation) gather into the same object again."""

    step: int = 0
    copies: dict = field(default_factory=dict)  # layer -> (expert ids, [w1, w3, w2] stacked leaf tensors)
    gathered: set = field(default_factory=set)  # layers whose spAG ran (the same on every rank)
    pending: dict = field(default_factory=dict)  # layer -> PendingGather
    reduce_armed: bool = False  # this backward is the step's last: start each layer's spRS in it
    reducing: dict = field(default_factory=dict)  # layer -> PendingReduce started in the backward pass
    accumulated: set = field(default_factory=set)  # (layer, weight index): copy gradient accumulated
    copy_grads: dict = field(default_factory=dict)  # (layer, weight index) -> its gradient, summed in fp32
    rank_loads: list = field(default_factory=list)  # per training forward: (world,) expert rows per rank
    sprs_in_backward: int = 0  # layers whose spRS started during this step's backward
    edp_armed: bool = False  # this backward is the step's last: reduce each layer's owned grads over EDP in it
    edp_works: dict = field(default_factory=dict)  # layer -> its expert-data-parallel all-reduces in flight
    row_grads: list = field(default_factory=list)  # expert sharding 2: (weight, slots, grad) until the layer ends
    rows_marked: set = field(default_factory=set)  # expert sharding 2: layers whose backward reported its end

    def finish_reduces(self) -> dict:
        """Complete the spRS started in the backward pass, round by round in layer order."""
        pending = [self.reducing[k] for k in sorted(self.reducing)]
        while any(not p.done for p in pending):
            for p in pending:
                p.advance()
        out = {}
        for p in pending:
            out.update(p.out)
        self.reducing.clear()
        return out

    def finish_edp(self) -> list:
        """Complete the layers' expert-data-parallel all-reduces posted in the backward pass;
        returns the layers they covered."""
        for works in self.edp_works.values():
            for w, dst, idx, buf in works:
                w.wait()
                if dst is not None:  # rows that were not one run: summed in a buffer, put back
                    dst.index_copy_(0, idx, buf)
        done = sorted(self.edp_works)
        self.edp_works.clear()
        return done

    def drop_copies(self) -> None:
        """Release the copies and complete every message still in flight (a step abandoned
        after its backward may leave posted spRS rounds and EDP all-reduces)."""
        if self.reducing:
            self.finish_reduces()
        self.finish_edp()
        self.reduce_armed = self.edp_armed = False
        self.copies.clear()
        self.copy_grads.clear()
        self.row_grads.clear()
        self.rows_marked.clear()
        self.gathered.clear()
        for pg in self.pending.values():
            pg.wait()
        self.pending.clear()

    def copy_count(self) -> int:
        return sum(len(ids) for ids, _ in self.copies.values())

    def live_copy_bytes(self) -> int:
        """Bytes of copies resident now (rematerialization frees a layer's after its forward)."""
        return sum(t.untyped_storage().nbytes() for _, ts in self.copies.values() for t in ts)
