"""Learning-rate schedules: pure functions of the step, returning a multiplier of the peak LR."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Literal


@dataclass
class ScheduleConfig:
    """LR schedule of one stage. Steps count optimizer updates within the stage."""

    kind: Literal["constant", "cosine", "linear", "wsd"] = "cosine"
    warmup_steps: int = 0  # linear warmup from 0 to the peak LR
    min_lr_ratio: float = 0.1  # final LR = ratio * peak (cosine, linear, wsd)
    decay_fraction: float = 0.1  # wsd only: share of the steps spent decaying at the end

    def check(self) -> Iterator[tuple[str, str]]:
        if self.warmup_steps < 0:
            yield "warmup_steps", f"{self.warmup_steps} must be >= 0"
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            yield "min_lr_ratio", f"{self.min_lr_ratio} is not a fraction in [0, 1]"
        if not 0.0 < self.decay_fraction <= 1.0:
            yield "decay_fraction", f"{self.decay_fraction} is not a fraction in (0, 1]"


def lr_multiplier(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """Multiplier of the peak LR for the update with index `step` (0-based) of `total_steps`."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
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
