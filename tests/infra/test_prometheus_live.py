"""A real Prometheus (Debian's `prometheus`, installed by scripts/bootstrap.sh) scrapes a live
`moeforge run` through Ray's service-discovery file, with the scrape config made from
infra/prometheus/prometheus.yml; then every PromQL expression of the Grafana dashboard (template
variables filled in: this run, every stage, MoE layer 0) is evaluated through Prometheus's HTTP
API over the run's time range, and each must return at least one series of the run.

The run: an fssdp pretraining stage with evaluations, then a continual stage on another domain
with replay (so the expert-parallel, routing, evaluation, continual and replay panels all have data).
It is also the test of the Ray-metrics export itself: each query filters on the run and on the
labels the exporter sets (stage, stat, expert, layer, part).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.helpers import tiny_spec, write_spec
from tests.infra.test_dashboards import DASHBOARD, PROMETHEUS, SD_FILE
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
PROM = shutil.which("prometheus")
RUN = "promlive"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp: Path) -> Path:
    """infra/prometheus/prometheus.yml with test cadences (seconds, not tens of seconds)."""
    cfg = yaml.safe_load(PROMETHEUS.read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (job,) = cfg["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == [SD_FILE]  # the file Ray keeps up to date
    job["file_sd_configs"][0]["refresh_interval"] = "1s"
    out = tmp / "prometheus.yml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def _get(url: str, timeout: float = 10) -> dict:
    return json.loads(urllib.request.urlopen(url, timeout=timeout).read().decode())


def _expressions() -> list[tuple[str, str]]:
    d = json.loads(DASHBOARD.read_text())
    out = []
    for p in d["panels"]:
        for t in p.get("targets", []):
            if t.get("expr"):
                expr = (t["expr"].replace("$run", RUN).replace("$stage", ".*").replace("$layer", "0"))
                out.append((p["title"], expr))
    return out


def _spec(tmp: Path) -> Path:
    a, b = {"name": "english_docs", "max_documents": 30}, {"name": "python_code", "max_documents": 30}
    base = {"micro_batch_size": 2, "checkpoint_every": 1000, "eval_every": 20, "optimizer": {"lr": 3e-3}}
    spec = tiny_spec(tmp, run={"name": RUN}, data={"sources": [a]}, metrics={"ray_metrics": True},
                     parallel={"world_size": 2, "expert_strategy": "fssdp"}, stages=[])
    spec["stages"] = [
        {"name": "pretrain", **base, "steps": 160},
        {"name": "continual", "kind": "continual", "init_from": "pretrain", **base, "steps": 160,
         "data": {"sources": [b], "replay": {"fraction": 0.25}}},
    ]
    return write_spec(tmp / f"{RUN}.yaml", spec)


@pytest.mark.skipif(PROM is None, reason="Debian's prometheus is not installed (scripts/bootstrap.sh installs it)")
def test_prometheus_answers_every_dashboard_query_for_a_live_run(tmp_path):
    port = _port()
    prom = subprocess.Popen([PROM, f"--config.file={_config(tmp_path)}", f"--web.listen-address=127.0.0.1:{port}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
                            stdout=open(tmp_path / "prometheus.log", "w"), stderr=subprocess.STDOUT)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_metrics_report_interval_ms="1000")  # Ray's metrics agent: export every second
    t0 = time.time()
    try:
        run = subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(_spec(tmp_path))], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        api = f"http://127.0.0.1:{port}/api/v1"

        def stage_steps() -> dict[str, float]:
            q = urllib.parse.urlencode({"query": f'max by (stage) (ray_moeforge_step{{run="{RUN}"}})',
                                        "start": t0, "end": time.time(), "step": "1s"})
            return {s["metric"]["stage"]: max(float(v) for _, v in s["values"])
                    for s in _get(f"{api}/query_range?{q}")["data"]["result"]}

        # the scrapes up to the run's end are in (each stage seen past step 100), or the bound
        try:
            wait_until(lambda: len(steps := stage_steps()) == 2 and min(steps.values()) >= 100, 30,
                       "Prometheus to hold both stages' steps", every=0.5)
        except AssertionError:
            pass  # asserted below, with what was found
        targets = _get(f"{api}/targets")["data"]["activeTargets"]
        assert targets, "Prometheus discovered no target from Ray's service-discovery file"
        empty = []
        for title, expr in _expressions():
            q = urllib.parse.urlencode({"query": expr, "start": t0, "end": time.time(), "step": "1s"})
            res = _get(f"{api}/query_range?{q}")
            assert res["status"] == "success", (title, res)
            series = [s for s in res["data"]["result"] if s["values"]]
            if not series:
                empty.append(f"{title}: {expr}")
        assert not empty, "dashboard queries with no series of the run:\n" + "\n".join(empty)
        # and the series are this run's: both stages, their steps climbing towards 160
        steps = stage_steps()
        assert set(steps) == {"pretrain", "continual"} and min(steps.values()) >= 100, steps
    finally:
        prom.terminate()
        try:
            prom.wait(timeout=30)
        except subprocess.TimeoutExpired:
            prom.kill()
