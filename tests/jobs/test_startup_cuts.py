"""Start-up cuts: DeepSpeed's JIT ops come from the venv's prebuilt folder (scripts/bootstrap.sh),
and MOEFORGE_STARTUP_TRACE's timestamps (bench/startup.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from parallel import dist as pdist

ROOT = Path(__file__).resolve().parents[2]


def test_prebuilt_ops_dir_used_when_set_up_built_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    for name in ("TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR"):
        # set, then removed: monkeypatch records the variable only when it exists, and only a
        # recorded one is put back (unset) after the test, not left pointing at tmp_path
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    pdist.configure_accelerator(False)
    assert "TORCH_EXTENSIONS_DIR" not in os.environ  # no prebuilt folder: torch's default

    (tmp_path / "torch_extensions").mkdir()
    pdist.configure_accelerator(False)
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "torch_extensions")
    assert os.environ["DS_ACCELERATOR"] == "cpu"


def test_explicit_torch_extensions_dir_wins(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    (tmp_path / "torch_extensions").mkdir()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/elsewhere")
    pdist.configure_accelerator(False)
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/elsewhere"


def test_bootstrap_builds_the_op_where_workers_look():
    text = (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert 'create_op_builder("ShareMemCommBuilder")' in text
    assert "DS_ACCELERATOR=cpu" in text and '/torch_extensions"' in text
    assert text.count("build_ops") >= 3  # defined, when the stamp matches and the op is missing, after installs


def test_startup_trace_only_when_asked(capsys, monkeypatch):
    monkeypatch.delenv(pdist.STARTUP_TRACE_ENV, raising=False)
    pdist.startup_trace("x")
    assert capsys.readouterr().out == ""
    monkeypatch.setenv(pdist.STARTUP_TRACE_ENV, "1")
    pdist.startup_trace("engine", at=12.5)
    assert capsys.readouterr().out == "[startup-trace] engine 12.500\n"


def test_every_process_builds_ops_with_the_venvs_ninja(tmp_path, monkeypatch):
    """Two ninja versions rewrite each other's build log and rebuild the op each time the other
    one ran: whatever PATH a process starts with (Ray workers, pytest's ranks), torch finds the
    venv's ninja first."""
    import shutil

    (tmp_path / "bin").mkdir()
    ninja = tmp_path / "bin" / "ninja"
    ninja.write_text("#!/bin/sh\n")
    ninja.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    pdist.configure_accelerator(False)
    assert shutil.which("ninja") == str(ninja) and os.environ["PATH"] == f"{tmp_path}/bin:/usr/bin:/bin"
    pdist.configure_accelerator(False)  # once only
    assert os.environ["PATH"] == f"{tmp_path}/bin:/usr/bin:/bin"
    ninja.unlink()  # no ninja of its own: PATH as it was
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    pdist.configure_accelerator(False)
    assert os.environ["PATH"] == "/usr/bin:/bin"
    text = (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert 'PATH="$(cd "$VENV" && pwd)/bin:$PATH" DS_ACCELERATOR=cpu' in text  # set-up builds with it too
