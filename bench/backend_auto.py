"""The measurements behind `experts.backend: auto` on CPU: each expert path, same run, same data.

For every (shape, dtype) it times the expert compute alone (forward + backward, the input needing
a gradient as inside a network) with the reference loop, the `grouped` backend's
`torch._grouped_mm` path and its padded bmm, taking turns within every iteration so load from
other work falls on all of them alike. Counts come from a top-k of random logits (the routing of
a freshly initialised router: close to balanced). It also says whether each path's output and
gradients are bit-identical to the reference's, and what `auto` resolves to.

    python bench/backend_auto.py                 # the grid below, fp32 and bf16 (~1.5 min idle)
    python bench/backend_auto.py --threads 1      # one intra-op thread, as each quickstart worker has
    python bench/backend_auto.py --dtypes fp32 --stat min
    python bench/backend_auto.py --json out.json

Shapes: the test suite's tiny models (d_model 32, and 30: rows not 16-byte aligned), the
quickstart / golden-curve models (d_model 128, 8 experts, top-2, d_expert 256, 1024 tokens per
rank and micro-batch) and the same with 16 to 64 experts, and larger ones (d_model 512, 8 or 64
experts). Figures: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from experts.backends import GROUPED_PATHS, choose_auto_backend, reference_backend  # noqa: E402
from experts.backends import _grouped_mm_probe  # noqa: E402

# (label, d_model, experts, top-k, d_expert, tokens, timed iterations by default)
GRID = [
    ("tests tiny", 32, 4, 2, 32, 128, 41),
    ("tests tiny, unaligned", 30, 4, 2, 24, 128, 41),
    ("quickstart / golden", 128, 8, 2, 256, 1024, 21),
    ("quickstart, 16 experts", 128, 16, 2, 256, 1024, 21),
    ("quickstart, 32 experts", 128, 32, 2, 256, 1024, 21),
    ("quickstart, 64 experts", 128, 64, 2, 256, 1024, 21),
    ("larger", 512, 8, 2, 1024, 2048, 5),
    ("larger, many experts", 512, 64, 8, 256, 2048, 5),
    ("larger, many experts top-2", 512, 64, 2, 1024, 2048, 5),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PATHS = {"reference": reference_backend, "grouped_mm": GROUPED_PATHS["grouped_mm"],
         "padded": GROUPED_PATHS["padded"]}


def init_counts(tokens: int, experts: int, top_k: int, seed: int = 0) -> list[int]:
    """Rows per expert when `tokens` tokens pick their top-k of random logits."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randn(tokens, experts, generator=g).topk(top_k, dim=-1).indices
    return torch.bincount(ids.flatten(), minlength=experts).tolist()


def bench_case(d: int, e: int, k: int, f: int, tokens: int, dtype: torch.dtype, warmup: int,
               iters: int, stat: str) -> dict:
    counts = init_counts(tokens, e, k)
    n = sum(counts)
    torch.manual_seed(0)
    x = torch.randn(n, d, dtype=dtype, requires_grad=True)
    ws = [(torch.randn(*s, dtype=dtype) * 0.02).requires_grad_() for s in ((e, d, f), (e, d, f), (e, f, d))]
    grad = torch.randn(n, d, dtype=dtype)
    aligned = all(v * dtype.itemsize % 16 == 0 for v in (d, f))
    paths = [p for p in PATHS if p != "grouped_mm" or (aligned and _grouped_mm_probe("cpu", None, dtype))]
    times: dict[str, list[float]] = {p: [] for p in paths}
    results: dict[str, list[torch.Tensor]] = {}
    for i in range(warmup + iters):
        for p in paths:
            for t in (x, *ws):
                t.grad = None
            t0 = time.perf_counter()
            y = PATHS[p](x, counts, *ws)
            y.backward(grad)
            ms = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                times[p].append(ms)
            if i == 0:
                results[p] = [y.detach(), x.grad, *(w.grad for w in ws)]
    pick = min if stat == "min" else statistics.median
    med = {p: pick(v) for p, v in times.items()}
    identical = {p: all(torch.equal(a, b) for a, b in zip(results["reference"], results[p])) for p in paths}
    auto = choose_auto_backend(device_type="cpu", dtype=dtype, d_model=d, d_expert=f, num_experts=e,
                               grouped_mm_runs=_grouped_mm_probe("cpu", None, dtype), megablocks_reason="no CUDA")
    return {"d_model": d, "experts": e, "top_k": k, "d_expert": f, "tokens": tokens, "dtype": str(dtype),
            "counts": counts, "ms": med, "ms_all": times, "bit_identical_to_reference": identical, "auto": auto}


def table(rows: list[dict]) -> str:
    head = ["shape", "dtype", "d_model x E x k x d_expert, tokens", "reference ms", "grouped_mm ms", "padded ms",
            "grouped_mm vs reference", "padded vs reference", "bit-identical", "auto picks"]
    out = ["| " + " | ".join(head) + " |", "| --- | --- | --- |" + " ---: |" * 4 + " ---: | --- | --- |"]
    for label, r in rows:
        ms = r["ms"]
        ratio = {p: (f"{ms['reference'] / ms[p]:.2f}x" if p in ms else "-") for p in ("grouped_mm", "padded")}
        same = ", ".join(p for p, ok in r["bit_identical_to_reference"].items() if ok and p != "reference") or "none"
        cells = [label, r["dtype"].replace("torch.", ""),
                 f"{r['d_model']} x {r['experts']} x {r['top_k']} x {r['d_expert']}, {r['tokens']}",
                 *(f"{ms[p]:.2f}" if p in ms else "-" for p in PATHS), ratio["grouped_mm"], ratio["padded"],
                 same, r["auto"]]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default: 41 / 21 / 5 by size)")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="per-path figure: the median, or the fastest iteration (less disturbed by other load)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", dest="json_path")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    rows = []
    for name in args.dtypes.split(","):
        for label, d, e, k, f, tokens, iters in GRID:
            r = bench_case(d, e, k, f, tokens, DTYPES[name], args.warmup, args.iters or iters, args.stat)
            rows.append((label, r))
            print(f"[bench] {label} {name}: " + ", ".join(f"{q} {v:.2f} ms" for q, v in r["ms"].items())
                  + f"; auto -> {r['auto']}", file=sys.stderr, flush=True)
    machine = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "threads": torch.get_num_threads(), "platform": platform.platform(), "stat": args.stat,
               "wall_s": round(time.time() - t0, 1)}
    print(table(rows))
    print(f"\n{machine}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"machine": machine, "rows": [
            {"label": label, **r} for label, r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
