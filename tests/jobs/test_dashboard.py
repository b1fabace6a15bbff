"""The run dashboard's server side: the incremental metrics reader, run discovery, stage states,
the driver's liveness and the stage events, and the JSON API (a real aiohttp server on
127.0.0.1). The page on a real run is tested in Chromium by tests/infra/test_dashboard_browser.py;
here Chromium draws hand-written run directories (liveness, event markers, the ep chart's axes,
the timeline's labels)."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from jobs.dashboard.runs import MetricsTail, RunIndex, compact
from jobs.dashboard.server import make_app, plotly_js
from jobs.heartbeat import DriverHeartbeat, record_event, stale_after_s
from tests.infra.cdp import Chromium, chromium_binary
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


def _heartbeat(run: Path, state: str, age_s: float, interval_s: float = 10, **kw) -> None:
    """RUN/heartbeat.json as a driver on another host left it `age_s` ago."""
    t = time.time() - age_s
    (run / "heartbeat.json").write_text(json.dumps({"host": "node-7", "pid": 4242, "started": t - 100, "time": t,
                                                    "interval_s": interval_s, "state": state, **kw}))


def _states(run) -> tuple[str, dict]:
    run.tail.poll(force=True)
    st = run.status()
    return st["liveness"]["state"], {s["name"]: (s["state"], s["detail"]) for s in st["stages"]}


def test_a_stage_runs_only_while_its_driver_beats(tmp_path):
    d = _run_dir(tmp_path, "r", stages=(("one", 5), ("two", 5)))
    JsonlSink(d / "metrics.jsonl").log(_rec("one", 1))
    (run,) = RunIndex([d]).refresh()
    assert _states(run) == ("unknown", {"one": ("running", ""), "two": ("pending", "")})  # a run from before
    _heartbeat(d, "running", age_s=5)
    assert _states(run) == ("running", {"one": ("running", ""), "two": ("pending", "")})
    _heartbeat(d, "running", age_s=stale_after_s(10) + 5)  # killed without a word
    live, st = _states(run)
    assert live == "dead" and st["one"][0] == "dead" and st["two"] == ("pending", "")
    assert "node-7 (pid 4242)" in st["one"][1] and "heartbeat" in st["one"][1]
    _heartbeat(d, "failed", age_s=3600, error="RuntimeError: stage one failed: lost worker")
    assert _states(run)[1]["one"] == ("failed", "the driver on node-7 (pid 4242) failed: RuntimeError: stage one "
                                                "failed: lost worker")
    _heartbeat(d, "interrupted", age_s=3600)
    assert _states(run)[1]["one"][0] == "interrupted"
    (d / "stages" / "one").mkdir(parents=True)
    (d / "stages" / "one" / "DONE.json").write_text(json.dumps({"step": 5}))
    _heartbeat(d, "finished", age_s=10 ** 6)  # an ended run never goes stale
    assert _states(run) == ("finished", {"one": ("done", "done at step 5"), "two": ("pending", "")})


def test_status_carries_the_stage_events(tmp_path):
    d = _run_dir(tmp_path, "r")
    (run,) = RunIndex([d]).refresh()
    assert run.status()["events"] == []
    record_event(d, "started", "pretrain", 0)
    record_event(d, "preempted", "pretrain", 6, checkpoint="ck/step_00000006")
    assert [(e["kind"], e["step"]) for e in run.status()["events"]] == [("started", 0), ("preempted", 6)]
    record_event(d, "resumed", "pretrain", 6)  # read again once the file changed
    evs = run.status()["events"]
    assert [(e["kind"], e["stage"], e["step"]) for e in evs] == [
        ("started", "pretrain", 0), ("preempted", "pretrain", 6), ("resumed", "pretrain", 6)]
    assert evs[1]["checkpoint"] == "ck/step_00000006"


def test_api_pages_records_and_generations(tmp_path):
    d = _run_dir(tmp_path / "runs", "r")
    sink = JsonlSink(d / "metrics.jsonl")
    for s in range(1, 4):
        sink.log(_rec("pretrain", s, **{"moe/0/tokens_per_expert": [s, 4 - s]}))

    async def go():
        async with TestClient(TestServer(make_app(RunIndex([tmp_path / "runs"])))) as c:
            runs = await (await c.get("/api/runs")).json()
            assert [r["id"] for r in runs] == ["r"] and runs[0]["stages"][0]["state"] == "running"
            assert runs[0]["liveness"] == {"state": "unknown"} and runs[0]["events"] == []
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


def _synthetic_runs(root: Path) -> tuple[Path, Path]:
    """Two hand-written run directories: `live` (an fssdp stage that was preempted and resumed,
    then a stage that has just started: its bar is too short for its label) and `dead`."""
    now = time.time()
    live = _run_dir(root, "live", stages=(("pretrain", 20), ("continual", 10)))
    sink = JsonlSink(live / "metrics.jsonl")
    t0 = now - 400
    for s in range(1, 21):
        sink.log({**_rec("pretrain", s), "time": t0 + 10 * s, "ep/straggler": 1.1 + s / 100, "ep/copies": s % 5,
                  "ep/peak_copies_rank": 2})
    for s in (1, 2):
        sink.log({**_rec("continual", s), "time": now - 4 + s})
    sink.close()
    (live / "stages" / "pretrain").mkdir(parents=True)
    (live / "stages" / "pretrain" / "DONE.json").write_text(json.dumps({"step": 20}))
    # as record_event writes them, at the times of the run's records
    with open(live / "events.jsonl", "w") as f:
        for t, kind, step in ((t0, "started", 0), (t0 + 102, "preempted", 10), (t0 + 160, "resumed", 10),
                              (t0 + 160, "resized", 10), (now - 4, "started", 0)):
            sizes = {"from_world_size": 4, "world_size": 2, "requested_world_size": 4} if kind == "resized" else {}
            f.write(json.dumps({"time": t, "kind": kind, "stage": "continual" if t > t0 + 200 else "pretrain",
                                "step": step, **sizes}) + "\n")
    dead = _run_dir(root, "dead")
    sink = JsonlSink(dead / "metrics.jsonl")
    for s in (1, 2, 3):
        sink.log({**_rec("pretrain", s), "time": now - 200 + 10 * s})
    sink.close()
    _heartbeat(dead, "running", age_s=stale_after_s(10) + 60)
    return live, dead


PLOT = "(id) => { const d = document.getElementById(id); return {layout: d.layout, data: d.data.map(t => " \
       "({name: t.name, yaxis: t.yaxis || 'y', y: Array.from(t.y), text: t.text || null, " \
       "symbol: (t.marker && t.marker.symbol) || null}))}; }"
# Every bar label of the timeline inside the drawing (the right edge cut a short bar's label).
LABELS_INSIDE = "(() => { const svg = document.querySelector('#chart-timeline .main-svg').getBoundingClientRect(); " \
                "const t = [...document.querySelectorAll('#chart-timeline text.bartext')]; " \
                "return {n: t.length, out: t.filter(e => e.getBoundingClientRect().right > svg.right + 0.5)" \
                ".map(e => e.textContent)}; })()"


@pytest.mark.slow
@pytest.mark.skipif(chromium_binary() is None, reason="no chromium (scripts/bootstrap.sh installs Debian's)")
def test_page_shows_liveness_events_and_the_ep_axes_in_chromium(tmp_path):
    """No training: the dashboard (in this process) on hand-written runs, the page in Chromium."""
    from aiohttp import web

    live, dead = _synthetic_runs(tmp_path / "runs")

    async def go():
        runner = web.AppRunner(make_app(RunIndex([tmp_path / "runs"])), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            with DriverHeartbeat(live, interval_s=1):
                async with Chromium(width=1400, height=1000) as page:
                    await page.goto(f"{url}/run/live")
                    await page.wait_for("window.moeforge && moeforge.draws > 0 && moeforge.lastDraw.records === 22", 30)
                    ep = await page.js(f"({PLOT})('chart-ep')")
                    assert {t["name"]: t["yaxis"] for t in ep["data"]} == {
                        "ep/straggler": "y2", "ep/copies": "y", "ep/peak_copies_rank": "y"}
                    assert ep["layout"]["yaxis2"]["overlaying"] == "y" and ep["layout"]["yaxis2"]["side"] == "right"
                    tl = {t["name"]: t for t in (await page.js(f"({PLOT})('chart-timeline')"))["data"]}
                    assert tl["events"]["text"] == ["preempted at step 10", "resumed at step 10",
                                                    "resized at step 10: 4 -> 2 workers (of 4)"]
                    assert tl["events"]["y"] == ["pretrain"] * 3
                    assert tl["events"]["symbol"][2] == "diamond-wide-open"
                    assert tl["stages"]["text"] == ["done, step 20 of 20", "running, step 2 of 10"]
                    labels = await page.js(LABELS_INSIDE)
                    assert labels["n"] == 2 and labels["out"] == [], labels
                    status = await page.js("document.getElementById('status').textContent")
                    assert "heartbeat" in status and "DEAD" not in status, status

                    await page.goto(f"{url}/run/dead")
                    await page.wait_for("window.moeforge && moeforge.draws > 0 && moeforge.lastDraw.records === 3", 30)
                    status = await page.js("document.getElementById('status').textContent")
                    assert status.startswith("DEAD: the driver on node-7 (pid 4242)"), status
                    tl = (await page.js(f"({PLOT})('chart-timeline')"))["data"]
                    assert tl[0]["text"][0].startswith("dead") and len(tl) == 1  # no events, no marker trace

                    await page.goto(f"{url}/")
                    await page.wait_for("document.querySelector('#runs tbody').rows.length === 2", 30)
                    rows = await page.js("[...document.querySelectorAll('#runs tbody tr')].map(r => r.innerText)")
                    driver = {r.split("\t")[0]: r.split("\t")[1] for r in rows}
                    assert driver["dead"].startswith("DEAD") and driver["live"].startswith("running"), driver
                    assert page.console_errors() == []
        finally:
            await runner.cleanup()

    asyncio.run(go())
