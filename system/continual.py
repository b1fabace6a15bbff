"""Continual-pretraining metrics from a stage's evaluation history (Ibrahim et al.; stability gap).

A stage evaluates its held-out domains at step 0 (before any update) and every `eval_every`
steps. Domains split into *new* (the stage's own training sources) and *old* (every other
evaluated domain: what earlier stages trained on). With L_g(t) the mean held-out loss of the
group g's domains at step t:

- per domain, delta(t) = L_d(t) - L_d(0) (`cl/delta/<domain>`);
- forgetting(t) = L_old(t) - L_old(0); adaptation(t) = L_new(0) - L_new(t);
- stability gap of group g: its depth is the largest rise max_s<=t (L_g(s) - L_g(0)) (0 when
  the loss never rose above its start), reached at `gap_step`; the group has *recovered* at the
  first later evaluation where L_g <= L_g(0) + tolerance * depth (tolerance 0: back to the
  start). `recovery_step` is that step, `recovery_steps` its distance from the worst point.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

Eval = tuple[int, Mapping[str, float]]  # (step, {domain: held-out loss})


def group_loss(losses: Mapping[str, float], domains: Sequence[str]) -> float | None:
    vals = [losses[d] for d in domains if d in losses]
    return sum(vals) / len(vals) if vals else None


def stability_gap(curve: Sequence[tuple[int, float]], tolerance: float = 0.0) -> dict[str, Any]:
    """Depth, worst step and recovery of one loss curve [(step, loss)], first point the start."""
    if not curve:
        return {}
    start = curve[0][1]
    depth, worst = 0.0, curve[0][0]
    for step, loss in curve:
        if loss - start > depth:
            depth, worst = loss - start, step
    out: dict[str, Any] = {"gap_depth": depth, "gap_step": worst}
    if depth <= 0:
        return out
    for step, loss in curve:
        if step > worst and loss <= start + tolerance * depth:
            out["recovery_step"] = step
            out["recovery_steps"] = step - worst
            break
    out["recovered"] = float("recovery_step" in out)
    return out


def continual_metrics(history: Sequence[Eval], groups: Mapping[str, Sequence[str]],
                      tolerance: float = 0.0) -> dict[str, float]:
    """`cl/...` metrics of the latest evaluation in `history` (step 0 first)."""
    if not history:
        return {}
    out: dict[str, float] = {}
    (_, first), (_, last) = history[0], history[-1]
    for d, v in last.items():
        if d in first:
            out[f"cl/delta/{d}"] = v - first[d]
    for g, doms in groups.items():
        curve = [(s, group_loss(l, doms)) for s, l in history]
        curve = [(s, v) for s, v in curve if v is not None]
        if not curve:
            continue
        out[f"cl/{g}/loss"] = curve[-1][1]
        if g == "old":
            out["cl/forgetting"] = curve[-1][1] - curve[0][1]
        elif g == "new":
            out["cl/adaptation"] = curve[0][1] - curve[-1][1]
        out.update({f"cl/{g}/{k}": float(v) for k, v in stability_gap(curve, tolerance).items()})
    if "cl/old/loss" in out and "cl/new/loss" in out:
        out["cl/mean_loss"] = (out["cl/old/loss"] + out["cl/new/loss"]) / 2
    return out
