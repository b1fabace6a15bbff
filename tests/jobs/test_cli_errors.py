"""Every command ends a user's mistake in one `error:` line naming the fix, exit code 2, never a
traceback. The cells that need no cluster run here, in process; the cluster cells (down, token
authentication, unknown job, a job failing on arrival) run as real commands against a real head in
tests/jobs/test_cluster_walkthrough.py."""
from __future__ import annotations

import pytest

from jobs.cli import EXIT_SPEC, main
from tests.helpers import tiny_spec, write_spec

SPEC_COMMANDS = (["validate"], ["run"], ["prepare", "--local"], ["submit", "--address", "http://127.0.0.1:9"])


def one_error_line(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == EXIT_SPEC, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("command", SPEC_COMMANDS, ids=lambda c: c[0])
def test_missing_spec_file(capsys, tmp_path, command):
    line = one_error_line(capsys, [command[0], str(tmp_path / "nope.yaml"), *command[1:]])
    assert "nope.yaml" in line and "does not exist" in line


@pytest.mark.parametrize("command", SPEC_COMMANDS, ids=lambda c: c[0])
def test_bad_spec(capsys, tmp_path, command):
    spec = tiny_spec(tmp_path)
    spec["stages"][0]["optimizer"] = {"lr": "fast"}
    path = write_spec(tmp_path / "bad.yaml", spec)
    line = one_error_line(capsys, [command[0], str(path), *command[1:]])
    assert f"{path}: stages[0].optimizer.lr:" in line and "'fast'" in line


def test_export_of_a_missing_run_dir(capsys, tmp_path):
    line = one_error_line(capsys, ["export", str(tmp_path / "runs" / "nope"), "--to", str(tmp_path / "hf")])
    assert "nope" in line
    assert not (tmp_path / "hf").exists()


def test_dashboard_of_a_missing_dir(capsys, tmp_path):
    line = one_error_line(capsys, ["dashboard", str(tmp_path / "nope")])
    assert "not a directory" in line and "nope" in line


@pytest.mark.parametrize("command", [["status", "raysubmit_x"], ["logs", "raysubmit_x"],
                                     ["submit", "SPEC"], ["run", "SPEC"], ["prepare", "SPEC"]],
                         ids=lambda c: c[0])
def test_cluster_down(capsys, tmp_path, command):
    """Nothing listens at the address: one line at once (Ray alone retries for minutes)."""
    from parallel.testing import free_port

    spec = str(write_spec(tmp_path / "ok.yaml", tiny_spec(tmp_path)))
    port = free_port()
    address = f"http://127.0.0.1:{port}" if command[0] in ("status", "logs", "submit") else f"127.0.0.1:{port}"
    argv = [spec if a == "SPEC" else a for a in command] + ["--address", address]
    line = one_error_line(capsys, argv)
    assert f"no Ray cluster answers at {address}" in line and "ray start --head" in line


def test_run_dir_that_cannot_be_written(capsys, tmp_path):
    """A file where the output directory should be: one line naming the field, before any Ray."""
    (tmp_path / "blocked").write_text("not a directory")
    spec = write_spec(tmp_path / "s.yaml", tiny_spec(tmp_path, run={"output_dir": str(tmp_path / "blocked")}))
    line = one_error_line(capsys, ["run", str(spec)])
    assert f"{spec}: run.output_dir: cannot write the run directory {tmp_path / 'blocked'}" in line
    assert (tmp_path / "blocked").read_text() == "not a directory"  # nothing lost
