"""`metrics.tensorboard`: event files read back with TensorBoard's own reader (scalars equal to
metrics.jsonl, per-layer expert-load histograms and the load image), superseded events purged
after a resume; `metrics.wandb`: a clear error without the package, offline logging with it."""
from __future__ import annotations

import pytest

from parallel.testing import run_distributed
from system.metrics import read_jsonl
from tests.helpers import tiny_spec


def _train(rank, world, spec):
    from jobs.stage_runner import run_stage

    run_stage(spec, 0)


def _events(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    return acc


def _spec(tmp_path, **stage):
    return tiny_spec(tmp_path, run={"name": "tb"}, metrics={"tensorboard": True},
                     stages=[{"name": "pretrain", "steps": 4, "micro_batch_size": 2, "checkpoint_every": 2,
                              "eval_every": 2, **stage}])


@pytest.mark.procs
def test_event_files_hold_the_runs_metrics(tmp_path):
    spec = _spec(tmp_path)
    run_distributed(_train, 1, spec, timeout_s=240)
    run = tmp_path / "runs" / "tb"
    recs = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    acc = _events(run / "tensorboard" / "pretrain")
    tags = acc.Tags()
    loss = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert loss == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in recs]
    assert [e.step for e in acc.Scalars("eval/english_docs/loss")] == [0, 2, 4]
    assert {"lr", "grad_norm", "tokens_per_s", "moe/0/max_over_mean", "skipped_steps"} <= set(tags["scalars"])
    hist = acc.Histograms("moe/0/tokens_per_expert")
    assert [h.step for h in hist] == [1, 2, 3, 4]
    assert hist[0].histogram_value.sum == pytest.approx(sum(recs[0]["moe/0/tokens_per_expert"]))
    assert hist[0].histogram_value.num == len(recs[0]["moe/0/tokens_per_expert"])
    img = acc.Images("moe/expert_load")
    assert len(img) == 4 and img[0].height == 2 and img[0].width == 4  # 2 MoE layers x 4 experts


@pytest.mark.procs
def test_a_resumed_stage_purges_the_superseded_events(tmp_path, monkeypatch):
    spec = _spec(tmp_path)
    monkeypatch.setenv("MOEFORGE_FAULT_AT_STEP", "3")
    with pytest.raises(RuntimeError, match="injected fault after step 3"):
        run_distributed(_train, 1, spec, timeout_s=240)
    monkeypatch.delenv("MOEFORGE_FAULT_AT_STEP")
    run_distributed(_train, 1, spec, timeout_s=240)
    run = tmp_path / "runs" / "tb"
    recs = {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}
    loss = [(e.step, e.value) for e in _events(run / "tensorboard" / "pretrain").Scalars("loss")]
    assert [s for s, _ in loss] == [1, 2, 3, 4]  # step 3 of the crashed attempt is gone
    assert all(v == pytest.approx(recs[s], rel=1e-6) for s, v in loss)


def test_wandb_without_the_package_is_a_clear_spec_error(tmp_path):
    from jobs.spec import parse_spec
    from system.configtree import SpecError
    from system.wandb_sink import wandb_available

    spec = tiny_spec(tmp_path, metrics={"wandb": {"project": "p"}})
    if wandb_available():
        parse_spec(spec, preflight=False)
        return
    with pytest.raises(SpecError) as ei:
        parse_spec(spec, preflight=False)
    assert "metrics.wandb" in str(ei.value) and "pip install wandb" in str(ei.value)


def test_wandb_offline_logs_the_run(tmp_path):
    pytest.importorskip("wandb")
    spec = tiny_spec(tmp_path, run={"name": "wb"}, metrics={"wandb": {"project": "moeforge-test", "mode": "offline"}},
                     stages=[{"name": "pretrain", "steps": 2, "micro_batch_size": 2, "checkpoint_every": 2}])
    run_distributed(_train, 1, spec, timeout_s=240)
    assert list((tmp_path / "runs" / "wb" / "wandb").rglob("*.wandb"))
