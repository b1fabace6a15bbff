"""FlexAttention against the reference paths of document attention, on any device: what the GPU
suite calls to check FlexAttention's gradients on CUDA (`compare_flex_with_reference`), and
the CPU test its dry run (forwards only: FlexAttention has no CPU backward)."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from system.attention import document_attention, document_layout, document_mask
from system.model import ModelConfig, Transformer


def compare_flex_with_reference(device="cuda", dtype=torch.bfloat16, dry_run: bool = False) -> dict:
    """For the GPU suite: FlexAttention (compiled) against the split path and the old masked
    SDPA on random document layouts.

    Attention cases (multi-head and grouped-query): flex in `dtype`, the references in fp32 from
    the same rounded inputs; the output and the gradients of q, k, v of sum(out^2). The model
    case: a 2-layer grouped-query `Transformer` in fp32 run with each path, its logits and every
    parameter's gradient. Returns
      {"device", "dtype", "max_abs", "max_rel" (over everything below),
       "cases": [{sizes, "<path>_seconds" (flex's first call compiles),
                  "<out|grad_q|grad_k|grad_v>_vs_<split|masked_sdpa>_max_<abs|rel>"}],
       "model": {"B", "T", "logits_max_abs", "logits_max_rel", "grads_max_rel" (None without
                 gradients)}}
    where rel is the largest absolute difference over the reference's largest magnitude.
    `dry_run`: CPU, fp32, tiny sizes, the grouped-query case only, forwards only (FlexAttention
    has no CPU backward)."""
    if dry_run:
        device, dtype = "cpu", torch.float32
    # dry run: 3 blocks (one partial, some needing no mask), the model case's shapes: one compilation
    B, T, d = (2, 300, 16) if dry_run else (4, 2048, 128)
    grads = not dry_run
    results = []
    for H, G in ((8, 2),) if dry_run else ((8, 8), (16, 2)):
        gen = torch.Generator().manual_seed(H * 100 + G)
        ids = _random_documents(B, T, gen).to(device)
        packed = torch.randn(B, T, H + 2 * G, d, generator=gen).to(device, dtype)
        heads = packed.split([H, G, G], dim=2)  # q, k contiguous and v a strided view, as the model's
        qkv = [t.transpose(1, 2).contiguous() for t in heads[:2]] + [heads[2].transpose(1, 2)]
        mask = document_mask(ids, 0)[:, None]
        paths = {
            "flex": (dtype, lambda q, k, v: document_attention(q, k, v, document_layout(ids, 0, "flex"))),
            "split": (torch.float32, lambda q, k, v: document_attention(q, k, v, document_layout(ids, 0, "split"))),
            "masked_sdpa": (torch.float32, lambda q, k, v: F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, enable_gqa=G != H)),
        }
        case = {"heads": H, "kv_heads": G, "B": B, "T": T, "head_dim": d}
        outs = {}
        for name, (dt, fn) in paths.items():
            t0 = time.perf_counter()
            leaves = [t.to(dt).detach().requires_grad_(grads) for t in qkv]
            with torch.set_grad_enabled(grads):  # as the model case: the dry run compiles once
                y = fn(*leaves)
            got = {"out": y.detach().float()}
            if grads:
                y.float().square().sum().backward()
                got.update({f"grad_{n}": t.grad.float() for n, t in zip("qkv", leaves)})
            outs[name] = got
            case[f"{name}_seconds"] = round(time.perf_counter() - t0, 3)
        for ref in ("split", "masked_sdpa"):
            for key, want in outs[ref].items():
                case[f"{key}_vs_{ref}_max_abs"], case[f"{key}_vs_{ref}_max_rel"] = _diff(outs["flex"][key], want)
        results.append(case)
    model = _model_case(device, (2, 300) if dry_run else (2, 1024), grads)

    def figures(suffix):
        return [v for c in results + [model] for k, v in c.items() if k.endswith(suffix) and v is not None]

    return {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "cases": results, "model": model,
            "max_abs": max(figures("_max_abs")), "max_rel": max(figures("_max_rel"))}


def _diff(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    diff = float((got.float() - want.float()).abs().max())
    return diff, diff / max(float(want.abs().max()), 1e-30)


def _model_case(device, shape: tuple[int, int], grads: bool) -> dict:
    """A 2-layer grouped-query fp32 Transformer with document masking, run with the flex and the
    split path: logits and (with `grads`) every parameter's gradient."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=128, n_layers=2, n_heads=8, n_kv_heads=2, d_ff=256, vocab_size=100, moe_layers="none")
    model = Transformer(cfg, document_sep_id=0).to(device)
    ids = _random_documents(*shape, torch.Generator().manual_seed(7)).to(device)
    got = {}
    for path in ("flex", "split"):
        model.document_attention_path = path
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grads):
            logits = model(ids).logits_BTV
            if grads:
                logits.square().mean().backward()
        got[path] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()} if grads else {})
    abs_, rel = _diff(got["flex"][0], got["split"][0])
    grads_rel = max([_diff(g, got["split"][1][n])[1] for n, g in got["flex"][1].items()], default=None)
    return {"B": shape[0], "T": shape[1], "logits_max_abs": abs_, "logits_max_rel": rel, "grads_max_rel": grads_rel}


def _random_documents(B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """Token ids 1..99 with separators (0) ending documents of mixed lengths: row 0 has none,
    row 1 starts and ends with one and has a length-1 document, others are random."""
    ids = torch.randint(1, 100, (B, T), generator=gen)
    for b in range(1, B):
        cuts = torch.randint(0, T, (max(1, T // 40),), generator=gen)
        ids[b, cuts] = 0
    if B > 1:
        ids[1, 0] = ids[1, -1] = ids[1, T // 2] = ids[1, T // 2 + 1] = 0
    return ids
