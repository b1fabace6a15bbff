"""Export a moeforge model as a Hugging Face directory that transformers (and vLLM) load.

    moeforge export RUN_DIR [--stage NAME] [--step N] --to DIR

Writes, into a temporary sibling of DIR renamed into place at the end (a failure leaves
nothing behind): safetensors shards `model-0000i-of-0000N.safetensors` with
`model.safetensors.index.json`, the family's `config.json` (`system.hf.families.choose_family`
picks the family that represents the model exactly, or refuses naming the feature),
`generation_config.json`, the tokenizer (the run's HF tokenizer, or our byte / BPE tokenizer as a
`tokenizers` JSON), and `moeforge_export.json` (where it came from). Tensor names and layout are
the Hub's (`system.hf.tensors`). Tensors are produced one at a time and written a shard at a
time: from replicated checkpoints out of DeepSpeed's model file, from ep/fssdp checkpoints with
the experts read from every rank's expert file one layer at a time (both memory-mapped).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from system.hf.families import NotRepresentable, choose_family, family_config
from system.hf.tensors import Piece, model_pieces, qkv_sizes, split

DEFAULT_MAX_SHARD_BYTES = 2 * 1024 ** 3
INDEX = "model.safetensors.index.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def effective_router(router, top_k: int, step: Optional[int]):
    """The router an exported model uses: a DTS gate past its hard step is a plain top-k
    (softmax, renormalised as configured) with k = hard_top_k; mid-anneal it is refused."""
    if router.kind != "dts":
        return router, top_k
    hard = router.dts.hard_step()
    if step is None or step < hard:
        raise NotRepresentable(f"the DTS gate is mid-anneal (step {step}, hard top-k from step {hard}): its "
                               f"Gumbel-softmax routing has no Hugging Face equivalent; export a checkpoint "
                               f"from step {hard} on")
    return replace(router, kind="topk"), router.dts.hard_top_k or top_k


def export_tensors(get: Callable[[str], torch.Tensor], mcfg, router, out: str | Path, *,
                   step: Optional[int] = None, tokenizer_writer: Optional[Callable[[Path], dict]] = None,
                   dtype: Optional[str] = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                   provenance: Optional[dict[str, Any]] = None, overwrite: bool = False) -> dict[str, Any]:
    """Write the model whose tensors `get(our_name)` returns as a Hugging Face directory `out`.

    `mcfg`: its ModelConfig (vocab_size set), `router`: its RouterConfig; `tokenizer_writer(dir)`
    saves the tokenizer and returns {"bos": id, "eos": id}. Returns a report (family, files)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--to {out}: the directory exists and is not empty (nothing was written)")
    router, top_k = effective_router(router, mcfg.top_k, step)
    mcfg = replace(mcfg, top_k=top_k)
    moe_ids = mcfg.moe_layer_ids()
    bias_nonzero = any(bool(get(f"blocks.{i}.ffn.expert_bias").abs().max() > 0) for i in moe_ids)
    family = choose_family(mcfg, router, moe_ids, bias_nonzero)
    # Qwen2-MoE always has q/k/v biases: a model without them is written with zero biases.
    fam_cfg = replace(mcfg, qkv_bias=True) if family == "qwen2_moe" else mcfg
    pieces = model_pieces(family, fam_cfg, moe_ids)
    want = _DTYPES.get(dtype) if dtype else None
    if dtype and want is None:
        raise ValueError(f"--dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    sizes = qkv_sizes(mcfg)

    def tensors_of(piece: Piece):
        if piece.ours.endswith("attn.qkv.bias") and not mcfg.qkv_bias:
            t = torch.zeros(sum(sizes), dtype=get(piece.ours.replace("bias", "weight")).dtype)
        else:
            t = get(piece.ours)
        for name, part in split(piece, t, sizes):
            part = part if want is None else part.to(want)
            yield name, part.contiguous()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        first_dtype = _write_shards(pieces, tensors_of, tmp, max_shard_bytes)
        dname = {v: k for k, v in _DTYPES.items()}.get(want or first_dtype, "float32")
        special = tokenizer_writer(tmp) if tokenizer_writer else {}
        cfg = family_config(family, mcfg, router, moe_ids, dtype=dname, bos=special.get("bos"),
                            eos=special.get("eos"))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        gen = {"_from_model_config": True, "bos_token_id": special.get("bos"), "eos_token_id": special.get("eos"),
               "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        report = {"family": family, "dtype": dname, "step": step, **(provenance or {})}
        (tmp / "moeforge_export.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        # mkdtemp made it 0700: give it the mode a mkdir would (0777 less the umask), like its files
        os.chmod(tmp, 0o777 & ~_umask())
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["files"] = sorted(p.name for p in out.iterdir())
    return report


def _write_shards(pieces, tensors_of, tmp: Path, max_shard_bytes: int) -> torch.dtype:
    """Stream the tensors into shards; a shard is written as soon as it is full."""
    from safetensors.torch import save_file

    shards: list[list[str]] = []
    buf: dict[str, torch.Tensor] = {}
    buf_bytes = total = 0
    weight_map: dict[str, str] = {}
    first_dtype = None
    written: list[Path] = []

    def flush():
        nonlocal buf, buf_bytes
        if not buf:
            return
        f = tmp / f".shard{len(written):05d}.safetensors"
        save_file(buf, str(f), metadata={"format": "pt"})
        written.append(f)
        shards.append(list(buf))
        buf, buf_bytes = {}, 0

    for piece in pieces:
        for name, t in tensors_of(piece):
            nb = t.numel() * t.element_size()
            if buf and buf_bytes + nb > max_shard_bytes:
                flush()
            first_dtype = first_dtype or t.dtype
            buf[name] = t
            buf_bytes += nb
            total += nb
    flush()
    n = len(written)
    for i, (f, names) in enumerate(zip(written, shards)):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(f, tmp / final)
        weight_map.update({k: final for k in names})
    (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                        indent=2, sort_keys=True) + "\n")
    return first_dtype or torch.float32


def export_module(model, router, out: str | Path, **kw) -> dict[str, Any]:
    """Export an in-memory `system.model.Transformer` (single process)."""
    sd = model.state_dict()
    return export_tensors(lambda k: sd[k].detach(), model.cfg, router, out, **kw)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it back at once
    os.umask(mask)
    return mask
