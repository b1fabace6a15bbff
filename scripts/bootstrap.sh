#!/usr/bin/env bash
# Create .venv and install moeforge with its dependencies. Idempotent: re-runs only when
# pyproject.toml or this script changed. torch comes first, as the CPU build on machines
# without an NVIDIA GPU, so that nothing later pulls CUDA wheels onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${MOEFORGE_VENV:-.venv}
TORCH_VERSION=${MOEFORGE_TORCH:-2.13.0}
# System packages the suite uses, installed when missing and this is a root shell with apt
# (otherwise the live tests that need one are skipped and say why; the alert-rule tests, which
# need prometheus's promtool, fail instead): Debian's prometheus
# (tests/infra/test_prometheus_live.py scrapes a live run with it, tests/infra/test_alert_rules.py
# runs promtool) and chromium
# (tests/infra/test_dashboard_browser.py drives `moeforge dashboard` in it, headless).
apt_install() {  # $1: command that shows it is there, $2: Debian package
  command -v "$1" >/dev/null 2>&1 && return 0
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 0
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -qq --no-install-recommends "$2" >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends "$2" >/dev/null 2>&1; }; } ||
    echo "bootstrap: could not install $2 (apt); the test that needs it will be skipped" >&2
}
apt_install prometheus prometheus
apt_install chromium chromium
# DeepSpeed's CPU communication op (deepspeed_shm_comm), which every CPU worker loads when
# DeepSpeed sets up its communication, is built here, once, into the venv (VENV/torch_extensions;
# parallel/dist.py points TORCH_EXTENSIONS_DIR there when that folder exists), instead of by the
# first `moeforge run` (about 40 s on 2 cores), and out of the per-user cache that every other
# checkout and venv of the same Python shares (a build with other paths there is rebuilt).
build_ops() {
  mkdir -p "$VENV/torch_extensions"
  # the venv's ninja, as every worker uses (parallel/dist.py use_own_ninja)
  PATH="$(cd "$VENV" && pwd)/bin:$PATH" DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$(cd "$VENV" && pwd)/torch_extensions" "$VENV/bin/python" -c '
from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)' >/dev/null ||
    echo "bootstrap: could not build DeepSpeed's shm op; the first run builds it" >&2
}
stamp="$VENV/.moeforge-installed"
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  [ -f "$VENV/torch_extensions/deepspeed_shm_comm/deepspeed_shm_comm.so" ] || build_ops
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade "pip>=23" setuptools wheel
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${pip[@]}" "torch==$TORCH_VERSION"
else
  # On the CPU machines this project targets, this version is a CPU build already on disk.
  "${pip[@]}" "torch==$TORCH_VERSION"
  "$VENV/bin/python" -c "import torch,sys; sys.exit(0 if not torch.version.cuda else 1)" || {
    echo "bootstrap: torch $TORCH_VERSION resolved to a CUDA build on a CPU machine; set MOEFORGE_TORCH" >&2
    exit 1; }
fi
# DeepSpeed ships as a source package whose setup imports torch: build it against ours.
DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation "deepspeed>=0.19,<0.20"
"${pip[@]}" -e ".[test]"
build_ops  # after every install: a changed torch or DeepSpeed needs it built again
echo "$want" > "$stamp"
