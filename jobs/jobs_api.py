"""`moeforge submit | status | logs`: a job spec on a Ray cluster through the Ray Jobs API.

`submit` resolves every relative path of the spec against the directory it runs in and ships the
resolved spec with the job (the job's working directory is a copy in Ray's temporary folder,
which disappears with the cluster: nothing may be written there). The job's driver first checks
that its Python can import the dependencies, then prints `READY`; `submit` waits for that line or
the job's failure, so a job that cannot start is reported by `submit` itself, in one line.
"""
from __future__ import annotations

import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from jobs.spec_source import SPEC_ENV, SPEC_SOURCE_ENV, load_job_spec
from jobs.user_errors import UserError

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
READY = "[moeforge] job driver ready:"  # printed by `run` once its imports succeeded
ARRIVAL_WAIT_S = 60.0
# `ray job stop` sends SIGTERM, then SIGKILL after this many seconds (Ray's default: 3): the
# driver asks every rank to checkpoint at the next step, which takes a step and a checkpoint.
STOP_GRACE_S = "60"


def address_of(args) -> str:
    return args.address or os.environ.get("RAY_ADDRESS") or DEFAULT_DASHBOARD


def client(address: str):
    import logging

    from ray.job_submission import JobSubmissionClient

    from jobs.user_errors import check_reachable

    check_reachable(address)
    for name in [n for n in logging.root.manager.loggerDict if n == "ray" or n.startswith("ray.")]:
        logging.getLogger(name).setLevel(logging.ERROR)  # not the upload's notices on stderr
    return JobSubmissionClient(address)


def job_spec_text(spec_path: str, output_dir: Optional[str]) -> tuple[str, str]:
    """The spec as the job will run it (every path absolute, against this directory) and its
    source label; validated here first (`moeforge validate`'s checks, files included)."""
    from jobs.spec import dump_spec, with_absolute_paths

    spec = load_job_spec(spec_path, output_dir)
    spec = with_absolute_paths(spec)
    return dump_spec(spec), f"{spec_path} (submitted from {socket.gethostname()}:{Path.cwd()})"


def cmd_submit(args) -> int:
    from jobs.orchestrate import REPO_ROOT, UPLOAD_EXCLUDES, worker_env

    text, source = job_spec_text(args.spec, args.output_dir)
    address = address_of(args)
    jobs = client(address)
    env_vars = {"RAY_JOB_STOP_WAIT_TIME_S": STOP_GRACE_S, **worker_env(), SPEC_ENV: text, SPEC_SOURCE_ENV: source}
    entry = f"{shlex.quote(args.python)} -m jobs.cli run env:{SPEC_ENV}"
    job_id = _submit(jobs, entry, {"working_dir": str(REPO_ROOT), "env_vars": env_vars,
                                   "excludes": UPLOAD_EXCLUDES})
    print(job_id, flush=True)
    state = wait_arrival(jobs, job_id, address)
    if args.wait:
        return follow(jobs, job_id)
    print(f"[moeforge] job {job_id}: {state}; follow it with `moeforge logs {job_id} -f --address {address}`",
          file=sys.stderr, flush=True)
    return 0


def _submit(jobs, entry: str, runtime_env: dict, patience_s: float = 30.0) -> str:
    """Submit, retrying while a just-started head has no job agent yet."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return jobs.submit_job(entrypoint=entry, runtime_env=runtime_env)
        except RuntimeError as e:
            if "No available agent" not in str(e):
                raise
            if time.monotonic() > deadline:
                raise UserError(f"the Ray head has no job agent ready after {patience_s:.0f} s (the dashboard "
                                f"agent did not start): check `ray status` on the head and its dashboard_agent.log") \
                    from None
            time.sleep(1.0)


def wait_arrival(jobs, job_id: str, address: str, timeout_s: float = ARRIVAL_WAIT_S) -> str:
    """Wait until the job's driver is ready (its imports worked) or the job ended; a job that
    failed on arrival raises UserError with its own error line."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while True:
        status = jobs.get_job_status(job_id)
        logs = jobs.get_job_logs(job_id) if status != JobStatus.PENDING else ""
        if status == JobStatus.FAILED:
            raise UserError(f"job {job_id} failed on arrival: {failure_line(logs, jobs, job_id)}")
        if status in (JobStatus.SUCCEEDED, JobStatus.STOPPED) or READY in logs:
            return "running" if status == JobStatus.RUNNING else str(status.value).lower()
        if time.monotonic() > deadline:
            return f"still {str(status.value).lower()} after {timeout_s:.0f} s (the cluster may be busy)"
        time.sleep(0.5)


def failure_line(logs: str, jobs=None, job_id: Optional[str] = None) -> str:
    """The line that says why a job failed: our own `error:` line, else the last line of a
    traceback, else Ray's message."""
    lines = [line.strip() for line in logs.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    if lines:
        return lines[-1]
    info = jobs.get_job_info(job_id) if jobs is not None else None
    return (info.message if info is not None and info.message else "no output (see `ray job logs`)")


def follow(jobs, job_id: str) -> int:
    import asyncio

    async def tail():
        async for lines in jobs.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    status = jobs.get_job_status(job_id)
    print(f"[moeforge] job {job_id}: {status.value}", flush=True)
    return 0 if status.value == "SUCCEEDED" else 1


def cmd_status(args) -> int:
    info = client(address_of(args)).get_job_info(args.job_id)
    print(f"{args.job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
    return 0


def cmd_logs(args) -> int:
    jobs = client(address_of(args))
    if args.follow:
        return follow(jobs, args.job_id)
    print(jobs.get_job_logs(args.job_id), end="")
    return 0


def add_commands(sub) -> None:
    s = sub.add_parser("submit", help="submit a job spec to a Ray cluster with the Ray Jobs API")
    s.add_argument("spec")
    s.add_argument("--address", help=f"Ray dashboard address (default: RAY_ADDRESS, else {DEFAULT_DASHBOARD})")
    s.add_argument("--output-dir", help="override run.output_dir (on a cluster: storage every node sees)")
    s.add_argument("--python", default="python",
                   help="the cluster's Python, with moeforge's dependencies (default: `python` on the PATH of "
                        "the environment Ray was started from)")
    s.add_argument("--wait", action="store_true",
                   help="follow the job's logs until it ends; exit 0 only if it succeeded")
    s.set_defaults(fn=cmd_submit)
    for name, fn, helptext in (("status", cmd_status, "a submitted job's status"),
                               ("logs", cmd_logs, "a submitted job's logs")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("job_id")
        c.add_argument("--address", help=f"Ray dashboard address (default: RAY_ADDRESS, else {DEFAULT_DASHBOARD})")
        if name == "logs":
            c.add_argument("--follow", "-f", action="store_true")
        c.set_defaults(fn=fn)
