"""`metrics.wandb`: the run's metrics in Weights & Biases (optional; `pip install wandb`).

Rank 0 logs every number of a metrics record at its stage's step, in one W&B run per stage
(`{run}-{stage}`, grouped by the moeforge run), `mode: offline` by default (files under
RUN/wandb, synced later with `wandb sync`), `online` with the usual WANDB_API_KEY.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

MISSING = ("metrics.wandb is set, but the wandb package is not installed in this environment "
           "(pip install wandb), or set metrics.wandb to null")


def wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


class WandbSink:
    def __init__(self, directory: Path, run_name: str, stage: str, project: str, mode: str,
                 entity: Optional[str] = None):
        try:
            import wandb
        except ImportError:
            raise ValueError(MISSING) from None
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(project=project, entity=entity, name=f"{run_name}-{stage}", group=run_name,
                               dir=str(directory), mode=mode, reinit="create_new")

    def log(self, record: dict[str, Any]) -> None:
        nums = {k: float(v) for k, v in record.items()
                if k not in ("stage", "step", "time") and isinstance(v, (int, float))}
        self._run.log(nums, step=int(record.get("step", 0)))

    def close(self) -> None:
        self._run.finish()
