"""Small specs and utilities shared by the tests."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from system.configtree import deep_merge

TINY_SPEC: dict[str, Any] = {
    "run": {"name": "tiny", "output_dir": "runs", "seed": 7},
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "moe_layers": "all",
              "num_experts": 4, "top_k": 2, "d_expert": 32},
    "experts": {"balancing": {"lbl": "micro_batch", "lbl_coeff": 0.01, "z_loss_coeff": 0.001}},
    "parallel": {"world_size": 1, "zero_stage": 0},
    "data": {"seq_len": 32, "sources": [
        {"name": "english_docs", "max_documents": 30},
        {"name": "python_code", "max_documents": 30, "weight": 0.5}]},
    "stages": [{"name": "pretrain", "steps": 4, "micro_batch_size": 4, "checkpoint_every": 2,
                "optimizer": {"lr": 3e-3}, "lr_schedule": {"kind": "cosine", "warmup_steps": 1}}],
    "metrics": {"progress_bar": False, "ray_metrics": False},
}


def tiny_spec(tmp_path: Path, **overrides) -> dict[str, Any]:
    """TINY_SPEC writing under tmp_path; `overrides` replace top-level sections (deep-merged)."""
    spec = copy.deepcopy(TINY_SPEC)
    spec["run"]["output_dir"] = str(tmp_path / "runs")
    for k, v in overrides.items():
        spec[k] = deep_merge(spec.get(k), v)
    return spec


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
