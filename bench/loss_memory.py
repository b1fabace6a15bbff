#!/usr/bin/env python
"""Peak extra memory and time of the training cross-entropy on bf16 logits, before and after.

    python bench/loss_memory.py [--vocab 151936] [--tokens 2048] [--reps 2]

"fp32 copy": torch's cross-entropy on `logits.float()` (what `system.losses` did);
"chunked": `system.chunked_ce.chunked_cross_entropy` (what it does now for bf16/fp16 logits).
For each: the peak of live tensor storage over one forward + backward beyond the logits
themselves (`system.memory_tracker.peak_live_bytes`, any device), the loss and gradient
agreement, and the median wall time of `--reps` untracked runs, in the same process.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch
    import torch.nn.functional as F

    from system.chunked_ce import chunked_cross_entropy, rows_per_chunk
    from system.memory_tracker import peak_live_bytes

    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=151936)  # Qwen's vocabulary
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json")
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(a.tokens, a.vocab, generator=g) * 2).to(torch.bfloat16).to(a.device).requires_grad_()
    labels = torch.randint(0, a.vocab, (a.tokens,), generator=g).to(a.device)
    paths = {"fp32 copy": lambda x: F.cross_entropy(x.float(), labels), "chunked": lambda x: chunked_cross_entropy(x, labels)}
    rows, results = {}, {}
    for name, loss_fn in paths.items():
        def run():
            logits.grad = None
            loss = loss_fn(logits)
            loss.backward()
            return loss.detach(), logits.grad.detach().clone()

        peak = peak_live_bytes(run)
        times = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            results[name] = run()
            if a.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        rows[name] = {"peak_extra_bytes": peak, "peak_extra_gb": peak / 1e9, "s": statistics.median(times)}
    (l0, g0), (l1, g1) = results["fp32 copy"], results["chunked"]
    out = {"vocab": a.vocab, "tokens": a.tokens, "device": a.device, "rows_per_chunk": rows_per_chunk(a.vocab),
           "logits_gb": logits.numel() * 2 / 1e9, "paths": rows,
           "peak_ratio_chunked_to_fp32_copy": rows["chunked"]["peak_extra_bytes"] / rows["fp32 copy"]["peak_extra_bytes"],
           "time_ratio_chunked_to_fp32_copy": rows["chunked"]["s"] / rows["fp32 copy"]["s"],
           "loss_rel_diff": float((l1 - l0).abs() / l0.abs()),
           "grad_max_abs_diff": float((g1.float() - g0.float()).abs().max())}
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
