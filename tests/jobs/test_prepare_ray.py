"""`moeforge prepare` on a Ray cluster (Ray Data tasks; the session's cluster, tests/ray_cluster.py): the shards equal the serial
preparation's, a rerun redoes only a unit that is missing, `--verify` catches a flipped byte, and
`moeforge run` prepares a stage's data on the driver when it is missing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from system.data import DataConfig, PackedCorpus, SourceConfig
from tests.helpers import tiny_spec, write_spec

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    return env


def test_prepare_on_ray_data_equals_serial_resumes_and_verifies(tmp_path, shared_ray):
    def _cli(*args, timeout=300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "jobs.cli", *args, "--address", shared_ray.ensure()], cwd=ROOT,
                              env={**_env(), **shared_ray.client_env()}, capture_output=True, text=True,
                              timeout=timeout)

    docs = [f"document {i} " + "lorem ipsum dolor sit amet " * (1 + i % 17) for i in range(3000)]
    path = tmp_path / "web.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data = {"cache_dir": str(tmp_path / "cache"), "seq_len": 32, "shard_mb": 0.05,
            "sources": [{"name": "web", "kind": "jsonl", "paths": [str(path)]}]}
    spec_d = tiny_spec(tmp_path)
    spec_d["data"] = data
    spec = write_spec(tmp_path / "p.yaml", spec_d)
    p = _cli("prepare", str(spec), "--workers", "2")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "web:" in p.stdout and "shards" in p.stdout
    (d,) = [x for x in (tmp_path / "cache" / "prepared").iterdir() if x.is_dir()]
    m = json.loads((d / "manifest.json").read_text())
    assert len(m["units"]) > 4 and m["documents"] == 3000
    serial = PackedCorpus.build(DataConfig(sources=[SourceConfig(name="web", kind="jsonl", paths=[str(path)])],
                                           seq_len=32, cache_dir=str(tmp_path / "serial")))
    ray_made = PackedCorpus.build(DataConfig(sources=[SourceConfig(name="web", kind="jsonl", paths=[str(path)])],
                                             seq_len=32, cache_dir=str(tmp_path / "cache"), shard_mb=0.05))
    assert ray_made.manifests["web"]["units"] == m["units"]  # opened as prepared, nothing redone
    for split in ("train", "holdout"):
        np.testing.assert_array_equal(np.asarray(getattr(ray_made, split)["web"]),
                                      np.asarray(getattr(serial, split)["web"]))

    # resumable: a lost unit (and no manifest, as after a crash) is the only one redone
    stamps = {f.name: f.stat().st_mtime_ns for f in d.iterdir() if f.name.startswith("unit-")}
    (d / "manifest.json").unlink()
    (d / "unit-00002.json").unlink()
    p = _cli("prepare", str(spec), "--workers", "2")
    assert p.returncode == 0, p.stdout + p.stderr
    after = {f.name: f.stat().st_mtime_ns for f in d.iterdir() if f.name.startswith("unit-")}
    assert [n for n in after if after[n] != stamps.get(n)] == ["unit-00002.json"]
    assert json.loads((d / "manifest.json").read_text())["units"] == m["units"]

    # --verify reads every shard: a flipped byte (same size, so the stat check passes) is named
    p = _cli("prepare", str(spec), "--verify")
    assert p.returncode == 0 and "checksums ok" in p.stdout, p.stdout + p.stderr
    f = d / "train-00001.bin"
    b = bytearray(f.read_bytes())
    b[5] ^= 0xFF
    f.write_bytes(bytes(b))
    p = _cli("prepare", str(spec), "--verify")
    assert p.returncode == 2 and "train-00001.bin" in p.stderr, p.stdout + p.stderr
