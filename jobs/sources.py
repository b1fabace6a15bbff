"""Where a stage's weights and teacher come from, resolved against the run directory.

The plan names them (`StagePlan.init`, `StagePlan.teacher`: an earlier stage or a directory);
these functions find the files: an earlier stage's final checkpoint, a user's checkpoint
directory (its latest complete checkpoint) or a Hugging Face model directory, and for teachers
the model they are (from the plan, a checkpoint manifest's spec, or a HF config.json).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from experts.config import ExpertsConfig, RouterConfig
from jobs.layout import RunLayout
from jobs.plan import JobPlan, StagePlan, plan_job
from parallel.teacher import ResolvedTeacher
from system.checkpoint import latest_checkpoint, read_manifest, require_intact, resolve_checkpoint
from system.hf.families import read_family
from system.hf_import import is_hf_model_dir
from system.model_config import ModelConfig


def final_checkpoint(layout: RunLayout, stage: str, where: str) -> Path:
    """The final checkpoint of a finished stage of this run; `where` names the referring field."""
    ckpt = latest_checkpoint(layout.checkpoints(stage))
    if ckpt is None or not read_manifest(ckpt).get("final"):
        raise ValueError(f"{where}: stage {stage!r} has not finished "
                         f"(no final checkpoint under {layout.checkpoints(stage)})")
    return require_intact(ckpt)  # a damaged final checkpoint is an error: no other one is final


def init_checkpoint(stage: StagePlan, layout: RunLayout) -> Optional[Path]:
    """The checkpoint (or HF directory) a stage starts from, or None."""
    ref = stage.init
    if ref is None:
        return None
    if ref.kind == "stage":
        return final_checkpoint(layout, ref.ref, f"stages[{stage.index}].init_from")
    if is_hf_model_dir(ref.ref):
        return Path(ref.ref)
    return resolve_checkpoint(ref.ref, warn=_warn)


def _warn(msg: str) -> None:
    print(f"[moeforge] warning: {msg}", flush=True)


def resolve_teacher(plan: JobPlan, stage: StagePlan, layout: RunLayout) -> ResolvedTeacher:
    """A distill stage's teacher: the files to load and the model config they hold."""
    from jobs.spec import parse_spec

    ref = stage.teacher
    where = f"stages[{stage.index}].distill.teacher"
    if ref.kind == "stage":
        ckpt = final_checkpoint(layout, ref.ref, where)
        t = plan.stage(ref.ref)
        return ResolvedTeacher(ckpt, t.model, t.experts, key_ref=str(ckpt))
    key_ref = str(Path(ref.ref).absolute())
    if is_hf_model_dir(ref.ref):
        fam = read_family(ref.ref)
        fields = fam.model if fam.is_moe else {**fam.model, "moe_layers": "none"}
        return ResolvedTeacher(Path(ref.ref), ModelConfig(**fields), ExpertsConfig(router=RouterConfig(**fam.router)),
                               key_ref=key_ref)
    ckpt = resolve_checkpoint(ref.ref, warn=_warn)
    man = read_manifest(ckpt)
    tplan = plan_job(parse_spec(man["spec"], f"{ckpt} manifest", preflight=False))
    names = [s.name for s in tplan.stages]
    if man.get("stage") not in names:
        raise ValueError(f"{where}: {ckpt}'s manifest names stage {man.get('stage')!r}, not in its spec")
    t = tplan.stage(man["stage"])
    return ResolvedTeacher(ckpt, t.model, t.experts, key_ref=key_ref, tokenizer=man.get("tokenizer"))
