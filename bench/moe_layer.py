"""Benchmark the MoE feed-forward layer (forward + backward), comparing the expert backends.

For every shape in the grid, time one forward + backward pass of `MoELayer` over a fixed
number of tokens with each available expert backend (experts.backends: auto, reference, grouped,
and megablocks where it can run; an `auto` row names the backend it resolved to), next to a dense SwiGLU FFN with the same *active* hidden
size (d_ff = top_k * d_expert). All of them run in the same process, take turns within every
timed iteration, and share weights (hence routing), so the `vs reference` ratios are
measured under the same conditions even on a noisy shared machine.

By default the expert width keeps the active hidden size at 4 * d_model for every
(num_experts, top_k), so all rows of one d_model share the same dense baseline and the
same FLOPs per token (d_expert = 4 * d_model / top_k).

    python bench/moe_layer.py                   # d_model 512/1024 x experts 8/64 x top-k 2/8, CPU fp32
    python bench/moe_layer.py --quick           # three of those shapes
    python bench/moe_layer.py --grid 2048x64x8 --device cuda --dtype bf16 --tokens 16384
    python bench/moe_layer.py --gpu-preset      # d_model 2048, 64 experts, top-8, bf16, CUDA
    python bench/moe_layer.py --json out.json   # also write the rows (and the machine) as JSON
    python bench/moe_layer.py --paths           # the grouped backend's paths alone, as padding grows

Times are per-iteration medians over the timed iterations (medians resist the noise of a
shared machine); tokens/s = tokens per batch / median seconds. TFLOP/s counts only the expert
matmuls: 3 matmuls of 2 * d_model * d_expert FLOPs per routed row (tokens * top_k rows) forward,
three times that for forward + backward (the input needs a gradient, as inside a network);
the dense FFN does the same number. On CUDA, iterations are timed with CUDA events.
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

from experts.backends import (  # noqa: E402
    BACKENDS, GROUPED_PATHS, choose_grouped_path, grouped_path_for, swiglu, unavailable_reason,
)
from experts.backends import _grouped_mm_probe  # noqa: E402
from experts.layer import MoELayer  # noqa: E402

FULL_GRID = [(d, e, k) for d, e, k in itertools.product((512, 1024), (8, 64), (2, 8))]
# One fast row per routing regime, and the coarse-grained case at the larger width.
QUICK_GRID = [(512, 8, 2), (512, 64, 8), (1024, 8, 2)]
GPU_PRESET = dict(grid=[(2048, 64, 8)], device="cuda", dtype="bfloat16", tokens=16384, warmup=3, iters=10,
                  backends="reference,auto,grouped,megablocks")
REFERENCE = "reference"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float64": torch.float64, "fp64": torch.float64}


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
    tflops: float  # achieved, expert matmuls only, forward + backward
    dense_d_ff: int
    dense_ms_per_iter: float
    dense_tflops: float
    max_over_mean_load: float
    path: str = ""  # for `grouped`: the path its dispatch rule took; for `auto`: what it ran
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


def expert_flops(tokens: int, top_k: int, d_model: int, d_expert: int) -> float:
    """Forward + backward FLOPs of the expert matmuls: 6 * D * F per routed row forward, x3."""
    return 3 * 6 * tokens * top_k * d_model * d_expert


class _Timer:
    """Wall-clock milliseconds of a region: perf_counter on CPU, CUDA events on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3
        return False


def time_interleaved(modules: list[nn.Module], x: torch.Tensor, grad: torch.Tensor, warmup: int,
                     iters: int) -> list[list[float]]:
    """Milliseconds of each timed forward + backward, per module.

    The modules take turns within every iteration, so a burst of load from other work on a
    shared machine hits all of them alike and their ratios stay meaningful. Gradients are
    cleared before each pass, outside the timing. x requires a gradient, as inside a network.
    """
    times: list[list[float]] = [[] for _ in modules]
    for i in range(warmup + iters):
        for j, m in enumerate(modules):
            m.zero_grad(set_to_none=True)
            x.grad = None
            with _Timer(x.device) as t:
                out = m(x)
                if isinstance(out, tuple):  # MoELayer returns (output, routing statistics)
                    out = out[0]
                out.backward(grad)
            if i >= warmup:
                times[j].append(t.ms)
    return times


def _grouped_path(layer: MoELayer, x_BTD: torch.Tensor, counts: list[int]) -> str:
    """The path the `grouped` backend takes for this layer, x and routing."""
    ex = layer.experts
    return grouped_path_for(x_BTD.reshape(-1, x_BTD.shape[-1]), counts, ex.w1, ex.w3, ex.w2)


def _backend_path(name: str, layer: MoELayer, x_BTD: torch.Tensor, counts: list[int]) -> str:
    """What a row ran: `grouped`'s path; for `auto` the backend it resolved to (and its path)."""
    if name == "auto":
        chosen = layer.experts._backend.chosen or "?"
        return f"{chosen}: {_grouped_path(layer, x_BTD, counts)}" if chosen == "grouped" else chosen
    return _grouped_path(layer, x_BTD, counts) if name == "grouped" else ""


def bench_shape(d_model: int, num_experts: int, top_k: int, *, tokens: int, d_expert: Optional[int],
                active_mult: int, warmup: int, iters: int, dtype: torch.dtype, device: torch.device, seed: int,
                backends: list[str], log: Callable[[str], None]) -> list[Row]:
    f = d_expert or max(1, active_mult * d_model // top_k)
    d_ff = top_k * f
    torch.manual_seed(seed)
    x = torch.randn(1, tokens, d_model, dtype=dtype, device=device, requires_grad=True)
    grad = torch.randn(1, tokens, d_model, dtype=dtype, device=device)
    with device:
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
        counts = layers[0](x)[1].counts_E.tolist()
    load = max(counts) / (sum(counts) / len(counts))

    dense_all, *moe_all = time_interleaved([dense, *layers], x, grad, warmup, iters)
    flops = expert_flops(tokens, top_k, d_model, f)
    dense_ms = statistics.median(dense_all)
    rows = []
    for name, layer, ms_all in zip(backends, layers, moe_all):
        ms = statistics.median(ms_all)
        path = _backend_path(name, layer, x, counts)
        rows.append(Row(d_model, num_experts, top_k, f, name, tokens, ms, tokens / ms * 1e3, flops / ms / 1e9,
                        d_ff, dense_ms, flops / dense_ms / 1e9, load, path=path,
                        ms_all=[round(t, 3) for t in ms_all]))
        log(f"  d_model={d_model} E={num_experts} k={top_k} d_expert={f} {name}{f' [{path}]' if path else ''}: "
            f"{ms:.1f} ms/iter (dense d_ff={d_ff}: {dense_ms:.1f} ms/iter)")
    ref = next((r for r in rows if r.backend == REFERENCE), None)
    if ref is not None:
        for r in rows:
            r.ratio_to_reference = ref.ms_per_iter / r.ms_per_iter
    return rows


def markdown_table(rows: list[Row]) -> str:
    show_ratio = len({r.backend for r in rows}) > 1
    head = ["d_model", "experts", "top-k", "d_expert", "backend", "ms/iter", "tokens/s", "TFLOP/s"]
    if show_ratio:
        head.append("vs reference")
    head += ["dense d_ff", "dense ms/iter", "dense TFLOP/s", "MoE / dense time", "max/mean load"]
    align = ["---" if h == "backend" else "---:" for h in head]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    for r in rows:
        backend = f"{r.backend} ({r.path})" if r.path else r.backend
        cells = [str(r.d_model), str(r.num_experts), str(r.top_k), str(r.d_expert), backend,
                 f"{r.ms_per_iter:.1f}", f"{r.tokens_per_s:,.0f}", f"{r.tflops:.3g}"]
        if show_ratio:
            cells.append(f"{r.ratio_to_reference:.2f}x" if r.ratio_to_reference else "-")
        cells += [str(r.dense_d_ff), f"{r.dense_ms_per_iter:.1f}", f"{r.dense_tflops:.3g}",
                  f"{r.ms_per_iter / r.dense_ms_per_iter:.2f}x", f"{r.max_over_mean_load:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --paths: (d_model, d_expert, experts, mean rows per expert) x padding factors (E * max count / N)
PATHS_GRID = [(128, 256, 64, 16), (128, 256, 64, 64), (128, 256, 16, 256), (128, 256, 8, 1024),
              (512, 512, 64, 16), (512, 512, 64, 64), (512, 512, 16, 256)]
PATHS_PADS = (1.1, 1.3, 1.6, 2.0, 3.0)


def skewed_counts(n: int, e: int, pad: float) -> list[int]:
    """n rows over e experts: one expert with round(pad * n / e) rows, the rest as even as can be."""
    hot = min(n, max(1, round(pad * n / e)))
    rest = [(n - hot) // (e - 1)] * (e - 1) if e > 1 else []
    for i in range(n - hot - sum(rest)):
        rest[i] += 1
    return [hot, *rest]


def bench_paths(dtype: torch.dtype, warmup: int, iters: int, log: Callable[[str], None]) -> str:
    """Each path of the `grouped` backend alone (expert compute, forward + backward, x needs a
    gradient) as padding grows: the measurements behind its dispatch rule. Returns a table."""
    paths = [p for p in GROUPED_PATHS if p != "grouped_mm" or _grouped_mm_probe("cpu", None, dtype)]
    head = ["d_model", "d_expert", "experts", "rows/expert", "E*max/N", "wasted rows/expert"]
    head += [f"{p} ms" for p in paths] + ["padded vs loop", "rule picks"]
    lines = ["| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]
    for d, f, e, rows in PATHS_GRID:
        for pad in PATHS_PADS:
            counts = skewed_counts(e * rows, e, pad)
            n = sum(counts)
            torch.manual_seed(0)
            x = torch.randn(n, d, dtype=dtype, requires_grad=True)
            ws = [(torch.randn(*shape, dtype=dtype) * 0.02).requires_grad_()
                  for shape in ((e, d, f), (e, d, f), (e, f, d))]
            grad = torch.randn(n, d, dtype=dtype)
            times: dict[str, list[float]] = {p: [] for p in paths}
            for i in range(warmup + iters):
                for p in paths:
                    for t in (x, *ws):
                        t.grad = None
                    with _Timer(x.device) as tm:
                        GROUPED_PATHS[p](x, counts, *ws).backward(grad)
                    if i >= warmup:
                        times[p].append(tm.ms)
            med = {p: statistics.median(v) for p, v in times.items()}
            rule = choose_grouped_path(counts, d_model=d, d_expert=f, dtype=dtype, device_type="cpu",
                                       grouped_mm_runs="grouped_mm" in paths)
            wasted = (e * max(counts) - n) / e
            cells = [d, f, e, rows, f"{e * max(counts) / n:.2f}", f"{wasted:.0f}"]
            cells += [f"{med[p]:.1f}" for p in paths] + [f"{med['loop'] / med['padded']:.2f}x", rule]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
            log(lines[-1])
    return "\n".join(lines)


def parse_grid(text: str) -> list[tuple[int, int, int]]:
    """'512x8x2,1024x64x8' -> [(512, 8, 2), (1024, 64, 8)] (d_model x experts x top-k)."""
    out = []
    for item in text.split(","):
        d, e, k = (int(v) for v in item.lower().split("x"))
        out.append((d, e, k))
    return out


def pick_backends(requested: Optional[str], device: torch.device,
                  log: Callable[[str], None]) -> tuple[list[str], dict[str, str]]:
    """The backends to run (reference first) and, for those left out, why."""
    names = list(BACKENDS) if not requested else requested.split(",")
    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; registered: {sorted(BACKENDS)}")
    skipped = {}
    for name in names:
        reason = unavailable_reason(name)
        if reason is None and name == "megablocks" and device.type != "cuda":
            reason = f"it runs on CUDA only (this run: --device {device.type})"
        if reason is not None:
            skipped[name] = reason
            log(f"[bench] skipping backend {name!r}: {reason}")
    names = [n for n in names if n not in skipped]
    if REFERENCE in names:  # reference first, so ratios refer to a number already printed
        names.remove(REFERENCE)
        names.insert(0, REFERENCE)
    return names, skipped


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="three shapes instead of the full grid")
    p.add_argument("--full", action="store_true", help="the full grid (the default; kept for old commands)")
    p.add_argument("--grid", type=parse_grid, help="explicit shapes, e.g. 512x8x2,1024x64x8 (d_model x E x k)")
    p.add_argument("--gpu-preset", action="store_true",
                   help="d_model 2048, 64 experts, top-8, bf16 on CUDA, 16384 tokens, backends reference, auto, "
                        "grouped, megablocks (other flags given explicitly still apply)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cpu (cuda with --gpu-preset)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per batch (default 2048; 16384 with --gpu-preset)")
    p.add_argument("--d-expert", type=int, default=None,
                   help="expert hidden size (default: active_mult * d_model / top_k)")
    p.add_argument("--active-mult", type=int, default=4, help="active hidden size / d_model (default 4)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations per shape (default 1; 3 on GPU preset)")
    p.add_argument("--iters", "--repeats", dest="iters", type=int, default=None,
                   help="timed iterations per shape (default 5; 10 with --gpu-preset)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default float32 (bfloat16 with --gpu-preset)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--backends", default=None,
                   help="comma-separated subset of the registered backends (default: all that can run here)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", help="write the rows (and the machine) as JSON to this path")
    p.add_argument("--paths", action="store_true",
                   help="instead: time each path of the `grouped` backend alone as padding grows (CPU; "
                        "the measurements behind its dispatch rule; default dtype float64, its fallback case)")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.paths:
        dtype = torch.float64 if args.dtype is None else DTYPES[args.dtype]
        warmup = 1 if args.warmup is None else args.warmup
        print(bench_paths(dtype, warmup, args.iters or 3, log))
        return 0

    preset = GPU_PRESET if args.gpu_preset else {}
    grid = args.grid or preset.get("grid") or (QUICK_GRID if args.quick else FULL_GRID)
    device = torch.device(args.device or preset.get("device", "cpu"))
    dtype_name = args.dtype or preset.get("dtype", "float32")
    dtype = DTYPES[dtype_name]
    tokens = args.tokens or preset.get("tokens", 2048)
    warmup = args.warmup if args.warmup is not None else preset.get("warmup", 1)
    iters = args.iters or preset.get("iters", 5)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device cuda (or --gpu-preset) needs a CUDA device; torch {torch.__version__} sees none")
    try:
        backends, skipped = pick_backends(args.backends or preset.get("backends"), device, log)
    except ValueError as e:
        p.error(str(e))
    if not backends:
        p.error("no backend left to run")

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "device": str(device), "dtype": str(dtype).removeprefix("torch."), "tokens": tokens,
               "warmup": warmup, "iters": iters, "skipped_backends": skipped}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
        machine["cuda"] = torch.version.cuda
    log(f"[bench] {len(grid)} shapes x backends {backends}; {machine}")
    t0 = time.perf_counter()
    rows: list[Row] = []
    for d, e, k in grid:
        if k > e:
            log(f"  skipping d_model={d} E={e} k={k}: top_k > num_experts")
            continue
        rows += bench_shape(d, e, k, tokens=tokens, d_expert=args.d_expert, active_mult=args.active_mult,
                            warmup=warmup, iters=iters, dtype=dtype, device=device, seed=args.seed,
                            backends=backends, log=log)
    log(f"[bench] done in {time.perf_counter() - t0:.0f}s")
    print(markdown_table(rows))
    for name, reason in skipped.items():
        print(f"\n(backend {name} not run: {reason})")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"machine": machine, "rows": [asdict(r) for r in rows]},
                                                   indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
