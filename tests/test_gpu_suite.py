"""bench/gpu_suite.py --dry-run: every case of the GPU suite runs its code path on CPU (tiny sizes,
`moeforge run` on gloo, megablocks and the CUDA tests skipped) and lands in one JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CASES = ("experts_cuda_tests", "moe_layer", "fssdp_overhead", "hf_cuda_check", "moeforge_run")


@pytest.mark.slow
def test_gpu_suite_dry_run(tmp_path, shared_ray):
    out = tmp_path / "suite.json"
    # its `moeforge run` joins the session's Ray cluster (on the GPU machine it starts an embedded
    # one; embedded Ray is what tests/infra/ runs on)
    env = {**os.environ, "RAY_ADDRESS": shared_ray.ensure(), **shared_ray.client_env()}
    p = subprocess.run([sys.executable, "bench/gpu_suite.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=420, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] is True and res["machine"]["device"] == "cpu"
    cases = res["cases"]
    assert set(cases) == set(CASES)
    bad = {n: c.get("error") for n, c in cases.items() if c["status"] == "failed"}
    assert not bad, bad
    assert all(c["status"] in ("ok", "skipped") for c in cases.values())

    run = cases["moeforge_run"]
    assert run["status"] == "ok" and run["tokens_per_s"] > 0 and run["steps"] > 0
    assert run["flops_per_token"] > 6 * run["active_params"] > 0
    assert run["mfu"] is None  # no peak for a CPU

    moe = cases["moe_layer"]
    assert moe["status"] == "ok"
    for name in ("reference", "grouped"):
        b = moe["backends"][name]
        assert b["status"] == "ok" and b["ms_per_iter"] > 0 and b["tokens_per_s"] > 0 and b["tflops"] > 0
    assert moe["backends"]["megablocks"]["status"] == "skipped"  # CUDA only

    tests = cases["experts_cuda_tests"]
    assert tests["status"] == "skipped" and tests["skipped"] > 0 and tests["failed"] == tests["errors"] == 0
    assert cases["fssdp_overhead"]["layer"]["ms"]["fssdp"] > 0
    assert cases["hf_cuda_check"]["result"]["ok"] is True
