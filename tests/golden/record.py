"""Golden loss curves: record (or check) the per-step metrics of a few real runs.

Each run is a real `moeforge run` (embedded Ray on 127.0.0.1, Ray Train workers, DeepSpeed on
gloo) of an example spec, shortened where the example is long. Every metric line is kept except
wall-clock figures; `--check` runs them again and requires every recorded number to be
identical (bit for bit: floats are compared with ==).

    .venv/bin/python tests/golden/record.py            # record tests/golden/cpu/<ISA>/<name>.json
    .venv/bin/python tests/golden/record.py --check    # run again, compare exactly
    .venv/bin/python tests/golden/record.py --check ep fssdp

Bit-for-bit floats depend on the CPU's vector instructions (PyTorch picks AVX-512 or AVX2
kernels: `torch.backends.cpu.get_cpu_capability()`), so curves are kept per capability under
`cpu/<capability>/`; `tests/golden/*.json` are the first ones, recorded before the architecture
refactor on the machine of that time. A set for another capability is recorded by running the
code of the commit the curves belong to (for the current ones: the commit before issue 16's
changes, 56a6d7f) on such a machine, so it still says what the code did then. Where no set
matches this CPU, the first set is compared within `TOLERANCE` (losses) instead of exactly.

Issue 27 changed one metric in every set: `lr` is now the rate of the step's own update (it was
the next update's). Each stage's values moved one step later, step 1 taking the schedule's first
rate; every other number is the recorded one.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WALL_CLOCK = ("time", "tokens_per_s", "step_time_s")
TOLERANCE = 2e-2  # relative, on loss/ce, when no curve was recorded on this CPU's capability
LOOSE_KEYS = ("loss", "ce")


def cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def golden_dir(capability: str | None = None) -> tuple[Path, bool]:
    """(where this CPU's curves are, whether they were recorded on its capability)."""
    d = HERE / "cpu" / (capability or cpu_capability())
    return (d, True) if d.is_dir() else (HERE, False)


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / "examples" / name).read_text())


def _quiet(spec: dict, name: str, out: Path) -> dict:
    spec = copy.deepcopy(spec)
    spec["run"] = {**spec.get("run", {}), "name": name, "output_dir": str(out)}
    spec["metrics"] = {**spec.get("metrics", {}), "progress_bar": False, "ray_metrics": False}
    return spec


def golden_specs(out: Path) -> dict[str, dict]:
    """name -> spec: the quickstart as shipped, and short ep, fssdp and pipeline runs."""
    qs = _load("quickstart.yaml")
    ep = copy.deepcopy(qs)
    ep["parallel"]["expert_strategy"] = "ep"
    ep["stages"][0].update(steps=16, checkpoint_every=8, eval_every=8, eval_batches=3)
    fs = _load("fssdp.yaml")
    fs["parallel"]["fssdp"].update(overlap_budget=2, reshard_every=6)  # a measured budget is not repeatable
    fs["stages"][0].update(steps=16, checkpoint_every=8, eval_every=8)
    pipe = _load("pipeline.yaml")
    for st in pipe["stages"]:
        st["steps"] = 10
        st["checkpoint_every"] = 5
        if st.get("eval_every"):
            st["eval_every"] = 5
        st.get("lr_schedule", {}).pop("decay_steps", None)
    return {name: _quiet(s, f"golden-{name}", out)
            for name, s in {"quickstart": qs, "ep": ep, "fssdp": fs, "pipeline": pipe}.items()}


def run_and_collect(name: str, spec: dict, out: Path) -> list[dict]:
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(path)], cwd=ROOT, env=env, check=True)
    recs = []
    for line in (out / spec["run"]["name"] / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        recs.append({k: v for k, v in r.items() if k not in WALL_CLOCK})
    return recs


# Metrics added after the golden files were recorded (the numerics guard's counters): absent
# from the golden lines, so not compared; every golden key still must match exactly.
ADDED_KEYS = {"step_skipped", "skipped_steps"}


def compare(name: str, want: list[dict], got: list[dict], exact: bool = True) -> list[str]:
    bad = []
    if len(want) != len(got):
        bad.append(f"{name}: {len(got)} metric lines, golden has {len(want)}")
    for i, (a, b) in enumerate(zip(want, got)):
        keys = sorted(set(a) | (set(b) - ADDED_KEYS))
        if not exact:  # another CPU: the step structure, and the losses within TOLERANCE
            keys = [k for k in keys if k in ("stage", "step") or k in LOOSE_KEYS or k.endswith("/loss")]
        for k in keys:
            if not exact and isinstance(a.get(k), float) and isinstance(b.get(k), float):
                if abs(a[k] - b[k]) <= TOLERANCE * abs(a[k]):
                    continue
            if a.get(k) != b.get(k):
                bad.append(f"{name} line {i} (stage {a.get('stage')} step {a.get('step')}) {k}: "
                           f"golden {a.get(k)!r} now {b.get(k)!r}")
    return bad


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="compare with the recorded curves")
    ap.add_argument("names", nargs="*")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="moeforge-golden-") as tmp:
        out = Path(tmp)
        specs = golden_specs(out)
        names = args.names or list(specs)
        problems = []
        where, exact = golden_dir()
        print(f"golden curves: {where.relative_to(ROOT)} ("
              + ("recorded on this CPU's capability" if exact else f"another CPU: losses within {TOLERANCE}") + ")")
        for name in names:
            got = run_and_collect(name, specs[name], out)
            if args.check:
                bad = compare(name, json.loads((where / f"{name}.json").read_text()), got, exact)
                ok = ("IDENTICAL" if exact else f"within {TOLERANCE}") if not bad else f"{len(bad)} differences"
                print(f"golden {name}: {len(got)} lines, {ok}")
                problems += bad
            else:
                f = HERE / "cpu" / cpu_capability() / f"{name}.json"
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(json.dumps(got, indent=0) + "\n")
                losses = [r["loss"] for r in got if "loss" in r]
                print(f"golden {name}: recorded {len(got)} lines, loss {losses[0]!r} -> {losses[-1]!r}")
        for p in problems[:40]:
            print("  " + p)
        return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
