"""Expert compute backends: every one must match `reference_backend` in outputs and gradients."""
from __future__ import annotations

import pytest
import torch

from experts import backends as B
from experts.backends import (
    BACKENDS, GROUPED_PATHS, BackendUnavailableError, available_backends, choose_grouped_path, get_backend,
    grouped_path_for, reference_backend,
)
from experts.layer import MoELayer

CPU_BACKENDS = [name for name in BACKENDS if name != "reference" and name != "megablocks"]

# Per-expert row counts: zeros, all rows to one expert, E=1, no rows at all, ragged and skewed.
COUNTS = {
    "ragged": [3, 0, 5, 2],
    "balanced": [4, 4, 4, 4],
    "one_expert": [0, 0, 11, 0],
    "first_only": [6, 0, 0, 0],
    "single_expert": [7],
    "empty": [0, 0, 0],
    "skewed": [40, 0, 1, 0, 0, 0, 0, 1],  # E*max - N = 278 > 32*E: the loop for fp64
}
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _tensors(counts, D, F, dtype, seed=0, noncontiguous=False):
    """x (N, D) and weights scaled so outputs are O(1); optionally as strided views."""
    g = torch.Generator().manual_seed(seed)
    E, N = len(counts), sum(counts)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    if noncontiguous:
        x = rnd(N, 2 * D)[:, ::2]  # every other column
        w1 = rnd(E, F, D, scale=D ** -0.5).transpose(1, 2)  # (E, D, F), column-major
        w3 = rnd(E, D, 2 * F, scale=D ** -0.5)[:, :, :F]  # (E, D, F), padded rows
        w2 = rnd(E, D, F, scale=F ** -0.5).transpose(1, 2)  # (E, F, D), column-major
    else:
        x = rnd(N, D)
        w1, w3 = rnd(E, D, F, scale=D ** -0.5), rnd(E, D, F, scale=D ** -0.5)
        w2 = rnd(E, F, D, scale=F ** -0.5)
    cot = rnd(N, D)
    return x, (w1, w3, w2), cot


def _run(fn, counts, x, ws, cot):
    """Output and gradients w.r.t. (x, w1, w3, w2); a missing gradient counts as zero."""
    leaves = [t.detach().requires_grad_(True) for t in (x, *ws)]  # detach keeps the strides
    y = fn(leaves[0], list(counts), *leaves[1:])
    assert y.shape == (sum(counts), x.shape[1]) and y.dtype == x.dtype
    if y.requires_grad:
        grads = torch.autograd.grad((y * cot).sum(), leaves, allow_unused=True)
    else:
        grads = (None,) * 4
    grads = [torch.zeros_like(leaf) if gr is None else gr for gr, leaf in zip(grads, leaves)]
    return y.detach(), grads


def _assert_matches(fn, counts, dtype, D=8, F=16, noncontiguous=False):
    x, ws, cot = _tensors(counts, D, F, dtype, noncontiguous=noncontiguous)
    if noncontiguous:
        assert (x.numel() == 0 or not x.is_contiguous()) and not any(w.is_contiguous() for w in ws)
    y, grads = _run(fn, counts, x, ws, cot)
    y_ref, grads_ref = _run(reference_backend, counts, x, ws, cot)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    for name, a, b in zip(["x", "w1", "w3", "w2"], grads, grads_ref):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"grad {name}: {m}")


# ---------------------------------------------------------------------------------------------
# backends and grouped's paths vs the reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(COUNTS))
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_backend_matches_reference(name, case, dtype):
    _assert_matches(get_backend(name), COUNTS[case], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_backend_matches_reference_noncontiguous_inputs(name, dtype):
    _assert_matches(get_backend(name), COUNTS["ragged"], dtype, noncontiguous=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_backend_matches_reference_unaligned_sizes(name, dtype):
    # d_model 6, d_expert 10: rows not 16-byte aligned, so no torch._grouped_mm
    _assert_matches(get_backend(name), COUNTS["ragged"], dtype, D=6, F=10)


def _unsupported(path, counts, dtype):
    """Why torch._grouped_mm cannot take this case (the dispatch rule never sends it there)."""
    if path != "grouped_mm":
        return None
    if sum(counts) == 0:
        return "torch._grouped_mm rejects empty input; the rule sends N=0 to the padded path"
    if not B._grouped_mm_probe("cpu", None, dtype):
        return f"torch._grouped_mm does not run for {dtype} on CPU in torch {torch.__version__}"
    return None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["ragged", "one_expert", "single_expert", "empty", "skewed"])
@pytest.mark.parametrize("path", list(GROUPED_PATHS))
def test_every_grouped_path_matches_reference(path, case, dtype):
    """Each path on its own, whatever the dispatch rule would pick for these counts."""
    counts = COUNTS[case]
    reason = _unsupported(path, counts, dtype)
    if reason:
        pytest.skip(reason)
    _assert_matches(GROUPED_PATHS[path], counts, dtype)
    _assert_matches(GROUPED_PATHS[path], counts, dtype, noncontiguous=True)


def test_grouped_mm_on_cpu_in_this_torch():
    # What the rule relies on here: fp32/bf16 run, fp64 does not (it falls back to bmm / loop).
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip(f"torch {torch.__version__} has no torch._grouped_mm")
    assert B._grouped_mm_probe("cpu", None, torch.float32)
    assert not B._grouped_mm_probe("cpu", None, torch.float64)
    x, ws, _ = _tensors([3, 0, 5], 8, 16, torch.float32)
    assert grouped_path_for(x, [3, 0, 5], *ws) == "grouped_mm"


def test_grouped_mm_backward_takes_any_gradient_layout():
    # torch's built-in derivative of _grouped_mm rejects the expanded gradient of .sum()
    if not B._grouped_mm_probe("cpu", None, torch.float32):
        pytest.skip(f"torch._grouped_mm does not run on CPU in torch {torch.__version__}")
    x, ws, _ = _tensors([3, 0, 5], 8, 16, torch.float32)
    leaves = [t.requires_grad_(True) for t in (x, *ws)]
    got = torch.autograd.grad(GROUPED_PATHS["grouped_mm"](leaves[0], [3, 0, 5], *leaves[1:]).sum(), leaves)
    want = torch.autograd.grad(reference_backend(leaves[0], [3, 0, 5], *leaves[1:]).sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_empty_input_still_gives_weights_a_gradient():
    x, ws, _ = _tensors([0, 0, 0], 8, 16, torch.float32)
    leaves = [w.requires_grad_(True) for w in ws]
    y = get_backend("grouped")(x, [0, 0, 0], *leaves)
    assert y.shape == (0, 8)
    grads = torch.autograd.grad(y.sum(), leaves)
    assert all(g is not None and g.shape == w.shape and not g.any() for g, w in zip(grads, leaves))


# ---------------------------------------------------------------------------------------------
# the dispatch rule


def _choose(counts, dtype=torch.float32, device="cpu", cap=None, runs=True, weights_ok=True, D=512, F=256):
    return choose_grouped_path(counts, d_model=D, d_expert=F, dtype=dtype, device_type=device,
                               cuda_capability=cap, grouped_mm_runs=runs, weights_ok=weights_ok)


def test_dispatch_rule():
    ragged = [100, 80, 90, 120]  # E*max - N = 90 <= 32*4
    skewed = [400, 0, 0, 8]  # E*max - N = 1192 > 32*4
    assert _choose([0, 0, 0]) == "padded"
    assert _choose([0, 0, 0], dtype=torch.float64) == "padded"
    # CPU: grouped_mm for fp32/bf16/fp16 whatever the imbalance
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert _choose(skewed, dtype=dtype) == "grouped_mm"
    # ... unless it does not run, the rows are unaligned, or the weights are not usable
    assert _choose(ragged, runs=False) == "padded"
    assert _choose(ragged, D=6) == "padded"
    assert _choose(ragged, dtype=torch.bfloat16, F=260) == "padded"  # 520 bytes: not 16-aligned
    assert _choose(ragged, weights_ok=False) == "padded"
    # fp64: padded bmm while padding is cheap, else the loop
    assert _choose(ragged, dtype=torch.float64) == "padded"
    assert _choose(skewed, dtype=torch.float64) == "loop"
    assert _choose([10 + 64, 10], dtype=torch.float64) == "padded"  # 64 wasted rows = 32 per expert
    assert _choose([10 + 65, 10], dtype=torch.float64) == "loop"
    assert _choose([5], dtype=torch.float64) == "padded"
    # CUDA: the fused kernel only in bf16 on compute capability 9.x/10.x, fewer than 1024 experts
    assert _choose(ragged, dtype=torch.bfloat16, device="cuda", cap=(9, 0)) == "grouped_mm"
    assert _choose(ragged, dtype=torch.bfloat16, device="cuda", cap=(10, 0)) == "grouped_mm"
    assert _choose(ragged, dtype=torch.bfloat16, device="cuda", cap=(8, 0)) == "padded"
    assert _choose(ragged, dtype=torch.float32, device="cuda", cap=(9, 0)) == "padded"
    assert _choose(skewed, dtype=torch.float32, device="cuda", cap=(9, 0)) == "loop"
    assert _choose([1] * 1024, dtype=torch.bfloat16, device="cuda", cap=(9, 0)) == "padded"
    assert _choose(ragged, device="mps") == "padded"


def test_grouped_path_for_sees_dtype_and_layout():
    x, ws, _ = _tensors([3, 0, 5], 8, 16, torch.float64)
    assert grouped_path_for(x, [3, 0, 5], *ws) == "padded"
    x, ws, _ = _tensors([3, 0, 5], 8, 16, torch.float32)
    w1, w3, w2 = ws
    assert grouped_path_for(x, [3, 0, 5], w1, w3, w2.double()) != "grouped_mm"  # mixed dtypes
    assert grouped_path_for(x, [3, 0, 5], w1[:, ::2], w3[:, ::2], w2[:, :, ::2]) != "grouped_mm"


# ---------------------------------------------------------------------------------------------
# the MoE layer end to end


def _layer_grads(layer, x, cot):
    x = x.detach().clone().requires_grad_(True)
    out, _ = layer(x)
    params = [layer.router.weight, layer.experts.w1, layer.experts.w3, layer.experts.w2]
    return out.detach(), torch.autograd.grad((out * cot).sum(), params + [x])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("E,k", [(1, 1), (4, 2), (8, 3)])
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_layer_with_backend_matches_reference_layer(name, E, k, dtype):
    D, F = 8, 16
    torch.manual_seed(0)
    ref = MoELayer(D, E, k, F, backend="reference").to(dtype)
    ref.reset_parameters(std=0.5, out_std=0.3)
    layer = MoELayer(D, E, k, F, backend=name).to(dtype)
    layer.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, D, generator=g, dtype=torch.float64).to(dtype)
    cot = torch.randn(3, 7, D, generator=g, dtype=torch.float64).to(dtype)

    out, grads = _layer_grads(layer, x, cot)
    out_ref, grads_ref = _layer_grads(ref, x, cot)
    tol = TOL[dtype]
    torch.testing.assert_close(out, out_ref, **tol)
    for pname, a, b in zip(["router.weight", "w1", "w3", "w2", "input"], grads, grads_ref):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{pname}: {m}")


# ---------------------------------------------------------------------------------------------
# megablocks


def _megablocks_skip_reason():
    return B.megablocks_unavailable_reason()


def test_megablocks_unavailable_is_a_clear_error():
    reason = _megablocks_skip_reason()
    if reason is None:
        pytest.skip("megablocks is usable on this machine; the error path cannot be exercised")
    with pytest.raises(BackendUnavailableError) as err:
        get_backend("megablocks")
    msg = str(err.value)
    assert reason in msg and "pip install" in msg and "megablocks" in msg and "--no-deps" in msg
    assert ("CUDA" in msg) or ("megablocks" in reason)
    with pytest.raises(BackendUnavailableError):
        BACKENDS["megablocks"](torch.zeros(2, 8), [2], torch.zeros(1, 8, 16), torch.zeros(1, 8, 16),
                               torch.zeros(1, 16, 8))
    assert "megablocks" not in available_backends()
    assert available_backends()[:3] == ["auto", "reference", "grouped"]


class _FakeGroupedGemm(torch.autograd.Function):
    """grouped_gemm.ops.gmm's contract, on CPU: host int64 batch_sizes, contiguous a and b."""

    @staticmethod
    def forward(ctx, a, b, batch_sizes, trans_b):
        assert batch_sizes.device.type == "cpu" and batch_sizes.dtype == torch.int64
        assert a.is_contiguous() and b.is_contiguous() and int(batch_sizes.sum()) > 0
        ctx.save_for_backward(a, b)
        ctx.sizes, ctx.trans_b = batch_sizes.tolist(), trans_b
        bs = b.transpose(1, 2) if trans_b else b
        return torch.cat([rows @ bs[e] for e, rows in enumerate(a.split(ctx.sizes))])

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        bs = b.transpose(1, 2) if ctx.trans_b else b
        ga = torch.cat([ge @ bs[e].T for e, ge in enumerate(g.split(ctx.sizes))])
        gb = torch.stack([ae.T @ ge for ae, ge in zip(a.split(ctx.sizes), g.split(ctx.sizes))])
        return ga, gb.transpose(1, 2) if ctx.trans_b else gb, None, None


def _fake_gmm(a, b, batch_sizes, trans_b=False):
    return _FakeGroupedGemm.apply(a, b, batch_sizes, trans_b)


@pytest.mark.parametrize("case", ["ragged", "one_expert", "empty"])
def test_megablocks_call_convention_with_a_stand_in_gmm(case):
    """Our weights go to gmm as (E, in, out) with trans_b=False; checked against a CPU stand-in."""
    _assert_matches(lambda x, counts, *ws: B.gmm_swiglu(_fake_gmm, x, counts, *ws), COUNTS[case],
                    torch.float64, noncontiguous=True)


@pytest.mark.parametrize("case", ["ragged", "one_expert", "empty"])
def test_megablocks_matches_reference_on_cuda(case):
    reason = _megablocks_skip_reason()
    if reason is not None:
        pytest.skip(f"megablocks backend unavailable: {reason}")
    counts = [c * 16 for c in COUNTS[case]]
    x, ws, cot = _tensors(counts, 128, 256, torch.bfloat16)
    dev = torch.device("cuda")
    x, ws, cot = x.to(dev), [w.to(dev) for w in ws], cot.to(dev)
    y, grads = _run(get_backend("megablocks"), counts, x, ws, cot)
    y_ref, grads_ref = _run(reference_backend, counts, x, ws, cot)
    torch.testing.assert_close(y, y_ref, **TOL[torch.bfloat16])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)
