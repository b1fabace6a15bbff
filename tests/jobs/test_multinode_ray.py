"""Two Ray nodes on one machine (two raylets on 127.0.0.1, `ray start` twice), 2 workers each:
one `moeforge run --address` job with a stage each for ep and fssdp with expert_parallel_size 2.
The ranks' nodes come from where Ray placed the workers (not from ranks_per_node, left at 8 here:
it would put all four ranks on one node), the expert-parallel
groups follow them (one group per node), and every stage ends with the losses of the same stage
on one process."""
from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from parallel import dist as pdist
from parallel.testing import run_distributed
from system.metrics import read_jsonl
from tests.helpers import tiny_spec, write_spec
from tests.ray_cluster import NO_LOG_MONITOR, private_ports, stop_cluster
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow
# Ray 2.5x turns token authentication on for `ray start --head` when ~/.ray/auth_token exists (an
# earlier local ray.init() may have written one) but not for the joining raylet, which is then
# refused. The test's cluster therefore states its mode and its own token to every process.
_TOKEN = secrets.token_hex(32)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    env["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = _TOKEN
    # Ray refuses a second raylet on a head started on a loopback address unless told it is wanted
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    return env


def _ray(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray2")
    port = pdist.free_port()
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--disable-usage-stats", *NO_LOG_MONITOR]
    head = _ray("start", "--head", "--port", str(port), "--temp-dir", str(tmp), "--include-dashboard", "false",
                *private_ports(), "--resources", '{"node_a": 2}', *common)
    assert head.returncode == 0, head.stdout + head.stderr
    try:
        worker = _ray("start", "--address", f"127.0.0.1:{port}", *private_ports(head=False),
                      "--resources", '{"node_b": 2}', *common)
        assert worker.returncode == 0, worker.stdout + worker.stderr
        probe = ("import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False); "
                 "print(sum(1 for n in ray.nodes() if n['Alive']))")
        wait_until(lambda: subprocess.run([sys.executable, "-c", probe, f"127.0.0.1:{port}"], env=_env(),
                                          capture_output=True, text=True, timeout=60).stdout.strip() == "2",
                   60, "both raylets registered (2 live Ray nodes)", every=1)
        yield f"127.0.0.1:{port}"
    finally:
        stop_cluster(str(tmp), port)  # these two raylets only: `ray stop` would stop the session's cluster too


# the expert-parallel layouts (replicated experts across nodes is DeepSpeed's data parallelism,
# which crosses no expert-parallel placement: its equality with one process is tested on one node)
STRATEGIES = (("ep", 2), ("fssdp", 2))


def _spec(tmp_path: Path, name: str, world: int) -> Path:
    """One job, a stage per strategy (each from its own seed, none from another): on 4 workers
    ep and fssdp with expert_parallel_size 2; on 1 process both replicated, on the same global
    batch and seeds (the reference)."""
    stages = []
    for strategy, P in STRATEGIES:
        stage = {"name": strategy, "steps": 4, "micro_batch_size": 8 // world, "optimizer": {"lr": 3e-3},
                 "lr_schedule": {"kind": "constant"}, "checkpoint_every": 4}
        if world > 1:
            stage["parallel"] = {"expert_strategy": strategy, **({"expert_parallel_size": P} if P else {})}
            if strategy == "fssdp":
                stage["parallel"]["fssdp"] = {"window": 1, "tolerance": 0.0, "memory_cap": 2, "reshard_every": 2}
        stages.append(stage)
    spec = tiny_spec(tmp_path, run={"name": name}, parallel={"world_size": world, "expert_strategy": "replicated"},
                     experts={"balancing": {"lbl": "none"}}, stages=stages)
    return write_spec(tmp_path / f"{name}.yaml", spec)


def _stage(rank: int, world: int, spec: dict, index: int) -> None:
    from jobs.stage_runner import run_stage

    run_stage(spec, index)


def _losses(run: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in read_jsonl(run / "metrics.jsonl"):
        if "loss" in r:
            out.setdefault(r["stage"], []).append(r["loss"])
    return out


def test_two_nodes_ep_dp_runs_match_one_process(tmp_path, two_nodes):
    # the reference: the same stages on one process (the stage runner every worker runs)
    ref_spec = yaml.safe_load(_spec(tmp_path, "ref", 1).read_text())
    for i in range(len(STRATEGIES)):
        run_distributed(_stage, 1, ref_spec, i)
    ref = _losses(tmp_path / "runs" / "ref")
    assert {k: len(v) for k, v in ref.items()} == {s: 4 for s, _ in STRATEGIES}
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(_spec(tmp_path, "two_nodes", 4)),
                          "--address", two_nodes], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    got = _losses(tmp_path / "runs" / "two_nodes")
    for strategy, _ in STRATEGIES:
        assert got[strategy] == pytest.approx(ref[strategy], rel=1e-5), strategy
    # ep and fssdp: Ray's placement puts two ranks on each node, and one expert-parallel group per node
    groups = re.findall(r"2 expert-parallel group\(s\) of 2 rank\(s\).*node of each rank (\[[0-9, ]+\])", log)
    assert groups == ["[0, 0, 1, 1]"] * 2, log[-4000:]
