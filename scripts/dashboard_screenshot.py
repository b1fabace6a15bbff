#!/usr/bin/env python
"""A screenshot of `moeforge dashboard`'s page for a run, taken in headless Chromium (how the
images in docs/img/ were made):

    python scripts/dashboard_screenshot.py runs/quickstart --out docs/img/dashboard-quickstart.png
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.infra.cdp import Chromium  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--width", type=int, default=1400)
    a = ap.parse_args(argv)
    run = Path(a.run_dir).absolute()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "jobs.cli", "dashboard", str(run), "--port", str(port)],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = server.stdout.readline()
        if "dashboard at" not in line:
            raise SystemExit(f"the dashboard did not start: {line}{server.stdout.read()}")

        async def shoot():
            async with Chromium(width=a.width) as page:
                await page.goto(f"http://127.0.0.1:{port}/")
                rid = await page.wait_for("document.querySelector('#runs tbody a') && "
                                          "document.querySelector('#runs tbody a').textContent", 30)
                await page.goto(f"http://127.0.0.1:{port}/run/{rid}")
                await page.wait_for("window.moeforge && window.moeforge.draws > 0", 30)
                await asyncio.sleep(1)
                await page.screenshot(Path(a.out))
                errors = page.console_errors()
                if errors:
                    raise SystemExit(f"the page logged errors: {errors}")

        asyncio.run(shoot())
        print(f"wrote {a.out}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
