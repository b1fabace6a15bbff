"""Export training metrics as Ray metrics (Prometheus via Ray's metrics agent).

Label sets are bounded: run and stage names, MoE layer index, expert index, loss part.
Besides the step records (`log`), the stage runner tells the sink the stage's shape when it
starts (`stage_started`: world sizes, the step it resumed from) and the trainer each committed
checkpoint (`checkpoint_committed`); the alerting rules (infra/prometheus/alerts.yml) read those.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

ROUTING_STATS = ("maxvio_global", "maxvio_micro", "dead_experts", "active_per_token", "temperature",
                 "bias_spread", "entropy", "load_entropy")
MAX_EXPERT_LABELS = 256  # per-expert series are skipped beyond this many experts


class RayGaugeSink:
    def __init__(self, run: str, stage: str):
        from ray.util.metrics import Gauge

        keys = ("run", "stage")
        self._tags = {"run": run, "stage": stage}
        self.loss = Gauge("moeforge_loss", "Training loss part of the last step", tag_keys=keys + ("part",))
        self.lr = Gauge("moeforge_learning_rate", "Learning rate of the last step", tag_keys=keys)
        self.tps = Gauge("moeforge_tokens_per_second", "Training tokens per second, all ranks", tag_keys=keys)
        self.gnorm = Gauge("moeforge_grad_norm", "Global gradient norm before clipping", tag_keys=keys)
        self.step = Gauge("moeforge_step", "Optimizer steps done in the stage", tag_keys=keys)
        self.skipped = Gauge("moeforge_skipped_steps", "Steps of the stage whose update was skipped (a non-finite "
                             "loss or gradient), all so far", tag_keys=keys)
        self.world = Gauge("moeforge_world_size", "Ranks the stage runs on", tag_keys=keys)
        self.requested = Gauge("moeforge_requested_world_size", "Ranks the stage's plan asks for "
                               "(parallel.world_size; an elastic stage: its largest size)", tag_keys=keys)
        self.ckpt_step = Gauge("moeforge_checkpoint_step", "Step of the stage's last committed checkpoint "
                               "(the step it started or resumed from until its first)", tag_keys=keys)
        self.ckpt_every = Gauge("moeforge_checkpoint_every", "The stage's checkpoint interval in steps",
                                tag_keys=keys)
        self.maxload = Gauge("moeforge_expert_max_over_mean", "Busiest expert's tokens / mean, per MoE layer",
                             tag_keys=keys + ("layer",))
        self.expert = Gauge("moeforge_expert_tokens", "Tokens routed to each expert in the last step",
                            tag_keys=keys + ("layer", "expert"))
        self.routing = Gauge("moeforge_routing", "Routing statistic per MoE layer (stat: maxvio_global, "
                             "maxvio_micro, dead_experts, active_per_token, temperature, bias_spread, "
                             "entropy, load_entropy)", tag_keys=keys + ("layer", "stat"))
        self.eval = Gauge("moeforge_eval_loss", "Held-out loss per domain", tag_keys=keys + ("domain",))
        self.ep = Gauge("moeforge_expert_parallel", "ep/fssdp figures of the last step (stat: straggler, "
                        "copies, bytes_all_to_all, bytes_spag, bytes_sprs, bytes_reshard, expert_bytes_rank, "
                        "peak_copies_rank, reshards, overlap_budget)", tag_keys=keys + ("stat",))
        self.continual = Gauge("moeforge_continual", "Continual pretraining (stat: forgetting, adaptation, "
                               "old|new/loss, old|new/gap_depth, old|new/recovery_step, mean_loss, "
                               "replay_fraction, replay_fraction_total)", tag_keys=keys + ("stat",))
        self.distill = Gauge("moeforge_distill", "Distillation (stat: kd, agreement, teacher_missing_mass, "
                             "eval_agreement/<domain>)", tag_keys=keys + ("stat",))

    def log(self, r: dict[str, Any]) -> None:
        t = self._tags
        for part in ("loss", "ce", "lbl", "z_loss"):
            if part in r:
                self.loss.set(r[part], tags={**t, "part": part})
        for gauge, key in ((self.lr, "lr"), (self.tps, "tokens_per_s"), (self.gnorm, "grad_norm"),
                           (self.step, "step"), (self.skipped, "skipped_steps"), (self.world, "world_size"),
                           (self.requested, "requested_world_size")):
            if key in r:  # an evaluation-only record (step 0) has no training figures
                gauge.set(r[key], tags=t)
        for part in ("kd", "agreement", "teacher_missing_mass"):
            if part in r:
                self.distill.set(float(r[part]), tags={**t, "stat": part})
        for key, v in r.items():
            parts = key.split("/")
            if parts[0] == "moe" and parts[2] == "max_over_mean":
                self.maxload.set(v, tags={**t, "layer": parts[1]})
            elif parts[0] == "moe" and parts[2] == "tokens_per_expert" and len(v) <= MAX_EXPERT_LABELS:
                for e, c in enumerate(v):
                    self.expert.set(c, tags={**t, "layer": parts[1], "expert": str(e)})
            elif parts[0] == "moe" and parts[2] in ROUTING_STATS:
                self.routing.set(float(v), tags={**t, "layer": parts[1], "stat": parts[2]})
            elif parts[0] == "eval" and parts[-1] == "loss" and len(parts) == 3:
                self.eval.set(v, tags={**t, "domain": parts[1]})
            elif parts[0] == "eval" and parts[-1] == "teacher_agreement":
                self.distill.set(float(v), tags={**t, "stat": f"eval_agreement/{parts[1]}"})
            elif parts[0] == "cl" and parts[1] != "delta":
                self.continual.set(float(v), tags={**t, "stat": "/".join(parts[1:])})
            elif parts[0] == "data" and parts[1].startswith("replay_fraction"):
                self.continual.set(float(v), tags={**t, "stat": parts[1]})
            elif parts[0] == "ep" and len(parts) == 2:
                self.ep.set(float(v), tags={**t, "stat": parts[1]})

    def stage_started(self, world_size: int, requested_world_size: int, checkpoint_step: int,
                      checkpoint_every: int) -> None:
        """The stage's shape, set once its trainer is ready (resumed or not): `checkpoint_step`
        is the step it starts from (0 afresh), so a stage that never checkpoints is seen."""
        t = self._tags
        self.world.set(world_size, tags=t)
        self.requested.set(requested_world_size, tags=t)
        self.ckpt_step.set(checkpoint_step, tags=t)
        self.ckpt_every.set(checkpoint_every, tags=t)

    def checkpoint_committed(self, step: int) -> None:
        self.ckpt_step.set(step, tags=self._tags)

    def close(self) -> None:
        pass


def announce_stage(sinks: Iterable[Any], **shape: int) -> None:
    """`RayGaugeSink.stage_started(**shape)` on each such sink among `sinks` (others ignore it)."""
    for s in sinks:
        if isinstance(s, RayGaugeSink):
            s.stage_started(**shape)


def checkpoint_listener(sinks: Iterable[Any]) -> Optional[Callable[[int], None]]:
    """The trainer's `on_checkpoint` hook for the Ray gauge sinks among `sinks` (None without one)."""
    gauges = [s for s in sinks if isinstance(s, RayGaugeSink)]
    if not gauges:
        return None

    def committed(step: int) -> None:
        for g in gauges:
            g.checkpoint_committed(step)
    return committed
