"""Causal attention within the documents of packed sequences, without a (B, T, T) mask.

`data.document_mask`: a document ends with (and includes) its separator token; a query attends
to the keys at or before it in its own document. What each token needs is its document's index
in the row (`document_ids`, B x T ints: separators strictly before it), computed on the device
once per forward. `document_layout` turns it into what one path needs, shared by all layers:

* `flex` (CUDA): FlexAttention with a block mask built from the document ids (block pairs that
  share no document are skipped, pairs inside one document take no mask); the compiled
  `flex_attention` is made once per process.
* `split` (CPU, where FlexAttention has no backward; CUDA without FlexAttention): each document
  is its own causal SDPA call on its piece of the row (`bench/attention_mask.py` measured it
  against the old mask and padded batches of documents). The documents' bounds are read on
  the host once per forward.

`document_mask` is the old (B, T, T) mask, kept as the reference for tests and the benchmark.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

FLEX_BLOCK = 128  # FlexAttention's block size (its default)


def document_ids(input_ids_BT: torch.Tensor, sep_id: int) -> torch.Tensor:
    """(B, T) int32: the index of each token's document in its row (separators strictly before
    it, so a separator belongs to the document it ends). Non-decreasing along T."""
    sep = (input_ids_BT == sep_id).to(torch.int32)
    return torch.cumsum(sep, dim=1, dtype=torch.int32) - sep


def document_mask(input_ids_BT: torch.Tensor, sep_id: int) -> torch.Tensor:
    """(B, T, T) bool, True where query i may attend to key j: the reference the paths are
    tested against (O(T^2) memory: not used by the model). With RoPE the scores depend only on
    relative positions, so each document is computed as if it were alone."""
    doc_BT = document_ids(input_ids_BT, sep_id)
    T = input_ids_BT.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=input_ids_BT.device).tril()
    return causal & (doc_BT[:, :, None] == doc_BT[:, None, :])


@dataclass(frozen=True, eq=False)
class DocumentLayout:
    """Where the documents of a batch are, in the form the chosen path needs; built once per
    forward (`document_layout`) and shared by every layer."""
    doc_ids_BT: torch.Tensor
    path: str                                     # "flex" or "split"
    block_mask: object = None                     # flex: a FlexAttention BlockMask
    spans: Optional[tuple[tuple[tuple[int, int], ...], ...]] = None  # split: per row, (start, end) per document


def flex_available(device: torch.device) -> bool:
    """FlexAttention with a backward: CUDA, and torch has it."""
    if torch.device(device).type != "cuda":
        return False
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def document_layout(input_ids_BT: torch.Tensor, sep_id: int, path: str = "auto") -> DocumentLayout:
    """`path`: "auto" (flex where `flex_available`, else split), "flex" or "split". Only the
    split path reads anything on the host (the separators' positions: one sync per forward)."""
    doc = document_ids(input_ids_BT, sep_id)
    if path == "auto":
        path = "flex" if flex_available(input_ids_BT.device) else "split"
    if path == "flex":
        return DocumentLayout(doc, "flex", block_mask=document_block_mask(doc))
    if path == "split":
        return DocumentLayout(doc, "split", spans=document_spans(input_ids_BT, sep_id))
    raise ValueError(f"unknown document attention path {path!r} (auto, flex, split)")


def document_spans(input_ids_BT: torch.Tensor, sep_id: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per row, the (start, end) of each document, read on the host (one sync)."""
    B, T = input_ids_BT.shape
    ends: list[list[int]] = [[] for _ in range(B)]
    for b, t in torch.nonzero(input_ids_BT == sep_id).tolist():
        if t + 1 < T:
            ends[b].append(t + 1)
    return tuple(tuple(zip([0] + e, e + [T])) for e in ends)


def document_attention(q_BHTd: torch.Tensor, k_BGTd: torch.Tensor, v_BGTd: torch.Tensor,
                       layout: DocumentLayout) -> torch.Tensor:
    """Causal attention within documents; grouped-query when k/v have fewer heads than q."""
    gqa = k_BGTd.shape[1] != q_BHTd.shape[1]
    if layout.path == "flex":
        return compiled_flex_attention()(q_BHTd, k_BGTd, v_BGTd, block_mask=layout.block_mask, enable_gqa=gqa)
    return split_attention(q_BHTd, k_BGTd, v_BGTd, layout.spans, gqa)


def split_attention(q_BHTd, k_BGTd, v_BGTd, spans, gqa: bool) -> torch.Tensor:
    """One causal SDPA per (row, document); a row of one document is a single call, exactly the
    plain causal attention. Rows and documents are taken with `split`, whose backward is one
    concatenation (slicing would add a full-size zero gradient per document)."""
    extra = {"enable_gqa": True} if gqa else {}
    rows_q, rows_k, rows_v = (t.split(1, dim=0) for t in (q_BHTd, k_BGTd, v_BGTd))
    rows = []
    for b, docs in enumerate(spans):
        sizes = [e - s for s, e in docs]
        parts = [F.scaled_dot_product_attention(q, k, v, is_causal=True, **extra)
                 for q, k, v in zip(*(t[b].split(sizes, dim=2) for t in (rows_q, rows_k, rows_v)))]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


_COMPILED_FLEX = None


def compiled_flex_attention():
    """`torch.compile(flex_attention)`, made on first use and kept for the process (uncompiled,
    FlexAttention runs a slow reference that materialises the scores)."""
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX


def document_block_mask(doc_BT: torch.Tensor, block: int = FLEX_BLOCK):
    """FlexAttention's BlockMask for causal attention within documents, built from the blocks'
    first and last document ids (documents are contiguous, ids non-decreasing): O(B (T/block)^2)
    memory, no (B, T, T) evaluation of the mask. Query block i and key block j <= i share a
    document when the key block's last id >= the query block's first; the pair needs no mask
    when j < i, both blocks lie in one document and the query block is whole. The same blocks
    as torch's `create_block_mask` of the mask function (tested)."""
    from torch.nn.attention.flex_attention import BlockMask

    B, T = doc_BT.shape
    n = -(-T // block)
    first_Bn = doc_BT[:, ::block]
    last_Bn = doc_BT[:, torch.clamp(torch.arange(1, n + 1, device=doc_BT.device) * block, max=T) - 1]
    idx = torch.arange(n, device=doc_BT.device)
    below = idx[None, :] < idx[:, None]  # (q block, kv block): kv strictly before q
    touching = (below | (idx[None, :] == idx[:, None]))[None] & (last_Bn[:, None, :] >= first_Bn[:, :, None])
    whole_q = (idx + 1) * block <= T
    full = (below & whole_q[:, None])[None] & (first_Bn[:, None, :] == last_Bn[:, :, None])
    partial = touching & ~full

    def as_kv_blocks(blocks_Bnn):
        counts = blocks_Bnn.sum(-1, dtype=torch.int32)[:, None]
        order = torch.argsort((~blocks_Bnn).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, None]
        return counts, order

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_BT[b, q_idx] == doc_BT[b, kv_idx])

    return BlockMask.from_kv_blocks(*as_kv_blocks(partial), *as_kv_blocks(full), BLOCK_SIZE=block,
                                    mask_mod=mask_mod, seq_lengths=(T, T))
