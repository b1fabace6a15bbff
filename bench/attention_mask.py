#!/usr/bin/env python
"""Causal attention within documents on CPU: the old (B, T, T) masked SDPA against the paths
without that mask. Time and peak extra memory of one forward + backward.

    python bench/attention_mask.py [--seq 2048 4096] [--batch 1] [--heads 4] [--kv-heads 4]
                                   [--head-dim 64] [--reps 2] [--json out.json]

Paths: "masked_sdpa" (what `system.model` did: `document_mask` and SDPA with it), "split" (one
causal SDPA per document on pieces of the row: `system.attention.split_attention`), "padded"
(an alternative not shipped: documents gathered into batches of equal padded length, one
causal SDPA per length bucket, the outputs scattered back), and "causal" (plain causal attention
over the whole row, ignoring documents: the floor). Layouts: document lengths geometric with
mean 64 or 512, and "mixed" (70% geometric mean 32, 30% uniform 256..2048 tokens).
For each: the CPU seconds (process time; `--threads` 1 by default, since on a shared machine
wall time measures the other processes too) and wall time of the fastest of `--reps` runs of
the attention given its layout (forward + backward of sum(out^2)), the time to build the layout
(mask, spans or gather indices: once per model forward, shared by the layers), and the peak of
live tensor storage over layout + forward + backward (`system.memory_tracker.peak_live_bytes`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from system.attention import document_mask, document_spans, split_attention  # noqa: E402
from system.memory_tracker import peak_live_bytes  # noqa: E402

SEP = 0


def layout_ids(kind: str, B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """Token ids (1..99) with separators (0) ending documents whose lengths follow `kind`."""
    ids = torch.randint(1, 100, (B, T), generator=gen)
    for b in range(B):
        t = 0
        while True:
            if kind == "mixed":
                long = torch.rand((), generator=gen) < 0.3
                n = int(torch.randint(256, 2049, (), generator=gen)) if long else _geometric(32, gen)
            else:
                n = _geometric(int(kind.split("-")[1]), gen)
            t += n
            if t > T:
                break
            ids[b, t - 1] = SEP
    return ids


def _geometric(mean: int, gen: torch.Generator) -> int:
    u = float(torch.rand((), generator=gen))
    return 1 + int(torch.log(torch.tensor(1 - u)) / torch.log(torch.tensor(1 - 1 / mean)))


def padded_layout(ids: torch.Tensor):
    """Per bucket (padded length L): (gather index (n, L) into the B*T tokens, the flat positions
    of real tokens in its (n*L) rows); and the permutation from bucket order back to token order.
    A document is padded at its end with copies of its last token: causal attention keeps every
    real query away from them."""
    B, T = ids.shape
    by_len: dict[int, list[tuple[int, int]]] = {}
    for b, docs in enumerate(document_spans(ids, SEP)):
        for s, e in docs:
            n = e - s
            step = max(1, 1 << max(0, (n - 1).bit_length() - 3))  # round up to an eighth of a power of two
            by_len.setdefault(-(-n // step) * step, []).append((b * T + s, n))
    buckets, order = [], []
    for L, docs in sorted(by_len.items()):
        idx = torch.tensor([[s + min(i, n - 1) for i in range(L)] for s, n in docs])
        keep = torch.tensor([j * L + i for j, (_, n) in enumerate(docs) for i in range(n)])
        buckets.append((L, idx, keep))
        order += [s + i for s, n in docs for i in range(n)]
    inverse = torch.empty(B * T, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(B * T)
    return buckets, inverse


def padded_attention(q, k, v, layout, gqa: bool):
    buckets, inverse = layout
    B, H, T, d = q.shape
    flat = [t.transpose(1, 2).reshape(B * T, t.shape[1], d) for t in (q, k, v)]
    outs = []
    for L, idx, keep in buckets:
        qq, kk, vv = (f[idx].transpose(1, 2) for f in flat)  # (n, heads, L, d)
        y = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=gqa)
        outs.append(y.transpose(1, 2).reshape(-1, H, d)[keep])
    return torch.cat(outs)[inverse].reshape(B, T, H, d).transpose(1, 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--layouts", nargs="+", default=["geometric-64", "geometric-512", "mixed"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    gqa = a.kv_heads != a.heads
    rows = []
    for T in a.seq:
        for kind in a.layouts:
            gen = torch.Generator().manual_seed(T)
            ids = layout_ids(kind, a.batch, T, gen)
            q, k, v = (torch.randn(a.batch, n, T, a.head_dim, generator=gen).requires_grad_()
                       for n in (a.heads, a.kv_heads, a.kv_heads))
            extra = {"enable_gqa": True} if gqa else {}
            paths = {
                "masked_sdpa": (lambda: document_mask(ids, SEP)[:, None],
                                lambda L: F.scaled_dot_product_attention(q, k, v, attn_mask=L, **extra)),
                "split": (lambda: document_spans(ids, SEP), lambda L: split_attention(q, k, v, L, gqa)),
                "padded": (lambda: padded_layout(ids), lambda L: padded_attention(q, k, v, L, gqa)),
                "causal": (lambda: None, lambda L: F.scaled_dot_product_attention(q, k, v, is_causal=True, **extra)),
            }
            n_docs = sum(len(d) for d in document_spans(ids, SEP))
            row = {"T": T, "layout": kind, "documents": n_docs, "paths": {}}
            outs = {}
            for name, (build, attend) in paths.items():
                def step(L):
                    for t in (q, k, v):
                        t.grad = None
                    y = attend(L)
                    y.square().sum().backward()
                    return y.detach(), [t.grad.clone() for t in (q, k, v)]

                peak = peak_live_bytes(lambda: step(build()))
                t0 = time.perf_counter()
                L = build()
                layout_s = time.perf_counter() - t0
                times = []
                for _ in range(a.reps):
                    t0, c0 = time.perf_counter(), time.process_time()
                    outs[name] = step(L)
                    times.append((time.process_time() - c0, time.perf_counter() - t0))
                cpu_s, wall_s = min(times)
                row["paths"][name] = {"cpu_s": round(cpu_s, 4), "wall_s": round(wall_s, 4),
                                      "layout_s": round(layout_s, 4), "peak_mb": round(peak / 2**20, 1)}
            ref = outs["masked_sdpa"]
            for name in ("split", "padded"):
                y, grads = outs[name]
                row["paths"][name]["max_abs_diff_vs_masked"] = max(
                    float((a_ - b_).abs().max()) for a_, b_ in zip([y] + grads, [ref[0]] + ref[1]))
            rows.append(row)
            p = row["paths"]
            print(f"T={T} {kind:14s} docs={n_docs:4d}  " + "  ".join(
                f"{n}: {p[n]['cpu_s'] * 1e3:7.1f} ms (+{p[n]['layout_s'] * 1e3:.1f}) {p[n]['peak_mb']:7.1f} MB"
                for n in paths), flush=True)
    out = {"device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
           "batch": a.batch, "heads": a.heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim, "rows": rows}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    else:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
