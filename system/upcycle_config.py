"""`UpcycleConfig`: how MoE layers are initialised from a dense (or one-expert) source layer
(`system.upcycle` applies it). Kept apart from the torch code: the job spec reads it."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Literal, Optional


@dataclass
class UpcycleConfig:
    """How MoE layers are initialised from a dense (or one-expert) source layer."""

    diversify: Literal["copy", "mask", "noise"] = "copy"
    fraction: float = 0.5  # mask: fraction of each copy's hidden units re-initialised
    noise_std: float = 0.01  # noise: noise std relative to each weight matrix's std
    keep_first: bool = True  # expert 0 stays an exact copy of the source FFN
    seed: Optional[int] = None  # default: the run's seed

    def check(self) -> Iterator[tuple[str, str]]:
        # `diversify` is a Literal: system.configtree rejects other values before check() runs.
        if not (isinstance(self.fraction, (int, float)) and 0.0 <= self.fraction <= 1.0):
            yield "fraction", f"{self.fraction} must be in [0, 1]"
        if not (isinstance(self.noise_std, (int, float)) and math.isfinite(self.noise_std)
                and self.noise_std >= 0.0):
            yield "noise_std", f"{self.noise_std} must be a finite number >= 0"
        if self.seed is not None and not 0 <= self.seed < 2 ** 63:
            yield "seed", f"{self.seed} must be in [0, 2^63)"
