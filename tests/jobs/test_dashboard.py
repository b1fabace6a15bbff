"""The run dashboard's server side: the incremental metrics reader, run discovery, stage states
and the JSON API (a real aiohttp server on 127.0.0.1). The page itself is tested in Chromium by
tests/infra/test_dashboard_browser.py."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from jobs.dashboard.runs import MetricsTail, RunIndex, compact
from jobs.dashboard.server import make_app, plotly_js
from system.metrics import JsonlSink, supersede_stage_records
from tests.waiting import await_until

ROOT = Path(__file__).resolve().parents[2]


def _rec(stage: str, step: int, **kw) -> dict:
    return {"stage": stage, "step": step, "time": 1000.0 + step, "loss": 5.0 - step / 10, **kw}


def _run_dir(root: Path, name: str, stages=(("pretrain", 10),)) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "spec.yaml").write_text(json.dumps({"run": {"name": name},
                                             "stages": [{"name": n, "steps": s} for n, s in stages]}))
    return d


def test_compact_keeps_numbers_and_token_counts_only():
    r = compact({"stage": "s", "step": 3, "time": 1.5, "loss": 2.0, "skipped": True, "nan": float("nan"),
                 "moe/0/tokens_per_expert": [1, 2], "moe/0/frac_micro": [0.5, 0.5],
                 "eval/moe/0/frac/a": [0.1], "note": "text"})
    assert r == {"stage": "s", "step": 3, "time": 1.5, "loss": 2.0, "skipped": 1, "nan": None,
                 "moe/0/tokens_per_expert": [1, 2]}


def test_tail_reads_only_appended_complete_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    tail.poll(force=True)
    assert tail.records == [] and tail.generation == 0  # no file yet
    sink = JsonlSink(path)
    for s in (1, 2):
        sink.log(_rec("a", s))
    tail.poll(force=True)
    assert [r["step"] for r in tail.records] == [1, 2]
    with open(path, "a") as f:  # a line being written: not taken until its newline arrives
        f.write(json.dumps(_rec("a", 3))[:20])
    tail.poll(force=True)
    assert [r["step"] for r in tail.records] == [1, 2]
    with open(path, "a") as f:
        f.write(json.dumps(_rec("a", 3))[20:] + "\n" + "{torn\n" + json.dumps(_rec("a", 4)) + "\n")
    tail.poll(force=True)
    assert [r["step"] for r in tail.records] == [1, 2, 3, 4] and tail.generation == 0
    tail.poll()  # within MIN_POLL_S of the last look: not read again, nothing duplicated
    assert len(tail.records) == 4
    sink.close()


def test_tail_starts_over_when_a_resume_replaces_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    for s in range(1, 6):
        sink.log(_rec("a", s))
    sink.close()
    tail = MetricsTail(path)
    tail.poll(force=True)
    assert len(tail.records) == 5
    assert supersede_stage_records(path, "a", 3) == 2  # resumed at step 3: steps 4, 5 dropped
    tail.poll(force=True)
    assert tail.generation == 1 and [r["step"] for r in tail.records] == [1, 2, 3]
    JsonlSink(path).log(_rec("a", 4, loss=9.0))
    tail.poll(force=True)
    assert [r["step"] for r in tail.records] == [1, 2, 3, 4] and tail.records[-1]["loss"] == 9.0


def test_index_finds_runs_directly_and_under_a_directory_and_new_ones_later(tmp_path):
    runs = tmp_path / "runs"
    a = _run_dir(runs, "alpha")
    (runs / "not-a-run").mkdir()
    other = _run_dir(tmp_path / "elsewhere", "alpha")  # same name: a distinct id
    index = RunIndex([runs, other])
    assert [(r.id, r.root) for r in index.refresh()] == [("alpha", a), ("alpha-2", other)]
    b = _run_dir(runs, "beta gamma")
    assert [r.id for r in index.refresh()] == ["alpha", "beta-gamma", "alpha-2"]
    assert index.get("beta-gamma").root == b and index.get("nope") is None
    with pytest.raises(FileNotFoundError, match="missing"):
        RunIndex([tmp_path / "missing"])


def test_stage_states(tmp_path):
    d = _run_dir(tmp_path, "r", stages=(("one", 5), ("two", 5), ("three", 5), ("four", 5)))
    for name, fname, body in (("one", "DONE.json", {"step": 5}), ("two", "PREEMPTED.json", {"step": 3}),
                              ("three", "FATAL.json", {"type": "ValueError", "message": "bad shard"})):
        (d / "stages" / name).mkdir(parents=True)
        (d / "stages" / name / fname).write_text(json.dumps(body))
    JsonlSink(d / "metrics.jsonl").log(_rec("four", 1))
    (run,) = RunIndex([d]).refresh()
    run.tail.poll(force=True)
    st = {s["name"]: (s["state"], s["detail"], s["steps"]) for s in run.status()["stages"]}
    assert st == {"one": ("done", "done at step 5", 5), "two": ("preempted", "preempted at step 3", 5),
                  "three": ("failed", "ValueError: bad shard", 5), "four": ("running", "", 5)}


def test_api_pages_records_and_generations(tmp_path):
    d = _run_dir(tmp_path / "runs", "r")
    sink = JsonlSink(d / "metrics.jsonl")
    for s in range(1, 4):
        sink.log(_rec("pretrain", s, **{"moe/0/tokens_per_expert": [s, 4 - s]}))

    async def go():
        async with TestClient(TestServer(make_app(RunIndex([tmp_path / "runs"])))) as c:
            runs = await (await c.get("/api/runs")).json()
            assert [r["id"] for r in runs] == ["r"] and runs[0]["stages"][0]["state"] == "running"
            j = await (await c.get("/api/run/r/records?gen=-1&since=0")).json()
            assert j["reset"] and j["gen"] == 0 and j["next"] == 3 and j["total"] == 3
            assert [r["moe/0/tokens_per_expert"] for r in j["records"]] == [[1, 3], [2, 2], [3, 1]]
            async def records(query: str, changed) -> dict:
                """The server's answer once it has looked at the file again (at most every MIN_POLL_S)."""
                async def get():
                    j = await (await c.get(f"/api/run/r/records?{query}")).json()
                    return j if changed(j) else None
                return await await_until(get, 10, f"records?{query} to change", every=0.05)

            sink.log(_rec("pretrain", 4))
            j = await records("gen=0&since=3", lambda j: j["records"] or j["reset"])
            assert not j["reset"] and [r["step"] for r in j["records"]] == [4] and j["next"] == 4
            supersede_stage_records(d / "metrics.jsonl", "pretrain", 2)
            j = await records("gen=0&since=4", lambda j: j["records"] or j["reset"])
            assert j["reset"] and j["gen"] == 1 and [r["step"] for r in j["records"]] == [1, 2]
            assert (await c.get("/api/run/nope/records")).status == 404
            assert (await c.get("/api/run/r/records?since=x")).status == 400
            page = await c.get("/run/r")
            assert page.status == 200 and "dashboard.js" in await page.text()
            js = await c.get("/static/plotly.min.js")
            assert js.status == 200 and int(js.headers["Content-Length"]) == plotly_js().stat().st_size
            assert (await c.get("/static/..%2Fserver.py")).status == 404

    asyncio.run(go())
    sink.close()


@pytest.mark.procs
def test_cli_refuses_a_missing_directory(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "dashboard", str(tmp_path / "nope")],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 2 and "not a directory" in p.stderr and "nope" in p.stderr
