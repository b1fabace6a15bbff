"""The mistakes a user fixes, as one line each: every `moeforge` command ends them with that line on
stderr and exit code 2, never a traceback (`jobs.cli.main`).

`UserError` is raised by our own checks; `describe` also recognises what Ray raises when a cluster
is down, asks for token authentication, or does not know a job, and names the fix for each.
"""
from __future__ import annotations

import socket
from typing import Iterator, Optional
from urllib.parse import urlparse

AUTH_FIX = ("set RAY_AUTH_MODE=token and give the cluster's token as RAY_AUTH_TOKEN (or a file: "
            "~/.ray/auth_token, RAY_AUTH_TOKEN_PATH); on the head, `ray get-auth-token` prints it")


class UserError(Exception):
    """A problem the user fixes; the message is one line that names the fix."""


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def spec_lines(err) -> list[str]:
    """One line per problem of a spec, each naming the spec and the field."""
    return [f"{err.source}: {path}: {msg}" if path else f"{err.source}: {msg}" for path, msg in err.problems]


def describe(err: BaseException, address: Optional[str] = None) -> Optional[list[str]]:
    """The user-facing lines for `err`, or None when it is not a user's mistake (a bug: the
    traceback is then the useful report)."""
    from system.configtree import SpecError

    where = f" at {address}" if address else ""
    for e in _chain(err):
        if "InvalidAuthToken" in str(e):  # ray.init names the connection; the token is in the text
            return [f"the Ray cluster{where} requires token authentication: {AUTH_FIX}"]
        if isinstance(e, SpecError):
            return spec_lines(e)
        if isinstance(e, UserError):
            return [str(e)]
        if type(e).__name__ == "AuthenticationError":  # ray.exceptions.AuthenticationError
            low = str(e).lower()
            if "invalid" in low or ("incorrect" in low and "missing" not in low):
                return [f"the Ray cluster{where} refused this authentication token: {AUTH_FIX}"]
            return [f"the Ray cluster{where} requires token authentication: {AUTH_FIX}"]
    text = str(err)
    if "does not exist" in text and "Job " in text:  # the Jobs API's 404
        job = text.split("Job ", 1)[1].split(" does not exist", 1)[0]
        return [f"no job {job} on the Ray cluster{where} (`ray job list --address {address or 'ADDRESS'}` "
                f"lists its jobs)"]
    if isinstance(err, ConnectionError) or "Failed to connect to Ray" in text:
        return [f"no Ray cluster answers{where}: start one (`ray start --head`) or give its address "
                f"(--address or RAY_ADDRESS)"]
    return None


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast, in one line, when nothing listens at a cluster address (Ray itself retries
    for minutes). `auto` and `ray://` addresses are left to Ray."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise UserError(f"--address {address!r} is not HOST:PORT (the head's GCS port, 6379 by default) "
                        f"or http://HOST:PORT (its dashboard, 8265 by default)")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserError(f"no Ray cluster answers at {address} ({reason}): start one (`ray start --head`) "
                        f"or give its address (--address or RAY_ADDRESS)") from None


def check_gcs_auth(address: str) -> None:
    """A GCS address (HOST:PORT) that requires a token this process lacks fails here in about a
    second (ray.init retries for half a minute, then names the connection, not the token). Ray's
    private GcsClient is used only to ask; anything unexpected leaves the question to ray.init."""
    if "://" in address or address in ("auto", "local"):
        return
    import os

    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" and not token_available():
        # Ray's C++ client exits the process without a word in this case
        raise UserError(f"RAY_AUTH_MODE is token but this process has no token for the Ray cluster at {address}: "
                        f"{AUTH_FIX}")
    try:
        from ray._raylet import GcsClient
    except ImportError:
        return
    saved = os.dup(2)  # the C++ client logs its failure to stderr: the one-line error says it all
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        GcsClient(address=address)
    except Exception as e:
        if type(e).__name__ == "AuthenticationError":
            raise UserError(describe(e, address)[0]) from None
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def token_available() -> bool:
    """Whether Ray would find an authentication token (the places its client looks)."""
    import os
    from pathlib import Path

    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).is_file() if path else (Path.home() / ".ray" / "auth_token").is_file()
