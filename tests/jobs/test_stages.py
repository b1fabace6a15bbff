"""A stage list runs in order; `init_from` starts a stage from an earlier stage's final weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from parallel.testing import run_distributed
from tests.helpers import tiny_spec

pytestmark = pytest.mark.slow


def _run_all(rank: int, world: int, spec: dict) -> list[dict]:
    from jobs.stage_runner import run_stage
    from system.metrics import read_jsonl

    for i in range(len(spec["stages"])):
        run_stage(spec, i)
    return read_jsonl(Path(spec["run"]["output_dir"]) / spec["run"]["name"] / "metrics.jsonl")


def test_init_from_earlier_stage_loads_its_final_weights(tmp_path):
    stage = {"steps": 12, "micro_batch_size": 4, "checkpoint_every": 6, "optimizer": {"lr": 1e-2},
             "lr_schedule": {"kind": "constant"}}
    spec = tiny_spec(tmp_path, run={"name": "chain"}, stages=[
        {"name": "first", **stage, "steps": 40, "checkpoint_every": 20},
        {"name": "second", "kind": "continual", "init_from": "first", **stage,
         "data": {"sources": [{"name": "python_code", "max_documents": 30}]}},
        {"name": "fresh", **stage, "data": {"sources": [{"name": "python_code", "max_documents": 30}]}},
    ])
    recs = run_distributed(_run_all, 1, spec)[0]
    by = {n: [r for r in recs if r["stage"] == n] for n in ("first", "second", "fresh")}
    assert [r["step"] for r in by["second"]] == list(range(1, 13))
    # Starting from trained weights, the second stage begins far below a fresh start on the same data.
    assert by["second"][0]["ce"] < by["fresh"][0]["ce"] - 1.0, (by["second"][0]["ce"], by["fresh"][0]["ce"])
    run = Path(spec["run"]["output_dir"]) / "chain"
    from system.checkpoint import latest_checkpoint, load_module_weights, read_manifest

    first_final = latest_checkpoint(run / "stages" / "first" / "checkpoints")
    second_ckpt = latest_checkpoint(run / "stages" / "second" / "checkpoints")
    assert read_manifest(second_ckpt)["init_from"] == str(first_final)
    assert read_manifest(first_final)["final"] is True
    # The first stage's checkpoint was not modified by the second stage.
    w1 = load_module_weights(first_final)
    w2 = load_module_weights(second_ckpt)
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)
    assert json.loads((run / "stages" / "second" / "DONE.json").read_text())["step"] == 12
