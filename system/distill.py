"""Knowledge-distillation losses for language models. Pure PyTorch, single-device code.

Divergences between a teacher distribution p and the student's q over the vocabulary, per token,
both at temperature T: ``forward_kl`` KL(p || q) (mean-seeking; torchtune's default KD loss),
``reverse_kl`` KL(q || p) (mode-seeking, as in MiniLLM) and ``jsd``, the generalized
Jensen-Shannon JSD_beta of GKD (TRL's ``generalized_jsd_loss``) with beta strictly in (0, 1).
The teacher is full logits or a sparse `TopKTeacher`: the k most likely ids plus the mass outside
them as one "rest" category, the student's rest mass computed exactly, so k = V gives the full
loss. Everything is computed in float32 (float64 for float64 inputs), the teacher is a constant
(detached), and zero-mass categories contribute exactly 0 (no NaN).

Definitions, limits and edge cases in full: docs/continual.md#the-divergences.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F

DivergenceKind = Literal["forward_kl", "reverse_kl", "jsd"]
KINDS = ("forward_kl", "reverse_kl", "jsd")

#: Reverse KL floors the teacher's rest-bucket mass at this probability where the student's
#: rest mass is > 0 (otherwise KL(q || p) would be infinite when the top-k hold all the mass).
REVERSE_KL_REST_FLOOR = 1e-12

_NEG_INF = float("-inf")


@dataclass
class TopKTeacher:
    """Sparse teacher: the top-k token ids per position and their log-probs at a temperature.

    idx_NK:      int64 token ids, shape (..., K).
    logp_NK:     float32 teacher log-probs of those ids at temperature T, shape (..., K)
                 (float64 when built from float64 logits).
    rest_logp_N: float32 log of the teacher mass outside the K ids, shape (...); -inf when
                 K == vocabulary size.
    temperature: the T the log-probs were taken at, when known; `distill_divergence` refuses a
                 different temperature. None: not checked.

    Leading dims (e.g. (B, T)) are kept as given; the functions here flatten them to N rows.
    The K + 1 probabilities are used as given (not renormalized).
    """

    idx_NK: torch.Tensor
    logp_NK: torch.Tensor
    rest_logp_N: torch.Tensor
    temperature: Optional[float] = None

    def __post_init__(self) -> None:
        if self.idx_NK.shape != self.logp_NK.shape:
            raise ValueError(f"TopKTeacher: idx {tuple(self.idx_NK.shape)} and logp "
                             f"{tuple(self.logp_NK.shape)} differ in shape")
        if self.rest_logp_N.shape != self.idx_NK.shape[:-1]:
            raise ValueError(f"TopKTeacher: rest_logp {tuple(self.rest_logp_N.shape)} must have the "
                             f"leading dims of idx {tuple(self.idx_NK.shape)}")

    @property
    def k(self) -> int:
        return self.idx_NK.shape[-1]

    @property
    def lead_shape(self) -> torch.Size:
        return self.idx_NK.shape[:-1]

    def rows(self) -> "TopKTeacher":
        """The same teacher with its leading dims flattened to N rows."""
        k = self.k
        return TopKTeacher(self.idx_NK.reshape(-1, k), self.logp_NK.reshape(-1, k),
                           self.rest_logp_N.reshape(-1), self.temperature)

    def select_rows(self, rows_M: torch.Tensor) -> "TopKTeacher":
        """Rows `rows_M` (int64 indices into the flattened N rows)."""
        r = self.rows()
        return TopKTeacher(r.idx_NK.index_select(0, rows_M), r.logp_NK.index_select(0, rows_M),
                           r.rest_logp_N.index_select(0, rows_M), self.temperature)

    def argmax(self) -> torch.Tensor:
        """Teacher argmax per position (leading dims): the id with the largest log-prob."""
        return self.idx_NK.gather(-1, self.logp_NK.argmax(-1, keepdim=True)).squeeze(-1)

    def missing_mass(self) -> torch.Tensor:
        """Teacher probability outside the K ids, per position (leading dims)."""
        return self.rest_logp_N.exp()


Teacher = Union[torch.Tensor, TopKTeacher]


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    out = torch.float32
    for d in dtypes:
        if d.is_floating_point:
            out = torch.promote_types(out, d)
    return out


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


@torch.no_grad()
def teacher_topk(logits_NV: torch.Tensor, k: int, temperature: float = 1.0) -> TopKTeacher:
    """Top-k teacher from full logits (..., V): log_softmax(logits / T) in float32, its k
    largest entries, and the exact log-mass of the complement (logsumexp over the other ids;
    exactly -inf when k == V). Leading dims are kept. Float64 logits give float64 log-probs."""
    _check_temperature(temperature)
    V = logits_NV.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"k must be in [1, {V}], got {k}")
    logp_NV = F.log_softmax(logits_NV.detach().to(_compute_dtype(logits_NV.dtype)) / temperature, dim=-1)
    logp_NK, idx_NK = logp_NV.topk(k, dim=-1)
    rest_logp_N = logp_NV.scatter(-1, idx_NK, _NEG_INF).logsumexp(dim=-1)
    return TopKTeacher(idx_NK, logp_NK, rest_logp_N, float(temperature))


def _kl_rows(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """KL(a || b) over the last dim from log-probs. Entries with a = 0 (log a = -inf) contribute
    exactly 0 with zero gradient (inputs are masked before use, so no 0 * inf in either pass)."""
    pos = la > _NEG_INF
    la_s = la.masked_fill(~pos, 0.0)
    lb_s = lb.masked_fill(~pos, 0.0)
    return torch.where(pos, la_s.exp() * (la_s - lb_s), 0.0).sum(-1)


def _mixture_logp(lp: torch.Tensor, lq: torch.Tensor, beta: float) -> torch.Tensor:
    """log(beta p + (1 - beta) q), NaN-free (also in backward) where both are zero."""
    a = lp + math.log(beta)
    b = lq + math.log1p(-beta)
    both = (a == _NEG_INF) & (b == _NEG_INF)
    m = torch.logaddexp(a.masked_fill(both, 0.0), b.masked_fill(both, 0.0))
    return m.masked_fill(both, _NEG_INF)


def _divergence_rows(lp: torch.Tensor, lq: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    if kind == "forward_kl":
        return _kl_rows(lp, lq)
    if kind == "reverse_kl":
        return _kl_rows(lq, lp)
    lm = _mixture_logp(lp, lq, beta)
    return beta * _kl_rows(lp, lm) + (1.0 - beta) * _kl_rows(lq, lm)


def _check_kind(kind: str, beta: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta} (beta -> 0 tends to forward_kl * beta, "
                         f"beta -> 1 to reverse_kl * (1 - beta); use those kinds for the end points)")


def distill_divergence(student_logits_NV: torch.Tensor, teacher: Teacher, *, kind: DivergenceKind,
                       temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Per-token divergence between teacher p and student q, both at temperature T.

    student_logits_NV: (..., V) logits. teacher: full logits of the same shape, or a
    `TopKTeacher` with the same leading dims (then k + 1 categories: the k ids and the rest).
    Returns the divergence with the student's leading dims, e.g. (B, T) for (B, T, V) logits,
    in float32 (float64 if an input is float64). Differentiable w.r.t. the student only.
    """
    _check_kind(kind, beta)
    _check_temperature(temperature)
    V = student_logits_NV.shape[-1]
    lead = student_logits_NV.shape[:-1]
    if isinstance(teacher, TopKTeacher):
        if teacher.lead_shape != lead:
            raise ValueError(f"TopKTeacher leading dims {tuple(teacher.lead_shape)} != student's "
                             f"{tuple(lead)}")
        if teacher.temperature is not None and not math.isclose(teacher.temperature, temperature):
            raise ValueError(f"TopKTeacher was built at temperature {teacher.temperature}, "
                             f"divergence asked at {temperature}")
        if teacher.k > V:
            raise ValueError(f"TopKTeacher k={teacher.k} exceeds the vocabulary {V}")
        t = teacher.rows()
        dt = _compute_dtype(student_logits_NV.dtype, t.logp_NK.dtype, t.rest_logp_N.dtype)
        lq_NV = F.log_softmax(student_logits_NV.reshape(-1, V).to(dt) / temperature, dim=-1)
        lq_NK = lq_NV.gather(1, t.idx_NK)
        lq_rest_N = lq_NV.scatter(1, t.idx_NK, _NEG_INF).logsumexp(dim=-1)  # exactly -inf if k == V
        lp_NK = t.logp_NK.detach().to(dt)
        lp_rest_N = t.rest_logp_N.detach().to(dt)
        if kind == "reverse_kl":
            floored = lp_rest_N.clamp_min(math.log(REVERSE_KL_REST_FLOOR))
            lp_rest_N = torch.where(lq_rest_N > _NEG_INF, floored, lp_rest_N)
        lp = torch.cat([lp_NK, lp_rest_N[:, None]], dim=1)
        lq = torch.cat([lq_NK, lq_rest_N[:, None]], dim=1)
    else:
        if teacher.shape != student_logits_NV.shape:
            raise ValueError(f"teacher logits {tuple(teacher.shape)} != student logits "
                             f"{tuple(student_logits_NV.shape)}")
        dt = _compute_dtype(student_logits_NV.dtype, teacher.dtype)
        lq = F.log_softmax(student_logits_NV.reshape(-1, V).to(dt) / temperature, dim=-1)
        lp = F.log_softmax(teacher.detach().reshape(-1, V).to(dt) / temperature, dim=-1)
    return _divergence_rows(lp, lq, kind, beta).reshape(lead)


def _teacher_argmax(teacher: Teacher) -> torch.Tensor:
    return teacher.argmax() if isinstance(teacher, TopKTeacher) else teacher.argmax(-1)


@torch.no_grad()
def agreement(student_logits: torch.Tensor, teacher: Teacher,
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fraction of tokens where the student's argmax equals the teacher's (a float32 0-dim
    tensor; 0 when no token counts). For a `TopKTeacher` the teacher's argmax is the id with
    the largest log-prob among its k. `mask` (leading dims, bool): tokens to count."""
    same = (student_logits.argmax(-1) == _teacher_argmax(teacher).to(student_logits.device))
    if mask is None:
        return same.float().mean() if same.numel() else torch.zeros((), device=same.device)
    mask = mask.bool()
    return (same & mask).sum().float() / mask.sum().clamp_min(1).float()


def distillation_loss(student_logits_BTV: torch.Tensor, labels_BT: torch.Tensor,
                      teacher: Optional[Teacher] = None, *, alpha: float = 0.5,
                      temperature: float = 1.0, kind: DivergenceKind = "forward_kl",
                      beta: float = 0.5, mask_BT: Optional[torch.Tensor] = None,
                      ignore_index: int = -100) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(1 - alpha) * CE(student, labels) + alpha * T^2 * mean_tokens D(teacher, student).

    Tokens counted (for both terms): labels != ignore_index, and mask_BT where given. Both
    terms are means over those tokens (0 when there are none). The CE is at temperature 1; D
    is `distill_divergence(..., kind, temperature, beta)`; T^2 keeps the KD gradient scale
    independent of T (Hinton et al.). `labels_BT` are the targets aligned with the logits
    (already shifted). With alpha == 0 the teacher may be None; if one is given anyway, its
    parts are still reported (computed without grad).

    Returns (loss, parts); parts are detached 0-dim tensors: "ce", "loss" and, with a teacher,
    "kd" (mean D, before alpha * T^2), "agreement" (argmax match fraction) and
    "teacher_missing_mass" (mean teacher mass outside the top-k; 0 for full logits).
    Counted tokens are gathered with a boolean index (one host sync), so masked-out positions
    cost no divergence compute and cannot inject NaN/inf.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    _check_temperature(temperature)
    if teacher is None and alpha > 0:
        raise ValueError("alpha > 0 needs a teacher")
    V = student_logits_BTV.shape[-1]
    if labels_BT.shape != student_logits_BTV.shape[:-1]:
        raise ValueError(f"labels {tuple(labels_BT.shape)} do not match logits "
                         f"{tuple(student_logits_BTV.shape)}")
    valid_N = (labels_BT != ignore_index).reshape(-1)
    if mask_BT is not None:
        valid_N = valid_N & mask_BT.reshape(-1).bool().to(valid_N.device)
    n_tokens = valid_N.sum().clamp_min(1)

    logits_NV = student_logits_BTV.reshape(-1, V)
    dt = _compute_dtype(student_logits_BTV.dtype)
    labels_N = labels_BT.reshape(-1).masked_fill(~valid_N, ignore_index)
    ce = F.cross_entropy(logits_NV.to(dt), labels_N, ignore_index=ignore_index, reduction="sum") / n_tokens
    loss = (1.0 - alpha) * ce
    parts: dict[str, torch.Tensor] = {"ce": ce.detach()}

    if teacher is not None:
        rows_M = valid_N.nonzero().squeeze(1)
        s_MV = logits_NV.index_select(0, rows_M)
        if isinstance(teacher, TopKTeacher):
            if teacher.lead_shape != labels_BT.shape:
                raise ValueError(f"TopKTeacher leading dims {tuple(teacher.lead_shape)} != labels "
                                 f"{tuple(labels_BT.shape)}")
            t_M = teacher.select_rows(rows_M)
            missing = t_M.missing_mass().float().sum() / n_tokens
        else:
            if teacher.shape != student_logits_BTV.shape:
                raise ValueError(f"teacher logits {tuple(teacher.shape)} != student logits "
                                 f"{tuple(student_logits_BTV.shape)}")
            t_M = teacher.reshape(-1, V).index_select(0, rows_M)
            missing = torch.zeros((), device=ce.device)
        with (nullcontext() if alpha > 0 else torch.no_grad()):
            d_M = distill_divergence(s_MV, t_M, kind=kind, temperature=temperature, beta=beta)
            kd = d_M.sum() / n_tokens
        if alpha > 0:
            loss = loss + (alpha * temperature ** 2) * kd
        parts["kd"] = kd.detach()
        parts["agreement"] = agreement(s_MV, t_M) if rows_M.numel() else torch.zeros((), device=ce.device)
        parts["teacher_missing_mass"] = missing.detach()
    parts["loss"] = loss.detach()
    return loss, parts
