"""The alerting rules (infra/prometheus/alerts.yml) are valid, the scrape config that loads them
is valid, and every alert passes its unit tests on synthetic series (alerts_test.yml), all with
Debian's `promtool` (package prometheus, installed by scripts/bootstrap.sh). No Ray, no network;
about a second. The rules read only gauges that jobs/ray_metrics.py exports."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.infra.test_dashboards import EXPORTED, INFRA, PROMETHEUS, promql_metric_names

pytestmark = pytest.mark.procs  # promtool runs as a subprocess
RULES = INFRA / "prometheus" / "alerts.yml"
RULE_TESTS = INFRA / "prometheus" / "alerts_test.yml"
ALERTS = {"MoeforgeNoOptimizerStep", "MoeforgeSkippedSteps", "MoeforgeStragglerRatioHigh",
          "MoeforgeBelowRequestedWorldSize", "MoeforgeCheckpointStale"}


def promtool() -> str:
    """The promtool binary; missing means set-up did not run (the suite never skips these)."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: run `make setup` (scripts/bootstrap.sh installs Debian's prometheus "
                    "package, which ships promtool; as root, or `apt-get install prometheus`)")
    return path


def run_promtool(*args: str) -> str:
    out = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"promtool {' '.join(args)} failed:\n{out.stdout}{out.stderr}"
    return out.stdout + out.stderr


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def rule_metric_names() -> set[str]:
    """Every metric name the rules' expressions read."""
    return set().union(*(promql_metric_names(r["expr"]) for r in rules()))


def test_promtool_checks_the_rules():
    out = run_promtool("check", "rules", str(RULES))
    assert f"SUCCESS: {len(ALERTS)} rules found" in out, out


def test_promtool_checks_the_config_that_loads_them():
    assert "alerts.yml" in yaml.safe_load(PROMETHEUS.read_text())["rule_files"]
    out = run_promtool("check", "config", str(PROMETHEUS))  # reads the rule files it names too
    assert "SUCCESS: 1 rule files found" in out, out


def test_every_alert_passes_its_unit_tests():
    out = run_promtool("test", "rules", str(RULE_TESTS))
    assert "SUCCESS" in out, out


def test_each_alert_is_tested_firing_and_quiet():
    """Every alert has a case where it fires and one where it must not (`exp_alerts: []`)."""
    fired, quiet = set(), set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for t in case.get("alert_rule_test", []):
            (fired if t.get("exp_alerts") else quiet).add(t["alertname"])
    assert {r["alert"] for r in rules()} == ALERTS
    assert fired == ALERTS and quiet == ALERTS, (fired, quiet)


def test_rules_read_exported_gauges_and_name_run_and_stage():
    names = rule_metric_names()
    assert names and names <= set(EXPORTED), f"not exported by jobs/ray_metrics.py: {names - set(EXPORTED)}"
    for r in rules():
        assert "by (run, stage)" in r["expr"], r["alert"]  # Ray's own labels aggregated away
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        for key in ("summary", "description", "runbook"):
            assert "{{ $labels.run }}" in r["annotations"]["summary"], r["alert"]
            assert r["annotations"].get(key), (r["alert"], key)


def test_without_promtool_the_tests_fail_and_say_how_to_install_it(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="make setup"):
        promtool()
