"""`metrics.tensorboard: true`: the run's metrics as TensorBoard event files.

One directory per stage, `RUN/tensorboard/STAGE/` (`tensorboard --logdir RUN/tensorboard` shows
the stages side by side): every number of a metrics record as a scalar under its own name at the
stage's step (`loss`, `eval/english_docs/loss`, `moe/0/max_over_mean`, `ep/straggler`, ...),
each MoE layer's per-expert token counts as a histogram (`moe/L/tokens_per_expert`), and the
step's load over all layers as one image (`moe/expert_load`: a row per MoE layer, a column per
expert, brightness = the expert's share of the layer's tokens relative to the busiest expert).
A resumed stage opens its writer with `purge_step` = the first step it will log again, so
TensorBoard drops the superseded events, as `metrics.jsonl` does.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

import torch

_SKIP = {"stage", "step", "time"}
_COUNTS = re.compile(r"^moe/(\d+)/tokens_per_expert$")


class TensorBoardSink:
    def __init__(self, logdir: Path, purge_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter

        Path(logdir).mkdir(parents=True, exist_ok=True)
        self._w = SummaryWriter(str(logdir), purge_step=purge_step, flush_secs=5)

    def log(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        wall = record.get("time")
        layers: dict[int, list[float]] = {}
        for key, value in record.items():
            if key in _SKIP:
                continue
            if isinstance(value, bool):
                value = float(value)
            if isinstance(value, (int, float)):
                self._w.add_scalar(key, float(value), step, walltime=wall)
                continue
            m = _COUNTS.match(key)
            if m and isinstance(value, list) and value:
                counts = torch.tensor(value, dtype=torch.float64)
                self._w.add_histogram(key, counts, step, walltime=wall)
                layers[int(m.group(1))] = [float(v) for v in value]
        if layers:
            self._w.add_image("moe/expert_load", load_image(layers), step, walltime=wall, dataformats="HW")

    def close(self) -> None:
        self._w.flush()
        self._w.close()


def load_image(layers: dict[int, list[float]]) -> torch.Tensor:
    """(MoE layers, experts) in [0, 1]: each expert's tokens over its layer's busiest expert."""
    n = max(len(v) for v in layers.values())
    img = torch.zeros(max(layers) + 1, n)
    for i, v in layers.items():
        row = torch.tensor(v, dtype=torch.float32)
        top = float(row.max())
        img[i, : len(v)] = row / top if top > 0 and math.isfinite(top) else 0.0
    return img
