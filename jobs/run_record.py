"""The run directory's record of what was trained: `spec.yaml` never says a stage was trained with
settings it did not have.

A stage that finished (DONE.json) or started (a checkpoint) was trained with the settings of the
recorded spec. Running the job again with a spec that changes any of those stages' *training*
settings is refused, naming the stage, the field, the recorded and the new value; the ways on are
a new `run.name` or `moeforge run --retrain-from STAGE`, which moves that stage's and every later
stage's files aside (`RUN/superseded/<time>/`, nothing is deleted) and trains them again.
How a stage runs (world size and the micro-batch / accumulation split of the same global batch,
the expert strategy, ZeRO, metrics, Ray, checkpoint and evaluation cadence) is not a training
setting and may change between runs.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

from jobs.layout import RunLayout
from jobs.plan import JobPlan, StagePlan
from jobs.user_errors import UserError
from system.configtree import SpecError, to_dict

# StagePlan fields that decide what a stage learns (the rest say how it runs)
TRAINING_FIELDS = ("kind", "model", "experts", "steps", "global_batch_size", "optimizer", "lr_schedule",
                   "grad_clip", "data", "weights", "replay_stages", "replay_fraction", "replay_sources",
                   "init", "init_weights_only", "upcycle", "teacher", "distill", "model_seed", "data_seed")
# parts of those that are about storage, not content
NOT_TRAINING = ("data.cache_dir", "data.shard_mb")


def training_settings(stage: StagePlan) -> dict[str, Any]:
    """The stage's training settings as dotted field -> value."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif prefix not in NOT_TRAINING:
            out[prefix] = value

    names = {f.name for f in fields(stage)}
    for name in TRAINING_FIELDS:
        if name in names:
            value = getattr(stage, name)
            walk(name, to_dict(value) if hasattr(value, "__dataclass_fields__") else value)
    return out


def trained_stages(layout: RunLayout, plan: JobPlan) -> list[StagePlan]:
    """The stages that finished or have a checkpoint in this run directory."""
    return [s for s in plan.stages if layout.done_file(s.name).is_file() or (layout.checkpoints(s.name) / "latest").is_file()]


def check_against_record(layout: RunLayout, plan: JobPlan) -> None:
    """Refuse a spec that changes a trained stage's training settings (SpecError, one line each)."""
    import yaml

    from jobs.plan import plan_job
    from jobs.spec import parse_spec

    if not layout.spec_file.is_file():
        return
    recorded = plan_job(parse_spec(yaml.safe_load(layout.spec_file.read_text()), str(layout.spec_file),
                                   preflight=False))
    before = {s.name: s for s in recorded.stages}
    problems = []
    for stage in trained_stages(layout, plan):
        if stage.name not in before:
            continue
        old, new = training_settings(before[stage.name]), training_settings(stage)
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                problems.append((f"stages.{stage.name}", f"{key} was {_show(old.get(key))} when this stage was trained "
                                 f"({'finished' if layout.done_file(stage.name).is_file() else 'checkpointed'}); the "
                                 f"spec now says {_show(new.get(key))}: use a new run.name, or `moeforge run SPEC "
                                 f"--retrain-from {stage.name}` to train it and the later stages again"))
    if problems:
        raise SpecError(problems, str(layout.spec_file.parent / "spec.yaml (the run's record)"))


def _show(value: Any) -> str:
    return "(unset)" if value is None else json.dumps(value) if not isinstance(value, str) else repr(value)


def retrain_from(layout: RunLayout, plan: JobPlan, stage_name: str, log=print) -> Optional[Path]:
    """Move `stage_name`'s and every later stage's files (and their metric records) aside, so
    they train again; returns the folder they went to (None when none had any)."""
    names = [s.name for s in plan.stages]
    if stage_name not in names:
        raise UserError(f"--retrain-from {stage_name!r}: this job has no such stage (its stages: {', '.join(names)})")
    later = names[names.index(stage_name):]
    moved = [n for n in later if layout.stage_dir(n).exists() or layout.log_dir(n).exists()]
    if not moved:
        return None
    dest = layout.root / "superseded" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest.mkdir(parents=True, exist_ok=True)
    _keep_metric_records(layout, set(moved), dest / "metrics.jsonl")
    for n in moved:
        if layout.stage_dir(n).exists():
            shutil.move(str(layout.stage_dir(n)), str(dest / n))
        if layout.log_dir(n).exists():
            shutil.move(str(layout.log_dir(n)), str(dest / f"logs-{n}"))
    if layout.spec_file.is_file():
        shutil.copy2(layout.spec_file, dest / "spec.yaml")
    log(f"[moeforge] --retrain-from {stage_name}: moved the files of {', '.join(moved)} to {dest}")
    return dest


def _keep_metric_records(layout: RunLayout, stages: set[str], out: Path) -> None:
    from system.metrics import read_jsonl, supersede_stage_records

    if not layout.metrics_file.is_file():
        return
    recs = [r for r in read_jsonl(layout.metrics_file) if r.get("stage") in stages]
    out.write_text("".join(json.dumps(r) + "\n" for r in recs))
    for s in stages:
        supersede_stage_records(layout.metrics_file, s, None)
