"""MoE routing and expert-compute configuration (plain data; validated by `jobs.spec`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Literal


@dataclass
class RouterConfig:
    """How tokens choose experts."""

    kind: Literal["topk"] = "topk"
    score: Literal["softmax"] = "softmax"  # softmax over all experts' logits
    normalize_topk: bool = True  # renormalise the k chosen weights to sum to 1


@dataclass
class BalancingConfig:
    """Auxiliary losses that keep routing balanced and logits small."""

    lbl: Literal["micro_batch", "none"] = "micro_batch"
    lbl_coeff: float = 0.01
    z_loss_coeff: float = 0.001

    def check(self) -> Iterator[tuple[str, str]]:
        for name in ("lbl_coeff", "z_loss_coeff"):
            v = getattr(self, name)
            if not (0.0 <= v <= 10.0):
                yield name, f"{v} must be in [0, 10]"


@dataclass
class ExpertsConfig:
    router: RouterConfig = field(default_factory=RouterConfig)
    balancing: BalancingConfig = field(default_factory=BalancingConfig)
    backend: Literal["reference"] = "reference"
