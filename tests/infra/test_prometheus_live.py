"""A real Prometheus (Debian's `prometheus`, installed by scripts/bootstrap.sh) scrapes a live
`moeforge run` through Ray's service-discovery file, with the scrape config made from
infra/prometheus/prometheus.yml; then every PromQL expression of the Grafana dashboard (template
variables filled in: this run, every stage, MoE layer 0) is evaluated through Prometheus's HTTP
API over the run's time range, and each must return at least one series of the run.

The alerting rules (infra/prometheus/alerts.yml) are loaded too: every metric selector their
expressions use has a series of the run (with the rules' own label matchers), the rules evaluated
on the real series without an error, the world-size gauges say 2 of 2, and the checkpoint-step
gauge followed the stages' checkpoints.

The run: an fssdp pretraining stage with evaluations, then a continual stage on another domain
with replay (so the expert-parallel, routing, evaluation, continual and replay panels all have data).
It is also the test of the Ray-metrics export itself: each query filters on the run and on the
labels the exporter sets (stage, stat, expert, layer, part).
"""
from __future__ import annotations

import json
import os
import re
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
from tests.infra.test_alert_rules import RULES, rules
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
    """infra/prometheus/prometheus.yml with test cadences (seconds, not tens of seconds), loading
    the alerting rules from the repository."""
    cfg = yaml.safe_load(PROMETHEUS.read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    assert cfg["rule_files"] == [RULES.name]
    cfg["rule_files"] = [str(RULES)]
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


def _rule_selectors() -> list[str]:
    """Each ray_moeforge_* selector of the alerting rules, with its label matchers."""
    found = set()
    for r in rules():
        for name, matchers in re.findall(r"\b(ray_moeforge_\w+)(\{[^}]*\})?", r["expr"]):
            found.add(name + matchers)
    return sorted(found)


def _with_run(selector: str) -> str:
    name, _, matchers = selector.partition("{")
    return f'{name}{{run="{RUN}"{", " + matchers.rstrip("}") if matchers else ""}}}'


def _spec(tmp: Path) -> Path:
    a, b = {"name": "english_docs", "max_documents": 30}, {"name": "python_code", "max_documents": 30}
    # checkpoints at 50, 100, 150, 160: the checkpoint-step gauge must follow them
    base = {"micro_batch_size": 2, "checkpoint_every": 50, "eval_every": 20, "optimizer": {"lr": 3e-3}}
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

        def per_stage(expr: str, how=max) -> dict[str, float]:
            q = urllib.parse.urlencode({"query": expr, "start": t0, "end": time.time(), "step": "1s"})
            res = _get(f"{api}/query_range?{q}")
            assert res["status"] == "success", (expr, res)
            return {s["metric"].get("stage", ""): how(float(v) for _, v in s["values"])
                    for s in res["data"]["result"] if s["values"]}

        # every gauge the alerting rules read, as they select it, has series of both stages
        selectors = _rule_selectors()
        assert len(selectors) >= 6, selectors
        missing = [sel for sel in selectors
                   if set(per_stage(f"max by (stage) ({_with_run(sel)})")) != {"pretrain", "continual"}]
        assert not missing, "alert-rule selectors with no series of each stage of the run:\n" + "\n".join(missing)
        # their values: 2 ranks of 2 asked for; checkpoints followed (the last one seen >= 100)
        for name in ("ray_moeforge_world_size", "ray_moeforge_requested_world_size"):
            for how in (min, max):
                assert per_stage(f'max by (stage) ({name}{{run="{RUN}"}})', how) == {"pretrain": 2, "continual": 2}
        assert per_stage(f'max by (stage) (ray_moeforge_checkpoint_every{{run="{RUN}"}})') == \
            {"pretrain": 50, "continual": 50}
        ckpt = per_stage(f'max by (stage) (ray_moeforge_checkpoint_step{{run="{RUN}"}})')
        assert set(ckpt) == {"pretrain", "continual"} and min(ckpt.values()) >= 100, ckpt
        assert per_stage(f'max by (stage) (ray_moeforge_skipped_steps{{run="{RUN}"}})') == \
            {"pretrain": 0, "continual": 0}
        # Prometheus loaded the rules and evaluated them on these series without an error
        groups = _get(f"{api}/rules")["data"]["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        assert set(loaded) == {r["alert"] for r in rules()}, sorted(loaded)
        bad = {n: r.get("lastError") for n, r in loaded.items() if r["health"] != "ok"}
        assert not bad, f"alerting rules that failed on the live series: {bad}"
        # and the series are this run's: both stages, their steps climbing towards 160
        steps = stage_steps()
        assert set(steps) == {"pretrain", "continual"} and min(steps.values()) >= 100, steps
    finally:
        prom.terminate()
        try:
            prom.wait(timeout=30)
        except subprocess.TimeoutExpired:
            prom.kill()
