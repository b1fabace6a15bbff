"""The driver's heartbeat (RUN/heartbeat.json) and the run's stage events (RUN/events.jsonl):
what the driver writes on each way out, how a reader tells a live, dead or ended driver apart,
and the append-only event log (jobs/heartbeat.py)."""
from __future__ import annotations

import json
import os
import socket

import pytest

from jobs.heartbeat import (DriverHeartbeat, liveness, read_events, read_heartbeat, record_event, run_liveness,
                            stale_after_s)
from tests.waiting import wait_until


def _hb(run):
    return json.loads((run / "heartbeat.json").read_text())


def test_beats_while_running_then_says_finished(tmp_path):
    with DriverHeartbeat(tmp_path, interval_s=0.05) as hb:
        first = _hb(tmp_path)
        assert first["state"] == "running" and first["pid"] == os.getpid()
        assert first["host"] == socket.gethostname() and first["started"] <= first["time"]
        assert run_liveness(tmp_path) == "running"
        wait_until(lambda: _hb(tmp_path)["time"] > first["time"], 10, "a second beat", every=0.02)
        assert hb.state == "running"
    last = _hb(tmp_path)
    assert last["state"] == "finished" and last["started"] == first["started"] and "error" not in last
    assert run_liveness(tmp_path) == "finished"
    assert not any(p.name.startswith(".heartbeat") for p in tmp_path.iterdir())  # no temp file left


@pytest.mark.parametrize("raise_,set_state,want", [
    (RuntimeError("stage x failed: lost worker"), None, "failed"),
    (KeyboardInterrupt(), None, "interrupted"),
    (RuntimeError("stage x preempted (SIGTERM)"), "preempted", "preempted"),  # the driver says which
    (None, "preempted", "preempted"),
])
def test_final_state_on_each_way_out(tmp_path, raise_, set_state, want):
    with pytest.raises(type(raise_)) if raise_ else _nothing():
        with DriverHeartbeat(tmp_path, interval_s=60) as hb:
            if set_state:
                hb.state = set_state
            if raise_:
                raise raise_
    got = _hb(tmp_path)
    assert got["state"] == want and run_liveness(tmp_path) == want
    assert got.get("error") == ("RuntimeError: stage x failed: lost worker" if want == "failed" else None)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_refuses_a_state_it_does_not_know(tmp_path):
    with pytest.raises(ValueError, match="interval_s"):
        DriverHeartbeat(tmp_path, interval_s=0)
    with DriverHeartbeat(tmp_path, interval_s=60) as hb:
        with pytest.raises(ValueError, match="heartbeat state 'done'"):
            hb.state = "done"


def test_liveness_fresh_stale_and_unknown(tmp_path):
    assert run_liveness(tmp_path) == "unknown" and read_heartbeat(tmp_path) is None  # a run from before
    t = 1_000_000.0
    (tmp_path / "heartbeat.json").write_text(json.dumps({"host": "node-7", "pid": 42, "started": t - 50, "time": t,
                                                         "interval_s": 10, "state": "running"}))
    limit = stale_after_s(10)
    assert run_liveness(tmp_path, now=t + 5) == "running"
    assert run_liveness(tmp_path, now=t - 3) == "running"  # the reader's clock a little behind
    assert run_liveness(tmp_path, now=t + limit) == "running"
    live = liveness(tmp_path, now=t + limit + 1)
    assert live["state"] == "dead" and live["host"] == "node-7" and live["pid"] == 42
    assert live["age_s"] == pytest.approx(limit + 1)
    (tmp_path / "heartbeat.json").write_text(json.dumps({"time": t, "state": "finished"}))
    assert run_liveness(tmp_path, now=t + 10 ** 6) == "finished"  # an ended run never goes stale
    for junk in ("{torn", "[1, 2]", json.dumps({"state": "running"}), json.dumps({"time": t, "state": "odd"})):
        (tmp_path / "heartbeat.json").write_text(junk)
        assert run_liveness(tmp_path, now=t) == "unknown", junk


def test_events_append_and_survive_a_torn_line(tmp_path):
    assert read_events(tmp_path) == []
    record_event(tmp_path, "started", "pretrain", 0)
    record_event(tmp_path, "preempted", "pretrain", 40, checkpoint="/ck/step_00000040")
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"time": 1, "kind": "resu')  # a crash mid-line
    assert [(e["kind"], e["step"]) for e in read_events(tmp_path)] == [("started", 0), ("preempted", 40)]
    record_event(tmp_path, "resumed", "pretrain", 40)  # starts a line of its own after the torn one
    evs = read_events(tmp_path)
    assert [(e["kind"], e["stage"], e["step"]) for e in evs] == [
        ("started", "pretrain", 0), ("preempted", "pretrain", 40), ("resumed", "pretrain", 40)]
    assert evs[1]["checkpoint"] == "/ck/step_00000040" and evs[0]["time"] <= evs[2]["time"]
    with pytest.raises(ValueError, match="event kind 'restarted'"):
        record_event(tmp_path, "restarted", "pretrain", 1)
