"""Benchmark the MoE feed-forward layer (forward + backward) on CPU, per expert backend.

For every shape in the grid and every backend in experts.backends.BACKENDS, time one
forward + backward pass of `MoELayer` over a fixed number of tokens, next to a dense
SwiGLU FFN with the same *active* hidden size (d_ff = top_k * d_expert): the gap between
the two is what routing, dispatch and per-expert matmuls cost over one big matmul.

By default the expert width keeps the active hidden size at 4 * d_model for every
(num_experts, top_k), so all rows of one d_model share the same dense baseline and the
same FLOPs per token (d_expert = 4 * d_model / top_k).

    python bench/moe_layer.py                  # reduced grid: ~30 s on 2 idle cores, < 3 min busy
    python bench/moe_layer.py --full           # d_model 512/1024 x experts 8/64 x top-k 2/8
    python bench/moe_layer.py --json out.json  # also write the rows as JSON

Times are per-iteration medians over the timed iterations (medians resist the noise of a
shared machine); tokens/s = tokens per batch / median seconds.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from experts.backends import BACKENDS, swiglu  # noqa: E402
from experts.layer import MoELayer  # noqa: E402

FULL_GRID = [(d, e, k) for d, e, k in itertools.product((512, 1024), (8, 64), (2, 8))]
# One fast row per routing regime, and the coarse-grained case at the larger width.
REDUCED_GRID = [(512, 8, 2), (512, 64, 8), (1024, 8, 2)]
REFERENCE = "reference"


@dataclass
class Row:
    d_model: int
    num_experts: int
    top_k: int
    d_expert: int
    backend: str
    tokens: int
    ms_per_iter: float
    tokens_per_s: float
    dense_d_ff: int
    dense_ms_per_iter: float
    dense_tokens_per_s: float
    max_over_mean_load: float
    ratio_to_reference: Optional[float] = None  # reference time / this backend's time (>1 = faster)
    ms_all: list[float] = field(default_factory=list)


class DenseSwiGLU(nn.Module):
    """The dense baseline: one SwiGLU FFN, d_model -> d_ff -> d_model, as the experts compute it."""

    def __init__(self, d_model: int, d_ff: int, std: float = 0.02):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(d_model, d_ff) * std)
        self.w3 = nn.Parameter(torch.randn(d_model, d_ff) * std)
        self.w2 = nn.Parameter(torch.randn(d_ff, d_model) * std)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return swiglu(x_BTD, self.w1, self.w3, self.w2)


def time_interleaved(modules: list[nn.Module], x: torch.Tensor, grad: torch.Tensor, warmup: int,
                     iters: int) -> list[list[float]]:
    """Milliseconds of each timed forward + backward, per module.

    The modules take turns within every iteration, so a burst of load from other work on a
    shared machine hits all of them alike and their ratios stay meaningful. Gradients are
    cleared before each pass, outside the timing.
    """
    times: list[list[float]] = [[] for _ in modules]
    for i in range(warmup + iters):
        for j, m in enumerate(modules):
            m.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            out = m(x)
            if isinstance(out, tuple):  # MoELayer returns (output, routing statistics)
                out = out[0]
            out.backward(grad)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[j].append(dt * 1e3)
    return times


def bench_shape(d_model: int, num_experts: int, top_k: int, *, tokens: int, d_expert: Optional[int],
                active_mult: int, warmup: int, iters: int, dtype: torch.dtype, seed: int,
                backends: list[str], log: Callable[[str], None]) -> list[Row]:
    f = d_expert or max(1, active_mult * d_model // top_k)
    d_ff = top_k * f
    torch.manual_seed(seed)
    x = torch.randn(1, tokens, d_model, dtype=dtype)
    grad = torch.randn(1, tokens, d_model, dtype=dtype)
    dense = DenseSwiGLU(d_model, d_ff).to(dtype)

    layers = []
    for name in backends:
        layer = MoELayer(d_model, num_experts, top_k, f, backend=name).to(dtype)
        if not layers:
            torch.manual_seed(seed + 1)
            layer.reset_parameters(std=0.02, out_std=0.02)
        else:
            layer.load_state_dict(layers[0].state_dict())  # same weights, hence the same routing
        layers.append(layer)
    with torch.no_grad():
        counts = layers[0](x)[1].counts_E.double()
    load = float(counts.max() / counts.mean())

    dense_all, *moe_all = time_interleaved([dense, *layers], x, grad, warmup, iters)
    dense_ms = statistics.median(dense_all)
    rows = []
    for name, ms_all in zip(backends, moe_all):
        ms = statistics.median(ms_all)
        rows.append(Row(d_model, num_experts, top_k, f, name, tokens, ms, tokens / ms * 1e3, d_ff, dense_ms,
                        tokens / dense_ms * 1e3, load, ms_all=[round(t, 3) for t in ms_all]))
        log(f"  d_model={d_model} E={num_experts} k={top_k} d_expert={f} {name}: {ms:.1f} ms/iter "
            f"(dense d_ff={d_ff}: {dense_ms:.1f} ms/iter)")
    ref = next((r for r in rows if r.backend == REFERENCE), None)
    if ref is not None:
        for r in rows:
            r.ratio_to_reference = ref.ms_per_iter / r.ms_per_iter
    return rows


def markdown_table(rows: list[Row]) -> str:
    show_ratio = len({r.backend for r in rows}) > 1
    head = ["d_model", "experts", "top-k", "d_expert", "backend", "ms/iter", "tokens/s"]
    if show_ratio:
        head.append("vs reference")
    head += ["dense d_ff", "dense ms/iter", "dense tokens/s", "MoE / dense time", "max/mean load"]
    align = ["---" if h == "backend" else "---:" for h in head]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    for r in rows:
        cells = [str(r.d_model), str(r.num_experts), str(r.top_k), str(r.d_expert), r.backend,
                 f"{r.ms_per_iter:.1f}", f"{r.tokens_per_s:,.0f}"]
        if show_ratio:
            cells.append(f"{r.ratio_to_reference:.2f}x" if r.ratio_to_reference else "-")
        cells += [str(r.dense_d_ff), f"{r.dense_ms_per_iter:.1f}", f"{r.dense_tokens_per_s:,.0f}",
                  f"{r.ms_per_iter / r.dense_ms_per_iter:.2f}x", f"{r.max_over_mean_load:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_grid(text: str) -> list[tuple[int, int, int]]:
    """'512x8x2,1024x64x8' -> [(512, 8, 2), (1024, 64, 8)] (d_model x experts x top-k)."""
    out = []
    for item in text.split(","):
        d, e, k = (int(v) for v in item.lower().split("x"))
        out.append((d, e, k))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="the full grid: d_model 512/1024, experts 8/64, top-k 2/8")
    p.add_argument("--grid", type=parse_grid, help="explicit shapes, e.g. 512x8x2,1024x64x8 (d_model x E x k)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per batch (default 2048)")
    p.add_argument("--d-expert", type=int, default=None,
                   help="expert hidden size (default: active_mult * d_model / top_k)")
    p.add_argument("--active-mult", type=int, default=4, help="active hidden size / d_model (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per measurement (default 1)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per measurement (default 5)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--backends", default=None, help="comma-separated subset of the registered backends")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", help="write the rows (and the machine) as JSON to this path")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    backends = list(BACKENDS) if not args.backends else args.backends.split(",")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        p.error(f"unknown backends {unknown}; registered: {sorted(BACKENDS)}")
    if REFERENCE in backends:  # reference first, so ratios refer to a number already printed
        backends.remove(REFERENCE)
        backends.insert(0, REFERENCE)
    grid = args.grid or (FULL_GRID if args.full else REDUCED_GRID)
    dtype = getattr(torch, args.dtype)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "dtype": args.dtype, "tokens": args.tokens, "warmup": args.warmup, "iters": args.iters}
    log(f"[bench] {len(grid)} shapes x backends {backends}; {machine}")
    t0 = time.perf_counter()
    rows: list[Row] = []
    for d, e, k in grid:
        if k > e:
            log(f"  skipping d_model={d} E={e} k={k}: top_k > num_experts")
            continue
        rows += bench_shape(d, e, k, tokens=args.tokens, d_expert=args.d_expert, active_mult=args.active_mult,
                            warmup=args.warmup, iters=args.iters, dtype=dtype, seed=args.seed,
                            backends=backends, log=log)
    log(f"[bench] done in {time.perf_counter() - t0:.0f}s")
    print(markdown_table(rows))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"machine": machine, "rows": [asdict(r) for r in rows]},
                                                   indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
