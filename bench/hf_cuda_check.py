#!/usr/bin/env python
"""The Hugging Face round trip on a GPU in bf16: import a tiny model, train, export, compare.

    python bench/hf_cuda_check.py [--family qwen3_moe] [--steps 20] [--json OUT]
    python bench/hf_cuda_check.py --dry-run        (same code path on CPU, for the test suite)

Builds a random tiny model of the family with transformers, imports it into ours, trains
`--steps` AdamW steps in bf16 on CUDA (next-token loss on random ids), exports it as bf16 and
compares our CUDA bf16 logits with transformers' CUDA bf16 forward of the export: the max
absolute difference, relative to the logits' scale, must stay within bf16 tolerance, and the
argmax tokens must agree on nearly every position. Prints one JSON line (for the GPU suite).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def run(family: str, steps: int, device: str) -> dict:
    import torch
    import transformers

    from experts.config import ExpertsConfig, RouterConfig
    from make_tiny_hf_moe import build_tiny
    from system.hf.export import export_module
    from system.hf_import import hf_model_config_fields, hf_router_fields, load_hf_into_model
    from system.model import ModelConfig, Transformer

    V = 512
    with tempfile.TemporaryDirectory() as tmp:
        src = build_tiny(family, Path(tmp) / "src", vocab_size=V, d_model=128, n_layers=4, num_experts=8,
                         d_expert=128)
        router = RouterConfig(**hf_router_fields(src))
        model = Transformer(ModelConfig(**hf_model_config_fields(src)), ExpertsConfig(router=router))
        load_hf_into_model(model, src)
        model = model.to(device=device, dtype=torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(steps):
            ids = torch.randint(0, V, (4, 65), generator=g).to(device)
            out = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(out.logits_BTV.float().flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        model.eval()
        export_module(model.float().to("cpu"), router, Path(tmp) / "out", dtype="bfloat16")
        model = model.to(device=device, dtype=torch.bfloat16)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(Path(tmp) / "out"), local_files_only=True,
                                                               dtype=torch.bfloat16).to(device).eval()
        ids = torch.randint(0, V, (2, 64), generator=g).to(device)
        with torch.no_grad():
            a = model(ids).logits_BTV.float()
            b = hf(ids).logits.float()
        scale = float(b.abs().max())
        diff = float((a - b).abs().max())
        agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    return {"family": family, "device": device, "steps": steps, "loss_first": losses[0], "loss_last": losses[-1],
            "max_abs_diff": diff, "logit_scale": scale, "rel_diff": diff / max(scale, 1e-6), "argmax_agreement": agree,
            "ok": diff / max(scale, 1e-6) < 0.05 and agree > 0.9 and losses[-1] < losses[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="qwen3_moe", choices=["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dry-run", action="store_true", help="CPU, bf16, 3 steps: the code path without a GPU")
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args(argv)
    import torch

    if a.dry_run:
        res = run(a.family, 3, "cpu")
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on CPU", file=sys.stderr)
        return 2
    else:
        res = run(a.family, a.steps, "cuda")
    print(json.dumps(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
