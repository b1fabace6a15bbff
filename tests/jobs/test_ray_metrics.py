"""jobs/ray_metrics.py without Ray running: which gauge each record key, the stage's shape and a
committed checkpoint set, with which tags (ray.util.metrics.Gauge replaced by a recorder). The
live export is tests/infra/prometheus_live.py (in test_dashboard_browser.py's live run)."""
from __future__ import annotations

import pytest

from jobs import ray_metrics
from system.metrics import JsonlSink


class FakeGauge:
    def __init__(self, name, description="", tag_keys=()):
        self.name, self.tag_keys, self.values = name, tuple(tag_keys), {}

    def set(self, value, tags=None):
        assert set(tags) == set(self.tag_keys), (self.name, tags)
        self.values[tuple(sorted(tags.items()))] = value


@pytest.fixture
def sink(monkeypatch):
    import ray.util.metrics

    monkeypatch.setattr(ray.util.metrics, "Gauge", FakeGauge)
    return ray_metrics.RayGaugeSink("r1", "pretrain")


def value(gauge: FakeGauge, **extra):
    return gauge.values.get(tuple(sorted({"run": "r1", "stage": "pretrain", **extra}.items())))


def test_a_step_record_sets_the_step_and_the_skipped_steps(sink):
    sink.log({"stage": "pretrain", "step": 0, "eval/english/loss": 3.0})  # the stage's first evaluation
    assert value(sink.skipped) is None and value(sink.eval, domain="english") == 3.0
    sink.log({"stage": "pretrain", "step": 7, "loss": 2.5, "lr": 1e-3, "skipped_steps": 1, "step_skipped": 0.0})
    assert value(sink.step) == 7 and value(sink.skipped) == 1 and value(sink.loss, part="loss") == 2.5
    sink.log({"stage": "pretrain", "step": 8, "world_size": 2, "requested_world_size": 4})  # when records carry them
    assert (value(sink.world), value(sink.requested)) == (2, 4)


def test_stage_shape_and_committed_checkpoints(sink, tmp_path):
    jsonl = JsonlSink(tmp_path / "m.jsonl")
    sinks = [jsonl, sink]
    ray_metrics.announce_stage(sinks, world_size=2, requested_world_size=4, checkpoint_step=40, checkpoint_every=20)
    assert (value(sink.world), value(sink.requested), value(sink.ckpt_step), value(sink.ckpt_every)) == (2, 4, 40, 20)
    on_checkpoint = ray_metrics.checkpoint_listener(sinks)
    on_checkpoint(60)
    assert value(sink.ckpt_step) == 60
    assert ray_metrics.checkpoint_listener([jsonl]) is None  # no gauge sink: no hook for the trainer
    ray_metrics.announce_stage([jsonl], world_size=1, requested_world_size=1, checkpoint_step=0, checkpoint_every=5)
    jsonl.close()
    assert (tmp_path / "m.jsonl").read_text() == ""  # the other sinks saw nothing
