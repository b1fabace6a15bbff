"""One live two-stage `moeforge run` (fssdp pretraining with evaluations, then continual
pretraining on another domain with replay; Ray metrics on), watched by the two things operators
watch it with:

* `moeforge dashboard` in a real browser (Debian's headless Chromium, driven over the DevTools
  protocol): live, each time the run appends metric lines the page shows them within
  LIVE_LIMIT_S; finished, every chart holds the run's numbers (loss and its parts, held-out loss
  per domain, the expert-load heatmap, ep/fssdp straggler and copies, replay share, forgetting
  and stability gap, the stage timeline), equal to metrics.jsonl; a screenshot of each (set
  MOEFORGE_SCREENSHOTS=DIR to keep them, as docs/img/ was made);
* a real Prometheus scraping it through Ray's service discovery: every Grafana query, every
  alert rule's selector and the gauges' values (tests/infra/prometheus_live.py).
One run serves both: a Ray Train job costs 15-25 s of this 2-core VM whatever its step count.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import tiny_spec, write_spec
from tests.infra.cdp import Chromium, chromium_binary
from tests.infra.prometheus_live import PROM, check_live_series, start_prometheus, stop
from tests.waiting import await_until

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
RUN = "live"
STEPS = 160  # a stage
LIVE_LIMIT_S = 5.0


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(tmp: Path) -> Path:
    a, b = {"name": "english_docs", "max_documents": 30}, {"name": "python_code", "max_documents": 30}
    # checkpoints at 50, 100, 150, 160: the checkpoint-step gauge must follow them
    base = {"micro_batch_size": 2, "checkpoint_every": 50, "eval_every": 20, "optimizer": {"lr": 3e-3}}
    spec = tiny_spec(tmp, run={"name": RUN}, data={"sources": [a]}, metrics={"progress_bar": False, "ray_metrics": True},
                     parallel={"world_size": 2, "expert_strategy": "fssdp"}, stages=[])
    spec["stages"] = [
        {"name": "pretrain", **base, "steps": STEPS},
        {"name": "continual", "kind": "continual", "init_from": "pretrain", **base, "steps": STEPS,
         "data": {"sources": [b], "replay": {"fraction": 0.25}}},
    ]
    return write_spec(tmp / f"{RUN}.yaml", spec)


def _records(path: Path) -> list[dict]:
    out = []
    if path.is_file():
        for line in path.read_text().split("\n")[:-1]:  # complete lines only
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def _keep(shot: Path) -> None:
    keep = os.environ.get("MOEFORGE_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)


TRACES = "(id) => { const d = document.getElementById(id); return d && !d.hidden && d.data ? " \
         "d.data.map(t => ({name: t.name, x: Array.from(t.x), y: t.y ? Array.from(t.y) : null, " \
         "z: t.z || null, customdata: t.customdata || null, text: t.text || null})) : null; }"


async def _traces(page, chart: str):
    return await page.js(f"({TRACES})('chart-{chart}')")


@pytest.mark.skipif(chromium_binary() is None or PROM is None,
                    reason="no chromium or prometheus (scripts/bootstrap.sh installs Debian's)")
def test_a_live_run_in_chromium_and_prometheus(tmp_path):
    spec = _spec(tmp_path)
    runs = tmp_path / "runs"
    runs.mkdir()
    metrics = runs / RUN / "metrics.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_metrics_report_interval_ms="1000")  # Ray's metrics agent: export every second
    prom, prom_port = start_prometheus(tmp_path)
    t0 = time.time()
    port = _port()
    server = subprocess.Popen([sys.executable, "-m", "jobs.cli", "dashboard", str(runs), "--port", str(port)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert "dashboard at" in server.stdout.readline()
    url = f"http://127.0.0.1:{port}"
    job = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(spec)], cwd=ROOT, env=env,
                           stdout=open(tmp_path / "run.log", "w"), stderr=subprocess.STDOUT)

    async def go():
        async with Chromium(width=1400, height=1000) as page:
            # the index lists the run once it has written its spec
            await page.goto(url + "/")
            await page.wait_for(f"document.querySelector('#runs tbody').innerText.includes('{RUN}')", 120)
            ended = lambda: (f"the run ended: {(tmp_path / 'run.log').read_text()[-3000:]}"  # noqa: E731
                             if job.poll() is not None else None)
            await await_until(lambda: len(_records(metrics)) >= 5, 300, "the run's first metrics", every=0.2,
                              abort=ended)
            await page.goto(f"{url}/run/{RUN}")
            await page.wait_for("window.moeforge && window.moeforge.draws > 0", 30)
            # live: every batch of new lines shows up within LIVE_LIMIT_S
            lags, live_shot = [], None
            while job.poll() is None:
                n = len(_records(metrics))
                t = time.monotonic()
                try:
                    await page.wait_for(f"moeforge.lastDraw && moeforge.lastDraw.records >= {n}", LIVE_LIMIT_S, 0.05)
                except Exception:
                    if job.poll() is not None:
                        break  # the run ended (and may have replaced its file) while we waited
                    raise
                lags.append((n, time.monotonic() - t))
                stages = await page.js("Object.keys(moeforge.lastDraw.lastStep)")
                if live_shot is None and "continual" in stages:
                    live_shot = await page.screenshot(tmp_path / "dashboard-live.png")
                # the next batch of lines (or the end of the run)
                await await_until(lambda: job.poll() is not None or len(_records(metrics)) > n, 60,
                                  "new metrics lines", every=0.25)
            assert job.wait() == 0, (tmp_path / "run.log").read_text()[-3000:]
            grew = sorted({n for n, _ in lags})
            assert len(grew) >= 5, f"the page was seen to grow only {len(grew)} times: {lags}"
            print(f"live: the page grew {len(grew)} times; lag from file to page: max "
                  f"{max(lag for _, lag in lags):.2f} s, median {sorted(lag for _, lag in lags)[len(lags) // 2]:.2f} s")
            assert max(lag for _, lag in lags) <= LIVE_LIMIT_S
            assert live_shot is not None, "no screenshot while the continual stage ran"
            _keep(live_shot)

            # finished: the page converges on the whole file, then every chart is checked
            recs = _records(metrics)
            await page.wait_for(f"moeforge.lastDraw.records === {len(recs)} && "
                                "document.getElementById('status').textContent.startsWith('finished')", 20)
            train = [r for r in recs if "loss" in r]
            loss = {t["name"]: t for t in await _traces(page, "loss")}
            assert loss["loss"]["y"] == [r["loss"] for r in train]
            assert loss["ce"]["y"] == [r["ce"] for r in train]
            assert [c[0] for c in loss["loss"]["customdata"]] == [r["stage"] for r in train]
            # job step: the continual stage's steps follow the pretraining stage's
            assert loss["loss"]["x"] == [r["step"] + (STEPS if r["stage"] == "continual" else 0) for r in train]

            ev = {t["name"]: t["y"] for t in await _traces(page, "eval")}
            assert set(ev) == {"english_docs", "python_code"}
            assert ev["python_code"] == [r["eval/python_code/loss"] for r in recs if "eval/python_code/loss" in r]

            for chart, keys in (("ep", ("ep/straggler", "ep/copies")),
                                ("replay", ("data/replay_fraction", "data/replay_fraction_total")),
                                ("continual", ("cl/forgetting", "cl/old/gap_depth")),
                                ("lr", ("lr",)), ("throughput", ("tokens_per_s",))):
                got = {t["name"]: t["y"] for t in (await _traces(page, chart)) or []}
                for k in keys:
                    want = [r[k] for r in recs if k in r]
                    assert want, f"the run logged no {k}"
                    assert got.get(k) == pytest.approx(want), f"chart {chart}: {k}"

            (heat,) = await _traces(page, "heatmap")
            rows = [r["moe/0/tokens_per_expert"] for r in recs if "moe/0/tokens_per_expert" in r]
            assert len(heat["z"]) == len(rows[0]) and len(heat["z"][0]) == len(rows)
            for j in (0, len(rows) // 2, len(rows) - 1):
                mean = sum(rows[j]) / len(rows[j])
                assert [heat["z"][e][j] for e in range(len(rows[j]))] == pytest.approx([c / mean for c in rows[j]])

            (timeline,) = await _traces(page, "timeline")
            assert timeline["y"] == ["pretrain", "continual"]
            assert [t.split(",")[0] for t in timeline["text"]] == ["done", "done"]
            assert await page.js("document.getElementById('absent').textContent") == "Not in this run: Distillation."
            assert page.console_errors() == []
            _keep(await page.screenshot(tmp_path / "dashboard-finished.png"))

    try:
        asyncio.run(go())
        check_live_series(prom_port, RUN, t0, STEPS)
    finally:
        for p in (job, server, prom):
            if p.poll() is None:
                stop(p)
