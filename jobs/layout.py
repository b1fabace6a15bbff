"""Where a run keeps its files. One run directory holds every stage of a job."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def spec_file(self) -> Path:
        return self.root / "spec.yaml"

    @property
    def heartbeat_file(self) -> Path:
        """The driver's liveness: host, pid, wall-clock time, state (`jobs.heartbeat`)."""
        return self.root / "heartbeat.json"

    @property
    def events_file(self) -> Path:
        """Append-only history of stage starts, resumes, preemptions, ends (`jobs.heartbeat`)."""
        return self.root / "events.jsonl"

    def stage_dir(self, stage: str) -> Path:
        return self.root / "stages" / stage

    def checkpoints(self, stage: str) -> Path:
        return self.stage_dir(stage) / "checkpoints"

    def done_file(self, stage: str) -> Path:
        return self.stage_dir(stage) / "DONE.json"

    def fatal_file(self, stage: str) -> Path:
        """Written by a worker that hit an error no restart can fix (see `jobs.orchestrate`)."""
        return self.stage_dir(stage) / "FATAL.json"

    def preempted_file(self, stage: str) -> Path:
        """Written when the stage checkpointed and stopped after a SIGTERM (`jobs.preemption`)."""
        return self.stage_dir(stage) / "PREEMPTED.json"

    def log_dir(self, stage: str) -> Path:
        """Each worker's captured output, rank{R}.log (`jobs.console`)."""
        return self.root / "logs" / stage

    def tensorboard_dir(self, stage: str) -> Path:
        return self.root / "tensorboard" / stage

    def consumed_file(self, stage: str) -> Path:
        return self.stage_dir(stage) / "consumed.json"

    def consumed_samples_file(self, stage: str) -> Path:
        return self.stage_dir(stage) / "consumed.npz"

    def teacher_cache(self, stage: str) -> Path:
        return self.stage_dir(stage) / "teacher_topk"
