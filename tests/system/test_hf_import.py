"""Importing local Hugging Face Llama / Qwen2 models: logits parity, upcycling, config checks, rejections."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from experts.config import ExpertsConfig, RouterConfig  # noqa: E402
from system.hf_import import (check_hf_compat, hf_model_config_fields, is_hf_model_dir,  # noqa: E402
                              load_hf_dense_state_dict)
from system.model import ModelConfig, Transformer  # noqa: E402
from system.upcycle import UpcycleConfig, init_model_from  # noqa: E402

V = 300
ARCHS = {
    # Llama with tied embeddings, Qwen2 (q/k/v biases) with an untied head; both grouped-query.
    "llama": dict(tie_word_embeddings=True),
    "qwen2": dict(tie_word_embeddings=False),
}


def _make_hf(kind: str, path: Path) -> Path:
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, vocab_size=V, rope_theta=5000.0, rms_norm_eps=1e-5,
                  attn_implementation="eager", **ARCHS[kind])
    if kind == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    else:
        cfg, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).float().eval()
    with torch.no_grad():  # make every tensor matter: sharp attention, non-trivial norms and biases
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(15.0)
            elif "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {k: _make_hf(k, root / k) for k in ARCHS}


def _hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    m = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True,
                                                          dtype=torch.float32).eval()
    with torch.no_grad():
        return m(ids).logits


def _ids(B=2, T=13, seed=0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _our_cfg(path: Path, **kw) -> ModelConfig:
    return replace(ModelConfig(**hf_model_config_fields(path)), **kw)


@pytest.mark.parametrize("kind", list(ARCHS))
def test_dense_import_matches_hf_logits(hf_dirs, kind):
    path = hf_dirs[kind]
    ids = _ids()
    ref = _hf_logits(path, ids)
    cfg = _our_cfg(path, moe_layers="none")
    assert cfg.qkv_bias == (kind == "qwen2") and cfg.n_kv_heads == 2
    assert cfg.tie_embeddings == (kind == "llama")
    model = Transformer(cfg).eval()
    model.load_state_dict(load_hf_dense_state_dict(path), strict=True)
    with torch.no_grad():
        ours = model(ids).logits_BTV
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    # The comparison is sensitive to positions: a different RoPE base changes the logits.
    other = Transformer(replace(cfg, rope_theta=10000.0)).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (other(ids).logits_BTV - ref).abs().amax() > 1e-3


@pytest.mark.parametrize("kind", list(ARCHS))
def test_upcycled_moe_matches_hf_logits(hf_dirs, kind):
    path = hf_dirs[kind]
    ids = _ids(seed=1)
    ref = _hf_logits(path, ids)
    cfg = _our_cfg(path, moe_layers="all", num_experts=4, top_k=2)
    assert cfg.d_expert == 48
    torch.manual_seed(3)
    model = Transformer(cfg, ExpertsConfig(router=RouterConfig(normalize_topk=True))).eval()
    routers = [layer.router.weight.clone() for layer in model.moe_layers()]
    report = init_model_from(model, path, UpcycleConfig(diversify="copy"), seed=0)
    assert report["kind"] == "huggingface"
    assert report["upcycled_layers"] == {"0": "dense", "1": "dense"}
    assert "blocks.0.ffn.router.weight" in report["kept_init"]
    assert "embed.weight" in report["loaded"]
    for layer, r in zip(model.moe_layers(), routers):
        torch.testing.assert_close(layer.router.weight, r, rtol=0, atol=0)  # a fresh router
    with torch.no_grad():
        ours = model(ids).logits_BTV
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_init_model_from_hf_dense(hf_dirs):
    path = hf_dirs["qwen2"]
    model = Transformer(_our_cfg(path, moe_layers="none")).eval()
    report = init_model_from(model, path, UpcycleConfig(), seed=0)
    assert report["upcycled_layers"] == {} and report["kept_init"] == []
    ids = _ids(1, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits_BTV, _hf_logits(path, ids), rtol=0, atol=1e-5)


def test_config_fields(hf_dirs):
    f = hf_model_config_fields(hf_dirs["llama"])
    assert f == {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 48, "d_expert": 48,
                 "vocab_size": V, "tie_embeddings": True, "rope_theta": 5000.0, "norm_eps": 1e-5,
                 "qkv_bias": False, "head_dim": None, "qk_norm": "none"}
    assert hf_model_config_fields(hf_dirs["qwen2"])["qkv_bias"] is True


def test_check_hf_compat(hf_dirs):
    path = hf_dirs["qwen2"]
    good = _our_cfg(path, moe_layers="all")
    assert check_hf_compat(path, good) == []
    probs = dict(check_hf_compat(path, replace(good, d_model=64, norm_eps=1e-6)))
    assert set(probs) == {"d_model", "norm_eps"}
    assert probs["d_model"] == f"model.d_model: 64 but the Hugging Face checkpoint at {path} has hidden_size 32"
    assert "rms_norm_eps" in probs["norm_eps"]
    # d_ff only matters with dense layers, d_expert only with MoE layers
    assert check_hf_compat(path, replace(good, d_ff=7)) == []
    assert [k for k, _ in check_hf_compat(path, replace(good, d_expert=24))] == ["d_expert"]
    assert [k for k, _ in check_hf_compat(path, replace(good, moe_layers="none", d_expert=24, d_ff=24))] == ["d_ff"]
    bad = replace(good, n_kv_heads=None, vocab_size=None, qkv_bias=False, tie_embeddings=True, rope_theta=1e4)
    keys = [k for k, _ in check_hf_compat(path, bad)]
    assert keys == ["n_kv_heads", "vocab_size", "tie_embeddings", "rope_theta", "qkv_bias"]


def test_is_hf_model_dir(hf_dirs, tmp_path):
    assert is_hf_model_dir(hf_dirs["llama"]) and is_hf_model_dir(str(hf_dirs["qwen2"]))
    assert not is_hf_model_dir(tmp_path)
    assert not is_hf_model_dir(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    assert not is_hf_model_dir(tmp_path)


def _edited(src: Path, dst: Path, **changes) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    raw = json.loads((src / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


@pytest.mark.parametrize("kind,changes,words", [
    ("llama", dict(model_type="mistral"), ["model_type", "mistral"]),
    ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_parameters=None),
     ["rope_scaling", "linear"]),
    ("llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192}), ["rope_parameters", "llama3"]),
    ("llama", dict(attention_bias=True), ["attention_bias", "o_proj"]),
    ("llama", dict(mlp_bias=True), ["mlp_bias"]),
    ("llama", dict(hidden_act="gelu"), ["hidden_act"]),
    ("qwen2", dict(head_dim=16), ["head_dim"]),
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1, layer_types=None),
     ["sliding", "max_window_layers"]),
])
def test_unsupported_models_are_rejected(hf_dirs, tmp_path, kind, changes, words):
    path = _edited(hf_dirs[kind], tmp_path / "m", **changes)
    for fn in (hf_model_config_fields, load_hf_dense_state_dict,
               lambda p: check_hf_compat(p, ModelConfig())):
        with pytest.raises(ValueError) as ei:
            fn(path)
        msg = str(ei.value)
        assert str(path / "config.json") in msg
        for w in words:
            assert w in msg, msg


@pytest.mark.parametrize("kind", list(ARCHS))
def test_hf_directory_as_a_distillation_teacher(hf_dirs, kind, tmp_path):
    """A distill stage's teacher from a HF directory: the dense converted model, frozen, whose
    logits (and so its top-k) equal the HF model's."""
    from jobs.layout import RunLayout
    from jobs.plan import plan_job
    from jobs.sources import resolve_teacher
    from jobs.spec import parse_spec
    from parallel.teacher import OnlineTeacher, load_teacher

    path = hf_dirs[kind]
    spec = parse_spec({"model": {"vocab_size": V}, "stages": [
        {"name": "s", "kind": "distill", "distill": {"teacher": str(path), "top_k": 5}}]})
    plan = plan_job(spec)
    teacher = resolve_teacher(plan, plan.stages[0], RunLayout(tmp_path))
    model, what = load_teacher(teacher, V, "any", torch.device("cpu"), "s.distill.teacher")
    assert str(path) in what and not any(p.requires_grad for p in model.parameters())
    ids = _ids()
    ref = _hf_logits(path, ids)
    t = OnlineTeacher(spec.stages[0].distill, ["d"], model).train_teacher({"input_ids": ids})
    torch.testing.assert_close(t.logp_NK, torch.log_softmax(ref, -1).topk(5, -1).values, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="predicts over"):
        load_teacher(teacher, V + 1, "any", torch.device("cpu"), "s.distill.teacher")
