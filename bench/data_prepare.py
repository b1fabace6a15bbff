#!/usr/bin/env python
"""Data at scale: `moeforge prepare` throughput, and a training rank's memory and start-up
with a small and a large prepared corpus, against the path before prepared shards.

    python bench/data_prepare.py [--gb 1.0] [--small-mb 100] [--old-rev 2c51a40] [--parts 1,2,3]

1. prepare throughput on generated JSON lines (about --gb GB) with 1 and 2 Ray Data workers,
   against the BPE tokenizer's own batched encode of the same documents in one process on one
   thread (RAYON_NUM_THREADS=1), all in this run; per-core ratio = prepare MB/s / workers / bare MB/s.
2. `moeforge run` (2 CPU workers, byte tokenizer, prepared corpus of --small-mb MB and of --gb GB):
   seconds to the first metrics line, and rank 0's peak private memory (RssAnon of its process,
   sampled every 50 ms).
3. The same run on the tree before prepared shards (`git worktree` of --old-rev), for the small
   corpus (and the large one with --old-large: every rank then reads and tokenizes it all).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VOCAB = [w for w in re.findall(r"[a-z]+", (ROOT / "README.md").read_text().lower()) if len(w) > 1]


def generate(path: Path, target_bytes: int, seed: int = 0) -> int:
    """JSON lines of English-like documents (README words, Zipf-ish weights) until target_bytes."""
    if path.is_file() and path.stat().st_size >= target_bytes:
        return path.stat().st_size
    rng = random.Random(seed)
    words = sorted(set(VOCAB))
    weights = [1.0 / (i + 1) for i in range(len(words))]
    rng.shuffle(words)
    size = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        while size < target_bytes:
            block = rng.choices(words, weights, k=200_000)
            at = 0
            lines = []
            while at < len(block):
                n = rng.randint(40, 900)
                doc = " ".join(block[at:at + n])
                lines.append(json.dumps({"text": doc.capitalize() + "."}) + "\n")
                at += n
            text = "".join(lines)
            f.write(text)
            size += len(text)
    os.replace(tmp, path)
    return size


def _env(extra=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", **(extra or {}))
    return env


def part1(tmp: Path, data: Path) -> None:
    from system.data import DataConfig, SourceConfig, TokenizerConfig
    from system.data.dataset import corpus_tokenizer
    from system.data.units import plan_units, unit_documents

    src = SourceConfig(name="gen", kind="jsonl", paths=[str(data)])
    cfg = DataConfig(sources=[src], cache_dir=str(tmp / "cache1"),
                     tokenizer=TokenizerConfig(kind="bpe", vocab_size=4096, train_sample_bytes=20 << 20))
    t = time.perf_counter()
    tok = corpus_tokenizer(cfg)
    print(f"BPE 4096 trained on a 20 MiB sample in {time.perf_counter() - t:.1f}s", flush=True)
    # bare: the tokenizer's batched encode, one thread, same documents (reading not timed)
    code = (
        "import sys, time, json; sys.path.insert(0, sys.argv[1]);"
        "from system.data import DataConfig, SourceConfig, TokenizerConfig;"
        "from system.data.dataset import corpus_tokenizer;"
        "from system.data.units import plan_units, unit_documents;"
        "src = SourceConfig(name='gen', kind='jsonl', paths=[sys.argv[2]]);"
        "cfg = DataConfig(sources=[src], cache_dir=sys.argv[3], tokenizer=TokenizerConfig(kind='bpe', "
        "vocab_size=4096, train_sample_bytes=20 << 20));"
        "tok = corpus_tokenizer(cfg); spent = 0.0; n = 0; batch = [];\n"
        "for u in plan_units(src):\n"
        "  for d in unit_documents(src, u):\n"
        "    batch.append(d)\n"
        "    if len(batch) == 512:\n"
        "      t = time.perf_counter(); tok.encode_batch(batch); spent += time.perf_counter() - t;"
        " n += sum(len(x.encode()) for x in batch); batch = []\n"
        "if batch:\n"
        "  t = time.perf_counter(); tok.encode_batch(batch); spent += time.perf_counter() - t;"
        " n += sum(len(x.encode()) for x in batch)\n"
        "print(json.dumps({'bytes': n, 'seconds': spent}))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), str(data), str(tmp / "cache1")],
                         env=_env({"RAYON_NUM_THREADS": "1"}), capture_output=True, text=True, check=True)
    bare = json.loads(out.stdout.strip().splitlines()[-1])
    bare_mbs = bare["bytes"] / 1e6 / bare["seconds"]
    print(f"bare encode_batch, 1 thread: {bare['bytes'] / 1e6:.0f} MB in {bare['seconds']:.1f}s = {bare_mbs:.2f} MB/s",
          flush=True)
    rows = []
    for workers in (1, 2):
        cache = tmp / f"cache-w{workers}"
        shutil.rmtree(cache, ignore_errors=True)
        shutil.copytree(tmp / "cache1", cache, ignore=shutil.ignore_patterns("prepared"))  # the same tokenizer
        spec = _spec(tmp / f"w{workers}.yaml", tmp, data, cache, tokenizer="bpe")
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "jobs.cli", "prepare", str(spec), "--workers", str(workers)],
                           cwd=ROOT, env=_env(), capture_output=True, text=True)
        wall = time.perf_counter() - t
        if p.returncode:
            raise SystemExit(p.stdout[-2000:] + p.stderr[-2000:])
        m = json.loads(next((cache / "prepared").glob("gen-*/manifest.json")).read_text())
        mbs = m["input_bytes"] / 1e6 / wall
        rows.append((workers, wall, mbs, mbs / workers / bare_mbs))
        print(f"moeforge prepare, {workers} worker(s): {wall:.1f}s wall (Ray start included) = {mbs:.2f} MB/s, "
              f"per core {mbs / workers / bare_mbs:.2f} of bare; {len(m['units'])} shards, "
              f"{m['train_tokens'] + m['holdout_tokens']} tokens", flush=True)
    print("\n| run | seconds | MB/s | per core / bare |\n|---|---|---|---|")
    print(f"| bare encode_batch, 1 thread | {bare['seconds']:.1f} | {bare_mbs:.2f} | 1 |")
    for w, wall, mbs, ratio in rows:
        print(f"| moeforge prepare, {w} worker{'s' if w > 1 else ''} | {wall:.1f} | {mbs:.2f} | {ratio:.2f} |")


def _spec(path: Path, tmp: Path, data: Path, cache: Path, tokenizer: str = "byte", steps: int = 6) -> Path:
    spec = {
        "run": {"name": path.stem, "output_dir": str(tmp / "runs"), "seed": 1},
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 2, "d_ff": 128, "moe_layers": "all",
                  "num_experts": 4, "top_k": 2, "d_expert": 64},
        "parallel": {"world_size": 2},
        "data": {"seq_len": 128, "cache_dir": str(cache), "sources": [{"name": "gen", "kind": "jsonl",
                                                                       "paths": [str(data)]}],
                 "tokenizer": {"kind": tokenizer, **({"vocab_size": 4096, "train_sample_bytes": 20 << 20}
                                                     if tokenizer == "bpe" else {})}},
        "stages": [{"name": "s", "steps": steps, "micro_batch_size": 4, "checkpoint_every": 1000, "eval_every": 0}],
        "metrics": {"progress_bar": False, "ray_metrics": False},
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_once(tree: Path, spec: Path, metrics: Path) -> dict:
    """Seconds to the first metrics line, and rank 0's peak RssAnon (MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(spec)], cwd=tree,
                            env={**_env(), "PYTHONPATH": str(tree)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    got: dict = {"peak_anon_mib": 0.0}
    pids: list[int] = []

    def watch():
        while proc.poll() is None:
            if "first_step" not in got and metrics.is_file() and metrics.stat().st_size:
                got["first_step"] = time.perf_counter() - t0
            for pid in list(pids):
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                m = re.search(r"RssAnon:\s+(\d+)", status)  # absent once the process is a zombie
                if m:
                    got["peak_anon_mib"] = max(got["peak_anon_mib"], int(m.group(1)) / 1024)
            time.sleep(0.05)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"rank 0 of \d+ \(pid (\d+)\)", line)
        if m:
            pids.append(int(m.group(1)))
    proc.wait()
    th.join(timeout=2)
    got["exit"] = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit("".join(lines[-40:]))
    if not pids:  # the old tree does not print the rank's pid: sample its Ray Train workers instead
        got["note"] = "no pid line"
    return got


def part2(tmp: Path, small: Path, large: Path, old_rev: str, old_large: bool, parts: set) -> None:
    rows = []
    for label, data in (("small", small), ("large", large)):
        cache = tmp / f"cache-run-{label}"
        spec = _spec(tmp / f"run-{label}.yaml", tmp, data, cache)
        p = subprocess.run([sys.executable, "-m", "jobs.cli", "prepare", str(spec)], cwd=ROOT, env=_env(),
                           capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(p.stdout[-2000:] + p.stderr[-2000:])
        for attempt in range(2):
            shutil.rmtree(tmp / "runs" / spec.stem, ignore_errors=True)
            r = run_once(ROOT, spec, tmp / "runs" / spec.stem / "metrics.jsonl")
            rows.append(("shards", label, data.stat().st_size / 1e6, r))
            print(f"prepared shards, {label} ({data.stat().st_size / 1e6:.0f} MB), run {attempt + 1}: first step "
                  f"{r.get('first_step', float('nan')):.1f}s, rank-0 peak private {r['peak_anon_mib']:.0f} MiB", flush=True)
    if 3 in parts:
        old = tmp / "old-tree"
        if not old.exists():
            subprocess.run(["git", "worktree", "add", "--detach", str(old), old_rev], cwd=ROOT, check=True,
                           capture_output=True)
        try:
            for label, data in (("small", small),) + ((("large", large),) if old_large else ()):
                cache = tmp / f"cache-old-{label}"
                spec = _spec(tmp / f"old-{label}.yaml", tmp, data, cache)
                for attempt in range(2):  # the first run tokenizes (cache miss), the second hits the cache
                    shutil.rmtree(tmp / "runs" / spec.stem, ignore_errors=True)
                    r = run_once(old, spec, tmp / "runs" / spec.stem / "metrics.jsonl")
                    rows.append((f"before ({old_rev})", label, data.stat().st_size / 1e6, r))
                    print(f"before ({old_rev}), {label}, run {attempt + 1} ({'cold' if attempt == 0 else 'warm'} cache): "
                          f"first step {r.get('first_step', float('nan')):.1f}s, rank-0 peak private "
                          f"{r['peak_anon_mib']:.0f} MiB {r.get('note', '')}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, capture_output=True)
    print("\n| data path | corpus | MB | first step (s) | rank-0 peak private MiB |\n|---|---|---|---|---|")
    for path, label, mb, r in rows:
        print(f"| {path} | {label} | {mb:.0f} | {r.get('first_step', float('nan')):.1f} | {r['peak_anon_mib']:.0f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--small-mb", type=float, default=100)
    ap.add_argument("--old-rev", default="2c51a40")
    ap.add_argument("--old-large", action="store_true")
    ap.add_argument("--parts", default="1,2,3")
    ap.add_argument("--data-dir", help="keep the generated corpora here (default: a temporary directory)")
    a = ap.parse_args(argv)
    parts = {int(x) for x in a.parts.split(",")}
    with tempfile.TemporaryDirectory(prefix="moeforge-bench-data-") as t:
        tmp = Path(t)
        data_dir = Path(a.data_dir) if a.data_dir else tmp
        data_dir.mkdir(parents=True, exist_ok=True)
        large = data_dir / f"gen-{a.gb:g}gb.jsonl"
        small = data_dir / f"gen-{a.small_mb:g}mb.jsonl"
        t0 = time.perf_counter()
        generate(large, int(a.gb * 1e9))
        generate(small, int(a.small_mb * 1e6), seed=1)
        print(f"corpora: {large.stat().st_size / 1e6:.0f} MB and {small.stat().st_size / 1e6:.0f} MB of JSON lines "
              f"({time.perf_counter() - t0:.0f}s to generate)", flush=True)
        if 1 in parts:
            part1(tmp, large)
        if 2 in parts or 3 in parts:
            part2(tmp, small, large, a.old_rev, a.old_large, parts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
