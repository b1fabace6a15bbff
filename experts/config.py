"""MoE routing and expert-compute configuration (plain data; validated by `jobs.spec`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Literal, Optional


@dataclass
class DTSConfig:
    """EvoMoE dense-to-sparse gate (arXiv 2112.14397), used when `router.kind` is "dts".

    Gumbel-softmax over the router logits at temperature T(t); an expert is active for a token
    when its Gumbel-softmax value exceeds `threshold`; combine weights are the plain softmax
    of the logits on the active experts. From step `hard_at_step` on (and always in eval) the
    gate is a hard top-k with k = `hard_top_k` (default: model.top_k).
    """

    t_max: float = 2.0
    t_min: float = 0.5
    decay_steps: int = 5000  # D: steps over which T falls from t_max to t_min
    schedule: Literal["linear", "exponential"] = "linear"
    threshold: float = 0.001
    hard_at_step: Optional[int] = None  # default: decay_steps
    hard_top_k: Optional[int] = None  # default: model.top_k

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.t_max > 0:
            yield "t_max", f"{self.t_max} must be > 0"
        if not 0 < self.t_min <= self.t_max:
            yield "t_min", f"{self.t_min} must be in (0, t_max={self.t_max}]"
        if self.decay_steps < 1:
            yield "decay_steps", f"{self.decay_steps} must be >= 1"
        if not 0 <= self.threshold < 1:
            yield "threshold", f"{self.threshold} must be in [0, 1)"
        if self.hard_at_step is not None and self.hard_at_step < 0:
            yield "hard_at_step", f"{self.hard_at_step} must be >= 0"
        if self.hard_top_k is not None and self.hard_top_k < 1:
            yield "hard_top_k", f"{self.hard_top_k} must be >= 1"

    def hard_step(self) -> int:
        return self.decay_steps if self.hard_at_step is None else self.hard_at_step


@dataclass
class RouterConfig:
    """How tokens choose experts."""

    kind: Literal["topk", "dts"] = "topk"
    score: Literal["softmax", "sigmoid"] = "softmax"  # scores of each expert from its logit
    normalize_topk: bool = True  # renormalise the k chosen weights to sum to 1
    # DeepSeek-V3's group-limited routing: experts in n_group contiguous groups, each token
    # chooses only inside its topk_group best groups (n_group 1: no limit).
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0  # the combine weights are multiplied by this (DeepSeek-V3)
    # The router projection in fp32 even when the model runs in bf16 (close logits decide the
    # top-k); false keeps it in the model's dtype (cheaper, as some reference codebases do).
    logits_fp32: bool = True
    dts: DTSConfig = field(default_factory=DTSConfig)

    def check(self) -> Iterator[tuple[str, str]]:
        if self.kind == "dts" and self.score != "softmax":
            yield "score", "the DTS gate uses softmax scores (EvoMoE); set score: softmax"
        if self.n_group < 1:
            yield "n_group", f"{self.n_group} must be >= 1"
        elif not 1 <= self.topk_group <= self.n_group:
            yield "topk_group", f"{self.topk_group} must be in [1, n_group={self.n_group}]"
        if self.kind == "dts" and (self.n_group > 1 or self.routed_scaling_factor != 1.0):
            yield "kind", "the DTS gate does not take n_group or routed_scaling_factor"
        if not (isinstance(self.routed_scaling_factor, (int, float)) and 0 < self.routed_scaling_factor <= 100):
            yield "routed_scaling_factor", f"{self.routed_scaling_factor} must be in (0, 100]"


@dataclass
class BalancingConfig:
    """Auxiliary losses and biases that keep routing balanced and logits small.

    lbl: scope of the Switch/GShard load-balancing loss's expert fractions f_i:
      micro_batch   this rank's micro-batch (what most frameworks do);
      sequence      each sequence on its own, averaged over sequences (DeepSeek-V3 style);
      global_batch  counts all-reduced over every data-parallel rank and accumulated over the
                    micro-batches of one optimizer step (Qwen, arXiv 2501.11873);
      none          no load-balancing loss (e.g. with aux_free).
    global_accumulation (global_batch only, with grad_accum_steps > 1):
      running  micro-batch m uses the counts of micro-batches 1..m of the step (Megatron-Core's
               buffer; no extra compute);
      exact    a no-grad routing pass over the step's micro-batches first, so every micro-batch
               uses the whole global batch's counts (costs one extra forward per micro-batch).
    aux_free: DeepSeek-V3 auxiliary-loss-free balancing: a per-expert bias added to the scores
      only to pick the top-k, after each optimizer step b_i += bias_update_rate * sign(mean(c) - c_i)
      with c the step's global counts.
    """

    lbl: Literal["micro_batch", "sequence", "global_batch", "none"] = "micro_batch"
    lbl_coeff: float = 0.01
    z_loss_coeff: float = 0.001
    global_accumulation: Literal["running", "exact"] = "running"
    aux_free: bool = False
    bias_update_rate: float = 0.001

    def check(self) -> Iterator[tuple[str, str]]:
        for name in ("lbl_coeff", "z_loss_coeff"):
            v = getattr(self, name)
            if not (0.0 <= v <= 10.0):
                yield name, f"{v} must be in [0, 10]"
        if not 0.0 <= self.bias_update_rate <= 1.0:
            yield "bias_update_rate", f"{self.bias_update_rate} must be in [0, 1]"


@dataclass
class ExpertsConfig:
    router: RouterConfig = field(default_factory=RouterConfig)
    balancing: BalancingConfig = field(default_factory=BalancingConfig)
    # auto: the fastest path measured for the device, dtype and expert shape (CPU: reference, or
    # grouped_mm from 64 experts, both bit-identical; CUDA: megablocks when installed and bf16, else grouped)
    backend: Literal["auto", "reference", "grouped", "megablocks"] = "auto"
