"""Learning-rate schedules: pure functions of the step, returning a multiplier of the peak LR.

`lr_multiplier(cfg, step, total_steps)` is the multiplier of the peak LR (eta_max = 1) for the
optimizer update with 0-based index `step` of a stage of `total_steps` updates; `lr_phase` names
the phase that update is in. Every kind starts with the same linear warmup, then: constant,
cosine, linear, wsd (warmup-stable-decay) or infinite (the schedules of Ibrahim et al., arXiv
2403.08763: cooldown, constant, optional anneal). Infinite without an anneal does not depend on
total_steps, so a later stage can continue from a constant-phase checkpoint without re-warming.

Each kind, exactly: docs/continual.md#each-kind-exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Literal

# Exponential anneal target when min_lr_ratio == 0 (which check() rejects, an exponential cannot
# reach 0): anneal down to this fraction of const_lr_ratio instead, i.e. three decades.
ANNEAL_ZERO_FLOOR = 1e-3

PHASES = ("warmup", "stable", "decay", "constant", "cooldown", "anneal", "done")


@dataclass
class ScheduleConfig:
    """LR schedule of one stage. Steps count optimizer updates within the stage."""

    kind: Literal["constant", "cosine", "linear", "wsd", "infinite"] = "cosine"
    warmup_steps: int = 0  # linear warmup from 0 to the peak LR
    min_lr_ratio: float = 0.1  # final LR = ratio * peak (cosine, linear, wsd; infinite: anneal target)
    decay_fraction: float = 0.1  # wsd only: share of the steps spent decaying at the end
    cooldown: Literal["cosine", "inv_sqrt", "linear"] = "cosine"  # infinite only: shape of peak -> const
    cooldown_steps: int = 0  # infinite only: N_cool; 0 = straight to the constant phase after warmup
    const_lr_ratio: float = 0.55  # infinite only: constant-phase LR = ratio * peak (eta_const / eta_max)
    anneal_steps: int = 0  # infinite only: last N_ann updates anneal exponentially to min_lr_ratio; 0 = none
    inv_sqrt_alpha: float = 10.0  # infinite, cooldown inv_sqrt only: alpha in g(x) = 1/sqrt(1+alpha*x) - 1

    def check(self) -> Iterator[tuple[str, str]]:
        if self.warmup_steps < 0:
            yield "warmup_steps", f"{self.warmup_steps} must be >= 0"
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            yield "min_lr_ratio", f"{self.min_lr_ratio} is not a fraction in [0, 1]"
        if not 0.0 < self.decay_fraction <= 1.0:
            yield "decay_fraction", f"{self.decay_fraction} is not a fraction in (0, 1]"
        if self.cooldown_steps < 0:
            yield "cooldown_steps", f"{self.cooldown_steps} must be >= 0"
        if self.anneal_steps < 0:
            yield "anneal_steps", f"{self.anneal_steps} must be >= 0"
        if not 0.0 < self.const_lr_ratio <= 1.0:
            yield "const_lr_ratio", f"{self.const_lr_ratio} is not a fraction in (0, 1]"
        if not self.inv_sqrt_alpha > 0.0:
            yield "inv_sqrt_alpha", f"{self.inv_sqrt_alpha} must be > 0"
        if self.kind == "infinite" and self.anneal_steps > 0:
            if self.min_lr_ratio == 0.0:
                yield "min_lr_ratio", ("must be > 0 with anneal_steps > 0: the exponential anneal "
                                       "cannot reach 0")
            elif self.min_lr_ratio > self.const_lr_ratio:
                yield "min_lr_ratio", (f"{self.min_lr_ratio} is above const_lr_ratio "
                                       f"{self.const_lr_ratio}: the anneal would raise the LR")


def _anneal_target(cfg: ScheduleConfig) -> float:
    return cfg.min_lr_ratio if cfg.min_lr_ratio > 0.0 else ANNEAL_ZERO_FLOOR * cfg.const_lr_ratio


def _cooldown(cfg: ScheduleConfig, n: int) -> float:
    """Multiplier of cooldown update n in 1..N_cool: from (just below) the peak down to c."""
    c, total = cfg.const_lr_ratio, cfg.cooldown_steps
    if n >= total:
        return c
    x = n / total
    if cfg.cooldown == "linear":
        return 1.0 + (c - 1.0) * x
    if cfg.cooldown == "inv_sqrt":
        a = cfg.inv_sqrt_alpha
        g = lambda u: 1.0 / math.sqrt(1.0 + a * u) - 1.0  # noqa: E731
        return 1.0 + (c - 1.0) * g(x) / g(1.0)
    return c + (1.0 - c) * 0.5 * (math.cos(math.pi * x) + 1.0)  # cosine


def _infinite(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    c = cfg.const_lr_ratio
    if cfg.anneal_steps > 0:
        start = total_steps - cfg.anneal_steps
        if step >= start:  # takes precedence over the cooldown and the constant phase
            n = step - start + 1
            lo = _anneal_target(cfg)
            if n >= cfg.anneal_steps:  # the final update and beyond: exactly the target
                return lo
            return c * (lo / c) ** (n / cfg.anneal_steps)
    n = step - cfg.warmup_steps + 1
    if n <= cfg.cooldown_steps:
        return _cooldown(cfg, n)
    return c


def lr_multiplier(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """Multiplier of the peak LR for the update with index `step` (0-based) of `total_steps`."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "infinite":
        return _infinite(cfg, step, total_steps)
    lo = cfg.min_lr_ratio
    if cfg.kind == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        start = total_steps - decay_steps
        if step < start:
            return 1.0
        frac = min(1.0, (step - start + 1) / decay_steps)
        return 1.0 - (1.0 - lo) * frac
    span = max(1, total_steps - cfg.warmup_steps)
    frac = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    if cfg.kind == "linear":
        return 1.0 - (1.0 - lo) * frac
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * frac))  # cosine


def lr_phase(cfg: ScheduleConfig, step: int, total_steps: int) -> str:
    """Phase of the update with index `step` (0-based) of `total_steps`, one of PHASES.

    "done" once step >= total_steps for the kinds that end (cosine, linear, wsd, and infinite
    with an anneal); constant and infinite without an anneal never end. Otherwise, as in
    `lr_multiplier`: "warmup" first; then "decay" (cosine, linear), "stable"/"decay" (wsd),
    "constant" (constant; infinite's constant phase), "cooldown" or "anneal" (infinite). Passing
    the number of updates already done as `step` gives the phase the next update would be in,
    e.g. for a checkpoint: "constant" means a later stage can continue without re-warming.
    """
    ends = cfg.kind in ("cosine", "linear", "wsd") or (cfg.kind == "infinite" and cfg.anneal_steps > 0)
    if ends and step >= total_steps:
        return "done"
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return "warmup"
    if cfg.kind == "constant":
        return "constant"
    if cfg.kind == "infinite":
        if cfg.anneal_steps > 0 and step >= total_steps - cfg.anneal_steps:
            return "anneal"
        if step - cfg.warmup_steps + 1 <= cfg.cooldown_steps:
            return "cooldown"
        return "constant"
    if cfg.kind == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        return "stable" if step < total_steps - decay_steps else "decay"
    return "decay"  # cosine, linear
