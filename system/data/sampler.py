"""A deterministic, resumable mixture sampler: global position -> (domain, chunk index).

The mapping is a pure function of (seed, weights, domain sizes, position), so any process can
compute any position without replaying the past. Positions come in blocks of `BLOCK` (1024) with a
fixed number of draws per domain (largest-remainder rounding of the weights), shuffled per (seed,
block), so the proportions are exact over every block; a domain's j-th draw walks a per-epoch
permutation of its chunks, so every chunk is drawn once per epoch before any repeats. With
`group_size` G > 1 the domain is drawn per group of G consecutive positions (each group one
domain); G = 1 is the per-position mapping exactly.

The formulas: docs/data.md#the-mixture-sampler.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Mapping, Optional

import numpy as np
import torch

BLOCK = 1024
# Tags keep the random streams of block orders and chunk permutations independent.
_TAG_BLOCK = 1
_TAG_EPOCH = 2
_CACHE_ENTRIES = 64  # recently used permutations kept per sampler (memory vs. recompute)


class MixtureSampler:
    """Maps global sample positions to (domain name, chunk index)."""

    def __init__(self, sizes: Mapping[str, int], weights: Mapping[str, float], seed: int,
                 *, group_size: int = 1) -> None:
        if set(sizes) != set(weights):
            raise ValueError(f"sampler: domains with sizes {sorted(sizes)} differ from domains"
                             f" with weights {sorted(weights)}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"sampler: seed must be a non-negative integer, got {seed!r}")
        if (isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer))
                or group_size < 1):
            raise ValueError(f"sampler: group_size must be a positive integer, got {group_size!r}")
        self.domains: list[str] = list(sizes)  # the order of `sizes`; "domain" ids index it
        self.sizes = {d: int(sizes[d]) for d in self.domains}
        self.weights = {d: float(weights[d]) for d in self.domains}
        self.seed = int(seed)
        self.group_size = int(group_size)  # consecutive positions sharing one domain
        for d in self.domains:
            if self.weights[d] < 0 or not np.isfinite(self.weights[d]):
                raise ValueError(f"sampler: weight of {d!r} is {self.weights[d]}; must be >= 0")
            if self.weights[d] > 0 and self.sizes[d] < 1:
                raise ValueError(f"sampler: domain {d!r} has weight {self.weights[d]} but no chunks")
        if sum(self.weights.values()) <= 0:
            raise ValueError("sampler: the domain weights must not all be zero")
        self.counts = _block_counts([self.weights[d] for d in self.domains], BLOCK)
        self._domain_keys = [_name_key(d) for d in self.domains]
        self._blocks: OrderedDict = OrderedDict()
        self._perms: OrderedDict = OrderedDict()
        # A stream's background thread and the trainer (consumed ranges at checkpoints) share
        # the caches above.
        self._lock = threading.RLock()

    def lookup(self, p: int) -> tuple[str, int]:
        """The (domain name, chunk index) drawn at global position `p`."""
        dom, idx = self.lookup_range(p, p + 1)
        return self.domains[int(dom[0])], int(idx[0])

    def lookup_range(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Domain ids (indices into `domains`) and chunk indices for positions start..stop-1."""
        with self._lock:
            return self._lookup_range(start, stop)

    def _lookup_range(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        if start < 0 or stop < start:
            raise ValueError(f"sampler: invalid position range [{start}, {stop})")
        G = self.group_size
        span = BLOCK * G  # positions per block of groups
        dom_out = np.empty(stop - start, dtype=np.int64)
        idx_out = np.empty(stop - start, dtype=np.int64)
        p = start
        while p < stop:
            block, lo = divmod(p, span)
            hi = min(span, lo + (stop - p))
            labels, ranks = self._block(block)
            if G == 1:
                labels, ranks, within = labels[lo:hi], ranks[lo:hi], None
            else:  # expand each group's label and rank to its positions
                offsets = np.arange(lo, hi, dtype=np.int64)
                groups, within = np.divmod(offsets, G)
                labels, ranks = labels[groups], ranks[groups]
            out = slice(p - start, p - start + (hi - lo))
            dom_out[out] = labels
            for d in np.unique(labels):
                sel = labels == d
                uses = block * int(self.counts[d]) + ranks[sel]  # group draws of domain d
                if within is not None:
                    uses = uses * G + within[sel]
                idx_out[out][sel] = self._chunks_for_uses(int(d), uses)
            p += hi - lo
        return dom_out, idx_out

    def consumed(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Per domain, the sorted unique chunk indices drawn by positions start..stop-1."""
        with self._lock:
            return self._consumed(start, stop)

    def _consumed(self, start: int, stop: int) -> dict[str, np.ndarray]:
        if start < 0 or stop < start:
            raise ValueError(f"sampler: invalid position range [{start}, {stop})")
        G = self.group_size
        span = BLOCK * G  # positions per block of groups
        parts: dict[int, list[np.ndarray]] = {d: [] for d in range(len(self.domains))}
        first_full = -(-start // span)
        last_full = stop // span
        if first_full >= last_full:  # no whole block inside: look positions up directly
            self._add_drawn(parts, start, stop)
        else:
            self._add_drawn(parts, start, first_full * span)
            self._add_drawn(parts, last_full * span, stop)
            # Whole blocks draw a contiguous run of uses per domain (count_d groups of G
            # draws each per block); no per-position work.
            for d in range(len(self.domains)):
                c = int(self.counts[d]) * G
                if c:
                    parts[d].append(self._chunks_for_use_span(d, first_full * c, last_full * c))
        return {self.domains[d]: np.unique(np.concatenate(parts[d])) if parts[d]
                else np.zeros(0, dtype=np.int64) for d in parts}

    def _add_drawn(self, parts: dict[int, list[np.ndarray]], start: int, stop: int) -> None:
        if stop <= start:
            return
        dom, idx = self.lookup_range(start, stop)
        for d in np.unique(dom):
            parts[int(d)].append(idx[dom == d])

    def _chunks_for_use_span(self, d: int, j_lo: int, j_hi: int) -> np.ndarray:
        n = self.sizes[self.domains[d]]
        if j_hi - j_lo >= n:
            return np.arange(n, dtype=np.int64)  # a full epoch's worth: every chunk
        return self._chunks_for_uses(d, np.arange(j_lo, j_hi, dtype=np.int64))

    def _chunks_for_uses(self, d: int, uses: np.ndarray) -> np.ndarray:
        """Chunk indices of the draws numbered `uses` of domain `d`."""
        n = self.sizes[self.domains[d]]
        epochs, within = np.divmod(uses, n)
        out = np.empty(len(uses), dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(d, int(e))[within[sel]]
        return out

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(domain id per offset, rank of that draw among its domain's draws) for a block.

        Offsets are groups of `group_size` positions (single positions when it is 1).
        """
        hit = self._blocks.get(block)
        if hit is not None:
            self._blocks.move_to_end(block)
            return hit
        labels = np.repeat(np.arange(len(self.domains), dtype=np.int64), self.counts)
        _rng(self.seed, _TAG_BLOCK, block).shuffle(labels)
        order = np.argsort(labels, kind="stable")
        starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        ranks = np.empty(BLOCK, dtype=np.int64)
        ranks[order] = np.arange(BLOCK) - starts[labels[order]]
        return _remember(self._blocks, block, (labels, ranks))

    def _perm(self, d: int, epoch: int) -> np.ndarray:
        key = (d, epoch)
        hit = self._perms.get(key)
        if hit is not None:
            self._perms.move_to_end(key)
            return hit
        n = self.sizes[self.domains[d]]
        # Generator.permutation(n) is arange(n) shuffled in place; shuffling an int32 arange gives
        # the same order with half the memory (a billion-token domain: 30 MiB, not 60).
        perm = np.arange(n, dtype=np.int32 if n < 2 ** 31 else np.int64)
        _rng(self.seed, _TAG_EPOCH, self._domain_keys[d], epoch).shuffle(perm)
        return _remember(self._perms, key, perm)


class DataStream:
    """One data-parallel rank's micro-batches from a `MixtureSampler`.

    Each call consumes the next `dp_size * micro_batch_size` global positions; this rank
    takes the slice `[dp_rank * B, (dp_rank + 1) * B)` of them. `position` (the next
    unconsumed global position) is the same on every rank, so resuming from it continues
    exactly, even with a different dp_size as long as dp_size * B is unchanged.

    With a sampler whose `group_size` G divides B (G = B: one domain per micro-batch), every
    rank's slice is whole groups, as long as the positions stay multiples of G.

    `prefetch`: the next micro-batch is gathered in a background thread while the current one
    trains (a batch is a pure function of its position, so the batches are the same); `pin_memory`
    puts it in page-locked memory for a non-blocking copy to the GPU.
    """

    def __init__(self, corpus_train: Mapping[str, np.ndarray], sampler: MixtureSampler,
                 dp_rank: int, dp_size: int, micro_batch_size: int,
                 start_position: int = 0, *, prefetch: bool = False, pin_memory: bool = False) -> None:
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"data stream: dp_rank {dp_rank} must be in [0, dp_size={dp_size})")
        if micro_batch_size < 1:
            raise ValueError(f"data stream: micro_batch_size {micro_batch_size} must be >= 1")
        if start_position < 0:
            raise ValueError(f"data stream: start_position {start_position} must be >= 0")
        G = sampler.group_size
        if G > 1 and micro_batch_size % G != 0:
            raise ValueError(f"data stream: micro_batch_size {micro_batch_size} is not a multiple"
                             f" of the sampler's group_size {G}; micro-batches would split"
                             " single-domain groups (build the sampler with group_size ="
                             " micro_batch_size)")
        if start_position % G != 0:
            raise ValueError(f"data stream: start_position {start_position} is not a multiple of"
                             f" the sampler's group_size {G}")
        for d in sampler.domains:
            if d not in corpus_train:
                raise ValueError(f"data stream: the corpus has no domain {d!r}")
            if len(corpus_train[d]) != sampler.sizes[d]:
                raise ValueError(f"data stream: domain {d!r} has {len(corpus_train[d])} chunks"
                                 f" but the sampler was built for {sampler.sizes[d]}")
        self.corpus = corpus_train
        self.sampler = sampler
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.micro_batch_size = micro_batch_size
        self.position = int(start_position)
        self.pin_memory = pin_memory
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="moeforge-data") if prefetch else None
        self._next = None  # (position, future of its batch)

    @property
    def positions_per_call(self) -> int:
        return self.dp_size * self.micro_batch_size

    def next_microbatch(self) -> dict[str, torch.Tensor]:
        """{"input_ids": (B, T), "labels": (B, T), "domain": (B,), "chunk": (B,)} int64 tensors
        for this rank ("domain" indexes `sampler.domains`, "chunk" that domain's chunk array)."""
        pos = self.position
        ready = self._next
        out = ready[1].result() if ready is not None and ready[0] == pos else self._batch(pos)
        self.position += self.positions_per_call
        if self._pool is not None:
            self._next = (self.position, self._pool.submit(self._batch, self.position))
        return out

    def close(self) -> None:
        """Stop the background thread (the stream still works, without prefetching)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._next = None, None

    def _batch(self, position: int) -> dict[str, torch.Tensor]:
        first = position + self.dp_rank * self.micro_batch_size
        doms_B, idxs_B = self.sampler.lookup_range(first, first + self.micro_batch_size)
        width = self.corpus[self.sampler.domains[int(doms_B[0])]].shape[1]  # W = seq_len + 1
        tokens_BW = np.empty((self.micro_batch_size, width), dtype=np.int64)
        for d in np.unique(doms_B):
            sel = doms_B == d
            tokens_BW[sel] = self.corpus[self.sampler.domains[int(d)]][idxs_B[sel]]
        tokens_BW = torch.from_numpy(tokens_BW)
        out = {"input_ids": tokens_BW[:, :-1].contiguous(), "labels": tokens_BW[:, 1:].contiguous(),
               "domain": torch.from_numpy(doms_B), "chunk": torch.from_numpy(idxs_B)}
        if self.pin_memory:
            out["input_ids"], out["labels"] = out["input_ids"].pin_memory(), out["labels"].pin_memory()
        return out

    def consumed(self, start: int = 0, stop: Optional[int] = None) -> dict[str, np.ndarray]:
        """Per domain, the sorted unique chunks drawn by all ranks in [start, stop or position)."""
        return self.sampler.consumed(start, self.position if stop is None else stop)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.sampler.seed,
                "weights": dict(self.sampler.weights), "group_size": self.sampler.group_size}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from a saved position; the seed, weights and group size must match.

        States saved before group sizes existed have no "group_size" and mean 1.
        """
        if int(state["seed"]) != self.sampler.seed:
            raise ValueError(f"data stream state: saved seed {state['seed']} differs from"
                             f" this stream's seed {self.sampler.seed}")
        saved = {k: float(v) for k, v in dict(state["weights"]).items()}
        if saved != self.sampler.weights:
            raise ValueError(f"data stream state: saved mixture weights {saved} differ from"
                             f" this stream's {self.sampler.weights}; resuming would change"
                             " which samples are drawn")
        saved_group = int(state.get("group_size", 1))
        if saved_group != self.sampler.group_size:
            raise ValueError(f"data stream state: saved group_size {saved_group} differs from this"
                             f" stream's group_size {self.sampler.group_size} (micro-batch domain"
                             " grouping); resuming would change which samples are drawn")
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"data stream state: position {position} must be >= 0")
        if position % self.sampler.group_size != 0:
            raise ValueError(f"data stream state: position {position} is not a multiple of the"
                             f" sampler's group_size {self.sampler.group_size}")
        self.position = position


def holdout_batches(holdout: Mapping[str, np.ndarray], name: str, batch_size: int,
                    max_batches: Optional[int] = None) -> Iterator[dict[str, torch.Tensor]]:
    """Evaluation batches {"input_ids", "labels"} of domain `name`, chunks in stored order.

    The last batch may be smaller than `batch_size`; at most `max_batches` are yielded.
    """
    if name not in holdout:
        raise ValueError(f"holdout: no domain {name!r}; have {sorted(holdout)}")
    if batch_size < 1:
        raise ValueError(f"holdout: batch_size {batch_size} must be >= 1")
    chunks = holdout[name]
    n_batches = -(-len(chunks) // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        tokens_BW = torch.from_numpy(
            np.asarray(chunks[b * batch_size:(b + 1) * batch_size], dtype=np.int64))
        chunk = torch.arange(b * batch_size, b * batch_size + len(tokens_BW), dtype=torch.int64)
        yield {"input_ids": tokens_BW[:, :-1].contiguous(), "labels": tokens_BW[:, 1:].contiguous(),
               "chunk": chunk}


def _remember(cache: OrderedDict, key, value):
    cache[key] = value
    if len(cache) > _CACHE_ENTRIES:
        cache.popitem(last=False)
    return value


def _block_counts(weights: list[float], total: int) -> np.ndarray:
    """Largest-remainder integer counts summing to `total`, proportional to `weights`.

    Ties go to the earlier domain; zero weights always get zero.
    """
    w = np.asarray(weights, dtype=np.float64)
    quota = w / w.sum() * total
    counts = np.floor(quota).astype(np.int64)
    frac = quota - counts
    frac[w == 0] = -1.0  # never round a zero-weight domain up
    short = total - int(counts.sum())
    order = np.lexsort((np.arange(len(w)), -frac))  # largest remainder first, then spec order
    counts[order[:short]] += 1
    return counts


def _name_key(name: str) -> int:
    # A domain's permutations follow its name, not its position in the list.
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))
