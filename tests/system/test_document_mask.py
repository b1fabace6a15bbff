"""`data.document_mask`: attention stays within each document of a packed sequence. A token right
after an eos attends to nothing before it, and the packed sequence's logits (and loss) equal
running each document on its own; without the mask they do not (the control). `document_mask` is
the (B, T, T) reference; the model attends without it (tests/system/test_attention.py)."""
from __future__ import annotations

import pytest
import torch

from experts.config import ExpertsConfig
from system.attention import document_mask
from system.losses import lm_cross_entropy
from system.model import ModelConfig, Transformer

EOS = 0


def test_the_mask_is_causal_within_documents_only():
    ids = torch.tensor([[5, 6, EOS, 7, 8, EOS, 9]])
    m = document_mask(ids, EOS)[0]
    assert m[3].tolist() == [False, False, False, True, False, False, False]  # right after an eos: itself only
    assert m[2].tolist() == [True, True, True, False, False, False, False]  # the eos belongs to its document
    assert m[5].tolist() == [False, False, False, True, True, True, False]
    assert m[6].tolist() == [False] * 6 + [True]
    assert torch.equal(m & ~torch.ones(7, 7, dtype=torch.bool).tril(), torch.zeros(7, 7, dtype=torch.bool))


@pytest.mark.parametrize("n_kv_heads", [None, 1])  # multi-head and grouped-query attention
def test_a_packed_sequence_equals_its_documents_run_alone(n_kv_heads):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, d_ff=64, num_experts=4, top_k=2,
                      d_expert=32, vocab_size=50, moe_layers="all")
    masked = Transformer(cfg, ExpertsConfig(), document_sep_id=EOS).eval()
    plain = Transformer(cfg, ExpertsConfig()).eval()
    plain.load_state_dict(masked.state_dict())
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(1, 50, (n,), generator=g) for n in (7, 5, 9)]
    docs = [torch.cat([d, torch.tensor([EOS])]) for d in docs[:2]] + [docs[2]]  # the last one cut off
    packed = torch.cat(docs)[None]
    labels = torch.randint(1, 50, packed.shape, generator=g)
    with torch.no_grad():
        got = masked(packed).logits_BTV[0]
        alone = torch.cat([masked(d[None]).logits_BTV[0] for d in docs])
        crossing = plain(packed).logits_BTV[0]
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
    loss_packed = lm_cross_entropy(got[None], labels)
    loss_alone = lm_cross_entropy(alone[None], labels)
    assert float(loss_packed) == pytest.approx(float(loss_alone), rel=1e-6)
    n0 = len(docs[0])
    torch.testing.assert_close(crossing[:n0], alone[:n0], rtol=1e-5, atol=1e-5)  # the first document is alone anyway
    assert (crossing[n0:] - alone[n0:]).abs().max() > 1e-3  # later ones saw the earlier documents


@pytest.mark.procs
def test_a_stage_trains_with_document_masking(tmp_path):
    from parallel.testing import run_distributed
    from system.metrics import read_jsonl
    from tests.helpers import tiny_spec

    spec = tiny_spec(tmp_path, run={"name": "docmask"}, data={"document_mask": True},
                     stages=[{"name": "pretrain", "steps": 3, "micro_batch_size": 2, "checkpoint_every": 3}])
    run_distributed(_train, 1, spec, timeout_s=240)
    recs = [r for r in read_jsonl(tmp_path / "runs" / "docmask" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in recs)


def _train(rank, world, spec):
    from jobs.stage_runner import run_stage

    run_stage(spec, 0)
