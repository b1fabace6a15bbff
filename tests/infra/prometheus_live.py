"""A real Prometheus (Debian's `prometheus`, installed by scripts/bootstrap.sh) scraping a live
`moeforge run` through Ray's service-discovery file, with the scrape config made from
infra/prometheus/prometheus.yml: `start_prometheus` before the run, `check_live_series` after it.
The live run is tests/infra/test_dashboard_browser.py's (Chromium watches the same run).

The checks: every PromQL expression of the Grafana dashboard (template variables filled in: this
run, every stage, MoE layer 0) is evaluated through Prometheus's HTTP API over the run's time
range, and each must return at least one series of the run. The alerting rules
(infra/prometheus/alerts.yml) are loaded too: every metric selector their expressions use has a
series of the run (with the rules' own label matchers), the rules evaluated on the real series
without an error, the world-size gauges say 2 of 2, and the checkpoint-step gauge followed the
stages' checkpoints. It is also the test of the Ray-metrics export itself: each query filters
on the run and on the labels the exporter sets (stage, stat, expert, layer, part).
"""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from tests.infra.test_alert_rules import RULES, rules
from tests.infra.test_dashboards import DASHBOARD, PROMETHEUS, SD_FILE
from tests.waiting import wait_until

PROM = shutil.which("prometheus")


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


def _expressions(run: str) -> list[tuple[str, str]]:
    d = json.loads(DASHBOARD.read_text())
    out = []
    for p in d["panels"]:
        for t in p.get("targets", []):
            if t.get("expr"):
                expr = (t["expr"].replace("$run", run).replace("$stage", ".*").replace("$layer", "0"))
                out.append((p["title"], expr))
    return out


def _rule_selectors() -> list[str]:
    """Each ray_moeforge_* selector of the alerting rules, with its label matchers."""
    found = set()
    for r in rules():
        for name, matchers in re.findall(r"\b(ray_moeforge_\w+)(\{[^}]*\})?", r["expr"]):
            found.add(name + matchers)
    return sorted(found)


def _with_run(selector: str, run: str) -> str:
    name, _, matchers = selector.partition("{")
    return f'{name}{{run="{run}"{", " + matchers.rstrip("}") if matchers else ""}}}'


def start_prometheus(tmp: Path) -> tuple[subprocess.Popen, int]:
    """Prometheus on a free loopback port, scraping every second; (process, port)."""
    port = _port()
    prom = subprocess.Popen([PROM, f"--config.file={_config(tmp)}", f"--web.listen-address=127.0.0.1:{port}",
                             f"--storage.tsdb.path={tmp / 'tsdb'}"],
                            stdout=open(tmp / "prometheus.log", "w"), stderr=subprocess.STDOUT)
    return prom, port


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def check_live_series(port: int, run: str, t0: float, steps: int) -> None:
    """After the run (stages `pretrain` and `continual` of `steps` steps, checkpoints every 50):
    what Prometheus scraped answers the dashboard, the alert rules and the gauges' values."""
    api = f"http://127.0.0.1:{port}/api/v1"

    def query(expr: str) -> dict:
        q = urllib.parse.urlencode({"query": expr, "start": t0, "end": time.time(), "step": "1s"})
        res = _get(f"{api}/query_range?{q}")
        assert res["status"] == "success", (expr, res)
        return res

    def stage_steps() -> dict[str, float]:
        return {s["metric"]["stage"]: max(float(v) for _, v in s["values"])
                for s in query(f'max by (stage) (ray_moeforge_step{{run="{run}"}})')["data"]["result"]}

    # the scrapes up to the run's end are in (each stage seen past 60% of its steps), or the bound
    least = int(0.6 * steps)
    try:
        wait_until(lambda: len(got := stage_steps()) == 2 and min(got.values()) >= least, 30,
                   "Prometheus to hold both stages' steps", every=0.5)
    except AssertionError:
        pass  # asserted below, with what was found
    targets = _get(f"{api}/targets")["data"]["activeTargets"]
    assert targets, "Prometheus discovered no target from Ray's service-discovery file"
    empty = [f"{title}: {expr}" for title, expr in _expressions(run)
             if not [s for s in query(expr)["data"]["result"] if s["values"]]]
    assert not empty, "dashboard queries with no series of the run:\n" + "\n".join(empty)

    def per_stage(expr: str, how=max) -> dict[str, float]:
        return {s["metric"].get("stage", ""): how(float(v) for _, v in s["values"])
                for s in query(expr)["data"]["result"] if s["values"]}

    # every gauge the alerting rules read, as they select it, has series of both stages
    selectors = _rule_selectors()
    assert len(selectors) >= 6, selectors
    missing = [sel for sel in selectors
               if set(per_stage(f"max by (stage) ({_with_run(sel, run)})")) != {"pretrain", "continual"}]
    assert not missing, "alert-rule selectors with no series of each stage of the run:\n" + "\n".join(missing)
    # their values: 2 ranks of 2 asked for; checkpoints followed (the last one seen >= 100)
    for name in ("ray_moeforge_world_size", "ray_moeforge_requested_world_size"):
        for how in (min, max):
            assert per_stage(f'max by (stage) ({name}{{run="{run}"}})', how) == {"pretrain": 2, "continual": 2}
    assert per_stage(f'max by (stage) (ray_moeforge_checkpoint_every{{run="{run}"}})') == \
        {"pretrain": 50, "continual": 50}
    ckpt = per_stage(f'max by (stage) (ray_moeforge_checkpoint_step{{run="{run}"}})')
    assert set(ckpt) == {"pretrain", "continual"} and min(ckpt.values()) >= 100, ckpt
    assert per_stage(f'max by (stage) (ray_moeforge_skipped_steps{{run="{run}"}})') == \
        {"pretrain": 0, "continual": 0}
    # Prometheus loaded the rules and evaluated them on these series without an error
    groups = _get(f"{api}/rules")["data"]["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(loaded) == {r["alert"] for r in rules()}, sorted(loaded)
    bad = {n: r.get("lastError") for n, r in loaded.items() if r["health"] != "ok"}
    assert not bad, f"alerting rules that failed on the live series: {bad}"
    # and the series are this run's: both stages, their steps climbing towards the end
    got = stage_steps()
    assert set(got) == {"pretrain", "continual"} and min(got.values()) >= least, got
