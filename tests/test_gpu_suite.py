"""bench/gpu_suite.py --dry-run: every case of the GPU suite runs its code path on CPU (tiny sizes,
gloo, megablocks and the CUDA tests skipped) and lands in one JSON. No Ray: the training cases
start `jobs.torchrun` with torch's launcher (Ray refused at import, as on the GPU machines), the
multi-GPU script runs 2 gloo ranks, and the wheels are installed offline from a folder.
FlexAttention's comparison compiles for ~20-50 s on this VM: its case runs a stub here
(tests/system/test_attention.py runs the comparison's dry run itself)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu_cases  # noqa: E402
import gpu_suite  # noqa: E402

STRATEGIES = ("replicated", "ep", "fssdp", "deepspeed_moe")


def _fake_wheel(folder: Path) -> Path:
    """A one-module wheel (`moeforge_wheel_probe`) that no environment has."""
    folder.mkdir()
    path = folder / "moeforge_wheel_probe-1.0-py3-none-any.whl"
    info = "moeforge_wheel_probe-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("moeforge_wheel_probe.py", "VALUE = 42\n")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: moeforge-wheel-probe\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


FLEX_STUB = """
def compare_flex_with_reference(device="cuda", dtype=None, dry_run=False):
    return {"device": "cpu", "dtype": "float32", "max_abs": 1e-7, "max_rel": 2e-7, "cases": [{"heads": 4}]}
"""


@pytest.mark.procs
@pytest.mark.timeout(450)  # ~60 s alone; its own --budget-s bounds it on a busy machine
def test_gpu_suite_dry_run(tmp_path):
    out = tmp_path / "suite.json"
    wheels = _fake_wheel(tmp_path / "wheels").parent
    (tmp_path / "stub").mkdir()
    (tmp_path / "stub" / "flex_stub.py").write_text(FLEX_STUB)
    env = {**os.environ, "GPU_SUITE_FLEX_MODULE": "flex_stub",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "stub"), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, "bench/gpu_suite.py", "--dry-run", "--out", str(out), "--wheels", str(wheels),
                        "--budget-s", "400"], cwd=ROOT, capture_output=True, text=True, timeout=440, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] is True and res["machine"]["device"] == "cpu" and res["budget_s"] == 400
    # installed offline into the work dir (pip, not unpacked by hand); the venv's own packages left alone
    assert res["wheels"]["installed"] == ["moeforge_wheel_probe-1.0-py3-none-any.whl"]
    assert res["wheels"]["pip"]["rc"] == 0 and "unpacked" not in res["wheels"]
    assert res["missing"] == []
    cases = res["cases"]
    assert set(cases) == set(gpu_suite.CASE_NAMES)
    bad = {n: c.get("error") for n, c in cases.items() if c["status"] == "failed"}
    assert not bad, bad
    flex = cases["flex_attention"]  # the wiring, with the stub's result
    assert flex["status"] == "ok" and flex["max_rel"] == 2e-7 and flex["max_rel_allowed"] == 1e-4
    assert flex["cases"] == [{"heads": 4}]

    for s in STRATEGIES:
        run = cases[f"train_{s}"]
        assert run["status"] == "ok" and run["steps"] == 5 and run["tokens_per_s"] > 0, (s, run)
        assert run["flops_per_token"] > 6 * run["active_params"] > 0
        assert run["mfu"] is None  # no peak for a CPU
        assert run["ray_imports"] == []  # the launch never tried to import Ray
        assert run["host_syncs_counted_by"] == "dispatch" and run["host_syncs_per_step"] >= 0
        assert run["host_collectives_per_step"] >= 1  # at least the step's logging all-reduce
        assert run["skipped_steps"] == 1  # the injected Inf at step 3
        if s in ("ep", "fssdp"):
            assert run["straggler_ratio"] >= 1.0
        mem = run["memory"]  # moeforge estimate beside max_memory_allocated (None without CUDA)
        assert mem["estimate_bytes"] > 0 and mem["cuda_peak_bytes"] is None, mem
    guard = cases["bf16_skipped_step"]
    assert guard["status"] == "ok"
    for s in STRATEGIES:
        g = guard["strategies"][s]
        assert g["ok"] and g["unchanged_by_skipped_step"] == g["tensors"] > 10 and g["step_skipped"] == [0, 1, 0]

    coll = cases["collectives_cost"]
    assert coll["status"] == "ok" and coll["backend"] == "gloo" and coll["staged"] is False
    assert coll["host_tensor_us"] > 0 and coll["device_tensor_read_us"] > 0

    multi = cases["multi_gpu"]
    assert multi["status"] == "ok" and multi["nproc"] == 2 and multi["backend"] == "gloo"
    for s in ("ep", "fssdp", "fssdp_sharded"):  # the last: P = 1, expert state sharded over the 2 ranks
        r = multi["strategies"][s]
        assert r["tokens_per_s"] > 0 and r["straggler_ratio"] >= 1.0 and r["ray_imports"] == []
        assert r["host_syncs_per_step"] >= 0 and r["bytes_per_step"]
        assert r["expert_state_bytes_rank"] > 0 and r["memory"]["estimate_bytes"] > 0

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


def test_flex_verdict_uses_the_dtype_tolerance():
    assert gpu_cases.flex_verdict({"dtype": "bfloat16", "max_rel": 0.01}) == (True, 5e-2)
    assert gpu_cases.flex_verdict({"dtype": "bfloat16", "max_rel": 0.2})[0] is False
    assert gpu_cases.flex_verdict({"dtype": "float32", "max_rel": 1e-3})[0] is False


def test_cuda_sync_counting_sees_every_sync_warning(monkeypatch):
    """The probe's CUDA mode counts each warning of torch.cuda's sync debug mode, also after an
    import turned warnings off, and passes other warnings on (torch.cuda's calls faked on CPU)."""
    import warnings

    import torch
    import train_probe

    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    counts = train_probe._Counts()
    other = []
    monkeypatch.setattr(warnings, "showwarning", lambda m, *a, **k: other.append(str(m)))
    with train_probe._CudaSyncs(counts) as ctx:
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation")
        warnings.simplefilter("ignore")  # what a library may do at import
        ctx.refresh()
        warnings.warn("called a synchronizing CUDA operation")
        warnings.simplefilter("always")
        warnings.warn("something else")
    assert counts.sync_kinds == {"cuda_sync": 3} and other == ["something else"] and modes == ["warn", 0]
