"""Document attention without a (B, T, T) mask (`system.attention`): the split path (CPU) and
FlexAttention's block mask give what the old masked SDPA gave, in values and gradients, and
no tensor with two sequence-length dimensions is made."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import system.model as model_module
from experts.config import ExpertsConfig
from system.attention import (FLEX_BLOCK, document_attention, document_block_mask, document_ids, document_layout,
                              document_mask)
from system.attention_check import compare_flex_with_reference
from system.model import ModelConfig, Transformer

SEP = 0
T = 37  # no other dimension of the tiny models below has this size


def layouts(B: int = 5, T: int = T) -> torch.Tensor:
    """Rows: no separator; separators at 0 and at the end; a run of length-1 documents; two
    random rows."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (B, T), generator=g)
    ids[1, 0] = ids[1, T - 1] = SEP
    ids[2, 5:9] = SEP
    ids[3:, :][torch.rand(B - 3, T, generator=g) < 0.15] = SEP
    return ids


def masked_reference(q, k, v, layout):
    """The old path: SDPA with the (B, T, T) document mask."""
    doc = layout.doc_ids_BT
    causal = torch.ones(doc.shape[1], doc.shape[1], dtype=torch.bool).tril()
    mask = causal & (doc[:, :, None] == doc[:, None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=k.shape[1] != q.shape[1])


def test_document_ids_keep_the_separator_in_the_document_it_ends():
    ids = torch.tensor([[SEP, 5, 6, SEP, 7, SEP, SEP, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
    assert document_ids(ids, SEP).tolist() == [[0, 1, 1, 1, 2, 2, 3, 4], [0] * 8]
    want = document_mask(ids, SEP)
    doc = document_ids(ids, SEP)
    assert torch.equal(want, torch.ones(8, 8, dtype=torch.bool).tril() & (doc[:, :, None] == doc[:, None, :]))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_split_path_equals_masked_sdpa_in_values_and_gradients(heads, kv_heads):
    ids = layouts()
    layout = document_layout(ids, SEP, "split")
    assert [len(d) for d in layout.spans] == [1, 2, 5, *[len(d) for d in layout.spans[3:]]]
    g = torch.Generator().manual_seed(1)
    qkv = [torch.randn(ids.shape[0], n, T, 8, generator=g) for n in (heads, kv_heads, kv_heads)]
    got, want = ([t.clone().requires_grad_() for t in qkv] for _ in range(2))
    y = document_attention(*got, layout)
    y_ref = masked_reference(*want, layout)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    w = torch.randn(y.shape, generator=g)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    for a, b in zip(got, want):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def _tiny_model(n_kv_heads=None, checkpointing="none"):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, d_ff=64, num_experts=4, top_k=2,
                      d_expert=24, vocab_size=50, moe_layers="all", activation_checkpointing=checkpointing)
    return Transformer(cfg, ExpertsConfig(), document_sep_id=SEP)


@pytest.mark.parametrize("n_kv_heads,checkpointing", [(None, "none"), (2, "full")])
def test_model_gradients_equal_the_old_masked_path(monkeypatch, n_kv_heads, checkpointing):
    ids = layouts()

    def run():
        m = _tiny_model(n_kv_heads, checkpointing)
        m(ids).logits_BTV.square().mean().backward()
        return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    got = run()
    monkeypatch.setattr(model_module, "document_attention", masked_reference)
    want = run()
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def _square_shapes(reference: bool, monkeypatch) -> list[tuple]:
    if reference:
        monkeypatch.setattr(model_module, "document_attention", masked_reference)
    m = _tiny_model(n_kv_heads=2)
    ids = layouts()
    with _Shapes() as seen:
        m(ids).logits_BTV.square().mean().backward()
    return [s for s in seen.shapes if list(s).count(T) >= 2]


def test_no_tensor_with_two_sequence_dimensions_is_made(monkeypatch):
    assert _square_shapes(False, monkeypatch) == []  # forward and backward
    assert (5, 1, T, T) in _square_shapes(True, monkeypatch)  # the old path does make one


@pytest.mark.parametrize("T_", [4 * FLEX_BLOCK, 2 * FLEX_BLOCK + 44])  # a whole number of blocks, and not
def test_block_mask_from_document_ids_equals_flex_create_block_mask(T_):
    from torch.nn.attention.flex_attention import create_block_mask

    B = 3
    ids = layouts(B, T_)
    ids[2, :] = 1
    ids[2, 2 * FLEX_BLOCK - 1] = SEP  # a document ending on a block boundary
    doc = document_ids(ids, SEP)
    ours = document_block_mask(doc)

    def mask_mod(b, h, q, kv):
        return (q >= kv) & (doc[b, q] == doc[b, kv])

    theirs = create_block_mask(mask_mod, B, None, T_, T_, device="cpu")
    for a, b in ((ours.kv_num_blocks, theirs.kv_num_blocks), (ours.full_kv_num_blocks, theirs.full_kv_num_blocks)):
        assert torch.equal(a, b)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert int(ours.full_kv_num_blocks[2].sum()) > 0  # the long documents have blocks that need no mask


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_the_flex_layout_reads_nothing_on_the_host():
    ids = layouts(3, 3 * FLEX_BLOCK)
    with _Ops() as flex:
        document_layout(ids, SEP, "flex")
    with _Ops() as split:
        document_layout(ids, SEP, "split")
    host_reads = ("_local_scalar_dense", "nonzero", "item")
    assert not [n for n in flex.names if n.startswith(host_reads)], flex.names
    assert [n for n in split.names if n.startswith(host_reads)] == ["nonzero.default"]  # the documents' bounds


@pytest.mark.procs  # inductor compiles C++ (gcc) in subprocesses
def test_compiled_flex_attention_forward_equals_the_split_path_on_cpu():
    import torch._inductor.config as inductor_config

    with inductor_config.patch(compile_threads=1):
        res = compare_flex_with_reference(dry_run=True)
    assert res["device"] == "cpu" and res["cases"] and res["model"]["logits_max_abs"] >= 0
    assert res["max_abs"] < 1e-5, res
