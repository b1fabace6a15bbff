"""Shared test set-up: CPU DeepSpeed, a private data cache, Ray pinned to loopback."""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1
os.environ.setdefault("MOEFORGE_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / "moeforge-test-cache"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
