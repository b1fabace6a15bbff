#!/usr/bin/env python
"""What the checkpoint manifest's checksums cost: CRC-32 (zlib, what moeforge records) against
writing the same bytes and against SHA-256 / BLAKE2b, on one file, same run.

    python bench/checkpoint_checksum.py [--mb 1024] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _hash(path: Path, h) -> str:
    with open(path, "rb") as f:
        while True:
            b = f.read(8 << 20)
            if not b:
                return h.hexdigest()
            h.update(b)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    a = ap.parse_args(argv)
    from system.checkpoint import file_checksum

    chunk = os.urandom(8 << 20)
    path = Path(a.dir) / "moeforge-checksum-bench.bin"
    try:
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            for _ in range(a.mb // 8):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        write = time.perf_counter() - t0
        rows = [("write + fsync", write)]
        for name, fn in (("crc32 (recorded)", lambda: file_checksum(path)),
                         ("sha256", lambda: _hash(path, hashlib.sha256())),
                         ("blake2b", lambda: _hash(path, hashlib.blake2b()))):
            t0 = time.perf_counter()
            fn()
            rows.append((name, time.perf_counter() - t0))
        size = path.stat().st_size / 2 ** 20
        print(f"{size:.0f} MiB file (page cache warm for the reads)")
        for name, t in rows:
            print(f"{name:18s} {t:7.2f} s {size / t:8.0f} MiB/s  {t / write:5.2f} x write")
    finally:
        path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
