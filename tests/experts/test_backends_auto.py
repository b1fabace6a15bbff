"""`experts.backend: auto`: its rule, the facts it gathers (probed once), one resolution per layer,
bit-identical results to `reference` on CPU, and its place in the job spec (the default)."""
from __future__ import annotations

import pytest
import torch

from experts import backends as B
from experts.backends import AutoBackend, choose_auto_backend, get_backend, resolve_auto
from experts.config import ExpertsConfig
from experts.layer import MoELayer
from jobs.spec import parse_spec
from system.configtree import SpecError


def _auto(device="cpu", dtype=torch.float32, D=128, F=256, E=64, runs=True, mb=None):
    return choose_auto_backend(device_type=device, dtype=dtype, d_model=D, d_expert=F, num_experts=E,
                               grouped_mm_runs=runs, megablocks_reason=mb)


def test_the_rule():
    # CPU: grouped (its torch._grouped_mm path) with many experts, where that kernel runs and the
    # rows are aligned ...
    assert _auto(dtype=torch.float32) == "grouped"
    assert _auto(dtype=torch.bfloat16, E=B.CPU_GROUPED_MM_MIN_EXPERTS) == "grouped"
    assert _auto(dtype=torch.float32, E=256, mb=None) == "grouped"  # megablocks is never a CPU choice
    # ... else the reference loop: fewer experts (the quickstart's 8, the tests' 4), no kernel,
    # fp64, unaligned rows (fp32 d_model 30, bf16 d_expert 260)
    assert _auto(E=8) == "reference" and _auto(E=4, dtype=torch.bfloat16) == "reference"
    assert _auto(E=B.CPU_GROUPED_MM_MIN_EXPERTS - 1) == "reference"
    assert _auto(runs=False) == "reference"
    assert _auto(dtype=torch.float64) == "reference"
    assert _auto(D=30) == "reference"
    assert _auto(dtype=torch.bfloat16, F=260) == "reference"
    # CUDA: megablocks when it can run and the model is bf16, else grouped
    assert _auto("cuda", torch.bfloat16, mb=None) == "megablocks"
    assert _auto("cuda", torch.bfloat16, E=8, mb=None) == "megablocks"
    assert _auto("cuda", torch.bfloat16, mb="not installed") == "grouped"
    assert _auto("cuda", torch.bfloat16, E=8, mb="not installed") == "grouped"
    assert _auto("cuda", torch.float32, mb=None) == "grouped"
    assert _auto("cuda", torch.bfloat16, runs=False, mb="not installed") == "grouped"
    assert _auto("mps", torch.float32) == "grouped"


@pytest.fixture
def fresh_resolution():
    B._resolve_auto.cache_clear()
    yield
    B._resolve_auto.cache_clear()


def test_resolution_on_this_machine(fresh_resolution):
    runs = B._grouped_mm_probe("cpu", None, torch.float32)
    assert resolve_auto(torch.device("cpu"), torch.float32, 128, 256, 64) == ("grouped" if runs else "reference")
    assert resolve_auto(torch.device("cpu"), torch.float32, 128, 256, 8) == "reference"
    assert resolve_auto("cpu", torch.float64, 128, 256, 64) == "reference"
    assert resolve_auto("cpu", torch.float32, 30, 24, 64) == "reference"


def test_resolution_with_faked_facts(fresh_resolution, monkeypatch):
    probes = []
    monkeypatch.setattr(B, "_grouped_mm_probe", lambda *key: probes.append(key) or False)
    assert resolve_auto("cpu", torch.bfloat16, 128, 256, 64) == "reference"  # no torch._grouped_mm here
    assert resolve_auto("cpu", torch.bfloat16, 128, 256, 64) == "reference"
    assert probes == [("cpu", None, torch.bfloat16)]  # probed once, then cached
    # a GPU without megablocks, then with it (no CUDA needed: only the facts are faked)
    monkeypatch.setattr(B, "megablocks_unavailable_reason", lambda: "megablocks is not installed")
    assert resolve_auto(torch.device("cuda", 0), torch.bfloat16, 128, 256, 8) == "grouped"
    B._resolve_auto.cache_clear()
    monkeypatch.setattr(B, "megablocks_unavailable_reason", lambda: None)
    assert resolve_auto(torch.device("cuda", 0), torch.bfloat16, 128, 256, 8) == "megablocks"
    assert resolve_auto(torch.device("cuda", 0), torch.float32, 128, 256, 8) == "grouped"


def test_each_layer_resolves_once_per_device_and_dtype(monkeypatch):
    calls = []

    def fake(device, dtype, d_model, d_expert, num_experts):
        calls.append((device.type, dtype, d_model, d_expert, num_experts))
        return "reference"

    monkeypatch.setattr(B, "resolve_auto", fake)
    backend = get_backend("auto")
    assert isinstance(backend, AutoBackend) and backend is not get_backend("auto")  # one per caller
    assert backend.chosen is None
    counts = [2, 0, 3]
    ws = [torch.randn(3, 8, 16), torch.randn(3, 8, 16), torch.randn(3, 16, 8)]
    for _ in range(3):
        backend(torch.randn(5, 8), counts, *ws)
    assert calls == [("cpu", torch.float32, 8, 16, 3)] and backend.chosen == "reference"
    backend(torch.randn(5, 8, dtype=torch.float64), counts, *(w.double() for w in ws))  # cast: resolved again
    assert calls[1:] == [("cpu", torch.float64, 8, 16, 3)]


@pytest.mark.parametrize("E", [8, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_auto_layer_is_bit_identical_to_reference_on_cpu(dtype, E):
    # The quickstart / golden models' expert shape (8 experts: the loop), and with 64 experts
    # (torch._grouped_mm): either way the golden fp32 curves cannot move.
    D, k, F = 128, 2, 256
    torch.manual_seed(0)
    ref = MoELayer(D, E, k, F, backend="reference")
    ref.reset_parameters(std=0.02, out_std=0.01)
    ref = ref.to(dtype)
    auto = MoELayer(D, E, k, F, backend="auto").to(dtype)
    auto.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 48, D, generator=g).to(dtype)
    cot = torch.randn(2, 48, D, generator=g).to(dtype)
    got = []
    for layer in (ref, auto):
        xi = x.clone().requires_grad_(True)
        out, _ = layer(xi)
        params = [layer.router.weight, layer.experts.w1, layer.experts.w3, layer.experts.w2, xi]
        got.append([out.detach(), *torch.autograd.grad((out.float() * cot.float()).sum(), params)])
    expect = "grouped" if E >= 64 and B._grouped_mm_probe("cpu", None, dtype) else "reference"
    assert auto.experts._backend.chosen == expect
    for name, a, b in zip(["output", "router", "w1", "w3", "w2", "input"], *got):
        assert torch.equal(a, b), name


def test_the_spec_defaults_to_auto_and_names_a_bad_backend():
    assert ExpertsConfig().backend == "auto"
    base = {"stages": [{"name": "pretrain"}]}
    assert parse_spec(base).experts.backend == "auto"
    for name in ("auto", "reference", "grouped", "megablocks"):
        assert parse_spec({**base, "experts": {"backend": name}}).experts.backend == name
    with pytest.raises(SpecError) as ei:
        parse_spec({**base, "experts": {"backend": "fastest"}})
    (path, message), = ei.value.problems  # (dotted path, message) pairs
    assert path == "experts.backend" and "not one of" in message and "'auto'" in message
