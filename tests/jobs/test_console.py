"""`jobs.console.capture_output`: a worker's Python and file-descriptor output lands in its log
file; only `[moeforge]` lines are forwarded; the streams are restored afterwards."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import os, sys, warnings
from pathlib import Path

import pytest
from jobs.console import capture_output
got = []
with capture_output(Path(sys.argv[1]), got.append):
    print("[moeforge] hello from the worker")
    print("chatter from a library")
    warnings.warn("a FutureWarning", FutureWarning)
    os.write(1, b"[moeforge] through the file descriptor\n")
    os.system("echo from a subprocess")
    sys.stderr.write("[moeforge] on stderr\n")
print("after:", got)
'''


@pytest.mark.procs
def test_capture_output_logs_everything_and_forwards_moeforge_lines(tmp_path):
    log = tmp_path / "logs" / "rank0.log"
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    text = log.read_text()
    for s in ("[moeforge] hello from the worker", "chatter from a library", "a FutureWarning",
              "through the file descriptor", "from a subprocess", "[moeforge] on stderr"):
        assert s in text, s
    # nothing reached the real streams while captured; Python-level moeforge lines were forwarded
    assert res.stdout.strip() == "after: ['[moeforge] hello from the worker', '[moeforge] on stderr']"
    assert res.stderr == ""
