"""Expert loads: a training run's token-count trace, and the per-iteration (L, N, E) generator."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import numpy as np

from parallel.simulator.config import SimConfig, moe_spacing
from system.configtree import SpecError

_TPE = re.compile(r"^moe/(\d+)/tokens_per_expert$")


def read_trace(path: str) -> np.ndarray:
    """(steps, L, E) global token counts from a run's metrics.jsonl (or its run directory).

    Records without `moe/<i>/tokens_per_expert` (evaluations, stage summaries) are skipped; the
    layers are the union of indices seen, and a step must carry all of them.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        raise SpecError([("load.trace", f"{str(p)!r} does not exist")])
    recs: list[dict[int, list]] = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SpecError([("load.trace", f"{p}:{n}: not JSON ({e.msg})")]) from None
        layers = {int(m.group(1)): v for k, v in rec.items() if (m := _TPE.match(k))}
        if layers:
            recs.append(layers)
    if not recs:
        raise SpecError([("load.trace", f"{p}: no record has moe/<i>/tokens_per_expert")])
    idx = sorted(set().union(*recs))
    widths = {len(v) for r in recs for v in r.values()}
    if len(widths) != 1:
        raise SpecError([("load.trace", f"{p}: layers/steps disagree on the number of experts {sorted(widths)}")])
    steps = [[r[i] for i in idx] for r in recs if all(i in r for i in idx)]
    if not steps:
        raise SpecError([("load.trace", f"{p}: no step carries all MoE layers {idx}")])
    arr = np.asarray(steps, dtype=np.float64)
    if (arr < 0).any():
        raise SpecError([("load.trace", f"{p}: negative token counts")])
    return arr


class LoadGenerator:
    """Per-iteration routed (token, expert) counts of every simulated rank: (L, N, E) int64.

    zipf:    each layer's experts are ranked by a random permutation; rank j has probability
             (j+1)^-s / sum; every iteration Poisson(drift) random adjacent pairs of the ranking
             swap (the popular experts wander slowly); each rank routes tokens_per_gpu*top_k
             (token, expert) pairs as a multinomial draw.
    uniform: every rank sends exactly the same number to every expert (remainders spread).
    trace:   the shares of step i's global counts, drawn per rank as for zipf; with
             trace_scale false each rank routes (the trace's pairs)/N instead of tokens_per_gpu*k.
    """

    def __init__(self, cfg: SimConfig, num_ranks: int, trace: Optional[np.ndarray] = None):
        self.kind = cfg.load.kind
        self.L, self.E, self.N = moe_spacing(cfg.model)[0], cfg.model.num_experts, num_ranks
        self.pairs = cfg.load.tokens_per_gpu * cfg.model.top_k
        self.drift = cfg.load.drift
        self.rng = np.random.default_rng(cfg.load.seed)
        self.trace = trace
        self.scale = cfg.load.trace_scale
        self.it = 0
        if self.kind == "zipf":
            j = np.arange(self.E, dtype=np.float64)
            p = (j + 1.0) ** -cfg.load.zipf_s
            self.p_rank = p / p.sum()
            self.rank_of = np.stack([self.rng.permutation(self.E) for _ in range(self.L)])  # expert at rank j

    def _drift(self) -> None:
        for layer in range(self.L):
            for _ in range(self.rng.poisson(self.drift) if self.drift > 0 else 0):
                j = int(self.rng.integers(0, self.E - 1))
                self.rank_of[layer, [j, j + 1]] = self.rank_of[layer, [j + 1, j]]

    def shares(self) -> np.ndarray:
        """(L, E) expected share of each expert this iteration (before drawing)."""
        if self.kind == "zipf":
            out = np.zeros((self.L, self.E))
            for layer in range(self.L):
                out[layer, self.rank_of[layer]] = self.p_rank
            return out
        if self.kind == "uniform":
            return np.full((self.L, self.E), 1.0 / self.E)
        step = self.trace[self.it % len(self.trace)]
        tot = step.sum(axis=1, keepdims=True)
        return np.where(tot > 0, step / np.maximum(tot, 1e-300), 1.0 / self.E)

    def next(self) -> np.ndarray:
        out = np.zeros((self.L, self.N, self.E), dtype=np.int64)
        if self.kind == "uniform":
            base, rem = divmod(self.pairs, self.E)
            out += base
            for s in range(self.N):
                out[:, s, (s * rem + np.arange(rem)) % self.E] += 1
        else:
            sh = self.shares()
            pairs = self.pairs
            if self.kind == "trace" and not self.scale:
                step = self.trace[self.it % len(self.trace)]
                pairs = max(1, int(round(step.sum(axis=1).mean() / self.N)))
            for layer in range(self.L):
                out[layer] = self.rng.multinomial(pairs, sh[layer], size=self.N)
        self.it += 1
        if self.kind == "zipf":
            self._drift()
        return out
