"""Expert compute backends: apply each expert's SwiGLU FFN to its contiguous block of rows.

Every backend takes rows already sorted by expert, the per-expert row counts (a host-side list)
and the stacked weights w1, w3: (E, D, F), w2: (E, F, D); it returns one output row per input
row, in the same order. All are dropless and differentiable in x and the three weights. The job
spec picks one with `experts.backend`:

auto        the default: one of the others per device, dtype and expert shape, chosen once
            (`choose_auto_backend`; measured on CPU: docs/benchmarks.md#expertsbackend-auto).
reference   a Python loop over experts: plain, obviously correct, the yardstick for the others.
grouped     one grouped matmul per projection (`torch._grouped_mm`) where it can run, else a
            padded batched matmul while padding stays small, else the loop; the pure function
            `choose_grouped_path` picks from the counts, shapes, dtype and device alone.
megablocks  MegaBlocks' grouped GEMM; optional (CUDA, bf16, packages built against this torch),
            otherwise `BackendUnavailableError` says what is missing.

The rule's conditions and measurements: docs/benchmarks.md#the-grouped-backends-dispatch-rule.
"""
from __future__ import annotations

import functools
import itertools
from typing import Callable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F

ExpertBackend = Callable[[torch.Tensor, list[int], torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
GroupedPath = Literal["grouped_mm", "padded", "loop"]

# "padded" is used while E * max(counts) - N <= PAD_ROWS_PER_EXPERT * E (see `choose_grouped_path`).
PAD_ROWS_PER_EXPERT = 32
# `auto` on CPU takes torch._grouped_mm from this many experts in a call; fewer run the loop
# (measured: docs/benchmarks.md#expertsbackend-auto).
CPU_GROUPED_MM_MIN_EXPERTS = 64
# torch._grouped_mm's CUDA bf16 kernel takes fewer groups than this.
CUDA_GROUPED_MM_MAX_GROUPS = 1024
_GMM_ALIGN_BYTES = 16
_CPU_GMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

MEGABLOCKS_INSTALL = (
    "on a CUDA machine, build MegaBlocks and its grouped GEMM against the installed torch "
    "(megablocks pins an old torch, hence --no-deps and --no-build-isolation): "
    "pip install --no-deps --no-build-isolation megablocks==0.10.0 grouped_gemm==0.3.0 stanford-stk==0.7.1"
)


class BackendUnavailableError(RuntimeError):
    """An optional expert backend cannot run here (missing package or device)."""


def recomputing(backend: ExpertBackend) -> ExpertBackend:
    """`backend` with activation checkpointing: only its inputs are kept for the backward pass,
    which runs the expert FFNs again (the (N, F) hidden activations are never stored)."""
    import torch.utils.checkpoint

    def run(x_ND, counts, w1, w3, w2):
        if not torch.is_grad_enabled():
            return backend(x_ND, counts, w1, w3, w2)
        return torch.utils.checkpoint.checkpoint(backend, x_ND, counts, w1, w3, w2, use_reentrant=False)
    return run


def swiglu(x_ND: torch.Tensor, w1_DF: torch.Tensor, w3_DF: torch.Tensor, w2_FD: torch.Tensor) -> torch.Tensor:
    return (F.silu(x_ND @ w1_DF) * (x_ND @ w3_DF)) @ w2_FD


def reference_backend(x_ND: torch.Tensor, counts: list[int], w1_EDF: torch.Tensor,
                      w3_EDF: torch.Tensor, w2_EFD: torch.Tensor) -> torch.Tensor:
    """Loop over experts; the plain, obviously-correct implementation."""
    # unbind, not w[e]: indexing would give each expert a zero-filled gradient of the whole
    # stacked tensor in backward (3*E full-size buffers a step); unbind stacks them once.
    w1s, w3s, w2s = w1_EDF.unbind(0), w3_EDF.unbind(0), w2_EFD.unbind(0)
    outs = []
    for e, rows in enumerate(torch.split(x_ND, counts, dim=0)):
        if rows.shape[0] == 0:
            continue
        outs.append(swiglu(rows, w1s[e], w3s[e], w2s[e]))
    if not outs:
        return x_ND.new_zeros(0, w2_EFD.shape[-1])
    return torch.cat(outs, dim=0)


# ---------------------------------------------------------------------------------------------
# grouped: the dispatch rule


def choose_grouped_path(counts: Sequence[int], *, d_model: int, d_expert: int, dtype: torch.dtype,
                        device_type: str, cuda_capability: Optional[tuple[int, int]] = None,
                        grouped_mm_runs: bool = True, weights_ok: bool = True) -> GroupedPath:
    """Which path the `grouped` backend takes; a pure function of its arguments.

    1. no rows at all -> "padded" (a zero-size bmm gives the weights zero gradients, not none;
       `torch._grouped_mm` rejects empty input);
    2. `torch._grouped_mm` usable -> "grouped_mm": CPU fp32/bf16/fp16, or CUDA bf16 on compute
       capability 9.x/10.x with < 1024 experts (elsewhere torch's CUDA op is a host-synchronising
       loop); d_model and d_expert rows 16-byte aligned; weights the kernel takes; no autocast;
    3. otherwise "padded" while E * max(counts) - N <= PAD_ROWS_PER_EXPERT * E, else "loop".
    Why these bounds, measured: docs/benchmarks.md#the-grouped-backends-dispatch-rule.

    grouped_mm_runs: `torch._grouped_mm` exists and runs for this device and dtype (probed).
    weights_ok:      the weights have x's dtype and strides the grouped kernel accepts, and
                     autocast is off.
    """
    n, e = sum(counts), len(counts)
    if n == 0:
        return "padded"
    aligned = all(size * dtype.itemsize % _GMM_ALIGN_BYTES == 0 for size in (d_model, d_expert))
    if device_type == "cuda":
        fast_kernel = (dtype == torch.bfloat16 and cuda_capability is not None
                       and cuda_capability[0] in (9, 10) and e < CUDA_GROUPED_MM_MAX_GROUPS)
    else:
        fast_kernel = device_type == "cpu" and dtype in _CPU_GMM_DTYPES
    if fast_kernel and aligned and grouped_mm_runs and weights_ok:
        return "grouped_mm"
    wasted_rows = e * max(counts) - n
    return "padded" if wasted_rows <= PAD_ROWS_PER_EXPERT * e else "loop"


def _gmm_operand_ok(t: torch.Tensor) -> bool:
    """Strides `torch._grouped_mm` accepts (its own check): row- or column-major last two
    dims, the leading stride a multiple of 16 bytes."""
    if t.dim() < 2:
        return False
    align = max(1, _GMM_ALIGN_BYTES // t.element_size())
    s_row, s_col = t.stride(-2), t.stride(-1)
    rows, cols = t.shape[-2], t.shape[-1]
    if s_col == 1 and s_row >= max(1, cols):
        return s_row % align == 0
    if s_row == 1 and s_col >= max(1, rows):
        return s_col % align == 0
    return False


@functools.lru_cache(maxsize=None)
def _grouped_mm_probe(device_type: str, device_index: Optional[int], dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs here, in both forms the grouped path uses (2D x 3D for
    forward and input gradients, 2D x 2D for weight gradients), with an empty group."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    try:
        with torch.no_grad():
            a = torch.ones(6, 16, dtype=dtype, device=device)
            b = torch.ones(3, 16, 16, dtype=dtype, device=device)
            offs = torch.tensor([2, 2, 6], dtype=torch.int32, device=device)
            y = torch._grouped_mm(a, b, offs=offs)
            gw = torch._grouped_mm(a.t(), y, offs=offs)
            return y.shape == (6, 16) and gw.shape == (3, 16, 16)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: Optional[int]) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def grouped_path_for(x_ND: torch.Tensor, counts: Sequence[int], w1_EDF: torch.Tensor, w3_EDF: torch.Tensor,
                     w2_EFD: torch.Tensor) -> GroupedPath:
    """The path `grouped_backend` takes for these tensors (gathers the facts, then the rule)."""
    dev = x_ND.device
    weights = (w1_EDF, w3_EDF, w2_EFD)
    weights_ok = (all(w.dtype == x_ND.dtype and _gmm_operand_ok(w) for w in weights)
                  and not torch.is_autocast_enabled(dev.type))
    return choose_grouped_path(
        counts, d_model=x_ND.shape[-1], d_expert=w1_EDF.shape[-1], dtype=x_ND.dtype, device_type=dev.type,
        cuda_capability=_cuda_capability(dev.index) if dev.type == "cuda" else None,
        grouped_mm_runs=_grouped_mm_probe(dev.type, dev.index, x_ND.dtype), weights_ok=weights_ok)


# ---------------------------------------------------------------------------------------------
# grouped: the paths


class _GroupedMM(torch.autograd.Function):
    """y[rows of group g] = a[rows of group g] @ b[g], with a backward that accepts any
    upstream gradient layout (made contiguous before it reaches the kernel): torch's built-in
    derivative passes it on as is, and the kernel rejects the non-contiguous gradients that
    `.sum()` or `.expand()` produce (torch 2.13)."""

    @staticmethod
    def forward(ctx, a_NK: torch.Tensor, b_GKM: torch.Tensor, offs_G: torch.Tensor,
                empty_groups: tuple[int, ...]) -> torch.Tensor:
        ctx.save_for_backward(a_NK, b_GKM, offs_G)
        ctx.empty_groups = empty_groups
        return torch._grouped_mm(a_NK, b_GKM, offs=offs_G)

    @staticmethod
    def backward(ctx, g_NM: torch.Tensor):
        a_NK, b_GKM, offs_G = ctx.saved_tensors
        g_NM = g_NM.contiguous()
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = torch._grouped_mm(g_NM, b_GKM.transpose(-2, -1), offs=offs_G)
        if ctx.needs_input_grad[1]:
            grad_b = torch._grouped_mm(a_NK.t(), g_NM, offs=offs_G)
            if ctx.empty_groups:  # a group with no rows must get a zero, not unwritten, gradient
                grad_b[list(ctx.empty_groups)] = 0
        return grad_a, grad_b, None, None


def _grouped_mm_path(x_ND: torch.Tensor, counts: Sequence[int], w1_EDF: torch.Tensor, w3_EDF: torch.Tensor,
                     w2_EFD: torch.Tensor) -> torch.Tensor:
    offs = torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=x_ND.device)
    empty = tuple(e for e, c in enumerate(counts) if c == 0)
    x_ND = x_ND.contiguous()
    h_NF = F.silu(_GroupedMM.apply(x_ND, w1_EDF, offs, empty)) * _GroupedMM.apply(x_ND, w3_EDF, offs, empty)
    return _GroupedMM.apply(h_NF, w2_EFD, offs, empty)


def _padded_rows(counts: Sequence[int], capacity: int, device: torch.device) -> torch.Tensor:
    """For each sorted row, its row in the flattened (E, capacity) padded layout, (N,) int64."""
    counts_E = torch.tensor(list(counts), dtype=torch.long, device=device)
    starts_E = torch.tensor([0, *itertools.accumulate(counts)][:-1], dtype=torch.long, device=device)
    shift_E = torch.arange(len(counts), device=device) * capacity - starts_E
    n = sum(counts)
    return torch.arange(n, device=device) + torch.repeat_interleave(shift_E, counts_E, output_size=n)


def _padded_path(x_ND: torch.Tensor, counts: Sequence[int], w1_EDF: torch.Tensor, w3_EDF: torch.Tensor,
                 w2_EFD: torch.Tensor) -> torch.Tensor:
    E, (N, D) = len(counts), x_ND.shape
    C = max(counts, default=0)
    if E * C == N:  # every expert has C rows (or there are none): already in the padded layout
        rows = None
        x_ECD = x_ND.reshape(E, C, D)
    else:
        rows = _padded_rows(counts, C, x_ND.device)
        x_ECD = x_ND.new_zeros(E * C, D).index_copy(0, rows, x_ND).view(E, C, D)
    # Padding rows are zero, so they add nothing to the weight gradients, and their outputs are
    # never gathered, so no gradient flows into them.
    h_ECF = F.silu(torch.bmm(x_ECD, w1_EDF)) * torch.bmm(x_ECD, w3_EDF)
    y = torch.bmm(h_ECF, w2_EFD).reshape(E * C, w2_EFD.shape[-1])
    return y if rows is None else y.index_select(0, rows)


GROUPED_PATHS: dict[str, ExpertBackend] = {
    "grouped_mm": _grouped_mm_path, "padded": _padded_path, "loop": reference_backend}


def grouped_backend(x_ND: torch.Tensor, counts: list[int], w1_EDF: torch.Tensor, w3_EDF: torch.Tensor,
                    w2_EFD: torch.Tensor) -> torch.Tensor:
    """One grouped matmul per projection (`torch._grouped_mm`), else a padded bmm, else the loop;
    `choose_grouped_path` says which, when."""
    path = grouped_path_for(x_ND, counts, w1_EDF, w3_EDF, w2_EFD)
    return GROUPED_PATHS[path](x_ND, counts, w1_EDF, w3_EDF, w2_EFD)


# ---------------------------------------------------------------------------------------------
# megablocks (optional)


@functools.lru_cache(maxsize=None)
def _megablocks_gg():
    """MegaBlocks' grouped GEMM module, or the reason it cannot be loaded (a str)."""
    if not torch.cuda.is_available():
        return ("no CUDA device is available (torch.cuda.is_available() is False; torch "
                f"{torch.__version__}); MegaBlocks' grouped GEMM runs only on CUDA GPUs")
    try:
        from megablocks import grouped_gemm_util as gg
    except Exception as exc:  # ImportError, or a CUDA extension built against another torch
        return f"the megablocks package cannot be imported ({type(exc).__name__}: {exc})"
    if not gg.grouped_gemm_is_available() or getattr(gg, "ops", None) is None:
        return ("megablocks is installed but its grouped GEMM is not (the `grouped_gemm` package, "
                "megablocks[gg], cannot be imported)")
    return gg


def megablocks_unavailable_reason() -> Optional[str]:
    """None if the megablocks backend can run here, else why not."""
    gg = _megablocks_gg()
    return gg if isinstance(gg, str) else None


def _require_megablocks():
    gg = _megablocks_gg()
    if isinstance(gg, str):
        raise BackendUnavailableError(f"expert backend 'megablocks' is unavailable: {gg}. To use it, "
                                      f"{MEGABLOCKS_INSTALL}; or set experts.backend: auto (or grouped).")
    return gg


def megablocks_backend(x_ND: torch.Tensor, counts: list[int], w1_EDF: torch.Tensor, w3_EDF: torch.Tensor,
                       w2_EFD: torch.Tensor) -> torch.Tensor:
    """The SwiGLU experts through `megablocks.grouped_gemm_util.ops.gmm`, as in MegaBlocks' GroupedGLU.

    That is the GEMM MegaBlocks' dropless MoE (dMoE, `mlp_impl="grouped"`) calls (the
    `grouped_gemm` package). gmm(a (N, K), b (E, K, M), batch_sizes) multiplies each group's rows
    by b[e]; our weights are already (E, in, out), so no transposes (trans_b=False). Its backward
    gives x and weight gradients.
    """
    gg = _require_megablocks()
    if x_ND.device.type != "cuda":
        raise BackendUnavailableError(f"expert backend 'megablocks' needs CUDA tensors; got {x_ND.device}")
    if x_ND.dtype != torch.bfloat16 or any(w.dtype != torch.bfloat16 for w in (w1_EDF, w3_EDF, w2_EFD)):
        raise TypeError("expert backend 'megablocks': its grouped GEMM takes bfloat16 only; got "
                        f"x {x_ND.dtype}, weights {w1_EDF.dtype}/{w3_EDF.dtype}/{w2_EFD.dtype} "
                        "(use bf16, or experts.backend: grouped)")
    return gmm_swiglu(gg.ops.gmm, x_ND, counts, w1_EDF, w3_EDF, w2_EFD)


def gmm_swiglu(gmm: Callable[..., torch.Tensor], x_ND: torch.Tensor, counts: Sequence[int], w1_EDF: torch.Tensor,
               w3_EDF: torch.Tensor, w2_EFD: torch.Tensor) -> torch.Tensor:
    """The SwiGLU experts through a grouped_gemm-style `gmm(a, b, batch_sizes)` (differentiable,
    batch_sizes an int64 host tensor, a and b contiguous, no group-free call)."""
    if sum(counts) == 0:  # grouped_gemm asserts that some group is non-empty
        return _padded_path(x_ND, counts, w1_EDF, w3_EDF, w2_EFD)
    batch_sizes = torch.tensor(list(counts), dtype=torch.long)  # on the host, as gmm requires
    x_ND = x_ND.contiguous()
    w1_EDF, w3_EDF, w2_EFD = w1_EDF.contiguous(), w3_EDF.contiguous(), w2_EFD.contiguous()
    h_NF = F.silu(gmm(x_ND, w1_EDF, batch_sizes)) * gmm(x_ND, w3_EDF, batch_sizes)
    return gmm(h_NF, w2_EFD, batch_sizes)


# ---------------------------------------------------------------------------------------------
# auto: a concrete backend per device, dtype and expert shape, chosen once


def choose_auto_backend(*, device_type: str, dtype: torch.dtype, d_model: int, d_expert: int, num_experts: int,
                        grouped_mm_runs: bool, megablocks_reason: Optional[str]) -> str:
    """The backend `auto` runs; a pure function of its arguments.

    cuda: `megablocks` where it can run (megablocks_reason None) and the dtype is bf16, else
          `grouped` (whose rule takes `torch._grouped_mm` where its kernel runs). MegaBlocks vs
          grouped_mm is a documented rule, not a measurement here: only a GPU can time them (the
          GPU suite's `moe_layer` case times both).
    cpu:  `grouped` with at least CPU_GROUPED_MM_MIN_EXPERTS experts in the call, where
          `torch._grouped_mm` runs for the dtype and the rows are 16-byte aligned (then it always
          takes that path: a C++ loop of the reference's matmuls, bit-identical to `reference`,
          which it beats only with many experts); else `reference` (as fast or faster with fewer
          experts; the padded bmm was slower at the shapes trained here and changes fp32 weight
          gradients in their last bits, which would move the golden curves).
    other devices: `grouped` (its padded bmm or loop; not measured).
    Measured: docs/benchmarks.md#expertsbackend-auto (bench/backend_auto.py).
    """
    if device_type == "cuda":
        return "megablocks" if megablocks_reason is None and dtype == torch.bfloat16 else "grouped"
    if device_type != "cpu":
        return "grouped"
    aligned = all(size * dtype.itemsize % _GMM_ALIGN_BYTES == 0 for size in (d_model, d_expert))
    many = num_experts >= CPU_GROUPED_MM_MIN_EXPERTS
    return "grouped" if many and grouped_mm_runs and aligned and dtype in _CPU_GMM_DTYPES else "reference"


def resolve_auto(device: torch.device, dtype: torch.dtype, d_model: int, d_expert: int, num_experts: int) -> str:
    """What `auto` runs for `num_experts` experts of this shape on `device` in `dtype` (probes
    once, cached)."""
    device = torch.device(device)
    return _resolve_auto(device.type, device.index, dtype, d_model, d_expert, num_experts)


@functools.lru_cache(maxsize=None)
def _resolve_auto(device_type: str, index: Optional[int], dtype: torch.dtype, d_model: int, d_expert: int,
                  num_experts: int) -> str:
    mb_reason = megablocks_unavailable_reason() if device_type == "cuda" else "not CUDA"
    return choose_auto_backend(device_type=device_type, dtype=dtype, d_model=d_model, d_expert=d_expert,
                               num_experts=num_experts, grouped_mm_runs=_grouped_mm_probe(device_type, index, dtype),
                               megablocks_reason=mb_reason)


class AutoBackend:
    """`experts.backend: auto`: runs the backend `resolve_auto` picks for the tensors it is given.

    The model is built on the host in fp32 and only later moved to its device and cast (DeepSpeed's
    bf16), so the facts exist at the first call, not at build: each instance (one per layer or
    expert store) resolves once per (device, dtype, shape, experts in the call: an expert store's
    calls run its own experts and copies) and keeps the answer; a call after that costs a dict
    lookup on host attributes (no device sync). `chosen`: the latest resolution, for logs.
    """

    def __init__(self):
        self._by_key: dict[tuple, ExpertBackend] = {}
        self.chosen: Optional[str] = None

    def __call__(self, x_ND: torch.Tensor, counts: list[int], w1_EDF: torch.Tensor, w3_EDF: torch.Tensor,
                 w2_EFD: torch.Tensor) -> torch.Tensor:
        key = (x_ND.device, x_ND.dtype, x_ND.shape[-1], w1_EDF.shape[-1], w1_EDF.shape[0])
        backend = self._by_key.get(key)
        if backend is None:
            self.chosen = resolve_auto(*key)
            backend = self._by_key[key] = get_backend(self.chosen)
        return backend(x_ND, counts, w1_EDF, w3_EDF, w2_EFD)


# ---------------------------------------------------------------------------------------------
# registry

BACKENDS: dict[str, ExpertBackend] = {
    "auto": AutoBackend(),  # `get_backend("auto")` gives each caller its own
    "reference": reference_backend,
    "grouped": grouped_backend,
    "megablocks": megablocks_backend,
}

# Optional backends: name -> () -> None if usable here, else the reason.
_UNAVAILABLE_REASON: dict[str, Callable[[], Optional[str]]] = {"megablocks": megablocks_unavailable_reason}


def unavailable_reason(name: str) -> Optional[str]:
    """None if backend `name` can run on this machine, else why not."""
    check = _UNAVAILABLE_REASON.get(name)
    return check() if check else None


def available_backends() -> list[str]:
    """Registered backends that can run on this machine, in registration order."""
    return [name for name in BACKENDS if unavailable_reason(name) is None]


def get_backend(name: str) -> ExpertBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown expert backend {name!r}; available: {sorted(BACKENDS)}")
    if name == "megablocks":
        _require_megablocks()
    if name == "auto":
        return AutoBackend()
    return BACKENDS[name]
