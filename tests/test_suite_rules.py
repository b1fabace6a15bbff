"""Rules the test suite keeps: no fixed sleeps (waiting goes through tests/waiting.py), no leaked
environment variables, and every test runs under a time limit."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SLEEP = re.compile(r"\bsleep\s*\(")


def test_no_fixed_sleeps_outside_the_wait_helper():
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        if path.name == "waiting.py" and path.parent == TESTS:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if SLEEP.search(line):
                found.append(f"{path.relative_to(TESTS.parent)}:{n}: {line.strip()}")
    assert not found, "fixed sleeps (use tests.waiting.wait_until / await_until):\n" + "\n".join(found)


def test_the_rule_sees_a_sleep(tmp_path):
    # the pattern the rule relies on, on the forms a sleep takes
    call = "sleep" + " ("  # not written out, or this file would break the rule
    for line in (f"time.{call}1)", f"await asyncio.{call}0.5)", f"{call}2)", f"from time import sleep; {call}1)"):
        assert SLEEP.search(line), line
    assert not SLEEP.search("sleepy = 1")


def test_every_test_has_a_time_limit(request):
    """pytest-timeout is active with a default limit; end-to-end (slow) tests get the larger one."""
    cfg = request.config
    assert cfg.pluginmanager.hasplugin("timeout"), "pytest-timeout is not installed (pyproject's test extra)"
    assert float(cfg.getini("timeout")) > 0
    assert cfg.getini("timeout_method") == "signal"  # a hang fails that test, not the whole session
    slow = [i for i in request.session.items if i.get_closest_marker("slow")]
    for item in slow:
        mark = item.get_closest_marker("timeout")
        assert mark is not None and mark.args[0] > float(cfg.getini("timeout")), item.nodeid


def test_a_hang_fails_within_the_limit(pytester):
    """A test that blocks is stopped by its limit and reported as failed, with a stack dump."""
    pytester.makepyfile(test_hang="""
import threading

def test_blocks():
    threading.Event().wait()
""")
    res = pytester.runpytest_inprocess("--timeout=1", "-p", "no:cacheprovider")
    res.assert_outcomes(failed=1)
    assert "Timeout" in res.stdout.str() and "test_blocks" in res.stdout.str()


def test_a_leaked_environment_variable_fails_the_test_and_is_put_back(pytester, monkeypatch):
    """Kept ranks and Ray drivers inherit the pytest process's environment, so a test that sets a
    variable without monkeypatch fails (tests/conftest.py `_environment_kept`), and the variable
    is removed before the next test."""
    monkeypatch.delenv("MOEFORGE_LEAK_PROBE", raising=False)
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_leak="""
import os

def test_leaks():
    os.environ["MOEFORGE_LEAK_PROBE"] = "1"

def test_sees_nothing_and_patches(monkeypatch):
    assert "MOEFORGE_LEAK_PROBE" not in os.environ
    monkeypatch.setenv("MOEFORGE_LEAK_PROBE", "2")
""")
    res = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    res.assert_outcomes(passed=2, errors=1)
    assert "test_leaks left os.environ changed (use monkeypatch): MOEFORGE_LEAK_PROBE='1'" in res.stdout.str()
    assert "MOEFORGE_LEAK_PROBE" not in os.environ


def test_the_wait_helper_returns_times_out_and_aborts():
    import asyncio

    from tests.waiting import WaitTimeout, await_until, wait_until

    calls = []
    assert wait_until(lambda: calls.append(1) or (len(calls) >= 3 and "ready"), 5, "three looks", every=0.01) == "ready"
    with pytest.raises(WaitTimeout, match="timed out after 0.05 s waiting for nothing"):
        wait_until(lambda: False, 0.05, "nothing", every=0.01)
    with pytest.raises(AssertionError, match="it died while waiting for the run"):
        wait_until(lambda: False, 5, "the run", abort=lambda: "it died")

    async def later():
        calls.append(1)
        return len(calls) >= 5

    assert asyncio.run(await_until(later, 5, "two more looks", every=0.01)) is True


PARTS = '''
import os
from pathlib import Path

import pytest

def _state():
    group = Path("/proc/self/autogroup")
    return os.sched_getscheduler(0), group.read_text() if group.exists() else None

@pytest.mark.slow
def test_slow_part():  # as the runner's caller: its policy, its session's autogroup
    assert _state() == (int(os.environ["CALLER_POLICY"]), os.environ["CALLER_AUTOGROUP"] or None)

def test_rest_part():
    policy, group = _state()
    assert policy == os.SCHED_IDLE and (group is None or "nice 19" in group)

def test_rest_fails():
    assert False, "the rest's own failure"
'''


@pytest.mark.procs
def test_make_test_runs_the_rest_beside_the_slow_tests_at_the_lowest_priority(tmp_path):
    """tests/run_suite.py (make test): the slow tests as the caller runs (this test runs in the
    rest part itself), the rest at SCHED_IDLE in an autogroup of its own at nice 19; both parts'
    results shown, and a failure in either fails the run."""
    import subprocess
    import sys

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "test_parts.py").write_text(PARTS)
    group = Path("/proc/self/autogroup")
    env = {**os.environ, "MOEFORGE_SUITE_TMP": str(tmp_path / "base"), "CALLER_POLICY": str(os.sched_getscheduler(0)),
           "CALLER_AUTOGROUP": group.read_text() if group.exists() else ""}
    res = subprocess.run([sys.executable, str(TESTS / "run_suite.py"), "-p", "no:cacheprovider", str(tmp_path / "t")],
                         cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "1 passed, 2 deselected" in out and "1 failed, 1 passed, 1 deselected" in out, out
    assert "the rest's own failure" in out and "slow tests rc 0" in out and "the rest rc 1" in out, out
    refused = subprocess.run([sys.executable, str(TESTS / "run_suite.py"), "-m", "slow"], cwd=TESTS.parent, env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "run pytest directly to use -m" in refused.stderr
