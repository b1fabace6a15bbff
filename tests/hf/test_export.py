"""moeforge -> Hugging Face: transformers loads the export with our logits (fp32, 1e-5) and greedy
decode; HF -> moeforge -> HF is bit-identical tensor for tensor (names as save_pretrained writes);
unrepresentable models are refused with nothing left behind; run directories export from
replicated and fssdp checkpoints."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402

from experts.config import DTSConfig, ExpertsConfig, RouterConfig  # noqa: E402
from parallel.testing import run_distributed  # noqa: E402
from system.hf.export import export_module  # noqa: E402
from system.hf.families import NotRepresentable  # noqa: E402
from system.hf_import import hf_model_config_fields, hf_router_fields, load_hf_into_model  # noqa: E402
from system.model import ModelConfig, Transformer, greedy_decode  # noqa: E402
from tests.hf.families import CASES, V, build  # noqa: E402


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hfsrc")
    return {c: build(c, root / c, seed=5) for c in CASES}


def _ours(path: Path):
    router = RouterConfig(**hf_router_fields(path))
    model = Transformer(ModelConfig(**hf_model_config_fields(path)), ExpertsConfig(router=router)).eval()
    load_hf_into_model(model, path)
    return model, router


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})
    return out


def _hf(d: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True,
                                                             dtype=torch.float32).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bit_identical_and_loads_in_transformers(hf_dirs, case, tmp_path):
    src = hf_dirs[case]
    model, router = _ours(src)
    out = tmp_path / "export"
    rep = export_module(model, router, out, max_shard_bytes=64 * 1024)  # small shards: several files
    assert rep["family"] == json.loads((src / "config.json").read_text())["model_type"]
    assert out.stat().st_mode & 0o777 == (out / "config.json").stat().st_mode & 0o777 | 0o111  # a mkdir's mode
    a, b = _tensors(src), _tensors(out)
    assert a.keys() == b.keys()  # the names save_pretrained writes (per-expert, Hub layout)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(idx["weight_map"]) == set(b) and len(set(idx["weight_map"].values())) > 1
    ids = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(1))
    hf = _hf(out)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits_BTV, rtol=1e-5, atol=1e-5)
    prompt = ids[:1, :5]
    theirs = hf.generate(prompt, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert torch.equal(theirs, greedy_decode(model, prompt, 16))


def _trained_like(cfg: ModelConfig, experts: ExpertsConfig, seed=0):
    torch.manual_seed(seed)
    m = Transformer(cfg, experts).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return m


BASE = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=48, num_experts=4, top_k=2, d_expert=24, vocab_size=V)


@pytest.mark.parametrize("cfg,router,family", [
    (BASE, RouterConfig(), "mixtral"),
    (replace(BASE, tie_embeddings=False, qk_norm="head", moe_layers=[1]), RouterConfig(normalize_topk=False),
     "qwen3_moe"),
    (replace(BASE, qk_norm="full"), RouterConfig(normalize_topk=False), "olmoe"),
    # no q/k/v biases in ours: Qwen2-MoE gets zero biases (it always has them)
    (replace(BASE, d_shared=16, shared_expert_gate=True, moe_layers=[0]), RouterConfig(), "qwen2_moe"),
    (replace(BASE, moe_layers="none"), RouterConfig(), "llama"),
    (replace(BASE, moe_layers="none", qkv_bias=True), RouterConfig(), "qwen2"),
])
def test_our_models_export_to_the_family_that_represents_them(cfg, router, family, tmp_path):
    model = _trained_like(cfg, ExpertsConfig(router=router))
    if cfg.qkv_bias:
        with torch.no_grad():
            for b in model.blocks:
                b.attn.qkv.bias.normal_()
    rep = export_module(model, router, tmp_path / "x")
    assert rep["family"] == family
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(_hf(tmp_path / "x")(ids).logits, model(ids).logits_BTV, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg,router,words", [
    (BASE, RouterConfig(score="sigmoid"), ["router score 'sigmoid'", "MLA"]),
    (BASE, RouterConfig(n_group=2, topk_group=1), ["group-limited"]),
    (replace(BASE, d_shared=16), RouterConfig(), ["ungated shared expert"]),
    (BASE, RouterConfig(normalize_topk=False), ["normalize_topk false", "Mixtral"]),
    (replace(BASE, qk_norm="full", d_shared=8, shared_expert_gate=True), RouterConfig(), ["OLMoE", "shared expert"]),
    (BASE, RouterConfig(kind="dts", dts=DTSConfig(decay_steps=10)), ["DTS gate is mid-anneal", "step 10"]),
])
def test_unrepresentable_models_are_refused_leaving_nothing(cfg, router, words, tmp_path):
    model = _trained_like(cfg, ExpertsConfig(router=router))
    with pytest.raises(NotRepresentable) as ei:
        export_module(model, router, tmp_path / "x", step=3)
    for w in words:
        assert w in str(ei.value), str(ei.value)
    assert list(tmp_path.iterdir()) == []


def test_a_nonzero_aux_free_bias_is_refused_and_a_hard_dts_gate_exports(tmp_path):
    model = _trained_like(BASE, ExpertsConfig())
    model.blocks[0].ffn.expert_bias[1] = 0.01
    with pytest.raises(NotRepresentable, match="aux-loss-free expert bias"):
        export_module(model, RouterConfig(), tmp_path / "x")
    one = RouterConfig(kind="dts", dts=DTSConfig(decay_steps=10, hard_top_k=1))
    with pytest.raises(NotRepresentable, match="normalize_topk false"):  # top-1 keeps the probability
        export_module(_trained_like(BASE, ExpertsConfig(router=one)), one, tmp_path / "z", step=10)
    dts = RouterConfig(kind="dts", dts=DTSConfig(decay_steps=10, hard_top_k=3))
    model = _trained_like(BASE, ExpertsConfig(router=dts))
    rep = export_module(model, dts, tmp_path / "y", step=10)
    cfg = json.loads((tmp_path / "y" / "config.json").read_text())
    assert rep["family"] == "mixtral" and cfg["num_experts_per_tok"] == 3
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # our eval-mode DTS gate is the hard top-3
        torch.testing.assert_close(_hf(tmp_path / "y")(ids).logits, model(ids).logits_BTV, rtol=1e-5, atol=1e-5)


def test_byte_tokenizer_exports_as_a_transformers_tokenizer(tmp_path):
    from jobs.export import byte_tokenizer
    from system.data.tokenizer import ByteTokenizer

    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer(), eos_token="<|eos|>")
    tok.save_pretrained(str(tmp_path))
    back = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    ours = ByteTokenizer()
    for text in ["hello world", "héllo ✓ ünïcode\n\ttabs", "def f(x):\n    return x  # ok"]:
        assert back.encode(text, add_special_tokens=False) == ours.encode(text)
        assert back.decode(ours.encode(text)) == text
    assert back.eos_token_id == ours.eos_id == 256 and len(back) == ours.vocab_size


def _train(rank: int, world: int, spec: dict) -> None:
    from jobs.stage_runner import run_stage

    run_stage(spec, 0)


@pytest.mark.slow
@pytest.mark.parametrize("strategy,world", [("replicated", 1), ("ep", 2), ("fssdp", 2)])
def test_export_a_run_directory(strategy, world, tmp_path):
    """A real (tiny) run on gloo ranks, exported with the CLI: transformers' logits equal our
    model's loaded from the same checkpoint; the directory has a mkdir's mode (umask), and the
    CLI in its own process prints no DeepSpeed warning."""
    from jobs.cli import main
    from system.checkpoint import latest_checkpoint, load_module_weights
    from tests.helpers import tiny_spec

    spec = tiny_spec(tmp_path, run={"name": f"exp-{strategy}"},
                     model={"qk_norm": "head", "n_kv_heads": 1},
                     parallel={"world_size": world, "expert_strategy": strategy})
    run_distributed(_train, world, spec, timeout_s=300)
    run_dir = tmp_path / "runs" / f"exp-{strategy}"
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), "--to", str(out)]) == 0
    mask = os.umask(0o022)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask  # as a mkdir makes it, not mkdtemp's 0700
    exp = json.loads((out / "moeforge_export.json").read_text())
    assert exp["family"] == "qwen3_moe" and exp["step"] == 4 and exp["expert_strategy"] == strategy
    cfg = ModelConfig(**{**spec["model"], "vocab_size": 257})
    model = Transformer(cfg).eval()
    model.load_state_dict(load_module_weights(latest_checkpoint(run_dir / "stages" / "pretrain" / "checkpoints")))
    ids = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(_hf(out)(ids).logits, model(ids).logits_BTV, rtol=1e-5, atol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.encode("abc", add_special_tokens=False) == [97, 98, 99]
    # a second export into the same directory is refused, and --step names what exists
    assert main(["export", str(run_dir), "--to", str(out)]) == 2
    assert main(["export", str(run_dir), "--to", str(tmp_path / "hf2"), "--step", "3"]) == 2
    assert not (tmp_path / "hf2").exists()
    if strategy == "replicated":
        _cli_export_says_nothing_of_deepspeed(run_dir, tmp_path / "hf3")


def _cli_export_says_nothing_of_deepspeed(run_dir: Path, out: Path) -> None:
    """`moeforge export` in a process of its own as a user runs it (no DS_ACCELERATOR, which the
    suite sets): its output has moeforge's lines only, not DeepSpeed's accelerator guess."""
    import subprocess
    import sys

    from tests.hf.families import ROOT

    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "export", str(run_dir), "--to", str(out)], cwd=ROOT,
                       env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    noise = [line for line in (p.stdout + p.stderr).splitlines() if "accelerator" in line.lower() or "[WARNING]" in line]
    assert noise == [], p.stdout + p.stderr
    assert "[moeforge] exported stage pretrain" in p.stdout


@pytest.mark.procs
def test_the_cuda_bf16_check_runs_its_code_path_on_cpu():
    """bench/hf_cuda_check.py --dry-run: import -> bf16 training -> bf16 export -> transformers
    bf16 forward, on CPU (the GPU run is the same code with device cuda)."""
    import subprocess
    import sys

    from tests.hf.families import ROOT

    out = subprocess.run([sys.executable, str(ROOT / "bench" / "hf_cuda_check.py"), "--dry-run"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ok"] and res["argmax_agreement"] > 0.9 and res["rel_diff"] < 0.05


def test_a_runs_bpe_tokenizer_exports_from_the_data_cache(tmp_path):
    """tokenizer.kind bpe: export finds the run's trained BPE in the data cache by its
    fingerprint and writes it as a transformers tokenizer that encodes identically."""
    from jobs.export import tokenizer_writer
    from jobs.plan import plan_job
    from jobs.spec import parse_spec
    from system.data.dataset import PackedCorpus

    spec = parse_spec({"data": {"seq_len": 32, "cache_dir": str(tmp_path / "cache"),
                                "tokenizer": {"kind": "bpe", "vocab_size": 300},
                                "sources": [{"name": "english_docs", "max_documents": 20}]},
                       "stages": [{"name": "a"}]})
    plan = plan_job(spec)
    ours = PackedCorpus.build(plan.corpus).tokenizer
    special = tokenizer_writer(plan, ours.fingerprint)(tmp_path / "out")
    back = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    assert special["eos"] == ours.eos_id == back.eos_token_id
    for text in ["The quick brown fox.", "def f(x):\n    return x"]:
        assert back.encode(text, add_special_tokens=False) == ours.encode(text)
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        tokenizer_writer(plan, "bpe-000000000000000000000000")(tmp_path / "out2")
